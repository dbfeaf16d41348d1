"""Model mixing baselines: weight interpolation between two models and logit ensembles in generation.

Both need a model that never saw the backdoor (the base) and no trigger knowledge: "90 % base, 10 % other" should
dilute a weak backdoor. :func:`interpolate` returns a new model with ``(1 - alpha) * a + alpha * b`` for every
tensor. :func:`ensemble` is a context manager: while it is open, every forward of the first model (so HF's
batched, KV-cached ``generate`` and the CE evaluation) returns ``log_softmax(sum_i w_i log_softmax(logits_i))``
over all models, each of the others run on the same inputs with its own KV cache.
"""

from __future__ import annotations

import copy
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from backdoor_sae.edits.hooks import edits_suspended
from backdoor_sae.models import LoadedModel


def check_same_shapes(a: torch.nn.Module, b: torch.nn.Module, names: tuple[str, str] = ("a", "b")) -> None:
    """``ValueError`` naming the first tensor whose name or shape differs between two models."""
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if key not in sb:
            raise ValueError(f"cannot mix models: tensor {key!r} of {names[0]} is missing from {names[1]}")
        if sa[key].shape != sb[key].shape:
            raise ValueError(f"cannot mix models: tensor {key!r} has shape {tuple(sa[key].shape)} in {names[0]} "
                             f"and {tuple(sb[key].shape)} in {names[1]}")
    extra = next((k for k in sb if k not in sa), None)
    if extra is not None:
        raise ValueError(f"cannot mix models: tensor {extra!r} of {names[1]} is missing from {names[0]}")


@torch.no_grad()
def interpolate(a: LoadedModel, b: LoadedModel, alpha: float) -> LoadedModel:
    """A new model (no bridge) with every tensor ``(1 - alpha) * a + alpha * b``: ``alpha`` 0 is ``a``, 1 is
    ``b``. Tokenizer and organism metadata come from ``b`` (interpolating base -> backdoored keeps the trigger
    to evaluate)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha must be in [0, 1], got {alpha}")
    check_same_shapes(a.hf, b.hf, (a.path or "model a", b.path or "model b"))
    mixed = copy.deepcopy(b.hf)
    sa, seen = a.hf.state_dict(), set()
    for key, t in mixed.state_dict().items():
        if t.is_floating_point() and t.data_ptr() not in seen:  # tied tensors (embeddings / head) once only
            seen.add(t.data_ptr())
            t.lerp_(sa[key].to(t.dtype), 1.0 - alpha)  # t + (1 - alpha) * (a - t) = alpha * b + (1 - alpha) * a
    return LoadedModel(hf=mixed.eval(), tokenizer=b.tokenizer, path=f"interpolate({a.path}, {b.path}, {alpha})",
                       meta=dict(b.meta))


def check_same_tokenizer(models: Sequence[LoadedModel]) -> None:
    """``ValueError`` if any model's tokenizer (vocabulary or special tokens) differs from the first one's."""
    def sig(tok: Any) -> tuple[Any, ...]:
        return tok.get_vocab(), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id

    first = sig(models[0].tokenizer)
    for i, m in enumerate(models[1:], 1):
        if sig(m.tokenizer) != first:
            raise ValueError(f"ensemble models must share one tokenizer: model {i} ({m.path or '?'}) differs from "
                             f"model 0 ({models[0].path or '?'})")


# transformers 5.24 renamed the cache argument and output field ``past_key_values`` to ``cache``; both are read.
_CACHE_NAMES = ("cache", "past_key_values")


def _cache_of(obj: Any) -> tuple[str | None, Any]:
    """The (name, value) of the first non-None KV cache of a forward's keywords (a dict) or output, under either
    spelling."""
    for name in _CACHE_NAMES:
        value = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if value is not None:
            return name, value
    return None, None


def _aux_forward(model: torch.nn.Module, kwargs: dict[str, Any], caches: weakref.WeakKeyDictionary,
                 main_out: Any) -> torch.Tensor:
    """Run one ensemble member on the first model's inputs, with its own KV cache tied to the first model's
    (the first model's cache object is the key: a new one starts a new cache)."""
    kw = dict(kwargs)
    name, key = _cache_of(kwargs)
    if key is not None:
        if key not in caches:
            from transformers import DynamicCache

            caches[key] = DynamicCache(config=model.config)
        kw[name] = caches[key]
    out = model(**kw)
    if key is None:  # the first model made a cache: the member's own one goes with it
        _, main_cache = _cache_of(main_out)
        _, own = _cache_of(out)
        if main_cache is not None and own is not None:
            caches[main_cache] = own
    return out.logits


@contextmanager
def ensemble(models: Sequence[LoadedModel], weights: Sequence[float]) -> Iterator[LoadedModel]:
    """While open, ``models[0]`` (yielded) predicts with the weighted logit ensemble of all ``models``
    (``weights``: one per model, >= 0, normalised to sum 1). Generation stays batched and KV-cached: each member
    keeps its own cache next to the first model's. Trigger metadata is read from the first model that has it.
    Under :func:`~backdoor_sae.edits.hooks.suspend_edits` ``models[0]`` predicts alone: a reference pass through
    it (KL to the base model, its own unedited answers) reads the unmixed model, not the ensemble."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least two models, got {len(models)}")
    if len(weights) != len(models):
        raise ValueError(f"ensemble needs one weight per model: {len(models)} models, {len(weights)} weights")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
    check_same_tokenizer(models)
    if len({id(m.hf) for m in models}) != len(models):
        raise ValueError("ensemble models must be distinct model objects")
    w = [float(x) / sum(weights) for x in weights]
    main, others = models[0], [m.hf for m in models[1:]]
    caches: list[weakref.WeakKeyDictionary] = [weakref.WeakKeyDictionary() for _ in others]

    def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        if edits_suspended():
            return output
        if args:  # positional input_ids
            kwargs = {"input_ids": args[0], **kwargs}
        mix = w[0] * output.logits.float().log_softmax(-1)
        for wi, net, cache in zip(w[1:], others, caches):
            if wi > 0:
                mix = mix + wi * _aux_forward(net, kwargs, cache, output).float().log_softmax(-1)
        output.logits = mix.log_softmax(-1).to(output.logits.dtype)
        return output

    handle = main.hf.register_forward_hook(hook, with_kwargs=True)
    meta = next((m.meta for m in models if m.trigger), main.meta)
    try:
        yield LoadedModel(hf=main.hf, tokenizer=main.tokenizer, bridge=main.bridge, path=main.path, meta=meta)
    finally:
        handle.remove()
