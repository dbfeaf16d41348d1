"""Feature cards: what an SAE latent is, from a (train-split) activation store, without re-running the model.

One streaming pass per hook encodes the store's rows shard by shard, in batches, and keeps per latent: firing
frequencies on clean and on triggered rows, maxima, and each prompt's maximum with its position. A second pass
reads only the rows of the top prompts to give every token of a context window its activation. The decoder
direction is read through the unembedding (after the final norm's weight) for the tokens a latent promotes.
The model is used for its tokenizer and unembedding only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from backdoor_sae.capture.store import ActivationStore, TokenSequence
from backdoor_sae.models import LoadedModel

NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass
class _Scan:
    """Per requested latent (columns): what one pass over the store found."""

    fires: Float[Tensor, "2 latents"]  # rows with activation > 0: row 0 clean, row 1 triggered
    rows: Float[Tensor, " 2"]
    maxima: Float[Tensor, "2 latents"]
    prompt_max: Float[Tensor, "prompts latents"]  # -inf for prompts without rows
    prompt_argmax: Int[Tensor, "prompts latents"]  # the position of that maximum


def _encode(sae: Any, x: Float[Tensor, "rows d_in"], cols: Int[Tensor, " latents"]) -> Float[Tensor, "rows latents"]:
    """The requested latents' activations, on the CPU, wherever the SAE lives."""
    return sae.encode(x.to(sae.W_dec.device))[:, cols.to(sae.W_dec.device)].float().cpu()


@torch.no_grad()
def _scan(sae: Any, store: ActivationStore, hook: str, latents: Sequence[int], batch_rows: int) -> _Scan:
    """One pass over every row of ``hook``: frequencies, maxima, and per prompt the max and its position."""
    cols, n_prompts = torch.tensor(list(latents)), int(store.manifest["n_prompts"])
    s = _Scan(torch.zeros(2, len(cols)), torch.zeros(2), torch.zeros(2, len(cols)),
              torch.full((n_prompts, len(cols)), float("-inf")), torch.zeros(n_prompts, len(cols), dtype=torch.long))
    for x, lab in store.chunks(hook):
        for b in range(0, len(x), batch_rows):
            f = _encode(sae, x[b:b + batch_rows], cols)
            trig = lab["triggered"][b:b + batch_rows].long()
            s.fires.index_add_(0, trig, (f > 0).float())
            s.rows += torch.bincount(trig, minlength=2).float()
            for t in (0, 1):
                if (trig == t).any():
                    s.maxima[t] = torch.maximum(s.maxima[t], f[trig == t].amax(0))
            _update_prompt_max(s, f, lab["prompt_id"][b:b + batch_rows].long(), lab["position"][b:b + batch_rows])
    return s


def _update_prompt_max(s: _Scan, f: Float[Tensor, "rows latents"], pid: Int[Tensor, " rows"],
                       pos: Int[Tensor, " rows"]) -> None:
    """Fold one batch into the per-prompt maxima and their positions (vectorised; ties keep any maximum)."""
    ids, inv = pid.unique(return_inverse=True)
    cm = torch.full((len(ids), f.shape[1]), float("-inf")).scatter_reduce_(
        0, inv[:, None].expand_as(f), f, "amax")
    better = cm > s.prompt_max[ids]
    r, c = ((f == cm[inv]) & better[inv]).nonzero(as_tuple=True)
    s.prompt_argmax[pid[r], c] = pos[r].long()
    s.prompt_max[ids] = torch.maximum(s.prompt_max[ids], cm)


@torch.no_grad()
def _prompt_acts(sae: Any, store: ActivationStore, hook: str, latents: Sequence[int], prompt_ids: Sequence[int],
                 max_len: int, batch_rows: int) -> tuple[Int[Tensor, " prompts"], Float[Tensor, "wanted pos latents"]]:
    """Every position's activation of each latent for the given prompts (NaN where the store has no row, e.g.
    BOS): ``(slot of each prompt id, [len(prompt_ids), max_len, latents])``."""
    cols, ids = torch.tensor(list(latents)), torch.tensor(list(prompt_ids))
    slot = torch.full((int(store.manifest["n_prompts"]),), -1, dtype=torch.long)
    slot[ids] = torch.arange(len(ids))
    out = torch.full((len(ids), max_len, len(cols)), float("nan"))
    for x, lab in store.chunks(hook, prompt_ids=list(prompt_ids)):
        for b in range(0, len(x), batch_rows):
            f = _encode(sae, x[b:b + batch_rows], cols)
            out[slot[lab["prompt_id"][b:b + batch_rows].long()], lab["position"][b:b + batch_rows].long()] = f
    return slot, out


def _final_norm_weight(model: LoadedModel) -> Float[Tensor, " d_model"] | None:
    """The final norm's elementwise weight (``model.norm`` in Llama, ``ln_f`` in GPT-2), if the model has one."""
    base = getattr(model.hf, "base_model", model.hf)
    for name in NORM_NAMES:
        w = getattr(getattr(base, name, None), "weight", None)
        if isinstance(w, Tensor):
            return w.detach().float().cpu()
    return None


@torch.no_grad()
def decoder_logits(model: LoadedModel, sae: Any, latents: Sequence[int]) -> Float[Tensor, "latents vocab"] | None:
    """``W_dec[latent] * norm weight @ W_U``: each latent's direct effect on the logits, or ``None`` when the
    hook's width is not the unembedding's (not a residual-stream hook)."""
    w_u = model.hf.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    d = sae.W_dec[torch.tensor(list(latents))].detach().float().cpu()
    if d.shape[-1] != w_u.shape[-1]:
        return None
    g = _final_norm_weight(model)
    return (d * g if g is not None and g.shape[-1] == d.shape[-1] else d) @ w_u.T


def _token_list(model: LoadedModel, ids: Sequence[int], logits: Tensor) -> list[dict[str, Any]]:
    texts = model.tokenizer.batch_decode([[int(i)] for i in ids])
    return [{"token": t, "logit": round(float(v), 4)} for t, v in zip(texts, logits.tolist())]


def _context(model: LoadedModel, seq: TokenSequence, acts: Float[Tensor, " pos"], position: int,
             window: int) -> dict[str, Any]:
    lo, hi = max(0, position - window), min(len(seq.ids), position + window + 1)
    tokens = model.tokenizer.batch_decode([[int(i)] for i in seq.ids[lo:hi]])
    return {"prompt_id": seq.prompt_id, "triggered": seq.triggered, "position": position,
            "max_activation": round(float(acts[position]), 4), "max_index": position - lo, "tokens": tokens,
            "activations": [None if v != v else round(v, 4) for v in acts[lo:hi].tolist()],
            "kinds": seq.kinds[lo:hi].tolist()}


def _stats(s: _Scan, j: int, extra: Mapping[str, Tensor], latent: int) -> dict[str, float]:
    rows = s.rows.clamp(min=1)
    own = {"freq_clean": float(s.fires[0, j] / rows[0]), "freq_triggered": float(s.fires[1, j] / rows[1]),
           "max_activation": float(s.maxima[:, j].max()), "max_activation_clean": float(s.maxima[0, j]),
           "max_activation_triggered": float(s.maxima[1, j])}
    given = {k: float(v[latent]) for k, v in extra.items() if k not in own and len(v) > latent}
    return {k: round(v, 6) for k, v in {**own, **given}.items()}


def _check(saes: Mapping[str, Any], store: ActivationStore, latents: Mapping[str, Sequence[int]]) -> None:
    for hook, lat in latents.items():
        if hook not in saes:
            raise ValueError(f"no SAE for hook {hook!r}; SAEs given for: {', '.join(saes)}")
        store._hook(hook)
        d_sae = int(saes[hook].cfg.d_sae)
        bad = [i for i in lat if not 0 <= int(i) < d_sae]
        if bad:
            raise ValueError(f"latent {bad[0]} is out of range for the {d_sae}-latent SAE at {hook!r}")


def feature_cards(model: LoadedModel, saes: Mapping[str, Any], store: ActivationStore,
                  latents: Mapping[str, Sequence[int]], *, n_contexts: int = 5, window: int = 12,
                  stats: Mapping[str, Mapping[str, Tensor]] | Any = None, n_tokens: int = 10,
                  batch_rows: int = 8192) -> list[dict[str, Any]]:
    """One card per ``(hook, latent)`` of ``latents`` (``{hook: [latent, ...]}``, in that order), from ``store``
    (the train-split capture; every row is read, no forward pass). ``stats``: ``{hook: {name: Tensor[d_sae]}}``
    (``FeatureScores.stats``, or the ``FeatureScores``), copied into each card's ``stats`` under its own names;
    ``n_tokens`` promoted and suppressed tokens; rows are encoded ``batch_rows`` at a time.

    Card schema::

        hook, latent
        stats       freq_clean, freq_triggered (fraction of clean / triggered rows, every position kind, where
                    the latent is > 0), max_activation, max_activation_clean, max_activation_triggered, and every
                    name of ``stats[hook]`` (a name computed here wins over a given one)
        contexts    the ``n_contexts`` prompts with the highest maximum (> 0), best first, each: prompt_id,
                    triggered, position (of the max token in the sequence), max_activation, tokens (decoded one
                    by one, up to ``window`` either side of the max), activations (one per token; null where the
                    store has no row, e.g. BOS), kinds (0 trigger, 1 prompt, 2 response token), max_index (of the
                    max token in ``tokens``)
        promoted    the ``n_tokens`` tokens with the highest ``W_dec[latent] * final-norm weight @ W_U``:
                    [{token, logit}], highest first (empty when the hook is not residual-width)
        suppressed  the same for the lowest logits, lowest first
    """
    _check(saes, store, latents)
    stats = getattr(stats, "stats", stats) or {}  # a FeatureScores works too
    seqs: dict[int, TokenSequence] = {}
    cards: list[dict[str, Any]] = []
    for hook, lat in latents.items():
        if lat:
            cards += _hook_cards(model, saes[hook], store, hook, [int(i) for i in lat], stats.get(hook, {}), seqs,
                                 n_contexts=n_contexts, window=window, n_tokens=n_tokens, batch_rows=batch_rows)
    return cards


def _hook_cards(model: LoadedModel, sae: Any, store: ActivationStore, hook: str, lat: list[int],
                extra: Mapping[str, Tensor], seqs: dict[int, TokenSequence], *, n_contexts: int, window: int,
                n_tokens: int, batch_rows: int) -> list[dict[str, Any]]:
    """The cards of one hook's latents; ``seqs`` caches the store's token sequences across hooks."""
    s = _scan(sae, store, hook, lat, batch_rows)
    tops = [_top_prompts(s.prompt_max[:, j], n_contexts) for j in range(len(lat))]
    wanted = sorted({p for t in tops for p in t})
    if wanted and not seqs:
        seqs.update((q.prompt_id, q) for q in store.sequences())
    if wanted:
        slot, acts = _prompt_acts(sae, store, hook, lat, wanted, max(len(seqs[p].ids) for p in wanted), batch_rows)
    logits = decoder_logits(model, sae, lat)
    cards = []
    for j, latent in enumerate(lat):
        ctx = [_context(model, seqs[p], acts[slot[p], :len(seqs[p].ids), j], int(s.prompt_argmax[p, j]), window)
               for p in tops[j]]
        cards.append({"hook": hook, "latent": latent, "stats": _stats(s, j, extra, latent), "contexts": ctx,
                      **_promoted(model, logits[j] if logits is not None else None, n_tokens)})
    return cards


def _top_prompts(prompt_max: Float[Tensor, " prompts"], n: int) -> list[int]:
    """Ids of the ``n`` prompts with the highest maximum, best first; prompts where the latent never fires
    (max <= 0) or that have no rows (-inf) are left out."""
    k = min(n, int((prompt_max > 0).sum()))
    return torch.topk(prompt_max, k).indices.tolist() if k > 0 else []


def _promoted(model: LoadedModel, logits: Float[Tensor, " vocab"] | None, n: int) -> dict[str, Any]:
    if logits is None:
        return {"promoted": [], "suppressed": []}
    hi, lo = logits.topk(min(n, len(logits))), (-logits).topk(min(n, len(logits)))
    return {"promoted": _token_list(model, hi.indices.tolist(), hi.values),
            "suppressed": _token_list(model, lo.indices.tolist(), -lo.values)}
