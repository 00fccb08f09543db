"""Every backbone family trains end to end with every head it supports (tiny random weights, real tokenizers)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import finish_cli, start_cli, write_config, write_entailment_task

FAMILIES_TRAINED = ["bert", "roberta", "gpt2", "llama"]
HEADS = ["linear", "verbalizer"]


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_models):
    """Every family x head run (1 rank, 3 steps), all started at once: on 2 cores each spends most of its time starting
    up on one core. Each test waits for its own; returns (run directory, process) per cell."""
    runs = {}
    for family in FAMILIES_TRAINED:
        for head in HEADS:
            tmp = tmp_path_factory.mktemp(f"{family}-{head}")
            data = write_entailment_task(tmp / "data", num_train=32, num_eval=16)
            cfg = write_config(tmp / "cfg.yaml", {
                "model": {"name_or_path": str(tiny_models[family])},
                "method": {"name": "ptuning_v2", "num_virtual_tokens": 3},
                "head": {"type": head},
                "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]),
                         "eval_split": str(data["val"]), "max_length": 48},
                "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3},
                "run": {"log_every": 1},
            })
            runs[family, head] = tmp / "run", start_cli("train", str(cfg), f"--run.output_dir={tmp / 'run'}")
    yield runs
    for _, process in runs.values():  # the runs of tests that were not reached
        process.kill()


@pytest.mark.parametrize("family", FAMILIES_TRAINED)
@pytest.mark.parametrize("head", HEADS)
def test_family_trains_with_head(family_runs, family, head):
    out, process = family_runs[family, head]
    result = finish_cli(process)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # three finite steps
    correct = json.loads((out / "results.json").read_text())["eval"]["acc"] * 16 / 100
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= 16  # all 16 eval examples were scored
