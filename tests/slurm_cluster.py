"""A one-node Slurm cluster on localhost for tests: munged, slurmctld and slurmd, all under one temporary directory.

`start(root)` writes a private munge key and slurm.conf (no systemd, no cgroups, no accounting; proctrack/linuxproc,
task/none), starts the three daemons in the foreground as children of the test process and waits until the node is
idle. `stop()` cancels the cluster's jobs and ends only the daemons it started, by PID. Nothing outside `root` is
touched: munged listens on its own socket, and the Slurm daemons use free ports.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is not installed, or the daemons did not come up; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, munge_socket: Path) -> str:
    state = root / "state"
    return "\n".join([
        "ClusterName=ipt-ds-test",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmUser={getpass.getuser()}",
        f"SlurmdUser={getpass.getuser()}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire: how long a requeued job waits before it may start again (120 s by default)
        f"AuthInfo=socket={munge_socket},cred_expire=5",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=bf_interval=1,sched_interval=2",  # a requeued job starts once it may, not up to 60 s later
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",  # trust the node line below whatever the host's CPU topology
        "ReturnToService=2",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={state}",
        f"SlurmdSpoolDir={state}/spool",
        f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        "InactiveLimit=0",
        "KillWait=5",
        "MinJobAge=300",
        "Waittime=0",
        # at least 2 CPUs, so that a 2-rank job fits even on a 1-CPU host (config_overrides)
        f"NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs={max(2, os.cpu_count() or 1)}",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


@dataclass
class SlurmCluster:
    root: Path
    env: dict
    """The environment for Slurm clients and jobs: SLURM_CONF names the cluster's config."""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None, check: bool = True):
        return subprocess.run(cmd, cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True,
                              check=check, timeout=60)

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        """Submit; returns the job id (of the array job, for an array)."""
        result = self.run("sbatch", "--parsable", *args, cwd=cwd, env=env, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 600) -> None:
        """Poll squeue until the job (every task of an array) has left the queue; sbatch -W polls far slower."""
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job_id, check=False).stdout.strip():
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                raise TimeoutError(f"job {job_id} still queued or running after {timeout:.0f} s")
            time.sleep(0.2)

    def _show_jobs(self, job_id: str) -> list[dict]:
        """`scontrol show job` as one dict per job (per task of an array); slurmctld keeps finished jobs for
        MinJobAge seconds, so this needs no accounting database."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return [dict(item.split("=", 1) for item in line.split() if "=" in item) for line in out.splitlines()]

    def jobs(self, job_id: str) -> dict[str, tuple[str, str]]:
        """{job id: (state, exit code)} for a job, or for each task of an array; exit code 2:0 means status 2."""
        return {job["JobId"]: (job["JobState"], job["ExitCode"]) for job in self._show_jobs(job_id)}

    def restarts(self, job_id: str) -> int:
        """How many times the job has been requeued (0 until then)."""
        return int(self._show_jobs(job_id)[0]["Restarts"])

    def run_time_s(self, job_id: str) -> int:
        """Seconds the job has been running in its current allocation."""
        days, _, clock = self._show_jobs(job_id)[0]["RunTime"].rpartition("-")
        hours, minutes, seconds = (int(part) for part in clock.split(":"))
        return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds

    def array_jobs(self, job_id: str) -> dict[int, str]:
        """{array index: job id} for the tasks of an array job."""
        return {int(job["ArrayTaskId"]): job["JobId"] for job in self._show_jobs(job_id)}

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def stop(self) -> None:
        if len(self.processes) == 3 and all(process.poll() is None for process in self.processes):
            # end the jobs first: their slurmstepd and ranks are not children of slurmd and would outlive it
            self.run("scancel", "--user", getpass.getuser(), check=False)
            deadline = time.monotonic() + 20
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for process in reversed(self.processes):  # slurmd, slurmctld, then munged
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start(root: Path, timeout: float = 30) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under `root`; raises SlurmUnavailable with the reason when that fails."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        raise SlurmUnavailable(f"Slurm/munge not installed (missing {', '.join(missing)}); "
                               "run .ci/install-slurm.sh")
    if os.geteuid() != 0:
        raise SlurmUnavailable("the one-node Slurm cluster needs root (slurmd starts jobs as their user)")
    for sub in ("munge", "log", "state/spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_socket = root / "munge" / "munge.socket"
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, env=env)
    key = os.open(root / "munge" / "munge.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # munged wants 0600
    os.write(key, os.urandom(1024))
    os.close(key)
    log = root / "log"
    # -F/-D: stay in the foreground, so each Popen is the daemon itself. -f: munged accepts a socket directory that
    # is not world-searchable (pytest's temporary directories are private).
    commands = [
        ["munged", "-F", "-f", f"--socket={munge_socket}", f"--key-file={root}/munge/munge.key",
         f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
         f"--log-file={log}/munged.log"],
        ["slurmctld", "-D", "-c", "-f", str(conf)],
        ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
    ]
    ready = [
        lambda: cluster.run("munge", "-n", f"--socket={munge_socket}", check=False).returncode == 0,
        lambda: "UP" in cluster.run("scontrol", "ping", check=False).stdout,
        lambda: cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip() == "idle",
    ]
    try:
        for command, is_ready in zip(commands, ready, strict=True):
            name = command[0]
            with open(log / f"{name}.stdout", "w") as stdout:
                cluster.processes.append(subprocess.Popen(command, stdout=stdout, stderr=subprocess.STDOUT, env=env))
            deadline = time.monotonic() + timeout
            while not is_ready():
                if cluster.processes[-1].poll() is not None or time.monotonic() > deadline:
                    raise SlurmUnavailable(f"{name} did not come up:\n{cluster.logs()}")
                time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster
