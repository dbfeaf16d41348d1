"""Apply an :class:`~backdoor_sae.edits.specs.Edit` to a model for the duration of a ``with`` block.

:func:`apply_edit` (and the shortcuts :func:`ablate_features`, :func:`ablate_directions`) attach one hook per spec
on the model's bridge. The bridge wraps the HF modules in place, so the hooks act in every forward, HF
``generate`` with its KV cache included; they stack across hooks and nested blocks, and are removed on exit,
also on error.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

from backdoor_sae.edits.hooks import direction_hook, feature_hook
from backdoor_sae.edits.specs import Edit, FeatureEdit, direction_edit, feature_edit
from backdoor_sae.models import LoadedModel


def check_edit(model: LoadedModel, edit: Edit) -> None:
    """Refuse an edit the model cannot take: a hook it lacks, an SAE or a direction of the wrong width."""
    from backdoor_sae.sae.training import check_sae_fits, hook_width

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
    hooks = [(s.hook, feature_hook(s) if isinstance(s, FeatureEdit) else direction_hook(s)) for s in edit.specs]
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
