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


def backbone_bytes(stderr: str) -> tuple[float, float]:
    """(MiB of the backbone held on rank 0, MiB of the whole backbone), as the trainer logs them."""
    sizes = re.search(r"backbone bytes on rank 0: ([\d.]+) MiB of ([\d.]+) MiB", stderr)
    assert sizes, stderr[-2000:]
    return float(sizes[1]), float(sizes[2])


def test_two_ranks_match_one_rank_under_zero2(tmp_path, tiny_bert):
    started = {}
    for num_ranks in (1, 2):  # both runs at once
        cfg = tiny_run_config(tmp_path / f"ranks{num_ranks}", tiny_bert, "ds_configs/zero2.json")
        # a clip that acts at every step: DeepSpeed clips on 2 ranks (ZeRO-2), our optimizer step on 1 (no ZeRO)
        started[num_ranks] = start_cli("train", str(cfg), f"--run.output_dir={tmp_path / f'ranks{num_ranks}' / 'out'}",
                                       "--optim.grad_clip=0.05", num_ranks=num_ranks)
    results = {num_ranks: finish_cli(process) for num_ranks, process in started.items()}
    assert all(r.returncode == 0 for r in results.values()), [r.stderr[-3000:] for r in results.values()]
    losses = {n: read_log(tmp_path / f"ranks{n}" / "out", "train/loss") for n in started}
    assert len(losses[1]) == NUM_STEPS and np.std(losses[1]) > 1e-3, "the loss must move for the comparison to mean"
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-4)
    on_rank, total = backbone_bytes(results[2].stderr)
    assert on_rank == total  # ZeRO-2 keeps the frozen backbone whole on every rank


@pytest.mark.parametrize(("family", "method"), [
    ("llama", {"name": "ptuning_v2", "num_virtual_tokens": 4, "dropout": 0.0}),
    ("bert", {"name": "bitfit"}),
    ("gpt2", {"name": "ptuning_v1", "num_virtual_tokens": 4, "placement": "split"}),
    ("bert", {"name": "ipt", "method": "prefix-tuning", "encoder": "cnn", "num_virtual_tokens": 4,
              "generator_width": 8}),
    ("llama", {"name": "lpt", "generator": "appg", "num_virtual_tokens": 4, "generator_width": 8, "dropout": 0.0}),
])
def test_zero3_two_ranks_match_one_rank_across_methods(tmp_path, tiny_models, family, method):
    """Prefixes through a grouped-query decoder, unfrozen biases, split prompts, an instance-wise prefix and a late
    prompt, all partitioned by ZeRO-3: 2 ranks hold half the backbone each and repeat 1 rank's losses."""
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
        on_rank, total = backbone_bytes(result.stderr)
        assert on_rank == pytest.approx(total / num_ranks, rel=0.02)  # partitioned across the ranks
    assert len(losses[1]) == NUM_STEPS and np.std(losses[1]) > 1e-3
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
