"""Soak test of resume: runs interrupted at random moments, by SIGKILL, by a stop signal, and resumed on another
number of ranks; how many end with the uninterrupted run's training losses.

    python -m benchmarks.soak_resume --kills 20 --signals 10 --resizes 5 [--num-ranks 2] [--victim all|rank1]

Every trial starts a fresh run (2 ranks under the `deepspeed` launcher, full fine-tuning of a tiny random BERT, a
checkpoint after every step, gradient accumulation, a warm-up + linear schedule, more than one epoch) and waits
until a random step has been logged plus a random fraction of a step, so that interruptions land mid-step,
mid-evaluation and mid-save. Then, by the trial's kind:
- kill: SIGKILL to the whole run at once (`--victim all`, as `kill -9` of a job) or to rank 1 only; resume from
  `latest` with --run.resume=true. Must repeat every loss bit for bit.
- signal: SIGUSR1 to one rank, chosen at random (as Slurm's warning before a time limit); every rank must stop
  after the same step with exit status 75 and `latest` on that step; resume. Must repeat every loss bit for bit.
- resize: SIGKILL at a random moment, resume on one rank, SIGUSR1 at a later random moment, resume on 2 ranks to
  the end (2 -> 1 -> 2 ranks, the global batch kept). Dropout is off in these runs (a rank's random stream cannot
  carry over to another number of ranks), and the losses must match the uninterrupted 2-rank run's within
  --rtol, since summing the same gradients over another number of ranks rounds differently in fp32.
Writes benchmarks/results/soak_resume/results-<victim>.json (one row per trial) and prints `k/N match`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

from tests import ranks
from tests.conftest import save_tiny, write_config, write_entailment_task

OUT = Path(__file__).resolve().parent / "results" / "soak_resume"
STOPPED = 75  # the exit status of a run stopped by a stop signal (ipt_ds/preemption.py)


def soak_config(work: Path, num_steps: int, *, dropout: bool) -> Path:
    model = work / "tiny-bert" if (work / "tiny-bert").exists() else save_tiny("bert", work / "tiny-bert")
    data = write_entailment_task(work / "data", num_train=64, num_eval=8)
    return write_config(work / f"cfg-dropout-{dropout}.yaml", {
        "run": {"log_every": 1, "seed": 3, "collective_timeout_s": 60},
        "model": {"name_or_path": str(model), "dropout": dropout},
        "method": {"name": "full"},
        "head": {"dropout": 0.1 if dropout else 0.0},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 16},
        "train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": num_steps, "eval_every": 1},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.2},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    })


def start(cfg: Path, out: Path, log_dir: Path, num_ranks: int, *extra: str) -> ranks.Ranks:
    return ranks.start(["train", str(cfg), f"--run.output_dir={out}", *extra], num_ranks=num_ranks, log_dir=log_dir,
                       launcher=True)


def run_to_end(cfg: Path, out: Path, log_dir: Path, num_ranks: int, *extra: str) -> None:
    run = start(cfg, out, log_dir, num_ranks, *extra)
    codes = run.wait(900)
    if any(codes):
        raise SystemExit(f"{out}: exit codes {codes}\n{run.output()[-3000:]}")


def interrupt(run: ranks.Ranks, out: Path, how: str, step: int, delay: float, rng: random.Random,
              num_ranks: int) -> dict:
    """Wait for `step` plus `delay` seconds, then SIGKILL the run (`how` = all or rank1) or send SIGUSR1 to a random
    rank (`how` = signal); returns what happened."""
    ranks.wait_for_step(out, step, run, timeout=900)
    time.sleep(delay)
    if how == "all":
        run.kill()
        codes = None
    elif how == "rank1":
        os.kill(run.rank_pid(1), signal.SIGKILL)
        codes = run.wait(300)
    else:
        os.kill(run.rank_pid(rng.randrange(num_ranks)), signal.SIGUSR1)
        codes = run.wait(300)
    latest = out / "checkpoints" / "latest"
    return {"how": how, "after_step": step, "extra_delay_s": round(delay, 3), "exit": codes,
            "last_logged": max(ranks.logged_steps(out), default=0),
            "latest": latest.read_text() if latest.exists() else None}


def resume(cfg: Path, out: Path, log_dir: Path, num_ranks: int, latest: str | None) -> None:
    """Resume from `latest`, or start over when the interruption came before the first checkpoint was complete."""
    run_to_end(cfg, out, log_dir, num_ranks, "--run.resume=true" if latest else "--run.overwrite=true")


def trial(number: int, kind: str, cfgs: dict, work: Path, references: dict, rng: random.Random, args) -> dict:
    out, logs = work / f"trial{number}", work / f"trial{number}-logs"
    first = rng.randint(1, args.steps - 2)
    run = start(cfgs[kind], out, logs / "1", args.num_ranks)
    if kind == "resize":
        events = [interrupt(run, out, "all", first, rng.uniform(0, args.step_seconds), rng, args.num_ranks)]
        if events[0]["latest"] is None:
            run = start(cfgs[kind], out, logs / "2", 1, "--run.overwrite=true")
        else:
            run = start(cfgs[kind], out, logs / "2", 1, "--run.resume=true")
        second = rng.randint(min(events[0]["last_logged"] + 1, args.steps - 1), args.steps - 1)
        events.append(interrupt(run, out, "signal", second, rng.uniform(0, args.step_seconds), rng, 1))
        resume(cfgs[kind], out, logs / "3", args.num_ranks, events[-1]["latest"])
    else:
        how = "signal" if kind == "signal" else args.victim
        events = [interrupt(run, out, how, first, rng.uniform(0, args.step_seconds), rng, args.num_ranks)]
        resume(cfgs[kind], out, logs / "2", args.num_ranks, events[0]["latest"])
    got, reference = ranks.losses(out), references[cfgs[kind]]
    rtol = args.rtol if kind == "resize" else 0.0
    stopped_as_documented = all(e["exit"] is None or set(e["exit"]) <= {STOPPED, 0} for e in events
                                if e["how"] == "signal")
    differing = sorted(s for s in reference.keys() | got.keys()
                       if not math.isclose(got.get(s, math.nan), reference.get(s, math.nan), rel_tol=rtol))
    row = {"trial": number, "kind": kind, "events": events, "rtol": rtol,
           "match": not differing and stopped_as_documented, "stopped_as_documented": stopped_as_documented,
           "steps_differing": differing}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="runs killed with SIGKILL and resumed")
    parser.add_argument("--signals", type=int, default=10, help="runs stopped by SIGUSR1 to one rank and resumed")
    parser.add_argument("--resizes", type=int, default=5, help="runs resumed on 1 rank, then on 2 again")
    parser.add_argument("--num-ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (8 per epoch)")
    parser.add_argument("--victim", choices=["all", "rank1"], default="all", help="kill the whole run or rank 1")
    parser.add_argument("--step-seconds", type=float, default=0.3, help="upper bound of the random extra delay")
    parser.add_argument("--rtol", type=float, default=1e-5, help="relative tolerance of the resize trials' losses")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rng = random.Random(args.seed)
    kinds = ["kill"] * args.kills + ["signal"] * args.signals + ["resize"] * args.resizes
    rng.shuffle(kinds)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="soak-resume-") as tmp:
        work = Path(tmp)
        with_dropout = soak_config(work, args.steps, dropout=True)
        cfgs = {"kill": with_dropout, "signal": with_dropout, "resize": soak_config(work, args.steps, dropout=False)}
        references = {}  # each config's uninterrupted run
        for cfg in {cfgs[kind] for kind in kinds}:
            run_to_end(cfg, work / f"reference-{cfg.stem}", work / f"reference-{cfg.stem}-logs", args.num_ranks)
            references[cfg] = ranks.losses(work / f"reference-{cfg.stem}")
        rows = [trial(i, kind, cfgs, work, references, rng, args) for i, kind in enumerate(kinds, 1)]
    matched = sum(r["match"] for r in rows)
    command = "python -m benchmarks.soak_resume " + " ".join(sys.argv[1:])
    by_kind = {k: f"{sum(r['match'] for r in rows if r['kind'] == k)}/{kinds.count(k)}" for k in dict.fromkeys(kinds)}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results-{args.victim}.json").write_text(json.dumps({
        "command": command, "date": time.strftime("%Y-%m-%d"), "match": matched, "trials": len(rows),
        "by_kind": by_kind, "minutes": round((time.time() - started) / 60, 1), "rows": rows}, indent=2) + "\n")
    print(f"{matched}/{len(rows)} match {by_kind} ({command})")


if __name__ == "__main__":
    main()
