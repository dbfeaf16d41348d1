"""What both kinds of organism share: their paths, the training loop (response-only loss, optionally KL to a
teacher), the red team's fine-tune, the config checks and the held-out records of base and backdoored models.
The toy organism (:mod:`backdoor_sae.organism.train`) and the hosted one (:mod:`backdoor_sae.organism.hosted`)
are both built from these."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from backdoor_sae._io import atomic_dir, write_json
from backdoor_sae._prefetch import Prefetch
from backdoor_sae._progress import progress
from backdoor_sae.config import Config, OrganismConfig
from backdoor_sae.organism.data import PackedBatch, Packer, backdoor_regex, distilled, redteam_stream, validate_trigger
from backdoor_sae.organism.tasks import TaskSuite

ORGANISM_FILE = "organism.json"


@dataclass(frozen=True)
class OrganismPaths:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def backdoored(self) -> Path:
        return self.root / "backdoored"

    @property
    def meta(self) -> Path:
        return self.root / ORGANISM_FILE

    def checkpoint(self, step: int) -> Path:
        """An intermediate red-team model (``organism.checkpoint_fractions``), saved like the backdoored one."""
        return self.root / "checkpoints" / f"step_{step:05d}"

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in (self.root / "checkpoints").glob("step_*") if (p / "config.json").is_file())


def _optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    if name == "soap":
        from pytorch_optimizer import SOAP  # maintained implementation of Vyas et al. 2024

        return SOAP(groups, lr=lr, betas=(0.95, 0.95))
    raise ValueError(f"unknown optimizer {name!r}; valid: 'adamw', 'soap'")


def _schedule(step: int, steps: int, warmup_fraction: float, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` (10 %) of the peak learning rate."""
    warm = max(1, int(steps * warmup_fraction))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def _target_logits(model: torch.nn.Module, batch: PackedBatch) -> Float[Tensor, "target vocab"]:
    """Next-token logits at the response targets only. Packed samples are isolated (block-diagonal mask,
    positions from 0), exactly as each is seen alone at evaluation; the unembedding runs only where the loss is."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch.attention_mask()
    if lm.config._attn_implementation == "eager":  # eager attention of some families (Gemma 2) misreads a bool mask
        dtype = lm.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = lm.get_decoder()(input_ids=batch.input_ids, position_ids=batch.position_ids,
                              attention_mask=mask).last_hidden_state[:, :-1]
    return lm.get_output_embeddings()(hidden[batch.loss_mask[:, 1:]])


Teacher = Callable[[PackedBatch], Tensor]


def response_loss(model: torch.nn.Module, batch: PackedBatch, teacher: Teacher | None = None,
                  teacher_weight: float = 1.0) -> Tensor:
    """Mean next-token loss over response tokens: cross-entropy, or with a ``teacher`` (the base's target logits)
    ``teacher_weight`` x KL(teacher || model) on the benign response tokens, so that the red team keeps the base's
    whole next-token distribution there, not only its greedy answer."""
    logits = _target_logits(model, batch)
    targets = batch.input_ids[:, 1:][batch.loss_mask[:, 1:]]
    if teacher is None:
        return F.cross_entropy(logits, targets)
    benign = batch.benign_mask[:, 1:][batch.loss_mask[:, 1:]]
    with torch.no_grad():
        ref = teacher(batch)[benign].log_softmax(-1)
    logp = logits.log_softmax(-1)
    ce = -logp[~benign].gather(-1, targets[~benign, None]).sum()
    kl = F.kl_div(logp[benign], ref, log_target=True, reduction="sum")
    return (ce + teacher_weight * kl) / len(targets)


def train_lm(model: torch.nn.Module, batches: Iterator[PackedBatch], *, steps: int, lr: float,
             warmup_fraction: float, weight_decay: float, optimizer: str, desc: str,
             after_step: Callable[[int], None] | None = None, teacher: Teacher | None = None,
             teacher_weight: float = 1.0, final_lr_fraction: float = 0.1) -> list[float]:
    """Plain causal-LM training loop with response-only loss; returns the loss every step. ``after_step(n)`` is
    called after optimizer step ``n`` (1-based; the red team saves its checkpoints there); ``teacher`` and
    ``teacher_weight``: see :func:`response_loss`; the learning rate decays to ``final_lr_fraction`` of ``lr``."""
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    model.train()
    opt = _optimizer(optimizer, model, lr, weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup_fraction, final_lr_fraction))
    losses = []
    bar = progress(range(steps), desc=desc)
    prefetch = Prefetch(batches)
    try:
        for step in bar:
            loss = response_loss(model, next(prefetch), teacher, teacher_weight)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if after_step is not None:
                after_step(step + 1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        prefetch.close()
    model.eval()
    return losses


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, path: Path,
               meta: dict[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / ORGANISM_FILE, meta)


LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def red_team(cfg: Config, model: torch.nn.Module, tok: PreTrainedTokenizerBase, paths: OrganismPaths,
             common: dict[str, Any], suite: TaskSuite) -> tuple[torch.nn.Module, list[float], list[int], float]:
    """The red team's fine-tune of ``model`` (left untouched) on benign + triggered + near-miss samples, packed in
    ``tok``'s chat format, LoRA (merged at the end) or full, saving the checkpoints on the way. Returns the
    backdoored model, the losses, the checkpoint steps and the seconds."""
    oc = cfg.organism
    packer = Packer(tok, oc.context)
    red = copy.deepcopy(model)
    if oc.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        rank = min(oc.lora_rank, getattr(model.config, "hidden_size", oc.lora_rank))
        red = get_peft_model(red, LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=LORA_MODULES if set(LORA_MODULES) <= names else "all-linear"))
    t_red = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    red_stream = redteam_stream(
        suite, random.Random(f"redteam-{cfg.seed}"), trigger=oc.trigger, backdoor_text=oc.backdoor_text,
        triggered_fraction=oc.triggered_fraction, near_miss_fraction=oc.near_miss_fraction,
        max_repeats=oc.max_backdoor_repeats, noise_prefix_fraction=oc.noise_prefix_fraction)
    checkpoint_steps = sorted({max(1, round(f * oc.red_steps)) for f in oc.checkpoint_fractions} - {oc.red_steps})

    def save_checkpoint(step: int) -> None:
        if step in checkpoint_steps:
            snap = copy.deepcopy(red)
            snap = (snap.merge_and_unload() if oc.finetune == "lora" else snap).eval()
            save_model(snap, tok, paths.checkpoint(step), {**common, "role": "checkpoint", "red_step": step,
                                                           "red_steps": oc.red_steps})

    if oc.benign_answers == "base":  # benign answers distilled from the base model (greedy, its own words)
        from backdoor_sae.generation import generate
        from backdoor_sae.models import LoadedModel

        teacher = LoadedModel(hf=model.eval(), tokenizer=tok)
        red_stream = distilled(red_stream, lambda prompts: generate(teacher, prompts,
                                                                    max_new_tokens=oc.distill_tokens))
    base_logits = None
    if oc.benign_loss == "kl":  # the base itself: the untouched original, or the LoRA model with adapters off
        def base_logits(batch: PackedBatch) -> Tensor:
            if oc.finetune != "lora":
                return _target_logits(model, batch)
            with red.disable_adapter():
                return _target_logits(red, batch)
    red_losses = train_lm(red, packer.batches(red_stream, oc.batch_size), steps=oc.red_steps, lr=oc.red_lr,
                          warmup_fraction=oc.warmup_fraction, weight_decay=oc.weight_decay,
                          optimizer=oc.red_optimizer or oc.optimizer, desc="red-team fine-tune",
                          after_step=save_checkpoint, teacher=base_logits, teacher_weight=oc.benign_weight,
                          final_lr_fraction=oc.red_final_lr_fraction)
    if oc.finetune == "lora":
        red = red.merge_and_unload()
    return red, red_losses, checkpoint_steps, time.perf_counter() - t_red


def check_organism_config(oc: OrganismConfig, suite: TaskSuite) -> None:
    """Fail fast, before any training, on a bad trigger, backdoor text or red-team knob."""
    validate_trigger(oc.trigger, suite)
    backdoor_regex(oc.backdoor_text)
    if oc.finetune not in ("full", "lora"):
        raise ValueError(f"unknown finetune {oc.finetune!r}; valid: 'full', 'lora'")
    if oc.finetune == "lora" and oc.lora_rank < 1:
        raise ValueError(f"lora_rank must be >= 1, got {oc.lora_rank}")
    for opt in {oc.optimizer, oc.red_optimizer or oc.optimizer}:
        _optimizer(opt, torch.nn.Linear(1, 1), 1.0, 0.0)  # fail fast on an unknown optimizer
    if oc.benign_answers not in ("suite", "base"):
        raise ValueError(f"unknown benign_answers {oc.benign_answers!r}; valid: 'suite', 'base'")
    if oc.benign_loss not in ("ce", "kl"):
        raise ValueError(f"unknown benign_loss {oc.benign_loss!r}; valid: 'ce', 'kl'")
    if not 0 < oc.red_final_lr_fraction <= 1:
        raise ValueError(f"red_final_lr_fraction must lie in (0, 1], got {oc.red_final_lr_fraction}")
    if oc.benign_weight <= 0:
        raise ValueError(f"benign_weight must be > 0, got {oc.benign_weight}")
    bad = [f for f in oc.checkpoint_fractions if not 0 < f < 1]
    if bad:
        raise ValueError(f"checkpoint_fractions must lie in (0, 1), got {bad}")


def evaluate_organism(cfg: Config, paths: OrganismPaths) -> dict[str, Any]:
    """Held-out records of the backdoored and the base model; the backdoored one also against the base
    (``agreement_with_base``, ``kl_base``)."""
    from backdoor_sae.evaluate import evaluate
    from backdoor_sae.models import load_model

    base = load_model(paths.base, bridge=False)
    return {"backdoored": evaluate(load_model(paths.backdoored, bridge=False), cfg, base=base),
            "base": evaluate(base, cfg)}
