"""Reliability on real 2-rank runs: exact resume after kill -9, kills during a checkpoint save, rank failures that
stop every rank in bounded time, and NaN/inf steps (the checks that need no ranks: tests/unit/test_reliability.py).
Faults are injected with IPT_DS_FAULT (ipt_ds/failures.py).

Runs start the ranks directly (as `srun` would) unless a test is about the `deepspeed` launcher, so what bounds a
failure is the trainer itself. Full fine-tuning with dropout on: an exact resume needs every rank's RNG back.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import psutil
import pytest
import torch

from tests import ranks
from tests.conftest import write_config, write_entailment_task

NUM_STEPS = 10  # 8 steps per epoch (64 examples, 4 micro-batches of 2 per step): the run crosses an epoch


def reliability_config(tmp_path, model_dir, **train):
    data = write_entailment_task(tmp_path / "data", num_train=64, num_eval=8)
    return write_config(tmp_path / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 3, "collective_timeout_s": 30},
        "model": {"name_or_path": str(model_dir), "dropout": True},
        "method": {"name": "full"},
        "head": {"dropout": 0.1},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 16},
        "train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": NUM_STEPS, "eval_every": 1, **train},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.2},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    })


def start(cfg, out, *extra, launcher=False, fault="", num_ranks=2):
    env = {"IPT_DS_FAULT": fault} if fault else {}
    return ranks.start(["train", str(cfg), f"--run.output_dir={out}", *extra], num_ranks=num_ranks,
                       log_dir=out.parent / f"{out.name}-logs", launcher=launcher, env=env)


def finish(run: ranks.Ranks, timeout: float = 300) -> None:
    codes = run.wait(timeout)
    assert codes == [0] * len(codes), f"exit codes {codes}:\n{run.output()[-4000:]}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("reliability")
    return tmp, reliability_config(tmp, tiny_bert)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted run's losses."""
    tmp, cfg = setup
    run = start(cfg, tmp / "reference")
    finish(run)
    assert "truncated to data.max_length=16 (longest first)" in run.output()  # the truncation policy is reported
    exported = [p for p in (tmp / "reference" / "best").rglob("*") if p.is_file()]
    assert exported and all(p.suffix in (".safetensors", ".json") for p in exported)  # no pickles to share
    result = ranks.losses(tmp / "reference")
    assert sorted(result) == list(range(1, NUM_STEPS + 1))
    return result


def test_sigkill_of_one_rank_in_a_save_then_resume_repeats_the_losses_bitwise(setup, reference):
    """Rank 1 is SIGKILLed at a random step, after writing its checkpoint files and before `latest` moves to them:
    rank 0 exits on its own naming rank 1, `latest` still names the previous complete checkpoint, and the resumed
    run repeats the uninterrupted run's losses bit for bit (data order, dropout draws, schedule, optimizer)."""
    tmp, cfg = setup
    out = tmp / "killed"
    checkpoints = out / "checkpoints"
    kill_at = random.randint(2, NUM_STEPS - 1)
    run = start(cfg, out, fault=f"kill_in_save:1:{kill_at}")
    codes = run.wait(120)
    assert codes[1] == -9 and codes[0] == 1, (codes, run.output()[-3000:])
    assert f"rank 0 failed at step {kill_at}" in run.output()
    assert f"peer ranks gone: rank 1 (pid {run.processes[1].pid})" in run.output()
    assert (checkpoints / "latest").read_text() == f"step{kill_at - 1}"
    previous = {p.name for p in (checkpoints / f"step{kill_at - 1}").iterdir()}
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors", "mp_rank_00_model_states.pt"} <= previous
    assert (checkpoints / f"step{kill_at}").is_dir()  # the interrupted save, which nothing points at

    resumed = start(cfg, out, "--run.resume=true")
    finish(resumed)
    assert f"resumed at step {kill_at - 1}" in resumed.output()
    assert ranks.losses(out) == reference, f"killed in the save of step {kill_at}"  # each step logged once
    assert [p.name for p in checkpoints.glob("step*")] == [f"step{NUM_STEPS}"]


def test_sigusr1_to_one_rank_stops_every_rank_at_one_step_then_resume_repeats_the_losses(setup, reference):
    """SIGUSR1 to rank 1 only, under the `deepspeed` launcher, at a random step: both ranks stop after the same step,
    which is checkpointed although it is no evaluation step, `latest` names it, the launcher exits 75; the resumed
    run completes the uninterrupted run's losses bit for bit, each step logged once."""
    from ipt_ds.preemption import STOPPED_EXIT_CODE

    tmp, cfg = setup
    out = tmp / "stopped"
    signal_at = random.randint(1, NUM_STEPS - 3)
    run = start(cfg, out, "--train.eval_every=4", launcher=True)  # evaluations (and their saves) at steps 4 and 8
    ranks.wait_for_step(out, signal_at, run)
    os.kill(run.rank_pid(1), signal.SIGUSR1)
    assert run.wait(120) == [STOPPED_EXIT_CODE], run.output()[-3000:]
    output = run.output()
    stops = {int(rank): int(step) for rank, step in
             re.findall(r"rank (\d): stopping after step (\d+) on a stop signal", output)}
    assert stops.keys() == {0, 1} and len(set(stops.values())) == 1, output[-3000:]
    assert f"rank 1: stopping after step {stops[1]} on a stop signal (SIGUSR1 received here)" in output
    assert f"rank 0: stopping after step {stops[0]} on a stop signal (received by another rank)" in output
    step = stops[0]
    assert signal_at <= step < NUM_STEPS
    assert (out / "checkpoints" / "latest").read_text() == f"step{step}"
    assert [p.name for p in (out / "checkpoints").glob("step*")] == [f"step{step}"]

    resumed = start(cfg, out, "--run.resume=true", "--train.eval_every=4")
    finish(resumed)
    assert f"resumed at step {step}" in resumed.output()
    assert ranks.losses(out) == reference, f"stopped after step {step}"


def test_an_exception_in_one_rank_stops_every_rank_under_the_launcher(setup):
    tmp, cfg = setup
    out = tmp / "raised"
    run = start(cfg, out, launcher=True, fault="raise:1:2")
    (code,) = run.wait(120)
    assert code != 0
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    output = run.output()
    assert "rank 1 failed at step 2: RuntimeError: injected fault" in output
    # rank 0 either fails in its next collective or is stopped by the launcher; either way it names rank 1
    assert re.search(r"rank 0 (failed|stopped by SIGTERM) at step 2.*rank 1 \(pid \d+\)", output), output[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step1"


def test_a_hung_rank_fails_its_peers_after_the_collective_timeout(setup):
    tmp, cfg = setup
    out = tmp / "hung"
    run = start(cfg, out, "--run.collective_timeout_s=5", fault="hang:1:2")
    try:
        ranks.wait_for_step(out, 1, run)
        reached = time.monotonic()
        run.processes[0].wait(timeout=90)
        waited = time.monotonic() - reached
    finally:
        run.kill()  # nothing else would stop the hung rank without a launcher
    assert run.processes[0].returncode == 1
    assert 5 < waited < 40, waited
    assert "rank 0 failed at step 2: RuntimeError" in run.output() and "one of them is stuck" in run.output()


def module_weights(run_dir, tag) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]


def test_a_nan_loss_stops_every_rank_or_its_update_is_skipped(setup):
    """The NaN is in rank 1's loss only; all ranks decide together. Stopping saves nothing of that step; skipping
    leaves the weights after step 3 bit-identical to those after step 2."""
    tmp, cfg = setup
    stop = start(cfg, tmp / "nan-stop", "--train.max_steps=3", fault="nan:1:3")
    assert stop.wait(120) == [2, 2], stop.output()[-3000:]
    assert "error: step 3: the loss or the gradients are not finite (NaN/inf)" in stop.output()
    assert (tmp / "nan-stop" / "checkpoints" / "latest").read_text() == "step2"

    skip = start(cfg, tmp / "nan-skip", "--train.max_steps=3", "--train.nonfinite=skip", fault="nan:1:3")
    finish(skip)
    assert "step 3: non-finite loss or gradients; its update was skipped" in skip.output()
    assert json.loads((tmp / "nan-skip" / "results.json").read_text())["skipped_steps"] == 1
    before, after = module_weights(tmp / "nan-stop", "step2"), module_weights(tmp / "nan-skip", "step3")
    assert before.keys() == after.keys() and all(t.isfinite().all() for t in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)
