"""Trigger-agnostic methods ("keep what is good"), their sweeps and their operating-point rule.

``sae_keep_trusted`` keeps the latents active on clean data (optionally intersected or united with the latents that
match an SAE of the base model), ``sae_keep_reward`` the latents most correlated with a reward on clean sampled
completions, ``sae_learned_mask`` the latents a hard-concrete mask trained on clean data keeps, and ``pca_keep``
the top principal components of clean activations of base + backdoored models; everything else is zeroed. Nothing
here reads the trigger, the backdoor text or a triggered row: the SAEs are trained on the store's clean rows
(``sae_data = "clean"``), every statistic goes through :data:`backdoor_sae.methods.keeping.CLEAN`. The same SAE
methods also run with the mixed-data SAEs of the SAE stage (``<name>_mixed``, ``trigger_agnostic: false``: those
SAEs saw triggered activations) so the cost of the defender's restriction is visible.

Operating point, fixed before any held-out number was read: the most aggressive point (fewest latents or
components kept) whose clean task accuracy on **train-split** prompts is within ``keep.accuracy_tolerance`` of
the unedited model's; no triggered prompt is read (not even train-split ones). If no point keeps clean accuracy,
the most accurate point is reported with ``constraint_met: false``. With ``eval.max_train_kl`` > 0 the
constraint also bounds ``kl_train`` (:func:`backdoor_sae.methods.trigger_known.capable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from backdoor_sae.capture.store import ActivationStore
from backdoor_sae.config import Config
from backdoor_sae.edits.masks import LearnedMask, learn_mask, mask_edit
from backdoor_sae.edits.specs import Edit
from backdoor_sae.methods.keeping import (PCABasis, active_on_clean, base_matched, combine, keep_edit, latent_frequency,
                                          pca_keep_edit, reward_correlated)
from backdoor_sae.methods.selection import pick_capable, run_sweep
from backdoor_sae.models import LoadedModel
from backdoor_sae.organism.tasks import Example

AGNOSTIC = ("sae_keep_trusted", "sae_keep_reward", "sae_learned_mask", "pca_keep")
SAE_AGNOSTIC = AGNOSTIC[:3]


@dataclass
class KeepContext:
    """What the trigger-agnostic methods are fit from. ``saes``: one per hook (clean-only for the agnostic
    methods); ``store``: the train-split capture, read through its clean rows only; ``base_saes``: SAEs of the
    base model; ``reward``: per hook, each latent's reward correlation (``RewardScores.correlation``);
    ``pca``: per hook, the clean PCA basis; ``mask_data``: clean token sequences for learned masks."""

    model: LoadedModel
    cfg: Config
    saes: dict[str, Any]
    store: ActivationStore
    base_saes: dict[str, Any] | None = None
    reward: dict[str, Any] | None = None
    pca: dict[str, PCABasis] | None = None
    mask_data: list[Any] | None = None
    base: LoadedModel | None = None  # the unbackdoored model, when there is one: records add agreement_with_base
    _freq: dict[str, Any] = field(default_factory=dict)
    _masks: dict[tuple[float, bool], LearnedMask] = field(default_factory=dict)

    def frequency(self, hook: str) -> Any:
        if hook not in self._freq:
            self._freq[hook] = latent_frequency(self.saes[hook], self.store, hook)
        return self._freq[hook]

    def mask(self, sparsity: float, error_term: bool) -> LearnedMask:
        kc = self.cfg.keep
        key = (sparsity, error_term)
        if key not in self._masks:
            if not self.mask_data:
                raise ValueError("sae_learned_mask needs clean mask data (KeepContext.mask_data)")
            self._masks[key] = learn_mask(self.model, self.saes, self.mask_data, sparsity=sparsity,
                                          error_term=error_term, steps=kc.mask_steps, batch_size=kc.mask_batch_size,
                                          lr=kc.mask_lr, seed=self.cfg.seed)
        return self._masks[key]

    def trusted(self, p: dict[str, Any]) -> dict[str, list[int]]:
        """Per hook, the trusted latents of a ``sae_keep_trusted`` / ``sae_keep_reward`` point."""
        out = {}
        for h in self.saes:
            if "fraction" in p:
                if self.reward is None:
                    raise ValueError("sae_keep_reward needs reward correlations (KeepContext.reward)")
                base = reward_correlated(self.reward[h], p["fraction"])
            else:
                base = active_on_clean(self.frequency(h), p["threshold"])
            matched = None
            if p.get("base", "none") != "none":
                if self.base_saes is None:
                    raise ValueError("a base combination needs SAEs of the base model (KeepContext.base_saes)")
                matched = base_matched(self.saes[h], self.base_saes[h], self.cfg.keep.base_match_cosine)
            out[h] = combine(base, matched, p.get("base", "none"))
        return out  # an empty set is refused by the keep edit (FeatureEdit), naming the hook


def _keep(ctx: KeepContext, p: dict[str, Any]) -> Edit:
    return keep_edit({h: (ctx.saes[h], lat) for h, lat in ctx.trusted(p).items()}, keep_error=p["keep_error"])


def _mask(ctx: KeepContext, p: dict[str, Any]) -> Edit:
    return mask_edit(ctx.mask(p["sparsity"], p["keep_error"]), ctx.saes)


def _pca(ctx: KeepContext, p: dict[str, Any]) -> Edit:
    if ctx.pca is None:
        raise ValueError("pca_keep needs clean PCA bases (KeepContext.pca)")
    return pca_keep_edit(ctx.pca, p["k"])


BUILDERS: dict[str, Callable[[KeepContext, dict[str, Any]], Edit]] = {
    "sae_keep_trusted": _keep, "sae_keep_reward": _keep, "sae_learned_mask": _mask, "pca_keep": _pca}


def check_agnostic(name: str) -> None:
    if name not in BUILDERS:
        raise ValueError(f"unknown trigger-agnostic method {name!r}; valid: {', '.join(AGNOSTIC)}")


def sweep_points(cfg: Config, name: str) -> list[dict[str, Any]]:
    """The configured sweep of a trigger-agnostic method. Without the error term every setting is swept;
    with it (where a keep edit can hardly act, docs/keep.md) the least and the most aggressive settings, and for
    masks only the most aggressive (at the least a mask keeps ~99 % of latents: with the error term, the
    unedited model; each mask point costs a training)."""
    kc = cfg.keep
    errors = list(dict.fromkeys(kc.keep_error))

    def with_error(key: str, values: tuple[Any, ...], ends: tuple[int, ...] = (0, -1),
                   **extra: Any) -> list[dict[str, Any]]:
        pts = [{key: v, **extra, "keep_error": False} for v in values] if False in errors else []
        if True in errors:
            pts += [{key: v, **extra, "keep_error": True} for v in dict.fromkeys(values[i] for i in ends)]
        return pts

    if name == "sae_keep_trusted":
        pts = with_error("threshold", kc.active_thresholds, base="none")
        return pts + [{"threshold": t, "base": b, "keep_error": False} for b in kc.base_combinations
                      for t in kc.active_thresholds]
    if name == "sae_keep_reward":
        return with_error("fraction", kc.reward_fractions)
    if name == "sae_learned_mask":
        return with_error("sparsity", kc.mask_sparsities, ends=(-1,))
    return [{"k": k} for k in kc.pca_components]


def kept_rule(tolerance: float,
              max_kl: float = 0.0) -> Callable[[list[dict[str, Any]], dict[str, float]], tuple[int, bool]]:
    """The agnostic operating-point rule (module doc): reads train-split clean records and the kept count."""

    def pick(sweep: list[dict[str, Any]], unedited: dict[str, float]) -> tuple[int, bool]:
        return pick_capable(sweep, unedited, tolerance, max_kl, lambda ok: min(
            ok, key=lambda i: (sweep[i].get("n_kept", 0), -sweep[i]["train"]["task_accuracy"])))

    return pick


def run_agnostic(ctx: KeepContext, name: str, *, selection: list[Example] | None = None,
                 unedited: dict[str, float] | None = None, points: list[dict[str, Any]] | None = None,
                 sae_data: str = "clean") -> dict[str, Any]:
    """Sweep one trigger-agnostic method and pick its point by :func:`kept_rule`. ``sae_data``: ``clean`` (the
    SAEs saw clean rows only: ``trigger_agnostic`` true) or ``mixed`` (they saw triggered rows too: false)."""
    check_agnostic(name)
    rec = run_sweep(ctx.model, ctx.cfg, points if points is not None else sweep_points(ctx.cfg, name),
                    lambda p: BUILDERS[name](ctx, p),
                    pick=kept_rule(ctx.cfg.keep.accuracy_tolerance, ctx.cfg.eval.max_train_kl),
                    selection=selection, unedited=unedited, trigger_known=False, base=ctx.base,
                    heldout_sweep=ctx.cfg.edit.heldout_sweep)
    extra: dict[str, Any] = {"trigger_agnostic": sae_data == "clean" or name == "pca_keep",
                             "sae_data": None if name == "pca_keep" else sae_data}
    if name == "sae_learned_mask":
        extra["masks"] = [{"sparsity": s, "keep_error": e, **m.meta} for (s, e), m in ctx._masks.items()]
    return {**rec, **extra}
