"""Every backbone family trains end to end with every head it supports (tiny random weights, real tokenizers)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli, write_config, write_entailment_task


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_family_trains_with_head(tmp_path, tiny_models, family, head):
    data = write_entailment_task(tmp_path / "data", num_train=32, num_eval=16)
    cfg = write_config(tmp_path / "cfg.yaml", {
        "model": {"name_or_path": str(tiny_models[family])},
        "method": {"name": "ptuning_v2", "num_virtual_tokens": 3},
        "head": {"type": head},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 48},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3},
        "run": {"log_every": 1},
    })
    out = tmp_path / "run"
    result = run_cli("train", str(cfg), f"--run.output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # three finite steps
    correct = json.loads((out / "results.json").read_text())["eval"]["acc"] * 16 / 100
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= 16  # all 16 eval examples were scored
