"""Edits as hooks: zero / mean / scale / clamp SAE latents or keep only trusted ones; project out, steer along
or keep only residual directions.

An :class:`Edit` is a tuple of per-hook specs (:class:`FeatureEdit`, :class:`DirectionEdit`) that saves to JSON
next to the SAEs it names. :func:`apply_edit` (and the shortcuts :func:`ablate_features`,
:func:`ablate_directions`) attach one hook per spec on the model's bridge for the duration of a ``with`` block.
The bridge wraps the HF modules in place, so the hooks act in every forward, HF ``generate`` with its KV cache
included; they stack across hooks and nested blocks, and are removed on exit, also on error.

Feature edits keep the SAE error term by default: x' = x - decode(f) + decode(f'), so an edit that changes no
latent leaves the model exactly as it was, and only the edited latents' decoder directions move the residual.
``keep`` inverts the list: the latents named are the trusted ones and every other latent is zeroed (with the
error term: x' = x - decode of the untrusted latents; without: x' = decode of the trusted ones, the SAE spliced in).

Positions: ``all``, ``prompt`` or ``response``. In generation, the prefill forward holds the prompt and each later
(single-token, KV-cached) forward one response token. A teacher-forced forward over prompt + response names its
response cells with :func:`response_positions`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from backdoor_sae._io import write_json
from backdoor_sae.models import LoadedModel

MODES = ("zero", "mean", "scale", "clamp", "keep")
DIRECTION_MODES = ("project", "steer", "keep")
POSITIONS = ("all", "prompt", "response")
_FORMAT = 1

_RESPONSE: ContextVar[Tensor | None] = ContextVar("backdoor_sae_response_positions", default=None)
_SUSPENDED: ContextVar[bool] = ContextVar("backdoor_sae_edits_suspended", default=False)


def _choice(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


# ------------------------------------------------------------------------------------------------- specs

def check_latents(sae: Any, hook: str, latents: Sequence[int], what: str = "latent list") -> None:
    """Refuse an empty latent list or an index outside ``[0, d_sae)``, naming d_sae."""
    if len(latents) == 0:
        raise ValueError(f"{what} for hook {hook!r} is empty: give at least one latent index")
    d_sae = int(sae.cfg.d_sae)
    bad = [i for i in latents if not 0 <= i < d_sae]
    if bad:
        raise ValueError(f"latent index {bad[0]} is out of range for the SAE at {hook!r} (d_sae={d_sae})")


@dataclass(frozen=True, eq=False)
class FeatureEdit:
    """Edit ``latents`` of the SAE at ``hook``. ``mode``: ``zero``; ``mean`` (set to ``values``, e.g. the clean
    means); ``scale`` (multiply by ``values``); ``clamp`` (cap at ``values``, e.g. the clean maxima); ``keep``
    (``latents`` is the trusted set: zero every other latent). ``values`` holds one number per latent.
    ``sae_path`` lets the edit be saved as JSON."""

    hook: str
    sae: Any
    latents: tuple[int, ...]
    mode: str = "zero"
    values: tuple[float, ...] | None = None
    positions: str = "all"
    error_term: bool = True
    sae_path: str | None = None

    def __post_init__(self) -> None:
        _choice(self.mode, MODES, "edit mode")
        _choice(self.positions, POSITIONS, "positions")
        check_latents(self.sae, self.hook, self.latents, "trusted set" if self.mode == "keep" else "latent list")
        if self.mode in ("zero", "keep") and self.values is not None:
            raise ValueError(f"mode {self.mode!r} takes no value")
        if self.mode not in ("zero", "keep") and (self.values is None or len(self.values) != len(self.latents)):
            raise ValueError(f"mode {self.mode!r} needs one value per latent ({len(self.latents)}), got "
                             f"{None if self.values is None else len(self.values)}")


@dataclass(frozen=True, eq=False)
class DirectionEdit:
    """Edit the residual at ``hook`` along ``vectors`` (``[k, d]``). ``project``: remove ``alpha`` times the
    component of ``x - center`` in their span (``center`` = e.g. the clean mean, so the projection is set to its
    clean value; ``None`` = 0). ``steer``: add ``alpha`` times the sum of the vectors. ``keep``: keep only the
    component of ``x - center`` in their span (e.g. the top principal components of clean activations)."""

    hook: str
    vectors: Float[Tensor, "k d"]
    mode: str = "project"
    alpha: float = 1.0
    center: Float[Tensor, " d"] | None = None
    positions: str = "all"

    def __post_init__(self) -> None:
        _choice(self.mode, DIRECTION_MODES, "direction mode")
        _choice(self.positions, POSITIONS, "positions")
        if self.vectors.ndim != 2 or len(self.vectors) == 0:
            raise ValueError(f"directions for {self.hook!r} must be a non-empty [k, d] tensor, got shape "
                             f"{tuple(self.vectors.shape)}")
        if self.center is not None and self.center.shape != self.vectors.shape[1:]:
            raise ValueError(f"center for {self.hook!r} has shape {tuple(self.center.shape)}, directions have "
                             f"dimension {self.vectors.shape[1]}")


Spec = FeatureEdit | DirectionEdit


@dataclass(frozen=True)
class Edit:
    """A set of per-hook edits applied together; saves to / loads from JSON next to the SAEs it uses."""

    specs: tuple[Spec, ...]
    name: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def hooks(self) -> list[str]:
        return list(dict.fromkeys(s.hook for s in self.specs))

    @property
    def n_edited(self) -> int:
        """Latents (feature edits) plus directions (direction edits) touched; for ``keep`` specs, the latents
        zeroed (``d_sae`` minus the trusted) or the dimensions removed (width minus the directions kept)."""
        return sum(_n_edited(s) for s in self.specs)

    @property
    def n_kept(self) -> int:
        """Latents or directions the ``keep`` specs keep (0 when the edit has none)."""
        return sum(len(s.latents) if isinstance(s, FeatureEdit) else len(s.vectors)
                   for s in self.specs if s.mode == "keep")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_json(path, {"format": _FORMAT, "name": self.name, "params": self.params,
                          "specs": [_spec_to_json(s, path.parent) for s in self.specs]})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"edit file not found: {path}")
        try:
            data = json.loads(path.read_text())
            raw = data["specs"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"edit file {path} is not an edit ({type(e).__name__})") from None
        return cls(tuple(_spec_from_json(s, path) for s in raw), data.get("name", ""), data.get("params", {}))


def _n_edited(s: Spec) -> int:
    if isinstance(s, FeatureEdit):
        return int(s.sae.cfg.d_sae) - len(s.latents) if s.mode == "keep" else len(s.latents)
    return s.vectors.shape[1] - len(s.vectors) if s.mode == "keep" else len(s.vectors)


def _spec_to_json(s: Spec, root: Path) -> dict[str, Any]:
    if isinstance(s, FeatureEdit):
        if s.sae_path is None:
            raise ValueError(f"the SAE for {s.hook!r} has no path: save it with save_sae (or load it with "
                             "load_sae) before saving the edit")
        rel = os.path.relpath(Path(s.sae_path).resolve(), root.resolve())
        return {"kind": "features", "hook": s.hook, "sae": rel, "latents": list(s.latents), "mode": s.mode,
                "values": None if s.values is None else list(s.values), "positions": s.positions,
                "error_term": s.error_term}
    return {"kind": "directions", "hook": s.hook, "vectors": s.vectors.tolist(), "mode": s.mode,
            "alpha": s.alpha, "center": None if s.center is None else s.center.tolist(), "positions": s.positions}


def _spec_from_json(d: dict[str, Any], path: Path) -> Spec:
    from backdoor_sae.sae import load_sae

    if d.get("kind") == "features":
        sae_dir = (path.parent / d["sae"]).resolve()
        if not (sae_dir / "cfg.json").is_file():
            raise FileNotFoundError(f"edit file {path} references SAE {d['sae']!r} for {d['hook']!r}, which does "
                                    f"not exist ({sae_dir})")
        values = None if d.get("values") is None else tuple(float(v) for v in d["values"])
        return FeatureEdit(d["hook"], load_sae(sae_dir), tuple(int(i) for i in d["latents"]), d["mode"], values,
                           d.get("positions", "all"), bool(d.get("error_term", True)), str(sae_dir))
    if d.get("kind") == "directions":
        center = None if d.get("center") is None else torch.tensor(d["center"], dtype=torch.float32)
        return DirectionEdit(d["hook"], torch.tensor(d["vectors"], dtype=torch.float32), d["mode"],
                             float(d.get("alpha", 1.0)), center, d.get("positions", "all"))
    raise ValueError(f"edit file {path}: unknown spec kind {d.get('kind')!r}; valid: features, directions")


# -------------------------------------------------------------------------------------------- builders

def _per_latent(value: Any, hook: str, n: int) -> tuple[float, ...] | None:
    if isinstance(value, Mapping):
        value = value.get(hook)
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),) * n
    vals = tuple(float(v) for v in (value.tolist() if isinstance(value, Tensor) else value))
    if len(vals) != n:
        raise ValueError(f"{len(vals)} values given for {n} latents at {hook!r}")
    return vals


def feature_edit(saes: Mapping[str, tuple[Any, Sequence[int]]], *, mode: str = "zero", value: Any = None,
                 positions: str = "all", error_term: bool = True, name: str = "") -> Edit:
    """An :class:`Edit` of the given latents of each hook's SAE. ``value``: a number, one number per latent, or
    a mapping ``{hook: ...}`` of either (``mean`` / ``scale`` / ``clamp``)."""
    from backdoor_sae.sae import sae_path

    if not saes:
        raise ValueError("no SAEs given: pass {hook: (sae, latents)}")
    specs = []
    for hook, (sae, latents) in saes.items():
        lat = tuple(int(i) for i in (latents.tolist() if isinstance(latents, Tensor) else latents))
        specs.append(FeatureEdit(hook, sae, lat, mode, _per_latent(value, hook, len(lat)), positions, error_term,
                                 sae_path(sae)))
    return Edit(tuple(specs), name)


def direction_edit(directions: Mapping[str, Any], *, mode: str = "project", alpha: float = 1.0,
                   positions: str = "all", center: Mapping[str, Tensor] | None = None, name: str = "") -> Edit:
    """An :class:`Edit` along directions per hook: a ``[d]`` or ``[k, d]`` tensor, or an object with
    ``vectors`` (and optionally ``center``, used by ``project``) such as :class:`backdoor_sae.Directions`."""
    if not directions:
        raise ValueError("no directions given: pass {hook: directions}")
    specs = []
    for hook, d in directions.items():
        vec = d.vectors if hasattr(d, "vectors") else d
        vec = torch.as_tensor(vec, dtype=torch.float32)
        vec = vec[None] if vec.ndim == 1 else vec
        c = (center or {}).get(hook, getattr(d, "center", None))
        specs.append(DirectionEdit(hook, vec, mode, float(alpha), c, positions))
    return Edit(tuple(specs), name)


# --------------------------------------------------------------------------------------------- applying

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


def _gated(positions: str, edit: Callable[[Tensor, bool | Tensor], Tensor]) -> Hook:
    """A bridge hook that applies ``edit(x, where)`` unless edits are suspended or no position is edited."""

    def fn(x: Float[Tensor, "batch pos d"], hook: Any) -> Tensor:
        if _SUSPENDED.get():
            return x
        where = _where(positions, x)
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
    out = sae.decode(f * gate)
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

    return _gated(s.positions, edit)


def _feature_hook(s: FeatureEdit) -> Hook:
    if s.mode == "keep":
        return _keep_hook(s)
    sae, idx = s.sae, torch.tensor(s.latents, dtype=torch.long, device=s.sae.W_dec.device)
    values = None if s.values is None else torch.tensor(s.values, dtype=torch.float32, device=idx.device)
    rows = _linear_rows(sae, idx)

    def edit(x: Tensor, where: bool | Tensor) -> Tensor:
        f = sae.encode(x)
        old = f[..., idx]
        new = _edited(old, s.mode, values)
        if s.error_term and rows is not None:
            delta = (new - old) @ rows
            return x + (delta if where is True else delta * where).to(x.dtype)
        f_new = f.clone()
        f_new[..., idx] = new
        out = sae.decode(f_new)
        if s.error_term:  # encode again: some normalisations keep state from encode to decode
            sae.encode(x)
            out = x + (out - sae.decode(f))
        out = out.to(x.dtype)
        return out if where is True else torch.where(where, out, x)

    return _gated(s.positions, edit)


def _direction_hook(s: DirectionEdit) -> Hook:
    basis = torch.linalg.qr(s.vectors.T.double()).Q.T.float()  # orthonormal rows spanning the directions
    steer = s.alpha * s.vectors.sum(0)

    def edit(x: Tensor, where: bool | Tensor) -> Tensor:
        if s.mode in ("project", "keep"):
            u = basis.to(x)
            xc = x if s.center is None else x - s.center.to(x)
            inside = (xc @ u.T) @ u
            delta = -s.alpha * inside if s.mode == "project" else inside - xc
        else:
            delta = steer.to(x).expand_as(x)
        return x + (delta if where is True else delta * where)

    return _gated(s.positions, edit)


def check_edit(model: LoadedModel, edit: Edit) -> None:
    """Refuse an edit the model cannot take: a hook it lacks, an SAE or a direction of the wrong width."""
    from backdoor_sae.sae import check_sae_fits, hook_width

    for s in edit.specs:
        if isinstance(s, FeatureEdit):
            check_sae_fits(s.sae, model, s.hook)
        else:
            width = hook_width(model, s.hook)
            if s.vectors.shape[1] != width:
                raise ValueError(f"direction for {s.hook!r} has dimension {s.vectors.shape[1]}, the hook's width "
                                 f"is {width}")


@contextmanager
def apply_edit(model: LoadedModel, edit: Edit) -> Iterator[Edit]:
    """Attach the edit's hooks on the model's bridge for the block (removed on exit, also on error)."""
    check_edit(model, edit)
    hooks = [(s.hook, _feature_hook(s) if isinstance(s, FeatureEdit) else _direction_hook(s)) for s in edit.specs]
    with model.hooked.hooks(fwd_hooks=hooks):
        yield edit


@contextmanager
def ablate_features(model: LoadedModel, saes: Mapping[str, tuple[Any, Sequence[int]]], *, mode: str = "zero",
                    value: Any = None, positions: str = "all", error_term: bool = True) -> Iterator[Edit]:
    """Edit latents of SAEs at their hooks for the block: ``with ablate_features(model, {hook: (sae, [3, 17])}):``.
    Modes: ``zero``, ``mean`` / ``clamp`` (``value`` per latent), ``scale`` (``value`` a factor)."""
    with apply_edit(model, feature_edit(saes, mode=mode, value=value, positions=positions,
                                        error_term=error_term)) as edit:
        yield edit


@contextmanager
def ablate_directions(model: LoadedModel, directions: Mapping[str, Any], *, mode: str = "project",
                      alpha: float = 1.0, positions: str = "all") -> Iterator[Edit]:
    """Project out (``project``) or steer along (``steer``: add ``alpha`` times the vectors) directions per
    hook for the block, on the same hook mechanism as :func:`ablate_features`."""
    with apply_edit(model, direction_edit(directions, mode=mode, alpha=alpha, positions=positions)) as edit:
        yield edit
