"""Learned latent masks: one hard-concrete gate per SAE latent, trained on clean trusted data only.

The gates are trained so the masked model's next-token distribution stays close (KL) to the unmasked model's
on clean prompts + the model's own responses, with an L0 penalty (the expected share of latents kept, times
``sparsity``) pushing as many gates shut as the clean behaviour allows. A latent the clean behaviour does not
need is dropped whatever it does elsewhere: the hope is that backdoor latents are among them. Without the error
term the SAE reconstruction from open latents replaces the activation; with it only the shut latents' decoded
part is removed (then a mask can hardly hurt, or help: measured in docs/results.md).

Hard-concrete gates (Louizos et al. 2018): ``s = sigmoid((logit(u) + log_alpha) / beta)`` stretched to
``(gamma, zeta)`` and clipped to [0, 1]; at test time a latent is kept when its deterministic gate exceeds 0.5.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from backdoor_sae._batching import padded_batches, right_padded
from backdoor_sae._progress import progress
from backdoor_sae.capture.store import TokenSequence
from backdoor_sae.edits.hooks import decoder_rows, gated_reconstruction
from backdoor_sae.models import LoadedModel, format_chats

BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1
REF_CACHE_FLOATS = 2**27  # reference log-probs held in memory up to 512 MiB (tokens x vocab); beyond, recomputed


@dataclass
class LearnedMask:
    """Per hook, the gate logits (``log_alpha``) of a trained mask, and how training went."""

    log_alpha: dict[str, Float[Tensor, " d_sae"]]
    error_term: bool
    sparsity: float
    meta: dict[str, Any] = field(default_factory=dict)

    def gates(self, hook: str) -> Float[Tensor, " d_sae"]:
        """Deterministic test-time gate of each latent, in [0, 1]."""
        return (torch.sigmoid(self.log_alpha[hook]) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def kept(self, threshold: float = 0.5) -> dict[str, list[int]]:
        """The latents each hook keeps (gate above ``threshold``)."""
        return {h: torch.nonzero(self.gates(h) > threshold).flatten().tolist() for h in self.log_alpha}

    @property
    def n_kept(self) -> int:
        return sum(len(v) for v in self.kept().values())


def _expected_open(log_alpha: Tensor) -> Tensor:
    """Probability that each hard-concrete gate is non-zero (the differentiable L0)."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def _sample_gate(log_alpha: Tensor, gen: torch.Generator) -> Tensor:
    u = torch.rand(log_alpha.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _masked_hook(sae: Any, gate: dict[str, Tensor], name: str, error_term: bool) -> Any:
    rows = decoder_rows(sae)

    def fn(x: Float[Tensor, "batch pos d"], hook: Any) -> Tensor:
        return x if name not in gate else gated_reconstruction(sae, x, gate[name], error_term, rows)

    return fn


@contextmanager
def _frozen(model: LoadedModel, saes: Mapping[str, Any]) -> Iterator[None]:
    """Model and SAE parameters do not take gradients for the block (restored after)."""
    params = [*model.hf.parameters(), *(p for s in saes.values() for p in s.parameters())]
    was = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, w in zip(params, was):
            p.requires_grad_(w)


def _sequences(model: LoadedModel, clean: Sequence[str] | Sequence[TokenSequence],
               max_new_tokens: int) -> list[Tensor]:
    """Token ids of prompt + response + EOS: given, or the model's own greedy responses to clean prompts."""
    if isinstance(clean[0], TokenSequence):
        return [s.ids for s in clean]  # type: ignore[union-attr]
    from backdoor_sae.generation import generate

    prompts = list(clean)  # type: ignore[arg-type]
    tok = model.tokenizer
    replies = generate(model, prompts, max_new_tokens=max_new_tokens)
    texts = format_chats(tok, prompts, [None] * len(prompts))
    return [torch.tensor(tok.encode(t, add_special_tokens=False) + tok.encode(r, add_special_tokens=False)
                         + [tok.eos_token_id]) for t, r in zip(texts, replies)]


@torch.no_grad()
def _reference(model: LoadedModel, seqs: list[Tensor], batch_size: int) -> list[Tensor] | None:
    """The unmasked model's next-token log-probs of each sequence, computed once (no gate changes them), or
    ``None`` when they would exceed :data:`REF_CACHE_FLOATS` (then each step recomputes its batch's)."""
    vocab = int(model.hf.get_output_embeddings().weight.shape[0])
    if sum(len(s) for s in seqs) * vocab > REF_CACHE_FLOATS:
        return None
    out: list[Tensor] = []
    for _, ids, real, _ in padded_batches(seqs, model.tokenizer.pad_token_id, batch_size):
        logp = model.hf(input_ids=ids).logits.float().log_softmax(-1)
        out += [lp[:n].clone() for lp, n in zip(logp, real.sum(1).tolist())]
    return out


def _kl(ref_logp: Tensor, logits: Tensor, real: Tensor) -> Tensor:
    """Mean KL(ref || edited) per real token (``ref_logp``: the unmasked model's log-probs)."""
    lq = logits.float().log_softmax(-1)
    return ((ref_logp.exp() * (ref_logp - lq)).sum(-1) * real).sum() / real.sum()


def learn_mask(model: LoadedModel, saes: Mapping[str, Any], clean: Sequence[str] | Sequence[TokenSequence], *,
               sparsity: float = 0.01, error_term: bool = False, steps: int = 300, batch_size: int = 32,
               lr: float = 0.05, init: float = 3.0, max_new_tokens: int = 32, seed: int = 0) -> LearnedMask:
    """Train one gate per latent of each SAE (``{hook: sae}``) on clean trusted data: prompt strings (answered
    by the model itself, greedy) or captured :class:`~backdoor_sae.capture.store.TokenSequence` s. Loss: KL to the
    unmasked model per token + ``sparsity`` x the expected share of latents kept. Seeded; Adam on the gate
    logits only (the model and SAEs are frozen)."""
    if len(clean) == 0:
        raise ValueError("learn_mask needs at least one clean prompt; got an empty list")
    if not saes:
        raise ValueError("no SAEs given: pass {hook: sae}")
    if sparsity < 0 or steps < 1:
        raise ValueError(f"learn_mask needs sparsity >= 0 and steps >= 1, got {sparsity} and {steps}")
    seqs = _sequences(model, clean, max_new_tokens)
    torch.manual_seed(seed)
    log_alpha = {h: torch.full((int(s.cfg.d_sae),), float(init), requires_grad=True) for h, s in saes.items()}
    opt = torch.optim.Adam(list(log_alpha.values()), lr=lr)
    gen, order = torch.Generator().manual_seed(seed), random.Random(f"mask-{seed}")
    gate: dict[str, Tensor] = {}
    hooks = [(h, _masked_hook(s, gate, h, error_term)) for h, s in saes.items()]
    d_total = sum(int(s.cfg.d_sae) for s in saes.values())
    pad, kl_hist = model.tokenizer.pad_token_id, []
    model.hf.eval()
    cached = _reference(model, seqs, batch_size)
    with _frozen(model, saes), model.hooked.hooks(fwd_hooks=hooks):
        for _ in progress(range(steps), desc=f"mask (sparsity {sparsity})"):
            pick = order.sample(range(len(seqs)), min(batch_size, len(seqs)))
            ids, real = right_padded([seqs[i] for i in pick], pad)
            if cached is not None:
                ref = pad_sequence([cached[i] for i in pick], batch_first=True)
            else:
                gate.clear()  # no gate: the hooks pass activations through (the unmasked reference)
                with torch.no_grad():
                    ref = model.hf(input_ids=ids).logits.float().log_softmax(-1)
            gate.update({h: _sample_gate(la, gen) for h, la in log_alpha.items()})
            kl = _kl(ref, model.hf(input_ids=ids).logits, real.float())
            l0 = sum(_expected_open(la).sum() for la in log_alpha.values()) / d_total
            loss = kl + sparsity * l0
            opt.zero_grad()
            loss.backward()
            opt.step()
            kl_hist.append(float(kl.detach()))
    mask = LearnedMask({h: la.detach() for h, la in log_alpha.items()}, error_term, sparsity)
    mask.meta = {"steps": steps, "n_sequences": len(seqs), "final_kl": round(sum(kl_hist[-20:]) / min(20, steps), 5),
                 "n_kept": mask.n_kept, "d_sae": d_total, "seed": seed}
    return mask


def mask_edit(mask: LearnedMask, saes: Mapping[str, Any], name: str = "") -> Any:
    """The keep edit of a trained mask: each hook keeps the latents whose gate is open (at least one)."""
    from backdoor_sae.methods.keeping import keep_edit

    kept = mask.kept()
    for h, lat in kept.items():  # an all-shut hook keeps its single most open latent: an empty set is refused
        if not lat:
            kept[h] = [int(mask.log_alpha[h].argmax())]
    return keep_edit({h: (saes[h], kept[h]) for h in kept}, keep_error=mask.error_term, name=name)
