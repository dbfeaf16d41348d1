"""Right-padded batches of token sequences, for every teacher-forced forward (CE, KL, SAE metrics, attribution).

Right padding keeps every real token at its true position and lets it see only real tokens (causal attention),
so no attention mask is needed; the boolean ``real`` mask says which cells hold tokens.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor


def right_padded(seqs: Sequence[Tensor], pad: int) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Stack 1-D token (or label) tensors into ``[batch, max_len]``, padding on the right with ``pad``. Integer
    tensors only: a boolean one would turn any non-zero ``pad`` into ``True``."""
    if seqs[0].dtype == torch.bool:
        raise ValueError("right_padded needs integer tensors; a bool tensor cannot hold the pad value")
    lengths = torch.tensor([len(s) for s in seqs])
    real = torch.arange(int(lengths.max())) < lengths[:, None]
    out = torch.full(real.shape, pad, dtype=seqs[0].dtype)
    out[real] = torch.cat(list(seqs))
    return out, real


def padded_batches(seqs: Sequence[Tensor], pad: int, batch_size: int,
                   *labels: Sequence[Tensor]) -> Iterator[tuple[int, Tensor, Tensor, list[Tensor]]]:
    """``(first index, ids, real mask, [padded labels...])`` per batch of ``batch_size`` sequences; each label
    sequence (e.g. position kinds) is padded alongside with ``-1``."""
    for s in range(0, len(seqs), batch_size):
        ids, real = right_padded(seqs[s:s + batch_size], pad)
        yield s, ids, real, [right_padded(lab[s:s + batch_size], -1)[0] for lab in labels]
