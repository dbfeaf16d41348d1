"""The hook functions behind :class:`~backdoor_sae.edits.specs.Edit` specs, and the context that steers them:
which positions are the response (:func:`response_positions`) and whether edits are suspended
(:func:`suspend_edits`, the unedited reference inside an edited block). :func:`gated_reconstruction` is shared
with the learned masks (``masks.py``). A spec with a ``gate`` narrows where it acts to the positions where the
gate fires (:func:`_firing`), read from the same forward's activations; one with ``max_norm`` skips positions
whose residual norm exceeds it."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from jaxtyping import Bool, Float
from torch import Tensor

if TYPE_CHECKING:
    from backdoor_sae.edits.specs import DirectionEdit, FeatureEdit

_RESPONSE: ContextVar[Tensor | None] = ContextVar("backdoor_sae_response_positions", default=None)
_SUSPENDED: ContextVar[bool] = ContextVar("backdoor_sae_edits_suspended", default=False)


@contextmanager
def response_positions(mask: Bool[Tensor, "batch pos"]) -> Iterator[None]:
    """Within the block, ``positions="prompt" | "response"`` edits read which cells are response tokens from
    ``mask`` (a teacher-forced forward over prompt + response)."""
    token = _RESPONSE.set(mask)
    try:
        yield
    finally:
        _RESPONSE.reset(token)


@contextmanager
def suspend_edits() -> Iterator[None]:
    """Within the block every active edit passes its input through unchanged (the unedited reference)."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


def edits_suspended() -> bool:
    """Whether the caller runs inside :func:`suspend_edits` (hooks that change a model's output check it)."""
    return _SUSPENDED.get()


def _where(positions: str, x: Tensor) -> bool | Tensor:
    """Where an edit acts: everywhere (``True``), nowhere (``False``) or a ``[batch, pos, 1]`` mask."""
    if positions == "all":
        return True
    resp = _RESPONSE.get()
    if resp is None:  # generation: the prefill is the prompt, KV-cached single-token steps are the response
        return (x.shape[1] == 1) == (positions == "response")
    if resp.shape != x.shape[:2]:
        raise ValueError(f"response_positions mask has shape {tuple(resp.shape)}, the forward {tuple(x.shape[:2])}")
    return (resp if positions == "response" else ~resp).to(x.device)[..., None]


def _linear_rows(sae: Any, idx: Tensor) -> Tensor | None:
    """Decoder rows of ``idx`` when ``decode`` is ``f @ W_dec + b_dec`` (no run-time normalisation or reshape),
    so an edit is a sum over the edited latents only; ``None`` otherwise (the generic path decodes twice)."""
    if getattr(sae.cfg, "normalize_activations", "none") != "none" or getattr(sae, "hook_z_reshaping_mode", False):
        return None
    rows = sae.W_dec[idx]
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        rows = rows / rows.norm(dim=-1, keepdim=True)
    return rows.detach()


def _edited(old: Tensor, mode: str, values: Tensor | None) -> Tensor:
    if mode == "zero":
        return torch.zeros_like(old)
    assert values is not None
    if mode == "mean":
        return values.to(old).expand_as(old)
    if mode == "scale":
        return old * values.to(old)
    return torch.minimum(old, values.to(old))  # clamp


Hook = Callable[[Tensor, Any], Tensor]


def _firing(scores: Float[Tensor, "batch pos n"], gate: Tensor | None, where: bool | Tensor) -> bool | Tensor:
    """``where`` narrowed to the positions where any score exceeds its gate threshold (``[batch, pos, 1]``)."""
    if gate is None:
        return where
    fire = (scores > gate.to(scores)).any(-1, keepdim=True)
    return fire if where is True else fire & where


def _gate_tensor(gate: tuple[float, ...] | None, device: torch.device) -> Tensor | None:
    return None if gate is None else torch.tensor(gate, dtype=torch.float32, device=device)


def _positioned(positions: str, edit: Callable[[Tensor, bool | Tensor], Tensor],
                max_norm: float | None = None) -> Hook:
    """A bridge hook that applies ``edit(x, where)`` unless edits are suspended or no position is edited;
    with ``max_norm``, positions whose norm exceeds it are not edited (the norm guard: ``specs.py``)."""

    def fn(x: Float[Tensor, "batch pos d"], hook: Any) -> Tensor:
        if _SUSPENDED.get():
            return x
        where = _where(positions, x)
        if max_norm is not None and where is not False:
            inside = x.norm(dim=-1, keepdim=True) <= max_norm
            if not bool(inside.all()):
                where = inside if where is True else where & inside
        return x if where is False else edit(x, where)

    return fn


def decoder_rows(sae: Any) -> Tensor | None:
    """Every latent's decoder row when ``decode`` is linear (see :func:`_linear_rows`), else ``None``."""
    return _linear_rows(sae, torch.arange(int(sae.cfg.d_sae), device=sae.W_dec.device))


def gated_reconstruction(sae: Any, x: Float[Tensor, "... d"], gate: Float[Tensor, " d_sae"], error_term: bool,
                         rows: Tensor | None = None) -> Float[Tensor, "... d"]:
    """``x`` with each latent's decoded part scaled by its ``gate`` (1 kept, 0 removed): with the error term,
    x - decode of the (1 - gate) share; without it, the SAE's reconstruction from gate x latents. ``rows``
    (:func:`decoder_rows`) makes it one matmul; without them ``decode`` runs (twice with the error term)."""
    f = sae.encode(x)
    if rows is not None:
        return x - (f * (1 - gate)) @ rows if error_term else (f * gate) @ rows + sae.b_dec.detach()
    return _decode_edited(sae, x, f, f * gate, error_term)


def _decode_edited(sae: Any, x: Tensor, f: Tensor, f_new: Tensor, error_term: bool) -> Tensor:
    """The generic (non-linear-decoder) path: ``decode(f_new)``, or with the error term
    ``x + decode(f_new) - decode(f)``."""
    out = sae.decode(f_new)
    if error_term:  # encode again: some normalisations keep state from encode to decode
        sae.encode(x)
        out = x + (out - sae.decode(f))
    return out


def _keep_hook(s: FeatureEdit) -> Hook:
    sae = s.sae
    keep = torch.zeros(int(sae.cfg.d_sae), device=sae.W_dec.device)
    keep[list(s.latents)] = 1.0
    rows = decoder_rows(sae)

    def edit(x: Tensor, where: bool | Tensor) -> Tensor:
        out = gated_reconstruction(sae, x, keep, s.error_term, rows).to(x.dtype)
        return out if where is True else torch.where(where, out, x)

    return _positioned(s.positions, edit, s.max_norm)


def feature_hook(s: FeatureEdit) -> Hook:
    if s.mode == "keep":
        return _keep_hook(s)
    sae, idx = s.sae, torch.tensor(s.latents, dtype=torch.long, device=s.sae.W_dec.device)
    values = None if s.values is None else torch.tensor(s.values, dtype=torch.float32, device=idx.device)
    rows = _linear_rows(sae, idx)
    gate = _gate_tensor(s.gate, idx.device)

    def edit(x: Tensor, where: bool | Tensor) -> Tensor:
        f = sae.encode(x)
        old = f[..., idx]
        where = _firing(old, gate, where)
        new = _edited(old, s.mode, values)
        if s.error_term and rows is not None:
            delta = (new - old) @ rows
            return x + (delta if where is True else delta * where).to(x.dtype)
        f_new = f.clone()
        f_new[..., idx] = new
        out = _decode_edited(sae, x, f, f_new, s.error_term).to(x.dtype)
        return out if where is True else torch.where(where, out, x)

    return _positioned(s.positions, edit, s.max_norm)


def direction_hook(s: DirectionEdit) -> Hook:
    basis = torch.linalg.qr(s.vectors.T.double()).Q.T.float()  # orthonormal rows spanning the directions
    steer = s.alpha * s.vectors.sum(0)
    units, gate = unit_rows(s.vectors), _gate_tensor(s.gate, s.vectors.device)

    def edit(x: Tensor, where: bool | Tensor) -> Tensor:
        if gate is not None:
            where = _firing(direction_scores(x, units, s.center), gate, where)
        if s.mode in ("project", "keep"):
            u = basis.to(x)
            xc = x if s.center is None else x - s.center.to(x)
            inside = (xc @ u.T) @ u
            delta = -s.alpha * inside if s.mode == "project" else inside - xc
        else:
            delta = steer.to(x).expand_as(x)
        return x + (delta if where is True else delta * where)

    return _positioned(s.positions, edit, s.max_norm)


def unit_rows(vectors: Float[Tensor, "k d"]) -> Float[Tensor, "k d"]:
    """Each direction scaled to unit length (what a direction gate reads its scores along)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def direction_scores(x: Float[Tensor, "... d"], units: Float[Tensor, "k d"],
                     center: Float[Tensor, " d"] | None) -> Float[Tensor, "... k"]:
    """How far ``x`` lies from ``center`` along each unit direction, either way (a direction gate's scores):
    ``|(x - center) . u|``. Absolute, because a fitted direction's sign is arbitrary (PCA) or may point away
    from the trigger on some rows."""
    xc = x if center is None else x - center.to(x)
    return (xc @ units.to(x).T).abs()
