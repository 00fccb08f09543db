"""The frozen-state cache in real DeepSpeed runs (gloo, CPU, fp32, and once bf16): LPT trains with the same losses and
scores the same metrics with and without `train.frozen_cache`, on 1 and 2 ranks, under ZeRO-2 and ZeRO-3, on an
encoder and a grouped-query decoder, once from the memory-mapped files that 2 ranks wrote (`train.frozen_cache_gb:
0`); so does the linear probe from its cached last-layer output under ZeRO-3; a method with nothing frozen to cache is
refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from tests.conftest import (
    REPO,
    deepspeed_command,
    finish_cli,
    run_cli,
    start_cli,
    write_config,
    write_entailment_task,
)

LPT = {"name": "lpt", "generator": "npg", "num_virtual_tokens": 4, "generator_width": 8, "dropout": 0.0}


def run_config(tmp_path, model_dir, stage: int, method: dict, *, frozen_cache: bool, frozen_cache_gb: float = 4.0):
    data = write_entailment_task(tmp_path / "data", num_train=48, num_eval=20)
    return write_config(tmp_path / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 3},
        "model": {"name_or_path": str(model_dir)},
        "method": method,
        "head": {"dropout": 0.0},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "test_split": str(data["val"]), "max_length": 64},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 8, "eval_every": 4, "eval_batch_size": 6,
                  "frozen_cache": frozen_cache, "frozen_cache_gb": frozen_cache_gb},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "deepspeed": {"config": f"ds_configs/zero{stage}.json"},
    })


PROBE = {"name": "linear_probe"}


@pytest.mark.parametrize(("family", "stage", "num_ranks", "budget_gb", "method"), [
    ("bert", 2, 1, 4.0, LPT), ("bert", 3, 2, 0.0, LPT), ("llama", 3, 1, 4.0, PROBE), ("llama", "2_bf16", 2, 4.0, LPT)],
    ids=["bert-zero2-1rank-lpt", "bert-zero3-2ranks-files-lpt", "llama-zero3-1rank-linear_probe",
         "llama-zero2bf16-2ranks-lpt"])
def test_losses_and_metrics_are_the_same_with_the_cache(tmp_path, tiny_models, family, stage, num_ranks, budget_gb,
                                                        method):
    """The cached states are those the forward computes (tests/unit/test_frozen_cache.py), so every logged
    loss matches (to a float32 ulp or two, below), and every evaluation and the final scores exactly. Two epochs:
    the cache is read again in the second. With budget 0, each rank writes the states it computed to its own file and
    reads both ranks' files. LPT caches the states entering layer 1, the linear probe the output of the last (layer 2
    of 2)."""
    started = {}
    for cached in (False, True):  # both runs at once
        run = tmp_path / f"cached{cached}"
        cfg = run_config(run, tiny_models[family], stage, method, frozen_cache=cached, frozen_cache_gb=budget_gb)
        started[cached] = start_cli("train", str(cfg), f"--run.output_dir={run / 'out'}", num_ranks=num_ranks)
    logs, results = {}, {}
    for cached, process in started.items():
        result = finish_cli(process)
        assert result.returncode == 0, result.stderr[-3000:]
        layer = 1 if method is LPT else 2
        assert (f"frozen-state cache: states entering layer {layer} of 88 examples" in result.stderr) == cached
        out = tmp_path / f"cached{cached}" / "out"
        logs[cached] = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        results[cached] = json.loads((out / "results.json").read_text())
    losses = [row["train/loss"] for row in logs[False] if "train/loss" in row]
    assert len(losses) == 8 and np.std(losses) > 1e-3, "the loss must move for the comparison to mean anything"
    # The cache computes its states in batches of other shapes than training's, and on some CPUs the GEMM rounds
    # the last bit by shape: the losses may differ by a float32 ulp or two, the evaluations not at all.
    assert len(logs[True]) == len(logs[False])
    for cached_row, row in zip(logs[True], logs[False]):
        cached_row.pop("train/samples_per_s", None)
        row.pop("train/samples_per_s", None)
        assert cached_row == pytest.approx(row, rel=1e-6, abs=0)
    assert sum("eval/" in key for row in logs[True] for key in row) >= 2
    assert results[True] == results[False] and "test" in results[True]
    files = tmp_path / "cachedTrue" / "out" / "frozen_cache"
    if budget_gb:
        assert not files.exists()
    else:
        written = json.loads((files / "fingerprint.json").read_text())["files"]
        assert sorted(written) == ["index.npy", "rank0.npy", "rank1.npy"]
        index = np.load(files / "index.npy")  # (file, first row, number of rows) per example
        assert sorted(set(index[:, 0].tolist())) == [0, 1] and index[:, 2].sum() > 0


def test_a_method_with_nothing_frozen_is_refused_before_anything_is_written(tmp_path, tiny_bert):
    cfg = run_config(tmp_path, tiny_bert, 2, {"name": "prompt_tuning", "num_virtual_tokens": 4}, frozen_cache=True)
    result = run_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'out'}")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train.frozen_cache: method 'prompt_tuning'" in errors[0], result.stderr[-2000:]
    assert "first trained layer is 0" in errors[0]
    assert not (tmp_path / "out").exists()


def test_under_zero3_the_layers_below_k_are_neither_run_nor_gathered_after_the_precompute(tmp_path, tiny_models):
    cfg = run_config(tmp_path, tiny_models["llama"], 3, LPT, frozen_cache=True)
    result = subprocess.run(deepspeed_command(2, "tests/frozen_cache_probe.py", str(cfg), str(tmp_path / "out")),
                            cwd=REPO, env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank's report, read where it starts: the two ranks print at the same moment, on one shared stdout
    reports = [json.JSONDecoder().raw_decode(chunk)[0] for chunk in result.stdout.split("FROZEN_CACHE_PROBE ")[1:]]
    assert sorted(r["rank"] for r in reports) == [0, 1], result.stdout[-2000:]
    for report in reports:
        runs = report["runs"]
        assert runs.get("precompute/0", 0) > 0 and runs.get("precompute/1", 0) == 0, runs  # layer 0 = below k = 1
        assert all(runs.get(f"{phase}/1", 0) > 0 and f"{phase}/0" not in runs for phase in ("train", "eval", "final"))
        gathered = report["lower_gathered"]
        assert gathered.pop("num_partitioned") == 7, "layer 0's attention and MLP weight matrices"
        assert gathered == {"train": False, "eval": False, "final": False}, report
