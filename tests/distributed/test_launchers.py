"""The launchers on real software: the deepspeed wrapper with two loopback "nodes" (--no_ssh), and the Slurm scripts
(train, sweep, chained resume) on a one-node Slurm cluster that tests/slurm_cluster.py starts on localhost.

The Slurm tests skip, with the reason, where Slurm and munge are not installed (.ci/install-slurm.sh installs them);
set IPT_DS_REQUIRE_SLURM=1 to make that a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests import ranks, slurm_cluster
from tests.conftest import REPO, read_log, write_config, write_entailment_task

LAUNCHERS = REPO / "launchers"
NUM_STEPS = 6
# Every process the launchers start finds `deepspeed` and `python` of this environment first on PATH.
JOB_ENV = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_bert) -> Path:
    """A tiny prompt-tuning run that trains in seconds; the loss moves, so equal losses mean the same run."""
    tmp = tmp_path_factory.mktemp("launch-config")
    data = write_entailment_task(tmp / "data")
    return write_config(tmp / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 3},
        "model": {"name_or_path": str(tiny_bert)},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "head": {"pool": "mean", "dropout": 0.0},  # dropout draws would differ between layouts
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": NUM_STEPS, "eval_every": 3},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    })


def deepspeed_sh(run_dir: Path, config: Path, **knobs: str) -> subprocess.Popen:
    """Start launchers/deepspeed.sh with environment knobs; its output goes to RUN_DIR.launcher.log."""
    with open(run_dir.with_suffix(".launcher.log"), "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([str(LAUNCHERS / "deepspeed.sh"), "train", str(config), f"--run.output_dir={run_dir}"],
                                cwd=REPO, env={**os.environ, **JOB_ENV, **knobs}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: the launcher and its ranks


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 600) -> None:
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    assert returncode == 0, run_dir.with_suffix(".launcher.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def one_node_losses(tmp_path_factory, run_config) -> list[float]:
    """1 node x 2 ranks through launchers/deepspeed.sh (NGPUS=2): the losses every other layout must reproduce."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    finish(deepspeed_sh(run_dir, run_config, NGPUS="2", MASTER_PORT=free_port()), run_dir)
    losses = read_log(run_dir, "train/loss")
    assert len(losses) == NUM_STEPS and np.std(losses) > 1e-3, losses
    return losses


def test_two_loopback_nodes_match_one_node(tmp_path, run_config, one_node_losses):
    """Two `deepspeed --no_ssh` launchers, node ranks 0 and 1 with one rank each, form one 2-rank world."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # distinct names; --no_ssh never resolves them
    run_dir = tmp_path / "run"
    knobs = {"HOSTFILE": str(hostfile), "NUM_NODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    nodes = [deepspeed_sh(run_dir, run_config, NODE_RANK=str(rank), **knobs) for rank in (0, 1)]
    for node in nodes:
        finish(node, run_dir)
    assert "WORLD INFO DICT: {'node0': [0], 'node1': [0]}" in run_dir.with_suffix(".launcher.log").read_text()
    np.testing.assert_allclose(read_log(run_dir, "train/loss"), one_node_losses, rtol=2e-4)
    assert (run_dir / "results.json").exists()


# ---- Slurm --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    except slurm_cluster.SlurmUnavailable as err:
        if os.environ.get("IPT_DS_REQUIRE_SLURM"):
            pytest.fail(str(err))
        pytest.skip(str(err))
    yield cluster
    cluster.stop()


@pytest.fixture
def submit_dir(tmp_path) -> Path:
    """Where sbatch runs, standing in for the repository root: launchers/ (linked) and logs/ beside each other."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "launchers").symlink_to(LAUNCHERS)
    return tmp_path


def submit(slurm, submit_dir: Path, *args: str, **knobs: str) -> str:
    return slurm.sbatch(*args, cwd=submit_dir, env={**JOB_ENV, **knobs})


@pytest.mark.parametrize("launch", ["per-rank", "per-node"])
def test_train_sbatch_two_ranks(slurm, submit_dir, run_config, one_node_losses, launch):
    """2 ranks, as 2 Slurm tasks (per-rank) or as 1 task running the deepspeed launcher (per-node): same losses."""
    run_dir = submit_dir / "run"
    tasks = "2" if launch == "per-rank" else "1"
    job = submit(slurm, submit_dir, f"--ntasks-per-node={tasks}", "launchers/slurm/train.sbatch", str(run_config),
                 f"--run.output_dir={run_dir}", LAUNCH=launch, NGPUS="2")
    slurm.wait(job)
    log = (submit_dir / "logs" / f"ipt-train-{job}.out").read_text()
    assert slurm.jobs(job) == {job: ("COMPLETED", "0:0")}, log[-3000:]
    assert f"{tasks} task(s), master localhost:" in log
    assert "(world size 2)" in log
    np.testing.assert_allclose(read_log(run_dir, "train/loss"), one_node_losses, rtol=2e-4)
    assert json.loads((run_dir / "results.json").read_text())["eval"]


def test_train_sbatch_fails_with_the_users_error(slurm, submit_dir, run_config):
    job = submit(slurm, submit_dir, "launchers/slurm/train.sbatch", str(run_config), "--train.no_such_key=1",
                 f"--run.output_dir={submit_dir / 'run'}")
    slurm.wait(job)
    log = (submit_dir / "logs" / f"ipt-train-{job}.out").read_text()
    assert slurm.jobs(job) == {job: ("FAILED", "2:0")}, log[-3000:]
    assert "error:" in log and "no_such_key" in log


def test_sweep_array_runs_each_cell_once(slurm, submit_dir, run_config):
    grid = submit_dir / "grid.txt"
    grid.write_text("# task seed method [flags]\nrte 1 prompt_tuning\n\n"
                    "rte 2 prompt_tuning --method.num_virtual_tokens=2\n")
    sweep_dir = submit_dir / "sweep"
    cells = [sweep_dir / "rte-prompt_tuning-seed1", sweep_dir / "rte-prompt_tuning-seed2"]
    args = ("--array=1-2", "launchers/slurm/sweep.sbatch", str(grid), str(run_config))
    job = submit(slurm, submit_dir, *args, SWEEP_DIR=str(sweep_dir))
    slurm.wait(job)
    logs = [(submit_dir / "logs" / f"ipt-sweep-{job}_{i}.out").read_text() for i in (1, 2)]
    assert sorted(slurm.jobs(job).values()) == [("COMPLETED", "0:0")] * 2, "\n".join(log[-2000:] for log in logs)
    for seed, cell in enumerate(cells, start=1):
        config = yaml.safe_load((cell / "config.yaml").read_text())
        assert (config["run"]["seed"], config["method"]["num_virtual_tokens"]) == (seed, 4 if seed == 1 else 2)
        assert (cell / "results.json").exists()
    finished = [(cell / "results.json").stat().st_mtime_ns for cell in cells]

    again = submit(slurm, submit_dir, *args, SWEEP_DIR=str(sweep_dir))
    slurm.wait(again)
    assert sorted(slurm.jobs(again).values()) == [("COMPLETED", "0:0")] * 2
    for i in (1, 2):
        assert "results.json exists, skipping" in (submit_dir / "logs" / f"ipt-sweep-{again}_{i}.out").read_text()
    assert [(cell / "results.json").stat().st_mtime_ns for cell in cells] == finished


def test_chained_array_resumes_from_latest(slurm, submit_dir, run_config):
    """--array=1-2%1: the first job is cancelled mid-run (as at a time limit); the second resumes and finishes."""
    run_dir = submit_dir / "long-run"
    num_steps, eval_every = 200, 10
    job = submit(slurm, submit_dir, "--array=1-2%1", "launchers/slurm/chain.sbatch", str(run_config), str(run_dir),
                 f"--train.max_steps={num_steps}", f"--train.eval_every={eval_every}")
    # Cancel the first job once it has logged a step past its first checkpoint (saved at every evaluation).
    deadline = time.monotonic() + 300
    while not any(step > eval_every for step in logged_steps(run_dir)):
        assert time.monotonic() < deadline, slurm.logs()
        time.sleep(0.05)
    slurm.run("scancel", f"{job}_1")
    slurm.wait(job)
    jobs = slurm.array_jobs(job)
    logs = {task: (submit_dir / "logs" / f"ipt-chain-{job_id}.out").read_text() for task, job_id in jobs.items()}
    states = slurm.jobs(job)
    assert states[jobs[1]][0] == "CANCELLED", "the first job finished before it could be cancelled: " + logs[1]
    assert states[jobs[2]] == ("COMPLETED", "0:0"), logs[2][-3000:]
    assert "no checkpoint yet, starting the run" in logs[1] and "resumed at step" not in logs[1]
    assert "resuming from the latest checkpoint" in logs[2] and "resumed at step" in logs[2]
    assert max(logged_steps(run_dir)) == num_steps
    assert (run_dir / "results.json").exists()


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


# ---- Preemption on Slurm: a stop signal, a checkpoint, exit 75, requeue, resume -----------------------------------

# A constant learning rate makes the first N losses independent of max_steps: one reference serves every length.
PREEMPT_FLAGS = ("--optim.schedule=constant", "--train.eval_every=100")
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def preemption_reference(slurm, tmp_path_factory, run_config):
    """reference(n) -> the losses of steps 1..n of an uninterrupted run (2 Slurm tasks, one rank each); a run is
    started only when no earlier one was long enough."""
    runs: list[dict[int, float]] = []

    def reference(num_steps: int) -> dict[int, float]:
        if not runs or len(runs[-1]) < num_steps:
            submit_dir = tmp_path_factory.mktemp("preempt-reference")
            (submit_dir / "logs").mkdir()
            (submit_dir / "launchers").symlink_to(LAUNCHERS)
            job = submit(slurm, submit_dir, "--ntasks-per-node=2", "launchers/slurm/train.sbatch", str(run_config),
                         f"--run.output_dir={submit_dir / 'run'}", f"--train.max_steps={num_steps}", *PREEMPT_FLAGS)
            slurm.wait(job)
            log = (submit_dir / "logs" / f"ipt-train-{job}.out").read_text()
            assert slurm.jobs(job) == {job: ("COMPLETED", "0:0")}, log[-4000:]
            runs.append(ranks.losses(submit_dir / "run"))
        return {step: loss for step, loss in runs[-1].items() if step <= num_steps}

    return reference


def assert_stopped_requeued_and_resumed(slurm, job: str, log: str, run_dir: Path, reference) -> None:
    """One stop (both ranks after the same step, exit 75), one requeue, one resume from that step; then the run
    completes, and every step's loss is the uninterrupted run's, each step logged once."""
    assert slurm.jobs(job) == {job: ("COMPLETED", "0:0")}, log[-4000:]
    assert slurm.restarts(job) == 1, log[-4000:]
    stops = re.findall(r"rank (\d): stopping after step (\d+) on a stop signal \(([^)]*)\)", log)
    assert sorted(rank for rank, _, _ in stops) == ["0", "1"] and len({step for _, step, _ in stops}) == 1, log[-4000:]
    # Slurm signals every rank, but not at one instant: a rank whose signal lands after the step's agreement stops
    # on its peer's ("received by another rank"); at least one rank stopped on its own SIGUSR1.
    received = [why for _, _, why in stops]
    assert "SIGUSR1 received here" in received and set(received) <= {"SIGUSR1 received here",
                                                                       "received by another rank"}, received
    step = int(stops[0][1])
    assert "exiting with status 75" in log and f"resumed at step {step}" in log
    assert "--run.resume=auto" in log  # the requeued job resumed by itself (SLURM_RESTART_COUNT)
    losses = ranks.losses(run_dir)  # asserts that no step was logged twice
    assert losses == reference(len(losses)), f"stopped after step {step}"
    assert (run_dir / "results.json").exists()


def test_time_limit_warning_stops_requeues_and_resumes_the_exact_losses(slurm, submit_dir, run_config,
                                                                        preemption_reference):
    """A job asks for the warning 120 s before its time limit (--signal=USR1@120). Once it trains, the test shortens
    its limit to between 60 and 120 s from now: Slurm, which checks time limits every 30 s, signals every rank (2
    tasks) within 30 s, and the run (too long to end first) stops, saves and requeues the job. The test then holds
    the job, sets the run's length in its YAML to 20 steps past the stop (a resumed run may change train.max_steps)
    and gives the job 10 minutes, so that the next allocation finishes instead of being warned again. (Shortening
    the limit once training runs keeps the warning out of start-up, where DeepSpeed may be compiling its
    communication op: Slurm signals the compiler too.)"""
    run_dir = submit_dir / "run"
    config = yaml.safe_load(run_config.read_text())
    config["train"]["max_steps"] = 100_000
    write_config(submit_dir / "cfg.yaml", config)
    job = submit(slurm, submit_dir, "--ntasks-per-node=2", "--time=10", "--signal=USR1@120",
                 "launchers/slurm/train.sbatch", str(submit_dir / "cfg.yaml"), f"--run.output_dir={run_dir}",
                 *PREEMPT_FLAGS)
    log_path = submit_dir / "logs" / f"ipt-train-{job}.out"
    deadline = time.monotonic() + 300
    while not any(step >= 3 for step in logged_steps(run_dir)):
        assert time.monotonic() < deadline and slurm.jobs(job)[job][0] not in ENDED, log_path.read_text()[-4000:]
        time.sleep(0.05)
    slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={slurm.run_time_s(job) // 60 + 2}")
    while not slurm.restarts(job):
        state = slurm.jobs(job)[job][0]
        assert time.monotonic() < deadline and state not in ENDED, f"{state}\n{log_path.read_text()[-4000:]}"
        time.sleep(0.2)
    slurm.run("scontrol", "hold", job)
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step"))
    config["train"]["max_steps"] = stopped_at + 20
    write_config(submit_dir / "cfg.yaml", config)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    slurm.run("scontrol", "release", job)
    slurm.wait(job)
    log = log_path.read_text()
    assert "DUE TO TIME LIMIT" not in log
    assert_stopped_requeued_and_resumed(slurm, job, log, run_dir, preemption_reference)
    assert max(ranks.losses(run_dir)) == stopped_at + 20


def test_scancel_usr1_stops_requeues_and_resumes_the_exact_losses(slurm, submit_dir, run_config,
                                                                  preemption_reference):
    """`scancel --signal=USR1` mid-run, with the deepspeed launcher in the job step (LAUNCH=per-node): the launcher
    ignores the signal, its ranks stop; the job requeues itself, and the next allocation resumes and finishes."""
    run_dir = submit_dir / "run"
    job = submit(slurm, submit_dir, "--ntasks-per-node=1", "launchers/slurm/train.sbatch", str(run_config),
                 f"--run.output_dir={run_dir}", "--train.max_steps=60", *PREEMPT_FLAGS, LAUNCH="per-node", NGPUS="2")
    deadline = time.monotonic() + 300
    while not any(step >= 3 for step in logged_steps(run_dir)):
        assert time.monotonic() < deadline and slurm.jobs(job)[job][0] not in ENDED, slurm.logs()
        time.sleep(0.05)
    slurm.run("scancel", "--signal=USR1", job)
    slurm.wait(job)
    log = (submit_dir / "logs" / f"ipt-train-{job}.out").read_text()
    assert_stopped_requeued_and_resumed(slurm, job, log, run_dir, preemption_reference)
    assert max(ranks.losses(run_dir)) == 60
