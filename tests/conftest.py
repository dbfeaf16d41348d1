# Offline before any HF import (STACK.md §6): an accidental hub call fails in < 1 s instead of hanging.
import logging
import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
               "BACKDOOR_SAE_PROGRESS": "0"}.items():
    os.environ.setdefault(_k, _v)
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with the organism's tokenizer and chat template, saved like a hub model."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from backdoor_sae.organism.tasks import FAMILIES, TaskSuite
    from backdoor_sae.organism.tokenizer import train_tokenizer

    suite, rng = TaskSuite(0), random.Random(0)
    tok = train_tokenizer([suite.sample(f, "train", rng).prompt for f in FAMILIES for _ in range(200)], 400)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def quick_organism(tmp_path_factory):
    """The --quick organism, trained once per session into a temporary cache (about a minute on 2 cores)."""
    from backdoor_sae.config import load_config
    from backdoor_sae.organism.train import get_organism

    cache = tmp_path_factory.mktemp("cache")
    root, meta, cached = get_organism(load_config(None, quick=True), cache)
    return cache, root, meta


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny random Llama, loaded with its bridge (one per test module)."""
    from backdoor_sae.models import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def ids(model):
    """One chat turn plus an answer, as token ids: the input of the logit-equality tests."""
    tok = model.tokenizer
    return torch.tensor([tok.encode(model.chat("What is 12 plus 30?") + "42", add_special_tokens=False)])


@pytest.fixture(scope="session")
def random_sae():
    """A factory of seeded random TopK SAEs (non-zero encoder bias, so latents fire) named for a hook."""
    def make(d_in: int = 32, d_sae: int = 64, seed: int = 0, hook: str = "blocks.1.hook_resid_post"):
        from sae_lens import TopKSAE, TopKSAEConfig

        torch.manual_seed(seed)
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=4)).eval()
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.1)
        sae.cfg.metadata.hook_name = hook
        return sae

    return make
