"""Keep what is good: trusted latent sets chosen without the trigger, and the keep edits built from them.

"Keep what is good rather than edit what is bad": a defender who does not know the trigger keeps the features
that matter for good behaviour and zeroes the rest. Every trusted set here is computed from **clean** data only
(rows of an activation store whose ``triggered`` label is false, a reward model trained on clean pairs, a model
that never saw the trigger): pass stores through :func:`clean_rows` filters and nothing triggered is read, which
``tests/test_keeping.py`` proves by removing every triggered row and getting the same sets.

- :func:`active_on_clean`: latents whose firing frequency on clean rows exceeds a threshold.
- :func:`reward_correlated`: the share of latents most positively correlated with reward (``RewardScores``).
- :func:`base_matched`: latents whose decoder direction has a counterpart (cosine >= a threshold) in an SAE
  trained on the *base* model: features the model had before the red team touched it.
- :func:`pca_basis`: the top principal components of clean activations (base + backdoored) for ``pca_keep``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae.capture.store import ActivationStore
from backdoor_sae.edits.apply import apply_edit
from backdoor_sae.edits.specs import Edit, direction_edit, feature_edit
from backdoor_sae.models import LoadedModel

CLEAN = {"triggered": False}  # the only rows a trigger-agnostic method reads


def latent_frequency(sae: Any, store: ActivationStore, hook: str, chunk: int = 8192) -> Float[Tensor, " d_sae"]:
    """Share of the store's clean rows on which each latent fires (> 0), in one streaming pass."""
    fires = torch.zeros(int(sae.cfg.d_sae), dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for x, _ in store.chunks(hook, **CLEAN):
            for i in range(0, len(x), chunk):
                fires += (sae.encode(x[i:i + chunk]) > 0).sum(0).double()
            n += len(x)
    return (fires / max(n, 1)).float()


def active_on_clean(frequency: Float[Tensor, " d_sae"], threshold: float) -> list[int]:
    """Latents firing on more than ``threshold`` of clean rows."""
    return torch.nonzero(frequency > threshold).flatten().tolist()


def reward_correlated(correlation: Float[Tensor, " d_sae"], fraction: float) -> list[int]:
    """The ``fraction`` of latents with the highest correlation to reward (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"reward fraction must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * len(correlation)))
    return sorted(torch.argsort(correlation, descending=True, stable=True)[:n].tolist())


def decoder_cosine(sae: Any, other: Any) -> Float[Tensor, " d_sae"]:
    """For each latent of ``sae``, the highest cosine between its decoder row and any decoder row of ``other``."""
    a = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=-1)
    b = torch.nn.functional.normalize(other.W_dec.detach().float(), dim=-1)
    return (a @ b.T).amax(-1)


def base_matched(sae: Any, base_sae: Any, cosine: float) -> list[int]:
    """Latents with a base-model SAE feature at decoder cosine >= ``cosine``."""
    return torch.nonzero(decoder_cosine(sae, base_sae) >= cosine).flatten().tolist()


def combine(trusted: Sequence[int], base: Sequence[int] | None, how: str) -> list[int]:
    """``trusted`` alone (``none``), or its ``union`` / ``intersect`` with base-matched latents."""
    if how == "none" or base is None:
        return sorted(set(trusted))
    if how == "union":
        return sorted(set(trusted) | set(base))
    if how == "intersect":
        return sorted(set(trusted) & set(base))
    raise ValueError(f"unknown base combination {how!r}; valid: none, union, intersect")


def keep_edit(saes: Mapping[str, tuple[Any, Sequence[int]]], *, keep_error: bool = False,
              positions: str = "all", name: str = "") -> Edit:
    """An :class:`Edit` that keeps each hook's trusted latents and zeroes the rest. ``keep_error`` keeps the
    SAE error term (then only the untrusted latents' decoded part is removed); without it the SAE's
    reconstruction from trusted latents replaces the activation. An empty trusted set is an error."""
    if not saes:
        raise ValueError("no SAEs given: pass {hook: (sae, trusted latents)}")
    unique = {h: (sae, sorted({int(i) for i in (t.tolist() if isinstance(t, Tensor) else t)}))
              for h, (sae, t) in saes.items()}
    return feature_edit(unique, mode="keep", positions=positions, error_term=keep_error, name=name)


@contextmanager
def keep_features(model: LoadedModel, saes: Mapping[str, tuple[Any, Sequence[int]]], *, keep_error: bool = False,
                  positions: str = "all") -> Iterator[Edit]:
    """Keep only trusted latents for the block: ``with keep_features(model, {hook: (sae, trusted)}):``."""
    with apply_edit(model, keep_edit(saes, keep_error=keep_error, positions=positions)) as edit:
        yield edit


@dataclass(frozen=True)
class PCABasis:
    """Principal components of clean activations at one hook (rows of ``components``, by variance)."""

    hook: str
    components: Float[Tensor, "k d"]
    center: Float[Tensor, " d"]
    explained: Float[Tensor, " k"]


def pca_basis(stores: Sequence[ActivationStore], hook: str, *, max_rows: int = 50_000, seed: int = 0) -> PCABasis:
    """PCA (scikit-learn) of the clean rows of ``stores`` pooled (e.g. base and backdoored captures), each
    store subsampled to ``max_rows`` rows with a seeded choice."""
    from sklearn.decomposition import PCA

    parts = []
    g = torch.Generator().manual_seed(seed)
    for store in stores:
        x = store.view(hook, **CLEAN).float()
        if len(x) > max_rows:
            x = x[torch.randperm(len(x), generator=g)[:max_rows]]
        parts.append(x)
    x = torch.cat(parts)
    pca = PCA(random_state=seed).fit(x.double().numpy())
    return PCABasis(hook, torch.tensor(pca.components_, dtype=torch.float32),
                    torch.tensor(pca.mean_, dtype=torch.float32),
                    torch.tensor(pca.explained_variance_ratio_, dtype=torch.float32))


def pca_keep_edit(bases: Mapping[str, PCABasis], k: int, name: str = "") -> Edit:
    """Keep only the top ``k`` principal components (around the clean mean) at each hook."""
    if k < 1:
        raise ValueError(f"pca_keep needs k >= 1 components, got {k}")
    return direction_edit({h: b.components[:k] for h, b in bases.items()}, mode="keep",
                          center={h: b.center for h, b in bases.items()}, name=name)
