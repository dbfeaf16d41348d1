"""``ActivationStore``: labelled activations on disk, per hook, in shards (written by ``capture_activations``).

On disk: ``manifest.json`` + per shard one safetensors file per hook (``<hook>/shard_00000.safetensors``) and
one labels file (``labels/shard_00000.safetensors``, which also keeps the token sequences for CE metrics). Every
row is labelled ``triggered``, ``prompt_id``, ``position``, ``position_kind`` (0 = trigger tokens, 1 = other
prompt tokens, 2 = response tokens) and ``token``. The manifest lists a shard only once all its files are in
place; opening a store checks every listed file's size and header.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file
from torch import Tensor

from backdoor_sae._io import safetensors_problem
from backdoor_sae._tensorfile import load_tensor

TRIGGER, PROMPT, RESPONSE = 0, 1, 2  # position kinds
LABEL_KEYS = ("triggered", "prompt_id", "position", "position_kind", "token")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TokenSequence:
    """One captured prompt (+ response) as token ids, with the position kind of every token."""

    ids: Int[Tensor, " pos"]
    kinds: Int[Tensor, " pos"]
    triggered: bool
    prompt_id: int


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def _file_problem(root: Path, rel: str, size: int) -> str | None:
    """Why a shard file is unusable (missing, wrong size, unreadable header), or ``None`` if it is fine."""
    p = root / rel
    if not p.is_file():
        return "missing"
    if p.stat().st_size != size:
        return f"truncated or changed ({p.stat().st_size} of {size} bytes)"
    return safetensors_problem(p)


class ActivationStore:
    """Labelled activations on disk, per hook, in shards; labels live in memory, activations are read per
    shard. Open an existing capture with ``ActivationStore(path)``."""

    def __init__(self, root: str | Path, *, _tmp: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.root = Path(root)
        self._tmp = _tmp  # keeps a temporary capture alive as long as the store
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"activation store not found: {path}")
        m = json.loads(path.read_text())
        if not m.get("complete"):
            raise ValueError(f"activation store {self.root} is incomplete: run the same capture again to resume")
        for s in m["shards"]:
            for rel, size in s["files"].items():
                problem = _file_problem(self.root, rel, size)
                if problem:
                    raise ValueError(f"activation store shard {self.root / rel} is {problem}: run the same "
                                     "capture again to re-capture it")
        self.manifest = m
        self.hooks: list[str] = list(m["hooks"])
        self._labels: dict[str, Tensor] | None = None
        if self.n_rows == 0:
            raise ValueError(f"activation store {self.root} is empty (no activation rows)")

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.root)!r}, hooks={self.hooks}, rows={self.n_rows})"

    def __len__(self) -> int:
        return self.n_rows

    @property
    def n_rows(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    @property
    def model_path(self) -> str:
        return self.manifest["model"]

    def d_in(self, hook: str) -> int:
        return int(self.manifest["d_in"][self._hook(hook)])

    def _hook(self, hook: str | None) -> str:
        if hook is None:
            if len(self.hooks) != 1:
                raise ValueError(f"store holds several hooks; name one of: {', '.join(self.hooks)}")
            return self.hooks[0]
        if hook not in self.hooks:
            raise ValueError(f"hook {hook!r} is not in this store; stored hooks: {', '.join(self.hooks)}")
        return hook

    def _shard_path(self, what: str, index: int) -> Path:
        return self.root / what / _shard_name(index)

    def labels(self, **filters: Any) -> dict[str, Tensor]:
        """Row labels (``triggered``, ``prompt_id``, ``position``, ``position_kind``, ``token``), filtered."""
        mask = self.mask(**filters)
        return {k: v[mask] for k, v in self._all_labels().items()}

    def _all_labels(self) -> dict[str, Tensor]:
        if self._labels is None:
            parts = [load_file(self._shard_path("labels", s["index"])) for s in self.manifest["shards"]]
            self._labels = {k: torch.cat([p[k] for p in parts]) for k in LABEL_KEYS}
        return self._labels

    def mask(self, *, triggered: bool | None = None, position_kind: int | Sequence[int] | None = None,
             prompt_ids: Sequence[int] | None = None) -> Tensor:
        """Boolean row mask for the filters; a filter that keeps no row is an error."""
        lab = self._all_labels()
        m = torch.ones(self.n_rows, dtype=torch.bool)
        if triggered is not None:
            m &= lab["triggered"] == bool(triggered)
        if position_kind is not None:
            kinds = [position_kind] if isinstance(position_kind, int) else list(position_kind)
            m &= torch.isin(lab["position_kind"], torch.tensor(kinds, dtype=torch.int8))
        if prompt_ids is not None:
            m &= torch.isin(lab["prompt_id"], torch.as_tensor(list(prompt_ids), dtype=torch.int64))
        if not m.any():
            raise ValueError(f"no rows match the filter (triggered={triggered}, position_kind={position_kind}, "
                             f"prompt_ids={'given' if prompt_ids is not None else None}) in {self.root}")
        return m

    def _shard_masks(self, **filters: Any) -> list[tuple[int, Tensor]]:
        """``(shard index, row mask within the shard)`` for every shard with a row that passes the filters."""
        mask, out, start = self.mask(**filters), [], 0
        for s in self.manifest["shards"]:
            m = mask[start:start + s["rows"]]
            if m.any():
                out.append((s["index"], m))
            start += s["rows"]
        return out

    def prompts(self) -> list[tuple[str, bool]]:
        """The captured user prompts (without the trigger) and whether each was captured with the trigger."""
        if "prompts" not in self.manifest:
            raise ValueError(f"activation store {self.root} predates stored prompts: run the same capture again "
                             "(it adds them without re-capturing)")
        return list(zip(self.manifest["prompts"], self.manifest["triggered"]))

    def chunks(self, hook: str | None = None, **filters: Any) -> Iterator[tuple[Float[Tensor, "rows d_in"],
                                                                              dict[str, Tensor]]]:
        """``(activations, labels)`` shard by shard for the rows that pass the filters (float32): one pass over
        a store of any size in bounded memory."""
        hook = self._hook(hook)
        lab, start, bounds = self._all_labels(), 0, {}
        for s in self.manifest["shards"]:
            bounds[s["index"]] = start
            start += s["rows"]
        for i, m in self._shard_masks(**filters):
            rows = slice(bounds[i], bounds[i] + len(m))
            yield self._shard_acts(hook, i)[m].float(), {k: v[rows][m] for k, v in lab.items()}

    def _shard_acts(self, hook: str, index: int) -> Float[Tensor, "rows d_in"]:
        return load_tensor(self._shard_path(hook, index))

    def view(self, hook: str | None = None, **filters: Any) -> Float[Tensor, "rows d_in"]:
        """The activations of one hook for the rows that pass the filters, in row order, in memory, in the
        stored dtype (``batches`` always yields float32)."""
        hook = self._hook(hook)
        return torch.cat([self._shard_acts(hook, i)[m] for i, m in self._shard_masks(**filters)])

    def batches(self, hook: str | None = None, batch_size: int = 4096, *, seed: int = 0, shuffle_shards: int = 8,
                **filters: Any) -> Iterator[Float[Tensor, "batch d_in"]]:
        """Endless shuffled batches (SAETrainer needs an iterator that never runs dry): each epoch visits the
        shards in a seeded order, ``shuffle_shards`` at a time, and shuffles rows within that window."""
        hook = self._hook(hook)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(seed)
        return self._batch_iter(hook, self._shard_masks(**filters), batch_size, max(1, shuffle_shards), gen)

    def _batch_iter(self, hook: str, shards: list[tuple[int, Tensor]], batch_size: int, window: int,
                    gen: torch.Generator) -> Iterator[Tensor]:
        def rows(i: int, m: Tensor) -> Tensor:
            a = self._shard_acts(hook, i)
            return a if bool(m.all()) else a[m]

        cached: dict[int, Tensor] = {}
        if len(shards) <= window:  # everything fits in one window: read the shards once
            cached = {i: rows(i, m) for i, m in shards}
        rest: list[Tensor] = []
        while True:
            order = torch.randperm(len(shards), generator=gen).tolist()
            for w in range(0, len(order), window):
                group = [shards[j] for j in order[w:w + window]]
                pool = torch.cat([*rest, *(cached[i] if i in cached else rows(i, m) for i, m in group)])
                perm = torch.randperm(len(pool), generator=gen)
                n_full = len(pool) // batch_size * batch_size
                for b in range(0, n_full, batch_size):
                    yield pool[perm[b:b + batch_size]].float()
                rest = [pool[perm[n_full:]]]

    def sequences(self, *, triggered: bool | None = None) -> list[TokenSequence]:
        """The captured token sequences (prompt + response + EOS) with position kinds, for CE/KL metrics."""
        out: list[TokenSequence] = []
        for s in self.manifest["shards"]:
            f = load_file(self._shard_path("labels", s["index"]))
            ends = torch.cumsum(f["seq_lengths"], 0).tolist()
            for j, end in enumerate(ends):
                flag = bool(f["seq_triggered"][j])
                if triggered is None or flag == triggered:
                    begin = end - int(f["seq_lengths"][j])
                    out.append(TokenSequence(f["seq_tokens"][begin:end].long(), f["seq_kinds"][begin:end].long(),
                                             flag, s["prompts"][0] + j))
        if not out:
            raise ValueError(f"no sequences match triggered={triggered} in {self.root}")
        return out
