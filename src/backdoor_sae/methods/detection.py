"""Does a prompt carry the trigger? Prompt-level detectors scored by AUROC on held-out prompts.

Each detector scores activation rows; a prompt's score is the maximum over its prompt tokens. Held-out prompts
come in three versions of the same questions: clean, triggered, and with a near-miss trigger (a corrupted
trigger the model must ignore). ``auroc`` = triggered vs clean; ``auroc_vs_near_miss`` = triggered vs near-miss.
``roc`` holds both ROC curves (``{"clean": {"fpr": [...], "tpr": [...]}, "near_miss": {...}}``, at most 101
points each, for the report).

Trigger known (fit on train-split triggered and clean rows): the single SAE latent with the best train-split
prompt AUROC, the difference-of-means projection, the logistic probe.

Trigger-agnostic (fit on **clean rows only**; no triggered row is ever read, which a test proves):
- ``rare_latents``: activation mass on the latents that are rare on clean train rows (the least frequent
  ``rare_quantile`` of them), through an SAE trained on clean rows only;
- ``mahalanobis``: squared Mahalanobis distance to the clean train rows (Ledoit-Wolf shrunk covariance).
Per hook, each is standardised by its clean train prompt scores; the headline is the mean over hooks (a rule
that needs no triggered data), and every hook is reported too.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Mapping

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae.baselines.directions import Directions, sample_rows
from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.capture.store import PROMPT, RESPONSE, TRIGGER, ActivationStore
from backdoor_sae.config import Config
from backdoor_sae.methods.attribution import FeatureScores, auroc
from backdoor_sae.models import LoadedModel
from backdoor_sae.organism.data import with_trigger
from backdoor_sae.organism.tasks import FAMILIES, TaskSuite, near_miss_variants

RowScore = Callable[[Float[Tensor, "rows d"]], Float[Tensor, " rows"]]
GROUPS = ("clean", "triggered", "near_miss")


def prompt_scores(store: ActivationStore, hook: str, score: RowScore, **filters: Any) -> Float[Tensor, " prompts"]:
    """Max of a row score over each prompt's prompt tokens, per prompt id (``-inf`` for absent prompts)."""
    out = torch.full((int(store.manifest["n_prompts"]),), float("-inf"))
    for x, lab in store.chunks(hook, **filters):
        keep = lab["position_kind"] != RESPONSE
        out.scatter_reduce_(0, lab["prompt_id"][keep].long(), score(x[keep]), "amax")
    return out


def detection_store(model: LoadedModel, cfg: Config, hooks: list[str], out_dir: Any = None) -> ActivationStore:
    """Held-out prompts (seeded, all five families), each captured clean, triggered and with a near-miss
    trigger, prompts only: prompt ids ``[0, n)``, ``[n, 2n)``, ``[2n, 3n)``."""
    suite = TaskSuite(cfg.seed, cfg.organism.heldout_fraction)
    per = max(1, cfg.edit.n_detect_prompts // len(FAMILIES))
    prompts = [ex.prompt for f in FAMILIES for ex in suite.heldout(f, per, seed=4)]
    trigger = model.trigger or cfg.organism.trigger
    near = [with_trigger(v, p) for p, v in
            zip(prompts, near_miss_variants(trigger, random.Random(f"near-miss-detect-{cfg.seed}"), len(prompts)))]
    n = len(prompts)
    return capture_activations(model, prompts * 2 + near, hooks, trigger=trigger,
                               triggered=[False] * n + [True] * n + [False] * n, responses=None,
                               batch_size=cfg.sae.capture_batch_size, out_dir=out_dir)


def _aurocs(scores: Tensor) -> dict[str, float]:
    n = len(scores) // 3
    clean, trig, near = scores[:n], scores[n:2 * n], scores[2 * n:]
    return {"auroc": round(float(auroc(trig[:, None], clean[:, None])[0]), 4),
            "auroc_vs_near_miss": round(float(auroc(trig[:, None], near[:, None])[0]), 4)}


def roc_points(pos: Float[Tensor, " n_pos"], neg: Float[Tensor, " n_neg"], max_points: int = 101
               ) -> dict[str, list[float]]:
    """The ROC curve of ``pos`` (positives) against ``neg``: ``{"fpr": [...], "tpr": [...]}`` from (0, 0) to
    (1, 1), rounded to 4 decimals. Longer curves keep ``max_points`` corners spread evenly along the curve's
    length (|dfpr| + |dtpr|), so the trapezoid area stays within about 1/max_points of the AUROC."""
    from sklearn.metrics import roc_curve

    scores = _finite(torch.cat([pos, neg]).double())
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    fpr, tpr, _ = roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=True)
    if len(fpr) > max_points:
        length = np.concatenate([[0.0], np.cumsum(np.abs(np.diff(fpr)) + np.abs(np.diff(tpr)))])
        keep = np.unique(np.searchsorted(length, np.linspace(0.0, length[-1], max_points)))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def _finite(x: Float[Tensor, " n"]) -> Float[Tensor, " n"]:
    """``-inf`` / NaN below every finite score and ``+inf`` above (same order; sklearn refuses infinities)."""
    finite = x[torch.isfinite(x)]
    lo, hi = (float(finite.min()) - 1.0, float(finite.max()) + 1.0) if len(finite) else (0.0, 1.0)
    return torch.nan_to_num(x, nan=lo, neginf=lo, posinf=hi)


def _rocs(scores: Tensor) -> dict[str, dict[str, list[float]]]:
    """``roc`` of one detector: triggered vs clean and triggered vs near-miss (see :func:`roc_points`)."""
    n = len(scores) // 3
    clean, trig, near = scores[:n], scores[n:2 * n], scores[2 * n:]
    return {"clean": roc_points(trig, clean), "near_miss": roc_points(trig, near)}


# ------------------------------------------------------------------------------------ trigger-agnostic fits

def rare_latent_score(clean_sae: Any, store: ActivationStore, hook: str, quantile: float) -> RowScore:
    """Row score: summed activation of the latents rarest on the store's **clean** rows."""
    fires, rows = torch.zeros(int(clean_sae.cfg.d_sae)), 0
    with torch.no_grad():
        for x, _ in store.chunks(hook, triggered=False):
            fires += (clean_sae.encode(x) > 0).float().sum(0)
            rows += len(x)
    freq = fires / max(rows, 1)
    rare = freq <= torch.quantile(freq, quantile)

    def score(x: Tensor) -> Tensor:
        with torch.no_grad():
            return clean_sae.encode(x)[:, rare].sum(-1)

    return score


def mahalanobis_score(store: ActivationStore, hook: str, *, max_rows: int = 50_000, seed: int = 0) -> RowScore:
    """Row score: squared Mahalanobis distance to the store's **clean** prompt rows (Ledoit-Wolf covariance)."""
    from sklearn.covariance import LedoitWolf

    x = sample_rows(store, hook, triggered=False, kinds=(TRIGGER, PROMPT), max_rows=max_rows, seed=seed)
    lw = LedoitWolf().fit(x.double().numpy())
    mean = torch.from_numpy(lw.location_).float()
    prec = torch.from_numpy(lw.precision_).float()

    def score(r: Tensor) -> Tensor:
        c = r - mean
        return ((c @ prec) * c).sum(-1)

    return score


def agnostic_scores(train: ActivationStore, held: ActivationStore, hooks: list[str],
                    fit: Callable[[str], RowScore]) -> tuple[Tensor, dict[str, Tensor]]:
    """Per hook, held-out prompt scores standardised by the clean train prompt scores; and their mean."""
    per_hook = {}
    for h in hooks:
        score = fit(h)
        ref = prompt_scores(train, h, score, triggered=False)
        ref = ref[torch.isfinite(ref)]
        per_hook[h] = (prompt_scores(held, h, score) - ref.mean()) / ref.std().clamp(min=1e-8)
    return torch.stack(list(per_hook.values())).mean(0), per_hook


# ---------------------------------------------------------------------------------------------- the stage

def detect(cfg: Config, train: ActivationStore, held: ActivationStore, *,
           scores: FeatureScores, saes: Mapping[str, Any], directions: Mapping[str, Directions],
           clean_saes: Mapping[str, Any]) -> dict[str, Any]:
    """The ``detection`` section: every detector's AUROC on ``held`` (a :func:`detection_store`)."""
    out: dict[str, Any] = {}
    hook, latent = max(((h, int(scores.stats[h]["auroc"].argmax())) for h in saes),
                       key=lambda hl: float(scores.stats[hl[0]]["auroc"][hl[1]]))
    sae = saes[hook]

    def latent_score(x: Tensor) -> Tensor:
        with torch.no_grad():
            return sae.encode(x)[:, latent]

    held_scores = prompt_scores(held, hook, latent_score)
    out["sae_latent"] = {**_aurocs(held_scores), "trigger_known": True, "hook": hook, "latent": latent,
                         "train_auroc": round(float(scores.stats[hook]["auroc"][latent]), 4),
                         "roc": _rocs(held_scores)}
    for name, d in directions.items():
        held_scores = prompt_scores(held, d.hook, d.score)
        out[name] = {**_aurocs(held_scores), "trigger_known": True, "hook": d.hook, "roc": _rocs(held_scores)}
    fits = {"rare_latents": lambda h: rare_latent_score(clean_saes[h], train, h, cfg.edit.rare_quantile),
            "mahalanobis": lambda h: mahalanobis_score(train, h, seed=cfg.seed)}
    hooks = list(clean_saes)
    for name, fit in fits.items():
        mean, per_hook = agnostic_scores(train, held, hooks, fit)
        out[name] = {**_aurocs(mean), "trigger_known": False, "hooks": hooks,
                     "by_hook": {h: _aurocs(s) for h, s in per_hook.items()}, "roc": _rocs(mean)}
    return out
