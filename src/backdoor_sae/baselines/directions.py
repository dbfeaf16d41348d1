"""Direction baselines in the residual stream (trigger known), each fit on train-split activations.

- ``diffmean``: mean of triggered rows minus mean of clean rows.
- ``pca`` (the RepE recipe, Zou et al. 2023): triggered and clean rows paired at random, the differences signed
  at random, scikit-learn's PCA on them; the top ``k`` components, each oriented so the triggered mean lies on
  its positive side.
- ``probe``: scikit-learn logistic regression (triggered vs clean) on standardised rows; the weight vector mapped
  back to raw coordinates.

Rows are the *non-trigger* prompt tokens (position kind 1) by default: the tokens that carry what the model
read from the trigger, not the trigger's own embedding. Every direction keeps the clean mean as its
``center``, so ``project`` sets the projection to its clean value instead of to zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae.capture.store import PROMPT, TRIGGER, ActivationStore

METHODS = ("diffmean", "pca", "probe")
ROWS = {"prompt": (PROMPT,), "prompt_and_trigger": (TRIGGER, PROMPT)}


@dataclass(frozen=True, eq=False)
class Directions:
    """``vectors`` ``[k, d]`` at ``hook`` (diffmean: the raw difference, so ``steer`` with alpha -1 removes it;
    pca / probe: unit vectors), the clean mean ``center``, and method details (probe intercept, accuracy)."""

    hook: str
    vectors: Float[Tensor, "k d"]
    center: Float[Tensor, " d"]
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def score(self, x: Float[Tensor, "rows d"]) -> Float[Tensor, " rows"]:
        """Detection score of rows: the probe's logit, or the projection on the first (unit) direction."""
        if self.method == "probe":
            return x @ self.vectors[0] * self.info["weight_norm"] + self.info["intercept"]
        return x @ (self.vectors[0] / self.vectors[0].norm())


def sample_rows(store: ActivationStore, hook: str, *, triggered: bool, kinds: Sequence[int], max_rows: int,
                seed: int) -> Float[Tensor, "rows d"]:
    """At most ``max_rows`` rows (seeded, uniform) of one hook with the given trigger flag and position kinds,
    streamed shard by shard."""
    n = int(store.mask(triggered=triggered, position_kind=list(kinds)).sum())
    keep = min(1.0, max_rows / n)
    gen = torch.Generator().manual_seed(seed)
    parts = [x[torch.rand(len(x), generator=gen) < keep] if keep < 1 else x
             for x, _ in store.chunks(hook, triggered=triggered, position_kind=list(kinds))]
    return torch.cat(parts)


def fit_directions(store: ActivationStore, hook: str, method: str = "diffmean", *, k: int = 1,
                   rows: str = "prompt", max_rows: int = 50_000, seed: int = 0) -> Directions:
    """Fit one baseline direction set at ``hook`` on the store's (train-split) triggered and clean rows."""
    if method not in METHODS:
        raise ValueError(f"unknown direction method {method!r}; valid: {', '.join(METHODS)}")
    if rows not in ROWS:
        raise ValueError(f"unknown rows {rows!r}; valid: {', '.join(ROWS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    trig = sample_rows(store, hook, triggered=True, kinds=ROWS[rows], max_rows=max_rows, seed=seed)
    clean = sample_rows(store, hook, triggered=False, kinds=ROWS[rows], max_rows=max_rows, seed=seed + 1)
    diff = trig.mean(0) - clean.mean(0)
    info: dict[str, Any] = {"rows": rows, "n_triggered": len(trig), "n_clean": len(clean)}
    if method == "diffmean":
        vectors = diff[None]
    elif method == "pca":
        vectors = _pca(trig, clean, diff, k, seed)
    else:
        vectors, extra = _probe(trig, clean, seed)
        info.update(extra)
    return Directions(hook, vectors.float(), clean.mean(0).float(), method, info)


def _pca(trig: Tensor, clean: Tensor, diff: Tensor, k: int, seed: int) -> Tensor:
    from sklearn.decomposition import PCA

    n = min(len(trig), len(clean))
    gen = torch.Generator().manual_seed(seed)
    pairs = trig[torch.randperm(len(trig), generator=gen)[:n]] - clean[torch.randperm(len(clean), generator=gen)[:n]]
    signs = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    pca = PCA(n_components=min(k, n, pairs.shape[1]), random_state=seed).fit((pairs * signs[:, None]).numpy())
    comps = torch.from_numpy(pca.components_).float()
    return comps * torch.where(comps @ diff >= 0, 1.0, -1.0)[:, None]


def _probe(trig: Tensor, clean: Tensor, seed: int) -> tuple[Tensor, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = torch.cat([trig, clean]).numpy()
    y = [1] * len(trig) + [0] * len(clean)
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(scaler.transform(x), y)
    w = torch.from_numpy(clf.coef_[0] / scaler.scale_).float()  # logit = w . x + b in raw coordinates
    b = float(clf.intercept_[0] - (clf.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    acc = float(clf.score(scaler.transform(x), y))
    return (w / w.norm())[None], {"intercept": b, "weight_norm": float(w.norm()), "train_accuracy": round(acc, 4)}
