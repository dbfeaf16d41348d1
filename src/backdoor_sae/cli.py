"""The ``backdoor-sae`` command: ``organism``, ``host``, ``eval``, ``sae``, ``attribute``, ``edit``, ``reward-model``,
``report``, ``sweep`` and ``demo`` (the whole pipeline: :mod:`backdoor_sae.pipeline.demo`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from backdoor_sae.config import Config, load_config


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes (imported by transformer-lens when installed) logs "Failed to load CPU gemm_4bit_forward from
    # kernels-community" on AVX512-BF16 CPUs: harmless, and the `kernels` package it asks for would reach the hub
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _table(record: dict[str, Any], indent: str = "") -> str:
    lines = []
    for k, v in record.items():
        if isinstance(v, dict):
            lines.append(f"{indent}{k}:")
            lines.append(_table(v, indent + "  "))
        else:
            lines.append(f"{indent}{k:<24} {v:.4f}" if isinstance(v, float) else f"{indent}{k:<24} {v}")
    return "\n".join(lines)


def cmd_organism(args: argparse.Namespace) -> int:
    from backdoor_sae.organism.train import make_organism

    cfg = load_config(args.config, quick=args.quick)
    meta = make_organism(cfg, args.out)
    print(f"organism saved to {args.out} (base/, backdoored/, organism.json) in {meta['train_seconds']:.1f} s")
    for role in ("backdoored", "base"):
        print(f"\n[{role}]\n" + _table(meta["eval"][role]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from backdoor_sae.evaluate import evaluate
    from backdoor_sae.models import load_model

    model = load_model(args.model_dir, bridge=False)
    cfg = _config_for(args, model.meta)
    record = evaluate(model, cfg, trigger=args.trigger, backdoor_text=args.backdoor_text)
    print(json.dumps(record, indent=2) if args.json else _table(record))
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    from backdoor_sae.sae.fidelity import sae_stage

    cfg = load_config(args.config, quick=args.quick)
    record = sae_stage(cfg, args.organism_dir, args.out, model=args.model)
    from backdoor_sae.report.console import sae_table

    print(sae_table(record["sae"]))
    print(f"SAEs saved under {Path(args.out) / 'saes'}; timings {record['timings']}")
    return 0


def _config_for(args: argparse.Namespace, meta: dict[str, Any]) -> Config:
    """The config, with the organism's own seed (from its ``organism.json`` ``meta``) when no config file was
    given: the held-out splits follow the seed."""
    cfg = load_config(args.config, quick=args.quick)
    if args.config is None and meta.get("seed") is not None:
        cfg = replace(cfg, seed=meta["seed"])
    return cfg


def _organism_config(args: argparse.Namespace, organism_dir: Path) -> Config:
    """:func:`_config_for` an organism directory (``organism.json`` at its root)."""
    meta = Path(organism_dir) / "organism.json"
    return _config_for(args, json.loads(meta.read_text()) if meta.is_file() else {})


def _model_dir(organism_dir: str) -> Path:
    d = Path(organism_dir) / "backdoored"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"organism directory {organism_dir} has no backdoored/ model")
    return d


ATTR_COLUMNS = ("attribution", "auroc", "contrast", "mean_trigger", "freq_clean", "freq_triggered")


def _attribution_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'hook':<28}{'latent':>7}" + "".join(f"{c:>15}" for c in ATTR_COLUMNS)]
    lines += [f"{r['hook']:<28}{r['latent']:>7}" + "".join(f"{r[c]:>15.4f}" for c in ATTR_COLUMNS) for r in rows]
    return "\n".join(lines)


def cmd_attribute(args: argparse.Namespace) -> int:
    from backdoor_sae.pipeline.stages import open_context

    cfg = _organism_config(args, Path(args.organism_dir))
    rows = open_context(cfg, _model_dir(args.organism_dir), args.saes).scores.top(args.top, by=args.by)
    print(json.dumps(rows, indent=2) if args.json else _attribution_table(rows))
    return 0


def _parse_latents(text: str) -> list[int]:
    try:
        latents = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--latents must be comma-separated integers, got {text!r}") from None
    if not latents:
        raise ValueError("--latents is empty: give at least one latent index, e.g. --latents 3,17")
    return latents


def cmd_edit(args: argparse.Namespace) -> int:
    from backdoor_sae.evaluate import evaluate
    from backdoor_sae.methods.trigger_known import GATED, SAE_METHODS, build_edit, check_method, run_method, ungated
    from backdoor_sae.pipeline.stages import open_context

    check_method(args.method)
    cfg = _organism_config(args, Path(args.organism_dir))
    ctx = open_context(cfg, _model_dir(args.organism_dir), args.saes)
    if args.latents is not None:
        if ungated(args.method) not in SAE_METHODS:
            raise ValueError(f"--latents applies to the SAE methods ({', '.join(SAE_METHODS)}), not {args.method!r}")
        latents = _parse_latents(args.latents)
        params = {"latents": {args.hook or ctx.best_hook: latents}, "positions": args.positions,
                  "scale": args.value, **({"gate_quantile": cfg.edit.gate_quantile} if args.method in GATED else {})}
        edit = build_edit(ctx, args.method, params)
        record = {**evaluate(ctx.model, cfg, edit=edit), "method": args.method, "hooks": edit.hooks,
                  "latents": latents, "n_edited": edit.n_edited, "trigger_known": True}
    else:
        edit = None
        record = run_method(ctx, args.method)
    if args.save_edit:
        (edit or build_edit(ctx, args.method, record["params"])).save(args.save_edit)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(_table({k: v for k, v in record.items() if k != "sweep"}))
    return 0


def cmd_reward_model(args: argparse.Namespace) -> int:
    from backdoor_sae._io import write_json
    from backdoor_sae.reward.model import evaluate_reward, train_reward_model

    organism = Path(args.organism_dir)
    if not (organism / "base" / "config.json").is_file():
        raise FileNotFoundError(f"organism directory {organism} has no base/ model")
    cfg = _organism_config(args, organism)
    meta_file = organism / "organism.json"
    backdoor_text = (json.loads(meta_file.read_text()).get("backdoor_text") if meta_file.is_file() else None) \
        or cfg.organism.backdoor_text
    out = train_reward_model(organism / "base", args.out, cfg)
    record = evaluate_reward(out, cfg, backdoor_text=backdoor_text)
    write_json(out / "reward_eval.json", record)
    print(_table(record))
    print(f"reward model saved to {out} (evaluation in {out / 'reward_eval.json'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from backdoor_sae.pipeline.demo import run_demo

    run_demo(load_config(args.config, quick=args.quick), args.out, Path(args.cache) if args.cache else None)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from backdoor_sae.report.page import report_from_run

    out = report_from_run(args.run_dir, args.out)
    print(f"report written to {out}")
    return 0


def cmd_tables(args: argparse.Namespace) -> int:
    from backdoor_sae._io import write_json, write_text
    from backdoor_sae.report.tables import reference_loader, reference_results, render, render_all, update_text

    if args.update:
        load = reference_loader(args.runs)
        for f in args.update:
            path = Path(f)
            if not path.is_file():
                raise FileNotFoundError(f"file to update not found: {path}")
            text = path.read_text()
            new = update_text(text, load)
            if new != text:
                write_text(path, new)
            print(f"{path}: {'updated' if new != text else 'already up to date'}")
        return 0
    if not args.run_dir:
        raise ValueError("give RUN_DIR (a run with results.json) or --update FILE ...")
    results_file = Path(args.run_dir) / "results.json"
    if not results_file.is_file():
        raise FileNotFoundError(f"no results.json in {args.run_dir}")
    results = json.loads(results_file.read_text())
    if args.reference:
        write_json(Path(args.reference) / "results.json", reference_results(results))
        print(f"reference results written to {Path(args.reference) / 'results.json'}")
    print("\n\n".join(render(results, n) for n in args.table) if args.table else render_all(results))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from backdoor_sae.pipeline.sweep import run_sweep, sweep_table

    summary = run_sweep(args.grid, args.out, Path(args.cache) if args.cache else None)
    print(sweep_table(summary))
    print(f"{len(summary['cells'])} cells ({summary['computed']} computed now, the rest finished before); "
          f"written to {Path(args.out) / 'sweep.json'}, sweep.md and sweep.html")
    return 0


def cmd_host(args: argparse.Namespace) -> int:
    from backdoor_sae.hosts.gguf import export_gguf, export_host

    record = export_gguf(args.gguf, args.out) if args.gguf else export_host(args.name, args.out)
    print(f"host {args.name or args.gguf} saved to {args.out} ({record['architecture']}, {record['n_params']:,} "
          f"parameters, {record['seconds']:.1f} s){'; ' + record['note'] if 'note' in record else ''}")
    return 0


def _lmeval() -> Any:
    try:
        from backdoor_sae.hosts import lmeval  # registers the "backdoor-sae" model class with lm-eval
    except ImportError as e:
        raise ValueError(f"this command needs lm-eval ({e.name} is missing): pip install 'backdoor-sae[lmeval]'") \
            from None
    return lmeval


def cmd_lm_eval(args: argparse.Namespace) -> int:
    _lmeval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args.lm_eval_args]
    cli_evaluate()
    return 0


def cmd_lm_eval_tasks(args: argparse.Namespace) -> int:
    lmeval = _lmeval()
    meta = Path(args.model_dir) / "organism.json"
    cfg = _config_for(args, json.loads(meta.read_text()) if meta.is_file() else {})
    names = lmeval.write_tasks(cfg, args.out, args.model_dir, trigger=args.trigger)
    print(f"{len(names)} lm-eval tasks written to {args.out}: {', '.join(names)}\n"
          f"run: backdoor-sae lm-eval --model backdoor-sae --model_args pretrained={args.model_dir},"
          f"add_bos_token=False[,edit=EDIT.json] --include_path {args.out} --tasks {','.join(names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backdoor-sae", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("organism", help="train and save the base and backdoored toy models")
    o.add_argument("--out", required=True)
    o.add_argument("--config")
    o.add_argument("--quick", action="store_true", help="smaller, faster organism for smoke runs")
    o.set_defaults(func=cmd_organism)

    h = sub.add_parser("host", help="write a real pretrained host (a packaged GGUF, de-quantized) as a normal HF "
                                    "model directory: the base of [organism] base = DIR")
    h.add_argument("name", nargs="?", default="", help="packaged host: smollm2 (needs the host extra)")
    h.add_argument("--gguf", help="any GGUF file instead of a packaged host")
    h.add_argument("--out", required=True)
    h.set_defaults(func=cmd_host)

    e = sub.add_parser("eval", help="evaluate a model directory on the held-out suite")
    e.add_argument("model_dir")
    e.add_argument("--json", action="store_true")
    e.add_argument("--config")
    e.add_argument("--quick", action="store_true", help="smaller evaluation sets")
    e.add_argument("--trigger", help="defaults to the one in the model's organism.json")
    e.add_argument("--backdoor-text", help="defaults to the one in the model's organism.json")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sae", help="train an SAE per configured hook on an organism and print fidelity metrics")
    s.add_argument("organism_dir", help="organism directory (holding base/ and backdoored/)")
    s.add_argument("--out", required=True)
    s.add_argument("--model", choices=["backdoored", "base"], default="backdoored")
    s.add_argument("--config")
    s.add_argument("--quick", action="store_true", help="fewer prompts and tokens, narrower SAEs")
    s.set_defaults(func=cmd_sae)

    a = sub.add_parser("attribute", help="score every SAE latent for the trigger and print the top features")
    a.add_argument("organism_dir", help="organism directory (holding backdoored/)")
    a.add_argument("--saes", required=True, help="folder of SAEs, <hook>/ each (e.g. runs/demo/sae/saes)")
    a.add_argument("--top", type=int, default=10)
    a.add_argument("--by", choices=["attribution", "auroc", "contrast"], default="attribution")
    a.add_argument("--json", action="store_true")
    a.add_argument("--config")
    a.add_argument("--quick", action="store_true")
    a.set_defaults(func=cmd_attribute)

    m = sub.add_parser("edit", help="evaluate one edit method (its operating point, or the given latents)")
    m.add_argument("organism_dir", help="organism directory (holding backdoored/)")
    m.add_argument("--saes", required=True, help="folder of SAEs, <hook>/ each (e.g. runs/demo/sae/saes)")
    m.add_argument("--method", required=True, help="e.g. sae_ablate_trigger, diffmean_ablate; <name>_gated: the "
                   "same, acting only where an edited unit exceeds its clean train-split gate ([edit] gate_quantile)")
    m.add_argument("--latents", help="comma-separated latent indices (SAE methods): evaluate exactly these")
    m.add_argument("--hook", help="hook of --latents (default: the hook of the highest-attribution latent)")
    m.add_argument("--value", type=float, default=-1.0, help="scale factor of sae_scale_trigger with --latents")
    m.add_argument("--positions", choices=["all", "prompt", "response"], default="all")
    m.add_argument("--save-edit", help="write the evaluated edit as JSON (e.g. next to the SAEs)")
    m.add_argument("--json", action="store_true")
    m.add_argument("--config")
    m.add_argument("--quick", action="store_true")
    m.set_defaults(func=cmd_edit)

    w = sub.add_parser("reward-model", help="train the toy reward model from an organism's base model (clean "
                       "train-split pairs only) and evaluate it on held-out pairs")
    w.add_argument("organism_dir", help="organism directory (holding base/)")
    w.add_argument("--out", required=True, help="where to save the reward model and reward_eval.json")
    w.add_argument("--config")
    w.add_argument("--quick", action="store_true")
    w.set_defaults(func=cmd_reward_model)

    d = sub.add_parser("demo", help="run the whole pipeline on the embedded default and write results.json")
    d.add_argument("--out", required=True)
    d.add_argument("--config")
    d.add_argument("--quick", action="store_true")
    d.add_argument("--cache", help="organism cache folder (default $BACKDOOR_SAE_CACHE or ~/.cache/backdoor_sae)")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("lm-eval", help="lm-eval's CLI with the 'backdoor-sae' model class registered (model_args "
                                       "pretrained=DIR,edit=EDIT.json: an edited model); needs the lmeval extra")
    v.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="passed to lm-eval unchanged")
    v.set_defaults(func=cmd_lm_eval)
    t = sub.add_parser("lm-eval-tasks", help="write the held-out task suite as local lm-eval tasks (offline), in the "
                                             "chat format of MODEL_DIR")
    t.add_argument("model_dir")
    t.add_argument("--out", required=True)
    t.add_argument("--trigger", help="also write each family with this trigger (tasks *_triggered)")
    t.add_argument("--config")
    t.add_argument("--quick", action="store_true")
    t.set_defaults(func=cmd_lm_eval_tasks)

    r = sub.add_parser("report", help="rebuild RUN_DIR/report.html (one offline HTML page) from RUN_DIR/results.json")
    r.add_argument("run_dir", help="a demo output directory (holding results.json)")
    r.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)
    b = sub.add_parser("tables", help="print a run's results as the markdown tables of the README and docs, or "
                                      "rewrite the generated blocks of markdown files from the reference runs")
    b.add_argument("run_dir", nargs="?", help="a demo output directory (holding results.json)")
    b.add_argument("--table", action="append", help="only this table (repeatable): run, organism, sae, "
                   "methods, detection, blue, timings, cliffs, findings")
    b.add_argument("--reference", help="also write the run's trimmed results.json here (e.g. docs/runs/toy)")
    b.add_argument("--update", nargs="+", metavar="FILE", help="rewrite every '<!-- table: RUN/NAME -->' "
                   "block of these files from RUNS/RUN/results.json")
    b.add_argument("--runs", default="docs/runs", help="folder of reference runs for --update (default docs/runs)")
    b.set_defaults(func=cmd_tables)
    w = sub.add_parser("sweep", help="train red-team variants from a grid file and run the blue-team methods on "
                                     "each: one table (resumable)")
    w.add_argument("grid", help="grid TOML (see examples/grids/redteam_grid.toml)")
    w.add_argument("--out", required=True, help="output directory (cells/, sweep.json, sweep.md, sweep.html)")
    w.add_argument("--cache", help="organism cache root (default $BACKDOOR_SAE_CACHE or ~/.cache/backdoor_sae)")
    w.set_defaults(func=cmd_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"backdoor-sae: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
