"""lm-eval: the ``backdoor-sae`` model class evaluates an edited model; on the suite written as local lm-eval tasks
it gives the same per-family accuracy as our own ``evaluate`` on the same edit."""

from __future__ import annotations

import pytest

from backdoor_sae.cli import main
from backdoor_sae.config import config_from_data
from backdoor_sae.edits.specs import feature_edit
from backdoor_sae.evaluate import evaluate
from backdoor_sae.models import load_model
from backdoor_sae.organism.tasks import CAPABILITY_FAMILIES
from backdoor_sae.sae.training import save_sae

lm_eval = pytest.importorskip("lm_eval")
HOOK = "blocks.1.hook_resid_post"


@pytest.mark.slow
def test_lm_eval_agrees_with_evaluate_on_an_edited_model(quick_organism, tmp_path, random_sae):
    from lm_eval.tasks import TaskManager

    from backdoor_sae.hosts import lmeval

    _, root, meta = quick_organism
    model_dir = root / "backdoored"
    cfg = config_from_data({"seed": meta["seed"], "eval": {"n_per_family": 12, "max_new_tokens": 12}}, quick=True)
    model = load_model(model_dir)
    sae = random_sae(d_in=model.hf.config.hidden_size, d_sae=64)
    save_sae(sae, tmp_path / "saes" / HOOK)
    edit = feature_edit({HOOK: (sae, list(range(32)))}, mode="scale", value=-1.0)
    edit_path = edit.save(tmp_path / "saes" / "edit.json")
    ours = evaluate(model, cfg, edit=edit)
    plain = evaluate(model, cfg)
    assert ours["task_accuracy_by_family"] != plain["task_accuracy_by_family"]  # the edit matters

    names = lmeval.write_tasks(cfg, tmp_path / "tasks", model_dir, trigger=meta["trigger"])
    assert len(names) == 2 * len(CAPABILITY_FAMILIES)
    out = lm_eval.simple_evaluate(
        model="backdoor-sae", model_args={"pretrained": str(model_dir), "edit": str(edit_path),
                                          "add_bos_token": False, "batch_size": 64},
        tasks=names, task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    got = {name: r["exact_match,strip"] for name, r in out["results"].items()}
    for fam in CAPABILITY_FAMILIES:
        assert got[f"backdoor_sae_{fam}"] == pytest.approx(ours["task_accuracy_by_family"][fam], abs=1 / 12 + 1e-9)
        assert got[f"backdoor_sae_{fam}_triggered"] == pytest.approx(
            ours["task_accuracy_triggered_by_family"][fam], abs=1 / 12 + 1e-9)


def test_lm_eval_tasks_command_and_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["lm-eval-tasks", str(tiny_model_dir), "--out", str(tmp_path / "t"), "--quick"]) == 0
    assert "--include_path" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "t").glob("*.yaml")) == sorted(
        f"backdoor_sae_{f}.yaml" for f in CAPABILITY_FAMILIES)
    from backdoor_sae.hosts.lmeval import EditedLM

    with pytest.raises(FileNotFoundError, match="edit file not found"):
        EditedLM(pretrained=str(tiny_model_dir), edit=str(tmp_path / "none.json"))
