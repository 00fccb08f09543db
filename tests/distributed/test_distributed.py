"""Real multi-process DeepSpeed runs on CPU (gloo): 2 ranks reproduce 1 rank under ZeRO-2 and ZeRO-3, and ZeRO-3's
shipped settings release a frozen backbone's modules after use."""

from __future__ import annotations

import json
import os
import re
import subprocess

import numpy as np
import pytest

from tests.conftest import (
    REPO,
    deepspeed_command,
    finish_cli,
    read_log,
    run_cli,
    start_cli,
    write_config,
    write_entailment_task,
)

NUM_STEPS = 6


def tiny_run_config(tmp_path, model_dir, ds_config: str, method: dict | None = None):
    data = write_entailment_task(tmp_path / "data")
    return write_config(tmp_path / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 3},
        "model": {"name_or_path": str(model_dir)},
        "method": method or {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "head": {"pool": "mean", "dropout": 0.0},  # dropout draws would differ between 1 and 2 ranks
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": NUM_STEPS, "eval_every": 3},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "deepspeed": {"config": ds_config},
    })


@pytest.fixture(scope="module")
def one_rank_losses(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("one-rank")
    cfg = tiny_run_config(tmp, tiny_bert, "ds_configs/zero2.json")
    result = run_cli("train", str(cfg), f"--run.output_dir={tmp / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    return read_log(tmp / "run", "train/loss")


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_one_rank(tmp_path, tiny_bert, one_rank_losses, stage):
    cfg = tiny_run_config(tmp_path, tiny_bert, f"ds_configs/zero{stage}.json")
    result = run_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'run'}", num_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = read_log(tmp_path / "run", "train/loss")
    assert len(losses) == len(one_rank_losses) == NUM_STEPS
    assert np.std(losses) > 1e-3, "the loss must move for the comparison to mean anything"
    np.testing.assert_allclose(losses, one_rank_losses, rtol=2e-4)
    sizes = re.search(r"backbone bytes on rank 0: ([\d.]+) MiB of ([\d.]+) MiB", result.stderr)
    assert sizes, result.stderr[-2000:]
    on_rank, total = map(float, sizes.groups())
    if stage == 3:  # partitioned across the 2 ranks
        assert on_rank == pytest.approx(total / 2, rel=0.02)
    else:
        assert on_rank == total


@pytest.mark.parametrize(("family", "method"), [
    ("llama", {"name": "ptuning_v2", "num_virtual_tokens": 4, "dropout": 0.0}),
    ("bert", {"name": "bitfit"}),
    ("gpt2", {"name": "ptuning_v1", "num_virtual_tokens": 4, "placement": "split"}),
    ("bert", {"name": "ipt", "method": "prefix-tuning", "encoder": "cnn", "num_virtual_tokens": 4,
              "generator_width": 8}),
    ("llama", {"name": "lpt", "generator": "appg", "num_virtual_tokens": 4, "generator_width": 8, "dropout": 0.0}),
])
def test_zero3_two_ranks_match_one_rank_across_methods(tmp_path, tiny_models, family, method):
    """Prefixes through a grouped-query decoder, unfrozen biases and split prompts, all partitioned by ZeRO-3."""
    started = {}
    for num_ranks in (1, 2):  # both runs at once
        run = tmp_path / f"ranks{num_ranks}"
        cfg = tiny_run_config(run, tiny_models[family], "ds_configs/zero3.json", method)
        started[num_ranks] = start_cli("train", str(cfg), f"--run.output_dir={run / 'out'}", num_ranks=num_ranks)
    losses = {}
    for num_ranks, process in started.items():
        result = finish_cli(process)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[num_ranks] = read_log(tmp_path / f"ranks{num_ranks}" / "out", "train/loss")
    assert np.std(losses[1]) > 1e-3
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-4)


@pytest.mark.parametrize("prefetch", [False, True])
def test_zero3_configs_release_each_frozen_module_after_use(prefetch):
    """The shipped zero3.json leaves nothing of a frozen backbone gathered at the end of the forward; with DeepSpeed's
    prefetching on (the trainer's default bucket when the JSON leaves it out), modules stay gathered until backward."""
    cmd = deepspeed_command(2, "tests/zero3_release.py", "ds_configs/zero3.json", *(["--prefetch"] if prefetch else []))
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    if prefetch:
        assert got["gathered"] >= 2 * got["layer"]
    else:
        assert got["gathered"] <= got["layer"]
