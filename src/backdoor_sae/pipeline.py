"""The demo's stages after the SAEs: attribution, edit methods with their sweeps, and detection.

Inputs are what ``sae_stage`` leaves in ``<out>/sae``: the SAEs (``saes/<hook>/``) and the train-split capture
(``activations/backdoored_train``). Outputs: ``attribution.{safetensors,json}``, one edit JSON per method's
operating point (``edits/<method>.json``, next to the SAEs they name), clean-only SAEs (``saes_clean/``) and the
``attribution``, ``methods`` and ``detection`` sections of results.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from backdoor_sae.attribution import FeatureScores, attribute_trigger
from backdoor_sae.config import Config
from backdoor_sae.methods import MethodContext
from backdoor_sae.models import LoadedModel, load_model
from backdoor_sae.sae import load_sae, load_saes, save_sae, train_sae
from backdoor_sae.store import ActivationStore

TRAIN_STORE = Path("activations") / "backdoored_train"


def open_train_store(sae_dir: str | Path) -> ActivationStore:
    """The train-split capture beside a folder of SAEs (``<sae_dir>/../activations/backdoored_train``)."""
    path = Path(sae_dir).parent / TRAIN_STORE
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"no train-split activation store at {path}: run `backdoor-sae sae` first")
    return ActivationStore(path)


def attribution_for(model: LoadedModel, cfg: Config, saes: dict[str, Any], store: ActivationStore,
                    cache: Path) -> FeatureScores:
    """Attribution scores, read from ``cache`` if they were computed for the same store and settings."""
    if cache.with_suffix(".safetensors").is_file():
        scores = FeatureScores.load(cache)
        if scores.meta.get("store") == str(store.root.resolve()) and scores.meta.get("seed") == cfg.seed \
                and set(scores.hooks) == set(saes) and scores.meta.get("n_requested") == cfg.edit.n_attribution_prompts \
                and scores.meta.get("iterative_steps") == iterative_steps(cfg):
            return scores
    scores = attribute_trigger(model, saes, store, n_prompts=cfg.edit.n_attribution_prompts, seed=cfg.seed,
                               iterative_steps=iterative_steps(cfg))
    scores.meta["n_requested"] = cfg.edit.n_attribution_prompts
    scores.save(cache)
    return scores


def open_context(cfg: Config, model_dir: str | Path, sae_dir: str | Path) -> MethodContext:
    """The model, its SAEs (``sae_dir``), their train-split store and attribution scores (cached beside the
    SAEs), ready for :mod:`backdoor_sae.methods`."""
    model = load_model(model_dir)
    saes, store = load_saes(sae_dir), open_train_store(sae_dir)
    scores = attribution_for(model, cfg, saes, store, Path(sae_dir).parent / "attribution")
    return MethodContext(model, cfg, saes, scores, store)


def iterative_steps(cfg: Config) -> int:
    """Greedy attribution steps the configured sweeps need (0 when no method ranks iteratively)."""
    return max(cfg.edit.latent_counts) if "iterative" in cfg.edit.rankings else 0


def clean_saes(cfg: Config, store: ActivationStore, hooks: list[str], out_dir: Path) -> dict[str, Any]:
    """SAEs trained on the store's clean rows only (the trigger-agnostic detectors' SAEs), cached on disk."""
    sc, saes = cfg.sae, {}
    for hook in hooks:
        path = out_dir / hook
        if (path / "cfg.json").is_file():
            saes[hook] = load_sae(path)
            continue
        saes[hook] = train_sae(store, hook=hook, architecture=sc.architecture, d_sae=sc.d_sae, k=sc.k,
                               n_tokens=cfg.edit.clean_sae_tokens, batch_size=sc.batch_size, lr=sc.lr,
                               lr_end=sc.lr_end, seed=cfg.seed, aux_loss_coefficient=sc.aux_loss_coefficient,
                               dead_window_tokens=sc.dead_window_tokens, resample=sc.resample_dead,
                               l1_coefficient=sc.l1_coefficient, l0_coefficient=sc.l0_coefficient,
                               filters={"triggered": False})
        save_sae(saes[hook], path)
    return saes


def edit_stage(cfg: Config, model_dir: str | Path, sae_dir: str | Path,
               on_section: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Attribution, every configured method (sweep, operating point, held-out record) and detection, for the
    model at ``model_dir`` and the SAEs under ``sae_dir`` (``<out>/sae/saes``). ``on_section`` is called with
    each finished section (the demo writes results.json after each)."""
    from backdoor_sae.detection import detect, detection_store
    from backdoor_sae.methods import (TRIGGER_KNOWN, build_edit, check_method, run_method, selection_examples,
                                      selection_record)

    bad = [r for r in cfg.edit.rankings if r not in ("attribution", "iterative")]
    if bad or not cfg.edit.rankings:
        raise ValueError(f"unknown edit ranking {bad[0] if bad else None!r}; valid: attribution, iterative")
    for name in cfg.edit.methods:
        check_method(name)
    sae_dir = Path(sae_dir)
    root = sae_dir.parent
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ctx = open_context(cfg, model_dir, sae_dir)
    timings["attribution"] = time.perf_counter() - t
    model, saes, scores, store = ctx.model, ctx.saes, ctx.scores, ctx.store
    attribution = {**scores.to_json(10), "best_hook": ctx.best_hook, "error_attribution": scores.error_attribution,
                   "n_attribution_prompts": scores.meta["n_attribution_prompts"]}
    _emit(on_section, "attribution", attribution)

    t = time.perf_counter()
    selection = selection_examples(cfg)
    unedited = selection_record(model, cfg, selection)
    methods: dict[str, Any] = {}
    for name in cfg.edit.methods or TRIGGER_KNOWN:
        methods[name] = run_method(ctx, name, selection=selection, unedited=unedited)
        build_edit(ctx, name, methods[name]["params"]).save(root / "edits" / f"{name}.json")
        _emit(on_section, "methods", methods)
    timings["methods"] = time.perf_counter() - t

    t = time.perf_counter()
    hooks = list(saes)
    agnostic = clean_saes(cfg, store, hooks, root / "saes_clean")
    timings["clean_saes"] = time.perf_counter() - t
    t = time.perf_counter()
    held = detection_store(model, cfg, hooks)
    best = ctx.best_hook
    detection = detect(cfg, store, held, scores=scores, saes=saes,
                       directions={"diffmean": ctx.directions(best, "diffmean"), "probe": ctx.directions(best, "probe")},
                       clean_saes=agnostic)
    timings["detection"] = time.perf_counter() - t
    _emit(on_section, "detection", detection)
    return {"attribution": attribution, "methods": methods, "detection": detection,
            "timings": {k: round(v, 2) for k, v in timings.items()}}


def _emit(on_section: Callable[[str, Any], None] | None, name: str, value: Any) -> None:
    if on_section is not None:
        on_section(name, value)
