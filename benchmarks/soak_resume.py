"""Soak test of exact resume: N runs killed with SIGKILL at random moments, each resumed from `latest`; how many
repeat the uninterrupted run's training losses bit for bit.

    python -m benchmarks.soak_resume --kills 12 [--num-ranks 2] [--launcher deepspeed|direct] [--victim all|rank1]

Every trial starts a fresh run (2 ranks, full fine-tuning of a tiny random BERT with dropout on, a checkpoint after
every step, gradient accumulation, a warm-up + linear schedule, more than one epoch), waits until a random step has
been logged plus a random fraction of a step (so kills land mid-step, mid-evaluation and mid-save), kills the whole
run at once (`--victim all`: SIGKILL to the launcher's process group, as `kill -9` of a job) or only rank 1, resumes
it with --run.resume=true and compares the logged losses with those of one uninterrupted run. Writes
benchmarks/results/soak_resume/results-<victim>.json (one row per trial) and prints `k/N identical`.
"""

from __future__ import annotations

import argparse
import json
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


def soak_config(work: Path, num_steps: int) -> Path:
    model = save_tiny("bert", work / "tiny-bert")
    data = write_entailment_task(work / "data", num_train=64, num_eval=8)
    return write_config(work / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 3, "collective_timeout_s": 60},
        "model": {"name_or_path": str(model), "dropout": True},
        "method": {"name": "full"},
        "head": {"dropout": 0.1},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 16},
        "train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": num_steps, "eval_every": 1},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.2},
        "deepspeed": {"config": "ds_configs/zero2.json"},
    })


def run_to_end(cfg: Path, out: Path, args, log_dir: Path, *extra: str) -> None:
    run = ranks.start(["train", str(cfg), f"--run.output_dir={out}", *extra], num_ranks=args.num_ranks,
                      log_dir=log_dir, launcher=args.launcher == "deepspeed")
    codes = run.wait(900)
    if any(codes):
        raise SystemExit(f"{out}: exit codes {codes}\n{run.output()[-3000:]}")


def trial(number: int, cfg: Path, work: Path, reference: dict, rng: random.Random, args) -> dict:
    out = work / f"trial{number}"
    kill_step = rng.randint(1, args.steps - 1)
    delay = rng.uniform(0, args.step_seconds)
    run = ranks.start(["train", str(cfg), f"--run.output_dir={out}"], num_ranks=args.num_ranks,
                      log_dir=work / f"trial{number}-killed", launcher=args.launcher == "deepspeed")
    ranks.wait_for_step(out, kill_step, run, timeout=900)
    time.sleep(delay)
    if args.victim == "all":
        run.kill()
    else:
        os.kill(run.rank_pid(1), signal.SIGKILL)
        run.wait(300)
    latest = out / "checkpoints" / "latest"
    resumed_from = latest.read_text() if latest.exists() else None
    if resumed_from is None:  # killed before the first checkpoint was complete: the run starts over
        run_to_end(cfg, out, args, work / f"trial{number}-again", "--run.overwrite=true")
    else:
        run_to_end(cfg, out, args, work / f"trial{number}-resumed", "--run.resume=true")
    got = ranks.losses(out)
    row = {"trial": number, "killed_after_step": kill_step, "extra_delay_s": round(delay, 3),
           "victim": args.victim, "resumed_from": resumed_from, "identical": got == reference,
           "steps_differing": sorted(s for s in reference if got.get(s) != reference[s])}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="number of killed-and-resumed runs")
    parser.add_argument("--num-ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (8 per epoch)")
    parser.add_argument("--launcher", choices=["deepspeed", "direct"], default="deepspeed")
    parser.add_argument("--victim", choices=["all", "rank1"], default="all", help="kill the whole run or rank 1")
    parser.add_argument("--step-seconds", type=float, default=0.3, help="upper bound of the random extra delay")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="soak-resume-") as tmp:
        work = Path(tmp)
        cfg = soak_config(work, args.steps)
        run_to_end(cfg, work / "reference", args, work / "reference-logs")
        reference = ranks.losses(work / "reference")
        rows = [trial(i, cfg, work, reference, rng, args) for i in range(1, args.kills + 1)]
    identical = sum(r["identical"] for r in rows)
    command = "python -m benchmarks.soak_resume " + " ".join(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"results-{args.victim}.json").write_text(json.dumps({
        "command": command, "date": time.strftime("%Y-%m-%d"), "identical": identical, "trials": len(rows),
        "minutes": round((time.time() - started) / 60, 1), "rows": rows}, indent=2) + "\n")
    print(f"{identical}/{len(rows)} identical ({command})")


if __name__ == "__main__":
    main()
