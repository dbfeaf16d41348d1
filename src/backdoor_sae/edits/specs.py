"""Edit specs: zero / mean / scale / clamp SAE latents or keep only trusted ones; project out, steer along or
keep only residual directions; and their JSON form.

An :class:`Edit` is a tuple of per-hook specs (:class:`FeatureEdit`, :class:`DirectionEdit`) that saves to JSON
next to the SAEs it names; :mod:`backdoor_sae.edits.apply` attaches it to a model as hooks.

Feature edits keep the SAE error term by default: x' = x - decode(f) + decode(f'), so an edit that changes no
latent leaves the model exactly as it was, and only the edited latents' decoder directions move the residual.
``keep`` inverts the list: the latents named are the trusted ones and every other latent is zeroed (with the
error term: x' = x - decode of the untrusted latents; without: x' = decode of the trusted ones, the SAE spliced in).

Gates: with ``gate`` (one threshold per latent or direction, e.g. its 99.9th percentile on clean train rows:
:mod:`backdoor_sae.edits.gates`) a spec acts only at positions where one of its latents fires above its
threshold (or the residual's distance from ``center`` along one of its directions exceeds it), so positions that
look like clean text are left exactly as they were. The gate is read per position, so it works in KV-cached
generation like every edit.

Norm guard: with ``max_norm`` a spec leaves every position whose residual norm exceeds it unchanged. The
methods set it to the largest norm among the rows the SAE and directions were fit on
(:func:`backdoor_sae.edits.gates.guard_edit`): a pretrained host's first position (the attention sink, whose norm
is many times any other's and which captures skip) lies outside every SAE's training data, and an edit there
wrecks every later token (docs/hosts.md, "The attention sink").

Positions: ``all``, ``prompt`` or ``response``. In generation, the prefill forward holds the prompt and each later
(single-token, KV-cached) forward one response token. A teacher-forced forward over prompt + response names its
response cells with :func:`backdoor_sae.edits.hooks.response_positions`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from backdoor_sae._io import write_json

MODES = ("zero", "mean", "scale", "clamp", "keep")
DIRECTION_MODES = ("project", "steer", "keep")
POSITIONS = ("all", "prompt", "response")
_FORMAT = 1


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
    gate: tuple[float, ...] | None = None
    max_norm: float | None = None

    def __post_init__(self) -> None:
        _choice(self.mode, MODES, "edit mode")
        _choice(self.positions, POSITIONS, "positions")
        check_latents(self.sae, self.hook, self.latents, "trusted set" if self.mode == "keep" else "latent list")
        _check_gate(self.gate, self.mode, self.hook, len(self.latents), "latent")
        _check_norm(self.max_norm, self.hook)
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
    gate: tuple[float, ...] | None = None
    max_norm: float | None = None

    def __post_init__(self) -> None:
        _choice(self.mode, DIRECTION_MODES, "direction mode")
        _choice(self.positions, POSITIONS, "positions")
        _check_gate(self.gate, self.mode, self.hook, len(self.vectors), "direction")
        _check_norm(self.max_norm, self.hook)
        if self.vectors.ndim != 2 or len(self.vectors) == 0:
            raise ValueError(f"directions for {self.hook!r} must be a non-empty [k, d] tensor, got shape "
                             f"{tuple(self.vectors.shape)}")
        if self.center is not None and self.center.shape != self.vectors.shape[1:]:
            raise ValueError(f"center for {self.hook!r} has shape {tuple(self.center.shape)}, directions have "
                             f"dimension {self.vectors.shape[1]}")


Spec = FeatureEdit | DirectionEdit


def _check_gate(gate: tuple[float, ...] | None, mode: str, hook: str, n: int, what: str) -> None:
    """A gate is one finite, non-negative threshold per latent or direction, and no gate on a ``keep`` spec
    (what it edits is everything but its list: there is no edited unit to read the gate from)."""
    if gate is None:
        return
    if mode == "keep":
        raise ValueError(f"a keep edit at {hook!r} cannot be gated: gate an ablation, scaling or projection")
    if len(gate) != n:
        raise ValueError(f"gate at {hook!r} has {len(gate)} thresholds for {n} {what}s: give one per {what}")
    if not all(0 <= g < float("inf") for g in gate):
        raise ValueError(f"gate thresholds at {hook!r} must be finite and >= 0, got {list(gate)}")


def _check_norm(max_norm: float | None, hook: str) -> None:
    if max_norm is not None and not 0 < max_norm < float("inf"):
        raise ValueError(f"max_norm at {hook!r} must be finite and > 0, got {max_norm}")


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
    def gated(self) -> bool:
        """Whether any spec acts only where its gate fires."""
        return any(s.gate is not None for s in self.specs)

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
                "error_term": s.error_term, "gate": None if s.gate is None else list(s.gate),
                "max_norm": s.max_norm}
    return {"kind": "directions", "hook": s.hook, "vectors": s.vectors.tolist(), "mode": s.mode,
            "alpha": s.alpha, "center": None if s.center is None else s.center.tolist(), "positions": s.positions,
            "gate": None if s.gate is None else list(s.gate), "max_norm": s.max_norm}


def _gate(d: dict[str, Any]) -> tuple[float, ...] | None:
    return None if d.get("gate") is None else tuple(float(g) for g in d["gate"])


def _max_norm(d: dict[str, Any]) -> float | None:
    return None if d.get("max_norm") is None else float(d["max_norm"])


def _spec_from_json(d: dict[str, Any], path: Path) -> Spec:
    from backdoor_sae.sae.training import load_sae

    if d.get("kind") == "features":
        sae_dir = (path.parent / d["sae"]).resolve()
        if not (sae_dir / "cfg.json").is_file():
            raise FileNotFoundError(f"edit file {path} references SAE {d['sae']!r} for {d['hook']!r}, which does "
                                    f"not exist ({sae_dir})")
        values = None if d.get("values") is None else tuple(float(v) for v in d["values"])
        return FeatureEdit(d["hook"], load_sae(sae_dir), tuple(int(i) for i in d["latents"]), d["mode"], values,
                           d.get("positions", "all"), bool(d.get("error_term", True)), str(sae_dir), _gate(d),
                           _max_norm(d))
    if d.get("kind") == "directions":
        center = None if d.get("center") is None else torch.tensor(d["center"], dtype=torch.float32)
        return DirectionEdit(d["hook"], torch.tensor(d["vectors"], dtype=torch.float32), d["mode"],
                             float(d.get("alpha", 1.0)), center, d.get("positions", "all"), _gate(d), _max_norm(d))
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
    from backdoor_sae.sae.training import sae_path

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
