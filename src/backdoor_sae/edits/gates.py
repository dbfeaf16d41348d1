"""Gates fixed on clean rows: one threshold per edited latent or direction, at a high percentile of its clean
train-split values, so a gated edit acts only where an edited unit looks unlike clean text and leaves the rest
of every clean prompt exactly as it was (docs/editing.md, "Gated edits").

A latent's gate is the ``quantile`` of its activation over the store's clean rows; a direction's is the
``quantile`` of ``|(x - center) . u|`` (:func:`~backdoor_sae.edits.hooks.direction_scores`). Only rows captured
without the trigger are read. A latent that never fires on the clean rows has no clean scale to calibrate a gate
from: by default that is an error naming it; ``inactive="any"`` gates it at 0 (it acts wherever the latent fires at
all), which is what the trigger-known methods use for latents that only triggered text turns on.

The norm guard (:func:`guard_edit`) is the other bound read from the store: an edit leaves alone every position
whose residual norm exceeds the largest norm among the store's rows (all of them: the rows the SAE was trained
on), such as a pretrained host's attention-sink first position, which captures skip.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae.capture.store import ActivationStore
from backdoor_sae.edits.hooks import direction_scores, unit_rows
from backdoor_sae.edits.specs import DirectionEdit, Edit, FeatureEdit, Spec

INACTIVE = ("error", "any")


def check_quantile(quantile: float, name: str = "gate quantile") -> None:
    """The one bound on a gate quantile (``name``: what the message calls it, e.g. a config key)."""
    if not 0.5 <= quantile < 1:
        raise ValueError(f"{name} must be in [0.5, 1), got {quantile}")


def _quantiles(scores: Float[Tensor, "rows n"], quantile: float) -> list[float]:
    """Per column, the ``quantile`` of its values (kthvalue: exact, and free of torch.quantile's size cap)."""
    k = max(1, min(len(scores), int(round(quantile * len(scores)))))
    return [float(v) for v in scores.kthvalue(k, dim=0).values]


def _clean_chunks(store: ActivationStore, hook: str) -> Iterator[Tensor]:
    for acts, _ in store.chunks(hook, triggered=False):
        yield acts


@torch.no_grad()
def latent_gate(store: ActivationStore, hook: str, sae: Any, latents: tuple[int, ...], quantile: float = 0.999,
                *, inactive: str = "error", cache: dict[Any, tuple[float, float]] | None = None
                ) -> tuple[float, ...]:
    """Each latent's ``quantile`` on the store's clean rows at ``hook`` (see the module doc for ``inactive``).
    ``cache``: ``{(hook, id(sae), quantile, latent): (threshold, clean max)}``, filled with what is read, so a
    sweep encodes the clean rows once per new latent set rather than once per point."""
    check_quantile(quantile)
    if inactive not in INACTIVE:
        raise ValueError(f"unknown inactive {inactive!r}; valid: {', '.join(INACTIVE)}")
    cache = {} if cache is None else cache
    key = (hook, id(sae), quantile)
    todo = [lat for lat in dict.fromkeys(latents) if (*key, lat) not in cache]
    if todo:
        idx = torch.tensor(todo, dtype=torch.long, device=sae.W_dec.device)
        scores = torch.cat([sae.encode(a.to(sae.W_dec))[:, idx].float().cpu() for a in _clean_chunks(store, hook)])
        for lat, q, m in zip(todo, _quantiles(scores, quantile), scores.max(0).values.tolist()):
            cache[(*key, lat)] = (q, m)
    never = [lat for lat in latents if cache[(*key, lat)][1] <= 0]
    if never and inactive == "error":
        n_rows = sum(len(a) for a in _clean_chunks(store, hook))
        raise ValueError(f"latent {never[0]} at {hook!r} is never active on the {n_rows} clean rows: a clean "
                         "percentile gives it no threshold; gate on another latent or pass inactive='any'")
    return tuple(max(0.0, cache[(*key, lat)][0]) for lat in latents)


@torch.no_grad()
def direction_gate(store: ActivationStore, spec: DirectionEdit, quantile: float = 0.999) -> tuple[float, ...]:
    """Each direction's ``quantile`` of ``|(x - center) . u|`` on the store's clean rows at its hook."""
    check_quantile(quantile)
    units = unit_rows(spec.vectors)
    scores = torch.cat([direction_scores(a, units, spec.center) for a in _clean_chunks(store, spec.hook)])
    return tuple(_quantiles(scores, quantile))


def gate_spec(store: ActivationStore, spec: Spec, quantile: float = 0.999, *, inactive: str = "error",
              cache: dict[Any, tuple[float, float]] | None = None) -> Spec:
    """``spec`` with its gate fixed on the store's clean rows (``cache``: see :func:`latent_gate`)."""
    if spec.mode == "keep":
        raise ValueError(f"a keep edit at {spec.hook!r} cannot be gated: gate an ablation, scaling or projection")
    if isinstance(spec, FeatureEdit):
        return replace(spec, gate=latent_gate(store, spec.hook, spec.sae, spec.latents, quantile, inactive=inactive,
                                              cache=cache))
    return replace(spec, gate=direction_gate(store, spec, quantile))


@torch.no_grad()
def norm_cap(store: ActivationStore, hook: str) -> float:
    """The largest residual norm among the store's rows at ``hook`` (a norm guard's ``max_norm``)."""
    return max(float(a.float().norm(dim=-1).max()) for a, _ in store.chunks(hook))


def guard_edit(edit: Edit, store: ActivationStore, caps: dict[str, float] | None = None) -> Edit:
    """``edit`` with every spec's ``max_norm`` set to :func:`norm_cap` of its hook (``caps``: a cache of those,
    filled as hooks are read)."""
    caps = {} if caps is None else caps
    for hook in edit.hooks:
        if hook not in caps:
            caps[hook] = norm_cap(store, hook)
    return Edit(tuple(replace(s, max_norm=caps[s.hook]) for s in edit.specs), edit.name, edit.params)


def gate_edit(edit: Edit, store: ActivationStore, quantile: float = 0.999, *, inactive: str = "error",
              cache: dict[Any, tuple[float, float]] | None = None) -> Edit:
    """``edit`` with every spec gated at the ``quantile`` of its clean train-split values in ``store``:
    ``with apply_edit(model, gate_edit(edit, store)):`` leaves clean-looking positions untouched (``cache``:
    see :func:`latent_gate`)."""
    specs = tuple(gate_spec(store, s, quantile, inactive=inactive, cache=cache) for s in edit.specs)
    return Edit(specs, edit.name, {**edit.params, "gate_quantile": quantile})
