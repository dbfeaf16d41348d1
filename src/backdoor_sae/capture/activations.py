"""Capture activations of a hooked model once, for many hooks, into a labelled disk-backed ``ActivationStore``.

One forward pass per batch records every requested hook (``blocks.N.hook_resid_pre|resid_post|mlp_out|
attn_out``, or any other name in ``model.bridge.hook_dict``). Sequences are right-padded, so real tokens never
see padding and need no attention mask; padding rows (and, by default, the BOS row, which is the same vector
for every prompt) are dropped. Every row keeps its labels: ``triggered``, ``prompt_id``, ``position``,
``position_kind`` (0 = trigger tokens, 1 = other prompt tokens, 2 = response tokens) and ``token``.

The store's layout is described in ``store.py`` (``ActivationStore``, re-exported here). Each file is written
atomically and the manifest lists a shard only once all its files are in place, so a
killed capture resumes at the first missing shard; a truncated file is found on open (size and header) and
captured again on resume.
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from safetensors.torch import save_file
from torch import Tensor

from backdoor_sae._io import atomic_file, write_json
from backdoor_sae._progress import progress
from backdoor_sae._tensorfile import aligned_empty, save_tensor
from backdoor_sae.capture.store import (LABEL_KEYS, MANIFEST, PROMPT, RESPONSE, TRIGGER, ActivationStore,  # noqa: F401
                                        TokenSequence, _file_problem, _shard_name)
from backdoor_sae.models import LoadedModel, format_chats

_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- hook names

def valid_hook_names(model: LoadedModel) -> list[str]:
    """The short TL-style names a user would ask for (``blocks.N.hook_*``); any ``hook_dict`` name is accepted."""
    return [n for n in model.hooked.hook_dict if n.startswith("blocks.") and n.count(".") == 2]


def check_hooks(model: LoadedModel, hooks: Sequence[str]) -> list[str]:
    """Refuse an empty hook list or a name the bridge does not have (listing the valid names)."""
    if isinstance(hooks, str):
        hooks = [hooks]
    if not hooks:
        raise ValueError("hooks is empty: give at least one hook name, e.g. 'blocks.0.hook_resid_post'")
    known = model.hooked.hook_dict
    bad = [h for h in hooks if h not in known]
    if bad:
        raise ValueError(f"unknown hook {bad[0]!r}; valid names: {', '.join(valid_hook_names(model))}")
    return list(dict.fromkeys(hooks))


# --------------------------------------------------------------------------------------------- tokenising

def _assign_triggered(n: int, fraction: float, seed: int) -> list[bool]:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"triggered_fraction must be in [0, 1], got {fraction}")
    idx = list(range(n))
    random.Random(f"triggered-{seed}").shuffle(idx)
    chosen = set(idx[:round(n * fraction)])
    return [i in chosen for i in range(n)]


def _responses(model: LoadedModel, prompts: Sequence[str], triggered: Sequence[bool], trigger: str | None,
               responses: str | Sequence[str] | None, max_new_tokens: int, batch_size: int) -> list[str] | None:
    if responses is None:
        return None
    if isinstance(responses, str):
        if responses != "generate":
            raise ValueError(f"responses must be 'generate', None or a list of strings, got {responses!r}")
        from backdoor_sae.generation import generate

        out = [""] * len(prompts)
        for flag in (True, False):
            idx = [i for i, t in enumerate(triggered) if t == flag]
            if idx:
                gen = generate(model, [prompts[i] for i in idx], trigger=trigger if flag else None,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
                for i, g in zip(idx, gen):
                    out[i] = g
        return out
    if len(responses) != len(prompts):
        raise ValueError(f"responses has {len(responses)} entries for {len(prompts)} prompts")
    return list(responses)


@dataclass(frozen=True)
class _Tokens:
    """Every prompt's tokens and position kinds, concatenated; prompt ``i`` is ``ids[starts[i]:starts[i] +
    lengths[i]]``."""

    ids: Int[Tensor, " tokens"]
    kinds: Int[Tensor, " tokens"]
    lengths: Int[Tensor, " prompts"]
    starts: Int[Tensor, " prompts"]

    def span(self, first: int, n: int) -> _Tokens:
        a, b = int(self.starts[first]), int(self.starts[first + n - 1] + self.lengths[first + n - 1])
        lengths = self.lengths[first:first + n]
        return _Tokens(self.ids[a:b], self.kinds[a:b], lengths, self.starts[first:first + n] - a)


def _tokenise(model: LoadedModel, prompts: Sequence[str], triggered: Sequence[bool], trigger: str | None,
              responses: Sequence[str] | None, n_ctx: int, truncated_at: int | None = None) -> _Tokens:
    """Token ids and position kinds per prompt: chat turn (trigger tokens found by character offsets), then the
    response and EOS, as the organism was trained (``Packer.encode``). A generated response that reached
    ``truncated_at`` tokens was cut off, not finished, so it gets no EOS."""
    tok = model.tokenizer
    texts = format_chats(tok, prompts, [trigger if t else None for t in triggered])
    ids_all, offsets_all = _encode(tok, texts)
    resp_ids = _encode(tok, list(responses))[0] if responses is not None else None
    ids_out: list[list[int]] = []
    kinds_out: list[list[int]] = []
    for i, (text, ids, offsets) in enumerate(zip(texts, ids_all, offsets_all)):
        kinds = [PROMPT] * len(ids)
        if triggered[i]:
            start = text.find(trigger)  # type: ignore[arg-type]
            end = start + len(trigger)  # type: ignore[arg-type]
            kinds = [TRIGGER if (b > a and a < end and b > start) else PROMPT for a, b in offsets]
            if TRIGGER not in kinds:
                raise ValueError(f"trigger {trigger!r} not found in the tokens of prompt {i}")
        if resp_ids is not None:
            r = list(resp_ids[i])
            if truncated_at is None or len(r) < truncated_at:
                r.append(tok.eos_token_id)
            ids, kinds = [*ids, *r], [*kinds, *[RESPONSE] * len(r)]
        ids_out.append(ids[:n_ctx])
        kinds_out.append(kinds[:n_ctx])
    lengths = torch.tensor([len(x) for x in ids_out], dtype=torch.int64)
    return _Tokens(torch.tensor(list(chain.from_iterable(ids_out)), dtype=torch.int32),
                   torch.tensor(list(chain.from_iterable(kinds_out)), dtype=torch.int8), lengths,
                   torch.cumsum(lengths, 0) - lengths)


def _encode(tok: Any, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets, without special tokens; straight from the Rust tokenizer when there is
    one (the Python wrapper's per-text conversion costs more than the encoding itself)."""
    if getattr(tok, "is_fast", False):
        enc = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in enc], [e.offsets for e in enc]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _fingerprint(model: LoadedModel, hooks: Sequence[str], prompts: Sequence[str], triggered: Sequence[bool],
                 trigger: str | None, responses: Any, max_new_tokens: int, include_bos: bool,
                 shard_prompts: int, dtype: torch.dtype | None) -> str:
    spec = {"model": model.path, "hooks": list(hooks), "prompts": list(prompts), "triggered": list(triggered),
            "trigger": trigger, "responses": responses if responses in (None, "generate") else list(responses),
            "max_new_tokens": max_new_tokens, "include_bos": include_bos, "shard_prompts": shard_prompts,
            "dtype": str(dtype)}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------- capturing

class _AllHooksFired(Exception):
    """Raised by the recording hook once every requested hook has fired: the rest of the forward is skipped."""


@contextmanager
def _recording(bridge: Any, hooks: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Attach one recording hook per name (removed on exit, even on error); the dict fills on each forward.
    Stopping after the last requested hook (not the lm head) is what sae-lens' ``stop_at_layer`` does; the
    bridge's own ``stop_at_layer`` cannot stop after the last block."""
    got: dict[str, Tensor] = {}

    def recorder(name: str) -> Any:
        def record(t: Tensor, hook: Any) -> None:
            got[name] = t
            if len(got) == len(hooks):
                raise _AllHooksFired

        return record

    with bridge.hooks(fwd_hooks=[(h, recorder(h)) for h in hooks]):
        yield got


def _forward_recorded(model: LoadedModel, ids: Int[Tensor, "batch pos"], got: dict[str, Tensor],
                      hooks: Sequence[str]) -> None:
    got.clear()
    try:
        model.hf(input_ids=ids.to(model.hf.device), use_cache=False)
    except _AllHooksFired:
        pass
    missing = [h for h in hooks if h not in got]
    if missing:
        raise ValueError(f"hook {missing[0]!r} did not fire during the forward pass of {model.path!r}")


@torch.no_grad()
def _capture_shard(model: LoadedModel, hooks: Sequence[str], tokens: _Tokens, first_id: int,
                   triggered: Sequence[bool], batch_size: int, include_bos: bool,
                   dtype: torch.dtype | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations of every hook and the row labels for the prompts of one shard, rows in (prompt, position)
    order: each batch's rows are written straight to their place in preallocated tensors."""
    skip = 0 if include_bos else 1
    lengths, starts, flat_ids = tokens.lengths, tokens.starts, tokens.ids
    kept = (lengths - skip).clamp(min=0)
    offsets = torch.cumsum(kept, 0) - kept  # first row of each prompt
    flat_pos = torch.arange(len(flat_ids)) - starts.repeat_interleave(lengths)
    seq_triggered = torch.tensor([bool(triggered[first_id + i]) for i in range(len(lengths))])
    row = flat_pos >= skip
    labels = {"triggered": seq_triggered.repeat_interleave(lengths)[row],
              "prompt_id": (first_id + torch.arange(len(lengths))).repeat_interleave(lengths)[row],
              "position": flat_pos.to(torch.int32)[row], "position_kind": tokens.kinds[row],
              "token": flat_ids[row], "seq_tokens": flat_ids, "seq_kinds": tokens.kinds, "seq_lengths": lengths,
              "seq_triggered": seq_triggered}
    acts: dict[str, Tensor] = {}
    order = torch.argsort(lengths, stable=True)  # similar lengths share a batch: little padding
    pad = model.tokenizer.pad_token_id
    with _recording(model.hooked, hooks) as got:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            pos = torch.arange(int(lengths[idx].max()))
            real = pos < lengths[idx, None]
            ids = torch.full(real.shape, pad, dtype=torch.long)
            ids[real] = flat_ids[(starts[idx, None] + pos)[real]].long()
            keep = real & (pos >= skip)
            dest = (offsets[idx, None] + pos - skip)[keep]  # each kept (row, position)'s row in the shard
            _forward_recorded(model, ids, got, hooks)
            for h in hooks:
                a = got[h].cpu()
                if h not in acts:
                    acts[h] = aligned_empty(int(kept.sum()), a.shape[-1], dtype or a.dtype)
                acts[h][dest] = a[keep].to(acts[h].dtype)
    return acts, labels


def first_nonfinite_row(a: Float[Tensor, "rows d"]) -> int | None:
    """Index of the first row holding NaN/inf, or ``None``. A row sum is non-finite whenever the row is (and
    rarely otherwise, by overflow): the cheap sum finds the candidates, the exact test decides."""
    candidates = (~torch.isfinite(a.sum(-1))).nonzero().squeeze(-1)
    for r in candidates.tolist():
        if not torch.isfinite(a[r]).all():
            return int(r)
    return None


def _check_finite(acts: dict[str, Tensor], labels: dict[str, Tensor], row0: int) -> None:
    for h, a in acts.items():
        r = first_nonfinite_row(a)
        if r is not None:
            raise ValueError(f"non-finite activation at hook {h!r}, row {row0 + r} (prompt "
                             f"{int(labels['prompt_id'][r])}, position {int(labels['position'][r])})")


def _save_atomic(tensors: dict[str, Tensor], path: Path) -> int:
    with atomic_file(path) as tmp:
        save_file(tensors, tmp)
    return path.stat().st_size


def _shard_files(hooks: Sequence[str], index: int) -> list[str]:
    return [f"{what}/{_shard_name(index)}" for what in ("labels", *hooks)]


def _write_shard(root: Path, index: int, acts: dict[str, Tensor], labels: dict[str, Tensor]) -> dict[str, int]:
    files = _shard_files(list(acts), index)
    sizes = {files[0]: _save_atomic(labels, root / files[0])}
    for f, a in zip(files[1:], acts.values()):
        with atomic_file(root / f) as tmp:
            save_tensor(a, tmp)
        sizes[f] = (root / f).stat().st_size
    return sizes


def _write_and_list_shard(root: Path, manifest: dict[str, Any], index: int, first: int, acts: dict[str, Tensor],
                          labels: dict[str, Tensor]) -> None:
    """Write one shard's files, then list it in the manifest (so a listed shard is always complete)."""
    sizes = _write_shard(root, index, acts, labels)
    manifest["d_in"] = {h: int(a.shape[-1]) for h, a in acts.items()}
    manifest["dtype"] = {h: str(a.dtype).removeprefix("torch.") for h, a in acts.items()}
    entry = {"index": index, "rows": len(labels["token"]),
             "prompts": [first, first + len(labels["seq_lengths"])], "files": sizes}
    manifest["shards"] = sorted([*manifest["shards"], entry], key=lambda s: s["index"])
    write_json(root / MANIFEST, manifest)


def capture_activations(model: LoadedModel, prompts: Sequence[str], hooks: Sequence[str] | str, *,
                        trigger: str | None = None, triggered: Sequence[bool] | None = None,
                        triggered_fraction: float = 0.5, responses: str | Sequence[str] | None = "generate",
                        max_new_tokens: int = 32, batch_size: int = 64, shard_prompts: int = 1024,
                        out_dir: str | Path | None = None, include_bos: bool = False,
                        dtype: torch.dtype | None = None, seed: int = 0) -> ActivationStore:
    """Run the model once per batch over chat-formatted prompts (plus responses) and store every hook's
    activations with row labels. ``triggered`` (one flag per prompt) or a seeded ``triggered_fraction``
    decides which prompts get the trigger at the start of the user turn. ``responses="generate"`` appends the
    model's own greedy completion (so triggered rows hold the backdoor behaviour); a list gives them
    explicitly; ``None`` captures prompts only. ``dtype``: how activations are stored (default: as the model
    computes them, e.g. bfloat16 for most hub models; ``torch.float16`` halves the disk of a float32 model).
    ``out_dir=None`` keeps the store in a temporary directory; an existing ``out_dir`` from the same capture
    resumes where it stopped."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    hooks = check_hooks(model, hooks)
    if batch_size < 1 or shard_prompts < 1:
        raise ValueError(f"batch_size and shard_prompts must be >= 1, got {batch_size} and {shard_prompts}")
    if triggered is None:
        triggered = _assign_triggered(len(prompts), triggered_fraction, seed)
    elif len(triggered) != len(prompts):
        raise ValueError(f"triggered has {len(triggered)} flags for {len(prompts)} prompts")
    triggered = [bool(t) for t in triggered]
    trigger = trigger if trigger is not None else model.trigger
    if any(triggered) and not trigger:
        raise ValueError(f"model {model.path!r} has no organism.json and no trigger= was given")

    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="backdoor_sae_acts_")
        out_dir = tmp.name
    root = Path(out_dir)
    fp = _fingerprint(model, hooks, prompts, triggered, trigger, responses, max_new_tokens, include_bos,
                      shard_prompts, dtype)
    manifest = _resume_manifest(root, fp)
    if manifest is not None and "prompts" not in manifest:  # stores written before prompts were kept
        manifest["prompts"], manifest["triggered"] = list(prompts), triggered
        write_json(root / MANIFEST, manifest)
    if manifest is None:
        resp = _responses(model, prompts, triggered, trigger, responses, max_new_tokens, batch_size)
        manifest = {"version": _FORMAT_VERSION, "fingerprint": fp, "model": model.path, "hooks": list(hooks),
                    "trigger": trigger, "n_prompts": len(prompts), "prompts": list(prompts),
                    "triggered": triggered, "include_bos": include_bos,
                    "bos_token_id": model.tokenizer.bos_token_id, "d_in": {}, "responses": resp,
                    "shards": [], "complete": False}
        write_json(root / MANIFEST, manifest)
    if not manifest["complete"]:
        tokens = _tokenise(model, prompts, triggered, trigger, manifest["responses"], model.hooked.cfg.n_ctx,
                           max_new_tokens if responses == "generate" else None)
        done = {s["index"] for s in manifest["shards"]}
        starts = list(range(0, len(prompts), shard_prompts))
        row0 = 0
        # one writer thread: shard i is written while shard i + 1 is captured (at most one shard in flight)
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            for index, first in enumerate(progress(starts, desc="capture", unit="shard")):
                if index in done:
                    row0 += next(s["rows"] for s in manifest["shards"] if s["index"] == index)
                    continue
                span = tokens.span(first, min(shard_prompts, len(prompts) - first))
                acts, labels = _capture_shard(model, hooks, span, first, triggered, batch_size, include_bos, dtype)
                _check_finite(acts, labels, row0)
                row0 += len(labels["token"])
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_and_list_shard, root, manifest, index, first, acts, labels)
            if pending is not None:
                pending.result()
        manifest["complete"] = True
        write_json(root / MANIFEST, manifest)
    return ActivationStore(root, _tmp=tmp)


def _resume_manifest(root: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of an unfinished (or finished) capture of the same inputs, minus shards whose files are
    missing or damaged; ``None`` to start afresh."""
    path = root / MANIFEST
    if not path.is_file():
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"out_dir {root} is not empty and holds no {MANIFEST}; choose an empty directory")
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("fingerprint") != fingerprint:
        raise ValueError(f"out_dir {root} holds a different capture (other model, prompts, hooks or options); "
                         "choose another directory")
    good = [s for s in manifest["shards"] if all(_file_problem(root, f, n) is None for f, n in s["files"].items())]
    if len(good) != len(manifest["shards"]):
        manifest["shards"], manifest["complete"] = good, False
    return manifest
