"""When a rank fails: every rank exits non-zero within a bounded time, and the log names the rank that failed.

How a multi-rank run can end badly, and what bounds each case:

* a rank raises: it logs `rank R failed at step S: ...` with the traceback and leaves at once (`os._exit`, no
  interpreter teardown that could wait on the process group); its peers' next collective fails on the closed
  connection and they log the same way, naming the peers whose processes are gone;
* a rank is killed (SIGKILL, the OOM killer): its peers' next collective fails the same way; under the `deepspeed`
  launcher or `srun --kill-on-bad-exit` the launcher also stops them (SIGTERM, logged here with the ranks gone);
* a rank hangs: its peers' collectives time out after `run.collective_timeout_s`.

Peers are named by pid for ranks on this host; ranks on other hosts are only reported through their own logs.

`IPT_DS_FAULT=KIND:RANK:STEP` injects one fault for the tests (see docs/reliability.md); unset, it costs nothing.
KIND is `raise` / `hang` at the start of step STEP (1-based) on rank RANK, `nan` (that rank's loss becomes NaN in
step STEP), or `kill_in_save` (SIGKILL after the step-STEP checkpoint files are written, before `latest` moves to
them). A SIGKILL anywhere else needs no hook: tests/ranks.py sends it from outside.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("ipt_ds")

_rank = {"rank": 0, "world": 1, "step": 0, "peers": []}  # this process: its rank, the step in progress, peer pids
FAULT_KINDS = ("raise", "hang", "nan", "kill_in_save")


def start(rank: int, world: int) -> None:
    """Record every rank's (host, pid) and stop cleanly on SIGTERM (unless `run.stop_signals` catches it: see
    preemption.py); call once, on every rank, after init."""
    _rank.update(rank=rank, world=world)
    peers: list = [None] * world
    torch.distributed.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    _rank["peers"] = peers
    signal.signal(signal.SIGTERM, exit_on_signal)


def begin_step(step: int) -> None:
    """Note the step now running (for messages) and fire an injected `raise` or `hang` fault."""
    _rank["step"] = step
    kind = _fault_here(step)
    if kind == "raise":
        raise RuntimeError(f"injected fault (IPT_DS_FAULT={os.environ['IPT_DS_FAULT']})")
    if kind == "hang":
        while True:
            time.sleep(60)


def watch_loss(module: torch.nn.Module) -> None:
    """Make this rank's loss NaN in the faulted step (`nan` faults only; otherwise nothing is attached)."""
    if _fault_spec() and _fault_spec()[0] == "nan":
        def poison(_module, _args, output):
            logits, loss = output
            return (logits, loss * float("nan")) if loss is not None and _fault_here(_rank["step"]) else output

        module.register_forward_hook(poison)


def checkpoint_written(step: int) -> None:
    """Between a checkpoint's files and its `latest` entry: where a `kill_in_save` fault fires."""
    if _fault_here(step, "kill_in_save"):
        os.kill(os.getpid(), signal.SIGKILL)


def _fault_spec() -> tuple[str, int, int] | None:
    spec = os.environ.get("IPT_DS_FAULT", "")
    if not spec:
        return None
    kind, rank, step = (spec.split(":") + ["", ""])[:3]
    if kind not in FAULT_KINDS or not rank.isdigit() or not step.isdigit():
        raise ValueError(f"IPT_DS_FAULT={spec!r}: expected KIND:RANK:STEP with KIND one of {', '.join(FAULT_KINDS)}")
    return kind, int(rank), int(step)


def _fault_here(step: int, kind: str | None = None) -> str | None:
    spec = _fault_spec()
    if spec is None or spec[1] != _rank["rank"] or spec[2] != step or (kind and spec[0] != kind):
        return None
    return spec[0]


def peers_gone() -> list[str]:
    """Ranks on this host whose process has exited (or is a zombie its launcher has not reaped yet)."""
    host = socket.gethostname()
    return [f"rank {r} (pid {pid})" for r, (peer_host, pid) in enumerate(_rank["peers"])
            if r != _rank["rank"] and peer_host == host and not _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def failure_message(err: BaseException) -> str:
    """`rank R failed at step S: Type: message`, plus which peers are gone when this rank is not the first to fail."""
    where = f"rank {_rank['rank']} failed at step {_rank['step']}" if _rank["step"] else f"rank {_rank['rank']} failed"
    text = f"{where}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    if _rank["world"] > 1:
        gone = peers_gone()
        if not gone:
            time.sleep(0.5)  # a peer that just closed its connection may still be exiting
            gone = peers_gone()
        text += f"; peer ranks gone: {', '.join(gone)}" if gone else \
            "; every peer rank on this host is still running (on a timeout: one of them is stuck, see its log)"
    return text


def exit_on_signal(signum: int, _frame=None) -> None:
    """Leave at once, logging the signal and the peers already gone (the launcher stopping the ranks left)."""
    gone = peers_gone()
    log.error("rank %d stopped by %s at step %d%s", _rank["rank"], signal.Signals(signum).name, _rank["step"],
              f" after peer ranks ended: {', '.join(gone)}" if gone else "")
    exit_now(128 + signum)


def shm_buffer(rank: int) -> Path:
    """The shared-memory buffer DeepSpeed's CPU collectives leave behind for `rank` of this run (~66 MB of RAM)."""
    return Path("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                            f"{os.environ.get('MASTER_PORT')}_{rank}")


def exit_now(code: int) -> None:
    """Flush the logs and leave without interpreter teardown (which can block on a broken process group). This
    rank's DeepSpeed shared-memory buffer goes too (peers that mapped it keep their mapping)."""
    if torch.distributed.is_initialized():
        shm_buffer(torch.distributed.get_rank()).unlink(missing_ok=True)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
