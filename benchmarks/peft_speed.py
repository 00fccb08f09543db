"""Training speed and peak memory against PEFT + HF Trainer: same backbone, config and data, per method.

    python -m benchmarks.peft_speed --methods prompt_tuning prefix ptuning full [--repeats 3] [--steps 30] [--window 10]

Each measurement is one fresh process, run the way its users run it. Ours: `ipt-ds train CONFIG` on 1 rank (DeepSpeed
with the config's ds_configs JSON) with `--train.max_steps=STEPS --run.log_every=WINDOW` and no evaluation before the
last step; its samples/s is what it logs in log.jsonl over the windows after the first (the first holds the first step
and the warm-up). PEFT + HF Trainer: `benchmarks.peft_trainer` in speed mode, set up from the same config and timed
by a step-end callback over the same steps, twice: `peft` is fed exactly our batches in our order (our length buckets,
read sequentially), which isolates the trainers; `peft_default` gets the Trainer's default random batches, as its
users run it (more padding). All evaluate once after the last step. Peak RSS is each process's ru_maxrss from wait4:
the whole process, loading and the final evaluation included. The arms run interleaved (ours, peft, peft_default;
the next repeat in reverse order), and each ratio ours / PEFT is taken within a repeat, so a machine that slows down
for a while shifts both sides.
Writes benchmarks/results/<name>/{results.json, results.md, results.png}; finished cells (runs/<id>.json) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.peft_reference import CONFIGS
from benchmarks.step_cost import ratios

ARMS = ("ours", "peft", "peft_default")  # peft: our batches; peft_default: the Trainer's random batches


def spawn(cmd: list[str], log: Path) -> tuple[int, float, str]:
    """Run `cmd` to the end; return (exit code, its peak RSS in MiB, its stdout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as err, open(log.with_suffix(".out"), "w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "DS_ACCELERATOR": "cpu"})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not the maximum over all children
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, log.with_suffix(".out").read_text()


def logged_rate(log_jsonl: Path, window: int) -> float:
    """Samples/s over the logged windows after the first: total samples / total time (windows hold equal samples)."""
    rates = [r["train/samples_per_s"] for r in map(json.loads, log_jsonl.read_text().splitlines())
             if "train/samples_per_s" in r and r["step"] > window]
    return len(rates) / sum(1 / r for r in rates)


def measure(out: Path, cell: dict) -> dict:
    run = out / "runs" / cell["id"]
    config, steps, window = str(CONFIGS[cell["method"]]), cell["steps"], cell["window"]
    if cell["label"] == "ours":
        cmd = [sys.executable, "-m", "ipt_ds", "train", config, "--run.seed=1", f"--run.output_dir={run}",
               "--run.overwrite=true", f"--train.max_steps={steps}", "--train.eval_every=1000000",
               f"--run.log_every={window}"]
    else:
        batches = "ours" if cell["label"] == "peft" else "default"
        spec = {"config": config, "seed": 1, "output_dir": str(run),
                "speed": {"steps": steps, "window": window, "batches": batches}}
        cmd = [sys.executable, "-m", "benchmarks.peft_trainer", json.dumps(spec)]
    start = time.perf_counter()
    code, peak, stdout = spawn(cmd, out / "runs" / f"{cell['id']}.log")
    if code != 0:
        raise SystemExit(f"{cell['id']} failed (exit {code}); see {out / 'runs' / cell['id']}.log")
    if cell["label"] == "ours":
        rate = logged_rate(run / "log.jsonl", window)
        trainable = json.loads((run / "results.json").read_text())["parameters"]["trainable"]
    else:
        result = json.loads(stdout.strip().splitlines()[-1])
        rate, trainable = result["samples_per_s"], result["parameters"]["trainable"]
        cell = {**cell, "padded_tokens_per_sample": result["padded_tokens_per_sample"]}
    return {**cell, "samples_per_s": rate, "peak_rss_mib": peak, "trainable": trainable,
            "wall_s": time.perf_counter() - start}


def run_cell(out: Path, cell: dict) -> dict:
    path = out / "runs" / f"{cell['id']}.json"
    if not path.exists():
        result = measure(out, cell)
        path.write_text(json.dumps(result))
        print(f"{cell['id']}: {result['samples_per_s']:.2f} samples/s, peak {result['peak_rss_mib']:,.0f} MiB",
              flush=True)
    return json.loads(path.read_text())


def table(results: list[dict]) -> list[str]:
    """Per method: the median of each arm and the within-repeat ratios ours / PEFT (median ± half-range), for
    samples/s and for peak RSS, against PEFT on our batches and on the Trainer's default batches."""
    lines = ["| method | trainable | measure | ours | PEFT, our batches | ours / PEFT | PEFT, Trainer's batches | "
             "ours / PEFT | repeats |", "|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in results):
        rows = [r for r in results if r["method"] == method]
        for key, name, form in (("samples_per_s", "samples/s", ".2f"), ("peak_rss_mib", "peak RSS (MiB)", ",.0f")):
            ratio = {arm: ratios([r for r in rows if r["label"] in ("ours", arm)], key, arm)["ours"]
                     for arm in ARMS[1:] if any(r["label"] == arm for r in rows)}
            median = {arm: statistics.median(r[key] for r in rows if r["label"] == arm) for arm in ARMS
                      if any(r["label"] == arm for r in rows)}
            cells = [f"{median[arm]:{form}} | {ratio[arm][0]:.2f} ± {ratio[arm][1]:.2f}" if arm in ratio else "- | -"
                     for arm in ARMS[1:]]
            lines.append(f"| {method} | {rows[0]['trainable']:,} | {name} | {median['ours']:{form}} | "
                         f"{cells[0]} | {cells[1]} | {sum(r['label'] == 'ours' for r in rows)} |")
    return lines


def padding(results: list[dict]) -> str:
    tokens = {arm: statistics.median(r["padded_tokens_per_sample"] for r in results if r["label"] == arm)
              for arm in ARMS[1:] if any(r["label"] == arm for r in results)}
    names = {"peft": "our batches", "peft_default": "the Trainer's default batches"}
    return "Padded tokens per training sample: " + ", ".join(f"{names[a]} {value:.1f}" for a, value in tokens.items())


def plot(out: Path, results: list[dict], goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.8 + 0.5 * len(methods)), sharey=True)
    for ax, key, title in ((axes[0], "samples_per_s", "training samples/s"), (axes[1], "peak_rss_mib", "peak RSS")):
        for offset, arm, color in ((0.2, "peft", "tab:blue"), (-0.2, "peft_default", "tab:orange")):
            if not any(r["label"] == arm for r in results):
                continue
            values = [ratios([r for r in results if r["method"] == m and r["label"] in ("ours", arm)], key, arm)
                      ["ours"] for m in methods]
            ax.barh([i + offset for i in range(len(methods))], [v[0] for v in values], height=0.4,
                    xerr=[v[1] for v in values], color=color,
                    label="vs PEFT, our batches" if arm == "peft" else "vs PEFT, Trainer's batches")
        ax.set_yticks(range(len(methods)), methods)
        ax.axvline(1.0, color="black", linestyle="--")
        ax.set_xlabel(f"{title}: ipt-ds / PEFT + HF Trainer")
    axes[0].axvline(goal, color="tab:red", linestyle=":", label=f"goal {goal}x")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["prompt_tuning", "prefix", "ptuning", "full"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (CB: 15 per epoch)")
    parser.add_argument("--window", type=int, default=10, help="steps in the first, untimed window (and per log)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="ours must be among them")
    parser.add_argument("--goal", type=float, default=1.25, help="the throughput ratio the plot marks")
    parser.add_argument("--name", default="peft_speed", help="study folder under benchmarks/results/")
    args = parser.parse_args()
    if args.steps % args.window or args.steps < 2 * args.window:
        parser.error("--steps must be a multiple of --window and at least two windows")
    out = Path("benchmarks/results") / args.name
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for repeat in range(args.repeats):
        for method in args.methods:
            for arm in args.arms if repeat % 2 == 0 else args.arms[::-1]:
                cell = {"id": f"{method}-{arm}-s{args.steps}-w{args.window}-r{repeat}", "label": arm,
                        "method": method, "repeat": repeat, "steps": args.steps, "window": args.window}
                results.append(run_cell(out, cell))
    command = "python -m benchmarks.peft_speed " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}",
             f"fp32, 1 process each, batch 16 of CB train; samples/s over steps {args.window + 1}-{args.steps}; "
             f"{args.repeats} interleaved repeats; ratios: median ± half-range over repeats.", "", *table(results), "",
             padding(results), ""]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text("\n".join(lines))
    plot(out, results, args.goal)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
