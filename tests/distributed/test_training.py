"""Single-process training runs on a tiny random backbone: what trains, what stays frozen, what is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import REPO, finish_cli, run_cli, start_cli, write_config, write_entailment_task


def tiny_config(tmp_path, model_dir, **method):
    data = write_entailment_task(tmp_path / "data")
    return write_config(tmp_path / "cfg.yaml", {
        "model": {"name_or_path": str(model_dir)},
        "method": method or {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 4, "eval_every": 2},
        "optim": {"lr": 0.05},
    })


def probe(cfg, out):
    result = subprocess.run([sys.executable, "tests/frozen_probe.py", str(cfg), str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


def test_prompt_tuning_trains_only_prompt_and_head(tmp_path, tiny_bert):
    report = probe(tiny_config(tmp_path, tiny_bert), tmp_path / "run")
    expected = ["head.linear.bias", "head.linear.weight", "method.prompt"]
    assert report["trainable"] == expected
    assert report["optimized"] == expected
    assert report["changed"] == expected  # every backbone tensor is bit-identical after training


def test_full_finetuning_trains_the_backbone(tmp_path, tiny_bert):
    report = probe(tiny_config(tmp_path, tiny_bert, name="full"), tmp_path / "run")
    assert "backbone.model.encoder.layer.0.attention.self.query.weight" in report["changed"]
    assert set(report["optimized"]) == set(report["trainable"])


def test_linear_probe_trains_only_the_head(tmp_path, tiny_bert):
    report = probe(tiny_config(tmp_path, tiny_bert, name="linear_probe"), tmp_path / "run")
    assert report["changed"] == report["trainable"] == ["head.linear.bias", "head.linear.weight"]


def test_run_writes_small_checkpoint_and_export_that_evaluate_and_predict_use(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert)
    out = tmp_path / "run"
    result = run_cli("train", str(cfg), f"--run.output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # the number to beat, in the task's own metrics: the eval split holds as many entailments as not
    assert results["eval_baseline"] == {"acc": 50.0}
    assert results["eval_not_above_baseline"] == (["acc"] if results["eval"]["acc"] <= 50.0 else [])
    assert "eval " + str(tmp_path / "data" / "val.jsonl") + " baseline (one answer for every example" in result.stderr
    export = load_file(out / "best" / "model.safetensors")
    assert sorted(export) == ["head.linear.bias", "head.linear.weight", "method.prompt"]
    checkpoint_bytes = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    assert checkpoint_bytes < 1_000_000, "the resume checkpoint must not contain the frozen backbone"

    predictions = tmp_path / "pred.jsonl"
    val = tmp_path / "data" / "val.jsonl"
    evaluating = start_cli("evaluate", str(out / "best"))  # evaluate and predict at once
    predicted = run_cli("predict", str(out / "best"), f"--input={val}", f"--output={predictions}")
    evaluated = finish_cli(evaluating)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.splitlines()[-1])["acc"] == pytest.approx(results["eval"]["acc"])

    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    gold = [json.loads(line)["label"] for line in val.read_text().splitlines()]
    assert len(rows) == len(gold)
    accuracy = 100 * sum(r["prediction"] == g for r, g in zip(rows, gold)) / len(gold)
    assert accuracy == pytest.approx(results["eval"]["acc"])

    again = run_cli("predict", str(out / "best"), f"--input={val}", f"--output={predictions}")
    assert again.returncode == 2 and "exists" in again.stderr  # never overwrites


def test_resume_from_latest_continues_the_exact_loss_sequence(tmp_path, tiny_bert):
    cfg = tiny_config(tmp_path, tiny_bert)
    common = ["--run.log_every=1", "--optim.schedule=constant", "--optim.warmup_ratio=0", "--head.dropout=0.3"]
    straight = start_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'a'}", "--train.max_steps=8", *common)
    first = finish_cli(start_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--train.max_steps=4",
                                 *common))  # while the straight run trains
    straight = finish_cli(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--train.max_steps=8",
                      "--run.resume=true", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stderr

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    assert losses("b") == losses("a")  # bitwise: same data order, dropout draws, optimizer state
