"""Edits as hooks on the tiny random Llama: exactness, generation with a KV cache, positions, cleanup, JSON, errors."""

from __future__ import annotations

import json

import pytest
import torch

from backdoor_sae import ablate_features, train_sae  # noqa: F401  (the design card's import line)
from backdoor_sae.edits import hooks as H
from backdoor_sae.edits.apply import ablate_directions, apply_edit
from backdoor_sae.edits.hooks import response_positions, suspend_edits
from backdoor_sae.edits.specs import Edit, direction_edit, feature_edit
from backdoor_sae.evaluate import clean_ce_kl
from backdoor_sae.generation import generate
from backdoor_sae.organism.tasks import Example
from backdoor_sae.sae.training import load_sae, save_sae

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["What is 12 plus 30?", "Repeat exactly: red fox", "Continue the sequence: 1 2 3"]


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def _active_latents(sae, model, ids, hook=HOOK):
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=[hook])
        f = sae.encode(cache[hook])
    return (f > 0).flatten(0, 1).any(0)


def test_no_change_edit_leaves_logits_exact(model, ids, random_sae):
    sae = random_sae()
    clean = _logits(model, ids)
    with ablate_features(model, {HOOK: (sae, [0, 5, 9])}, mode="scale", value=1.0):
        same = _logits(model, ids)
    assert (same - clean).abs().max() < 1e-5
    silent = int((~_active_latents(sae, model, ids)).nonzero()[0])
    with ablate_features(model, {HOOK: (sae, [silent])}):  # zeroing a latent that never fires changes nothing
        assert (_logits(model, ids) - clean).abs().max() < 1e-5
    active = int(_active_latents(sae, model, ids).nonzero()[0])
    with ablate_features(model, {HOOK: (sae, [active])}):
        assert (_logits(model, ids) - clean).abs().max() > 1e-4
    with ablate_features(model, {HOOK: (sae, [silent])}, error_term=False):  # reconstruction replaces x
        assert (_logits(model, ids) - clean).abs().max() > 1e-4


def test_hooks_removed_after_block_and_after_error(model, ids, random_sae):
    sae = random_sae()
    active = _active_latents(sae, model, ids).nonzero().squeeze(-1).tolist()
    clean = _logits(model, ids)
    with ablate_features(model, {HOOK: (sae, active)}):
        assert not torch.equal(_logits(model, ids), clean)
    assert torch.equal(_logits(model, ids), clean)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate_features(model, {HOOK: (sae, active)}):
            raise RuntimeError("boom")
    assert torch.equal(_logits(model, ids), clean)
    assert all(not hp._forward_hooks for hp in model.bridge.hook_dict.values())


def test_fast_path_equals_generic_decode(model, ids, monkeypatch, random_sae):
    sae = random_sae()
    lat = _active_latents(sae, model, ids).nonzero().squeeze(-1).tolist()[:3]
    for mode, value in (("zero", None), ("scale", -2.0), ("mean", [0.5, 1.0, 2.0]), ("clamp", [0.1, 0.1, 0.1])):
        with ablate_features(model, {HOOK: (sae, lat)}, mode=mode, value=value):
            fast = _logits(model, ids)
        monkeypatch.setattr(H, "_linear_rows", lambda *a: None)
        with ablate_features(model, {HOOK: (sae, lat)}, mode=mode, value=value):
            generic = _logits(model, ids)
        monkeypatch.undo()
        assert (fast - generic).abs().max() < 1e-4, mode


def test_modes_move_latents_as_defined(model, ids, random_sae):
    """The hook output differs from its input by (f' - f) @ W_dec over the edited latents only."""
    sae = random_sae()
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=[HOOK])
    x = cache[HOOK]
    f = sae.encode(x)
    lat = [int(i) for i in (f > 0).flatten(0, 1).any(0).nonzero()[:2]]
    cases = {"zero": (None, torch.zeros_like(f[..., lat])), "scale": (-1.0, -f[..., lat]),
             "mean": ([0.3, 0.7], torch.tensor([0.3, 0.7]).expand_as(f[..., lat])),
             "clamp": ([0.05, 0.05], f[..., lat].clamp(max=0.05))}
    for mode, (value, new) in cases.items():
        spec = feature_edit({HOOK: (sae, lat)}, mode=mode, value=value).specs[0]
        out = H.feature_hook(spec)(x, None)
        expect = x + (new - f[..., lat]) @ sae.W_dec[lat]
        assert (out - expect).abs().max() < 1e-5, mode


def test_edit_acts_in_kv_cached_generation(model):
    """Greedy generation with the KV cache under an edit equals generation without the cache (the full
    sequence re-run each step), and differs from the unedited model."""
    d = model.bridge.cfg.d_model
    steer = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 3
    plain = generate(model, PROMPTS, max_new_tokens=6)
    with ablate_directions(model, {HOOK: steer}, mode="steer", alpha=1.0):
        cached = generate(model, PROMPTS, max_new_tokens=6)
        tok = model.tokenizer
        uncached = []
        for p in PROMPTS:
            enc = tok(model.chat(p), return_tensors="pt", add_special_tokens=False)
            out = model.hf.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            uncached.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert cached == uncached
    assert cached != plain


def test_positions(model, ids, random_sae):
    sae = random_sae()
    active = _active_latents(sae, model, ids).nonzero().squeeze(-1).tolist()
    clean = _logits(model, ids)
    with ablate_features(model, {HOOK: (sae, active)}, positions="response"):
        assert torch.equal(_logits(model, ids), clean)  # a multi-token forward is the prompt (prefill)
        resp = torch.zeros(ids.shape, dtype=torch.bool)
        resp[0, -2:] = True
        with response_positions(resp):
            edited = _logits(model, ids)
    assert torch.equal(edited[0, :-2], clean[0, :-2]) and not torch.equal(edited[0, -2:], clean[0, -2:])
    with ablate_features(model, {HOOK: (sae, active)}, positions="prompt"), response_positions(resp):
        prompt_only = _logits(model, ids)
    with ablate_features(model, {HOOK: (sae, active)}):
        everywhere = _logits(model, ids)
    assert torch.allclose(prompt_only[0, :-2], everywhere[0, :-2], atol=1e-6)
    assert not torch.allclose(prompt_only[0, -1], everywhere[0, -1], atol=1e-6)


def test_kl_and_suspend(model):
    exs = [Example("arithmetic", str(i), f"What is {i} plus 2?", str(i + 2)) for i in range(4)]
    base = clean_ce_kl(model, exs)
    assert base["kl_clean"] == 0.0
    with ablate_directions(model, {HOOK: torch.ones(model.bridge.cfg.d_model)}, mode="steer", alpha=2.0):
        edited = clean_ce_kl(model, exs)
        with suspend_edits():
            assert clean_ce_kl(model, exs) == base
    assert edited["kl_clean"] > 1e-3 and edited["clean_ce"] != base["clean_ce"]


def test_directions_project_and_steer(model, ids):
    d = model.bridge.cfg.d_model
    v = torch.randn(2, d, generator=torch.Generator().manual_seed(1))
    spec = direction_edit({HOOK: v}, mode="project").specs[0]
    x = torch.randn(1, 5, d)
    out = H.direction_hook(spec)(x, None)
    assert (out @ v.T).abs().max() < 1e-4  # nothing left in the span
    center = torch.randn(d)
    spec = direction_edit({HOOK: v}, mode="project", center={HOOK: center}).specs[0]
    out = H.direction_hook(spec)(x, None)
    assert ((out - center) @ v.T).abs().max() < 1e-4  # the projection is set to the center's
    spec = direction_edit({HOOK: v[0]}, mode="steer", alpha=-0.5).specs[0]
    assert torch.allclose(H.direction_hook(spec)(x, None), x - 0.5 * v[0])


def test_edit_json_round_trip(model, ids, tmp_path, random_sae):
    sae = random_sae()
    save_sae(sae, tmp_path / "saes" / HOOK)
    sae = load_sae(tmp_path / "saes" / HOOK)
    active = _active_latents(sae, model, ids).nonzero().squeeze(-1).tolist()[:3]
    d = model.bridge.cfg.d_model
    edit = Edit(feature_edit({HOOK: (sae, active)}, mode="scale", value=-1.0, positions="prompt").specs
                + direction_edit({"blocks.0.hook_resid_post": torch.randn(d)}, alpha=0.5).specs, "mine")
    path = edit.save(tmp_path / "edits" / "mine.json")
    saved = json.loads(path.read_text())
    assert saved["specs"][0]["sae"] == f"../saes/{HOOK}"  # relative: the folder can move
    back = Edit.load(path)
    with apply_edit(model, edit):
        a = _logits(model, ids)
    with apply_edit(model, back):
        b = _logits(model, ids)
    assert torch.equal(a, b) and back.name == "mine" and back.n_edited == 4


def test_bad_inputs_are_one_line_errors(model, tmp_path, random_sae):
    sae = random_sae()

    def one_line(exc_info):
        assert "\n" not in str(exc_info.value)

    with pytest.raises(ValueError, match=r"latent index 64 .*d_sae=64") as e:
        feature_edit({HOOK: (sae, [3, 64])})
    one_line(e)
    with pytest.raises(ValueError, match="latent list .* is empty") as e:
        feature_edit({HOOK: (sae, [])})
    one_line(e)
    with pytest.raises(ValueError, match=r"unknown edit mode 'erase'; valid: zero, mean, scale, clamp") as e:
        feature_edit({HOOK: (sae, [1])}, mode="erase")
    one_line(e)
    with pytest.raises(ValueError, match="unknown hook 'blocks.7.hook_resid_post'") as e:
        with ablate_features(model, {"blocks.7.hook_resid_post": (sae, [1])}):
            pass
    one_line(e)
    with pytest.raises(ValueError, match=r"d_in=48 does not match hook .* width 32") as e:
        with ablate_features(model, {HOOK: (random_sae(d_in=48), [1])}):
            pass
    one_line(e)
    with pytest.raises(ValueError, match=r"direction for .* has dimension 31, the hook's width is 32") as e:
        with ablate_directions(model, {HOOK: torch.ones(31)}):
            pass
    one_line(e)
    save_sae(sae, tmp_path / "saes" / HOOK)
    edit = feature_edit({HOOK: (load_sae(tmp_path / "saes" / HOOK), [1])})
    path = edit.save(tmp_path / "edit.json")
    import shutil

    shutil.rmtree(tmp_path / "saes")
    with pytest.raises(FileNotFoundError, match=r"references SAE .*blocks.1.hook_resid_post.* which does not exist") as e:
        Edit.load(path)
    one_line(e)
    with pytest.raises(ValueError, match="has no path"):
        feature_edit({HOOK: (random_sae(), [1])}).save(tmp_path / "x.json")


def test_unknown_method_lists_valid_ones():
    from backdoor_sae.methods.trigger_known import TRIGGER_KNOWN, check_method

    with pytest.raises(ValueError, match="unknown method 'sae_erase'; valid: " + ", ".join(TRIGGER_KNOWN)):
        check_method("sae_erase")
