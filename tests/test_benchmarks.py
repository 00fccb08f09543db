"""Study scripts: table assembly from cell results, and resumed studies reusing finished cells (no process runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import accuracy, step_cost


def cell(eval_acc: float, test_acc: float | None = None) -> dict:
    result = {"task": "cb", "method": "lpt", "eval": {"acc": eval_acc}, "eval_majority_acc": 50.0,
              "parameters": {"trainable": 1234}}
    if test_acc is not None:
        result |= {"test": {"acc": test_acc}, "test_majority_acc": 60.0}
    return result


def test_accuracy_table_reports_the_test_split_when_there_is_one(tmp_path):
    rows = accuracy.summarize({"cb/a": [cell(70.0), cell(74.0)], "sst2/b": [cell(90.0, 80.0), cell(95.0, 84.0)]})
    assert rows[0]["split"] == "eval" and rows[0]["mean"] == pytest.approx(72.0)
    assert rows[0]["sd"] == pytest.approx(2.8284, rel=1e-4) and rows[0]["majority"] == 50.0
    assert rows[1]["split"] == "test" and rows[1]["mean"] == pytest.approx(82.0) and rows[1]["majority"] == 60.0
    accuracy.write_report(tmp_path, rows, "python -m benchmarks.accuracy ...")
    table = (tmp_path / "results.md").read_text()
    assert "| cb/a | cb | lpt | 1,234 | eval | acc | 72.0 ± 2.8 | 2 | 50.0 |" in table
    assert "| sst2/b | cb | lpt | 1,234 | test | acc | 82.0 ± 2.8 | 2 | 60.0 |" in table
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "results.png").stat().st_size > 0


def test_accuracy_study_reuses_finished_cells(tmp_path):
    run = tmp_path / "runs" / "cb-missing-seed7"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(cell(66.0)))
    # The config does not exist: training it would fail, so a returned result proves the cell was skipped.
    assert accuracy.run_cell(tmp_path, Path("configs/cb/missing.yaml"), 7, 1, [])["eval"]["acc"] == 66.0


def step(label: str, repeat: int, seconds: float, peak: float) -> dict:
    return {"label": label, "repeat": repeat, "step_s": seconds, "peak_rss_mib": peak, "start_rss_mib": 100.0,
            "trainable": 10}


def test_step_cost_ratios_are_taken_within_each_repeat():
    # Repeat 1 ran on a machine twice as slow: ratios within a repeat stay 0.5, a ratio of medians would not.
    results = [step("base", 0, 1.0, 300.0), step("lpt", 0, 0.5, 200.0),
               step("base", 1, 2.0, 300.0), step("lpt", 1, 1.0, 250.0)]
    time_ratio = step_cost.ratios(results, "step_s", "base")
    assert time_ratio["lpt"] == (pytest.approx(0.5), pytest.approx(0.0))
    assert time_ratio["base"] == (1.0, 0.0)
    peak_ratio = step_cost.ratios(results, "peak_rss_mib", "base")["lpt"]
    assert peak_ratio == (pytest.approx(0.75), pytest.approx(1 / 12))
    lines = step_cost.table(results, "base")
    assert lines[3].startswith("| lpt | 10 | 0.750 | 0.50 ± 0.00 | 225 | 0.75 ± 0.08 | 125 | 0.62 ± 0.12 |")


def test_step_cost_study_reuses_finished_cells(tmp_path):
    done = {"id": "x-lpt-r0", "step_s": 0.25}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "x-lpt-r0.json").write_text(json.dumps(done))
    assert step_cost.run_cell(tmp_path, {"id": "x-lpt-r0", "backbone": "does-not-exist"}) == done


def test_sweep_accuracy_groups_finished_runs_by_insertion_layer(tmp_path):
    for name, layer, acc in [("a", 1, 70.0), ("b", 1, 74.0), ("c", 3, 80.0), ("unfinished", 5, None)]:
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(f"method:\n  name: lpt\n  layer: {layer}\n")
        if acc is not None:
            (run / "results.json").write_text(json.dumps({"eval": {"acc": acc}}))
    assert step_cost.accuracy_by_layer(sorted(tmp_path.iterdir())) == {1: [70.0, 74.0], 3: [80.0]}
