"""The blue-team baselines alone (fine-tuning curves, de-pirating, interpolation, ensembles) on an organism: the
demo's ``blue`` stage, timed, with its tables printed and the records written as JSON.

Usage: python benchmarks/bench_blue.py [--config C.toml | --quick | --organism DIR] [--out blue.json]
Multi-GPU: ``accelerate launch benchmarks/bench_blue.py ...`` runs the same SFT through trl/accelerate (on CPU
it runs in one process).
"""

from __future__ import annotations

import _common  # noqa: F401  (offline, quiet)
import json
import sys
import time
from pathlib import Path

from backdoor_sae._io import write_json
from backdoor_sae.baselines.blue import blue_stage
from backdoor_sae.config import load_config
from backdoor_sae.report.console import blue_table, methods_table


def main() -> None:
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path("runs/bench_blue.json")
    if "--out" in sys.argv:
        i = sys.argv.index("--out")
        del sys.argv[i:i + 2]
    args, root = _common.organism_from_args(__doc__)
    cfg = load_config(args.config, quick=args.quick)
    t0 = time.perf_counter()
    res = blue_stage(cfg, root)
    total = round(time.perf_counter() - t0, 2)
    write_json(out, {**res, "total_seconds": total, "organism": str(root)})
    print(methods_table(res["methods"], {}, {}).split("\n", 3)[0])
    print("\n".join(methods_table(res["methods"], {}, {}).split("\n")[3:]))
    print(blue_table(res["methods"], res["blue"]))
    print(json.dumps(res["blue"]["findings"], indent=1))
    print(f"timings {json.dumps(res['timings'])}; total {total} s; written to {out}")


if __name__ == "__main__":
    main()
