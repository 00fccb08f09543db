"""Stopping on a signal: Slurm's warning before a time limit, preemption, or a user's `kill -USR1`.

Each signal of `run.stop_signals` (default SIGUSR1 and SIGTERM) only sets a flag. After every optimizer step all
ranks agree on the flags with one all-reduce (the MAX of one integer), so a signal that reaches one rank only, or
every rank at a slightly different moment, stops them all after the same step. The loop then saves a checkpoint of
that step unless it was just saved (every rank, then `latest` moved by rank 0, as for every checkpoint) and raises
`Stopped`; the command line leaves the process group together and exits with `STOPPED_EXIT_CODE`. The Slurm scripts
requeue a job that ends with it, and the requeued job resumes from `latest` (docs/launching.md, "Preemption and time
limits").

The exit status is 75, EX_TEMPFAIL of sysexits.h ("a temporary failure; the user is invited to retry later"): it is
neither success (0), a failure (1), a user error (2) nor a death by a signal (128 + N), so a script can tell a run
that stopped to be continued from one that failed.

`ipt-ds train` catches the default stop signals from its first moment, before the heavy imports; the config's own
list replaces them once it is read. Until training starts they are also blocked: a signal then stays pending and is
taken at the first step boundary, and the processes a rank starts meanwhile (`ninja` building DeepSpeed's
communication op, which Slurm signals too, as every process of the job step) inherit the block instead of dying of
the signal's default action.

One exception to "only sets a flag": the `deepspeed` launcher and `srun --kill-on-bad-exit` send SIGTERM to the ranks
that are left after one has failed. A rank whose peers on this host are gone then leaves at once, as without
preemption (failures.py); waiting for a step boundary would only wait for a collective that cannot complete.
"""

from __future__ import annotations

import signal
import sys

STOPPED_EXIT_CODE = 75
DEFAULT_STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
UNCATCHABLE = ("SIGKILL", "SIGSTOP")
_received: list[int] = []  # signal numbers this rank has received, in order (appended by the handler only)
_installed: list[signal.Signals] = []
_before: dict[signal.Signals, object] = {}  # handlers before the first install (the launchers ignore SIGUSR1)


class Stopped(Exception):  # noqa: N818 - not an error: the run stopped on request, with a checkpoint to resume from
    """Every rank agreed to stop after a stop signal; the checkpoint of `step` is saved and `latest` names it."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on a stop signal; the checkpoint of step {step} is saved")
        self.step = step


def signal_problems(names: list[str]) -> list[str]:
    """Why some of `names` cannot be stop signals: unknown names, or signals no process can catch."""
    valid = {s.name for s in signal.Signals} - set(UNCATCHABLE)
    return [f"run.stop_signals: {name!r} {_why_not(name, valid)}" for name in names if name not in valid]


def _why_not(name: str, valid: set[str]) -> str:
    if name in UNCATCHABLE:
        return "cannot be caught"
    if f"SIG{name}" in valid:
        return f"is not a signal name; did you mean 'SIG{name}'?"
    return "is not a signal name; use names such as SIGUSR1, SIGUSR2, SIGTERM, SIGINT, or [] for none"


def install(names) -> None:
    """Catch the signals `names` on this rank from now on, and only those, and block them until `start_training`: a
    signal caught before that is not among them gets its handler from before back, and its receipt is forgotten. Call
    it again after failures.start, whose SIGTERM handler it replaces."""
    wanted = [signal.Signals[name] for name in names]
    dropped = [number for number in _installed if number not in wanted]
    for number in dropped:
        if signal.getsignal(number) is _on_signal:  # (failures.start may have given SIGTERM its own handler)
            signal.signal(number, _before.get(number) or signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, dropped)
    _received[:] = [n for n in _received if n in wanted]
    _installed[:] = wanted
    for number in wanted:
        _before.setdefault(number, signal.getsignal(number))
        signal.signal(number, _on_signal)
    signal.pthread_sigmask(signal.SIG_BLOCK, wanted)


def start_training() -> None:
    """Unblock the stop signals: one that came during start-up is taken now, and counts at the first step boundary.
    (Threads started meanwhile keep them blocked, so that they reach this, the main, thread.)"""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _installed)


def _on_signal(signum: int, _frame) -> None:
    failures = sys.modules.get("ipt_ds.failures")  # no import in a handler; before it is loaded, no peers are known
    if failures is not None and failures.peers_gone():  # the launcher stopping the ranks left after a failure
        failures.exit_on_signal(signum)
    _received.append(signum)


def agreed(device) -> bool:
    """Whether any rank has received a stop signal; every rank calls it at the same step boundary. One all-reduce
    of one integer on `device` (the engine's), skipped when no stop signal is caught (all ranks read one config)
    and on a single rank."""
    import torch

    if not _installed:
        return False
    if torch.distributed.get_world_size() == 1:
        return bool(_received)
    flag = torch.tensor([1 if _received else 0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def received() -> str:
    """Which signal stopped the run, for the log: 'SIGUSR1 received here', or 'received by another rank'."""
    names = ", ".join(signal.Signals(n).name for n in dict.fromkeys(_received))
    return f"{names} received here" if names else "received by another rank"


def ignore_further() -> None:
    """Once the stop is agreed: a later signal (a second warning, or the launcher ending ranks that have not exited
    yet when the first one has exited with STOPPED_EXIT_CODE) must not change how this rank ends."""
    for number in _installed:
        signal.signal(number, signal.SIG_IGN)
