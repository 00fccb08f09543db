"""Start a multi-rank `ipt-ds` run as real processes, watch its progress and kill it (reliability tests, soak).

Two ways to start the ranks: `launcher=True` goes through the `deepspeed` launcher (which stops every rank when one
exits non-zero); `launcher=False` starts one process per rank with the torch.distributed environment variables, as
`srun` or a bare scheduler would, so that only the trainer itself bounds a failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import deepspeed_command

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ranks:
    processes: list[subprocess.Popen]
    logs: list[Path]
    port: str
    started: float = field(default_factory=time.monotonic)

    def release_shared_memory(self) -> None:
        """Remove the run's DeepSpeed shared-memory buffers (~66 MB of RAM per rank), which a killed rank leaves."""
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{self.port}_*"):
            path.unlink(missing_ok=True)

    def wait(self, timeout: float) -> list[int]:
        """Every process's exit status; raises TimeoutError (after killing them) if any is still running."""
        deadline = self.started + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(f"still running after {timeout} s:\n{self.output()[-3000:]}") from None
        self.release_shared_memory()
        return [p.returncode for p in self.processes]

    def kill(self) -> None:
        """SIGKILL every process of the run at once (the launcher and its ranks share a process group)."""
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        self.release_shared_memory()

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        """The pid of rank `rank` (under the launcher: the child started with --local_rank=RANK)."""
        if len(self.processes) > 1:
            return self.processes[rank].pid
        import psutil

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for child in psutil.Process(self.processes[0].pid).children(recursive=True):
                try:
                    if f"--local_rank={rank}" in child.cmdline():
                        return child.pid
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.2)
        raise TimeoutError(f"no rank {rank} process")

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in self.logs if log.exists())


def start(args: list[str], *, num_ranks: int, log_dir: Path, launcher: bool = False, env: dict | None = None) -> Ranks:
    """Start `ipt-ds ARGS` on `num_ranks` ranks; stdout and stderr go to files in `log_dir`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
            **(env or {})}
    port = str(free_port())
    if launcher:
        cmd = deepspeed_command(num_ranks, "--module", "ipt_ds", *args, port=port)
        commands = [(cmd, base, log_dir / "launcher.log")]
    else:
        commands = [([sys.executable, "-m", "ipt_ds", *args],
                     {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(num_ranks),
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}, log_dir / f"rank{r}.log")
                    for r in range(num_ranks)]
    processes, logs = [], []
    for cmd, process_env, log in commands:
        with open(log, "w") as handle:
            processes.append(subprocess.Popen(cmd, cwd=REPO, env=process_env, stdout=handle, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        logs.append(log)
    return Ranks(processes, logs, port)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps with a training loss in the run's log.jsonl so far (a half-written last line is ignored)."""
    path = run_dir / "log.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in row:
            steps.append(row["step"])
    return steps


def wait_for_step(run_dir: Path, step: int, ranks: Ranks, timeout: float = 300) -> None:
    """Return as soon as the run has logged `step`; fail if it ends or takes too long first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in logged_steps(run_dir)):
            return
        if all(p.poll() is not None for p in ranks.processes):
            raise AssertionError(f"the run ended before step {step}:\n{ranks.output()[-3000:]}")
        time.sleep(0.02)
    ranks.kill()
    raise TimeoutError(f"step {step} not reached in {timeout} s")


def losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss; asserts that no step was logged twice."""
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
