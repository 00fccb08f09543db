"""What every CPU speed study records beside its figures, so that a figure from a busy machine is never read as a
clean one.

- **Pinning:** `pinned(cmd, cores)` runs a measured process under `taskset` on its own cores, with as many threads as
  cores (`thread_env`: OMP_NUM_THREADS, MKL_NUM_THREADS).
- **The GEMM rate of the same run:** `gemm(cores)`, an fp32 `torch.mm` of 2048^3 in one process pinned the same way
  (`benchmarks.scale --gemm`), taken at the start and at the end of a study: the rate its FLOP/s are a fraction of.
- **The load:** `run_watched` runs a process to the end while sampling the machine's runnable threads every half
  second (/proc/loadavg's fourth field, less the sampling thread itself), and records the load averages at its start
  and end, its own CPU seconds and peak RSS (wait4's rusage of this child alone). A cell is `oversubscribed` when the
  runnable threads averaged more than 1.1x the machine's cores (`OVERSUBSCRIBED`): its threads then had less than
  about 90 % of a core each, and it ranks nothing. (Loading briefly runs a few threads of its own, and a shell
  command beside a study adds one, so exactly the number of cores is too strict a line.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OVERSUBSCRIBED = 1.1
"""Runnable threads per CPU, averaged over a cell, above which it is marked oversubscribed."""


def thread_env(cores: list[int]) -> dict[str, str]:
    threads = str(len(cores))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def pinned(cmd: list[str], cores: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cores)), *cmd]


def runnable_threads() -> int:
    """Threads running or ready to run on the whole machine right now (the reading thread included)."""
    return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])


def run_watched(cmd: list[str], *, cores: list[int], log: Path, env: dict | None = None) -> dict:
    """Run `cmd` pinned to `cores` to the end, its stderr in `log` and its stdout next to it (.out); return its exit
    code, peak RSS (MiB), CPU seconds, wall seconds, stdout and the machine's load while it ran."""
    log.parent.mkdir(parents=True, exist_ok=True)
    samples: list[int] = []
    load_start = os.getloadavg()[0]
    begin = time.perf_counter()
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        process = subprocess.Popen(pinned(cmd, cores), stdout=out, stderr=err,
                                   env={**thread_env(cores), **(env or {})})
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                samples.append(runnable_threads() - 1)  # less this sampling thread

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the maximum over all children
        done.set()
        sampler.join()
    runnable = sum(samples) / len(samples) if samples else float(runnable_threads() - 1)
    cpus = os.cpu_count() or 1
    return {"returncode": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.perf_counter() - begin,
            "stdout": log.with_suffix(".out").read_text(), "cores": cores, "threads": len(cores),
            "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
            "runnable_threads": round(runnable, 2), "cpus": cpus, "oversubscribed": runnable > OVERSUBSCRIBED * cpus}


def machine(run: dict) -> dict:
    """What a study keeps of `run_watched`'s record beside its own figures: the load the cell ran under."""
    return {key: run[key] for key in ("threads", "load_average", "runnable_threads", "oversubscribed")}


def gemm(cores: list[int], *, seconds: float = 5.0) -> float:
    """FLOP/s of an fp32 2048^3 torch.mm in one process pinned to `cores` with as many threads."""
    spec = {"device": "cpu", "dtype": "float32", "m": 2048, "k": 2048, "n": 2048, "threads": len(cores),
            "seconds": seconds}
    result = subprocess.run(pinned([sys.executable, "-m", "benchmarks.scale", "--gemm", json.dumps(spec)], cores),
                            env=thread_env(cores), capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def machine_note(gemm_rates: list[float], cells: list[dict]) -> str:
    """One line for a study's report: the GEMM rates of the run, the load, and how many cells were oversubscribed."""
    busy = sum(c["oversubscribed"] for c in cells)
    loads = [x for c in cells for x in c["load_average"]]
    return (f"Machine: {os.cpu_count()} CPUs; fp32 GEMM (2048^3, pinned, {cells[0]['threads'] if cells else 1} "
            f"thread(s)) {', '.join(f'{g / 1e9:.1f}' for g in gemm_rates)} GFLOP/s at the start and end of this run; "
            f"1-min load average {min(loads, default=0):.2f}-{max(loads, default=0):.2f} over the cells; "
            f"{busy} of {len(cells)} cells oversubscribed (on average more than {OVERSUBSCRIBED} runnable threads per "
            "CPU; marked *).")
