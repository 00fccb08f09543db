"""The CUDA path end to end on one GPU, in minutes: bf16, ZeRO-3, a 1.1B LLaMA shape, steps of IPT, LPT and prefix
tuning, each step's useful FLOP/s against the GPU's dense bf16 peak (MFU) and against a bf16 GEMM measured in the
same run.

    python -m benchmarks.gpu_check [--shape 1b] [--steps 5] [--methods ipt lpt prefix] [--out DIR]
    python -m benchmarks.gpu_check --dry-run      # the same runs on the CPU: tiny shape, fp32, gloo (the tests run it)

Each method is one real `ipt-ds train` process (through benchmarks/peak_rss.py, which also records the GPU's peak
allocated memory): the backbone is created partitioned under zero.Init with random weights (`model.random_init`, the
shape's config.json and SmolLM2's tokenizer, no weights to download), trains 1 warm-up step and `--steps` timed
steps on synthetic pairs that fill `max_length`, evaluates once and exports `best/`. A method passes when its process
exits 0, every logged loss is finite, and results.json and the export exist.

Useful FLOPs of a step, per sequence, with the backbone frozen (no weight gradients), N_l a layer's matrix-product
parameters, D the attention width: a layer that trains or lies above one that does runs forward (2 N_l T + 4 T^2 D)
and backward through its activations (2 N_l T + 8 T^2 D); a layer below LPT's insertion layer k runs forward only,
on the input's T positions. T counts IPT's input prompt; prefix tuning's extra keys and the generators' own products
are left out (both are under 1% here). MFU = useful FLOP/s / the dense bf16 peak of the GPU's model
(scale.DENSE_BF16_PEAK).
Writes results.json, results.md and gpu_check.png under benchmarks/results/gpu_check/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import scale
from benchmarks.memory import write_long_pairs

PROMPT = 8  # prompt vectors of every method


def method_section(method: str, num_layers: int) -> dict:
    return {
        "ipt": {"name": "ipt", "method": "prompt-tuning", "instance": True, "encoder": "cnn",
                "num_virtual_tokens": PROMPT},
        "lpt": {"name": "lpt", "layer": num_layers // 2, "num_virtual_tokens": PROMPT, "generator": "npg"},
        "prefix": {"name": "prefix", "num_virtual_tokens": PROMPT},
    }[method]


def useful_flops(shape: str, method: str, *, sequences: int, tokens: int) -> float:
    """FLOPs of one step (module docstring): forward and activation backward from the first trained layer up."""
    hidden, _, layers, *_ = scale.SHAPES[shape]
    per_layer = scale.matmul_params(shape) / layers
    positions = tokens + PROMPT if method == "ipt" else tokens
    trained_from = layers // 2 if method == "lpt" else 0
    above = tokens + PROMPT if method == "lpt" else positions  # LPT's prompt joins at layer k
    forward = lambda t: 2 * per_layer * t + 4 * t**2 * hidden  # noqa: E731
    backward = lambda t: 2 * per_layer * t + 8 * t**2 * hidden  # noqa: E731
    per_sequence = trained_from * forward(positions) + (layers - trained_from) * (forward(above) + backward(above))
    return sequences * per_sequence


def run_config(folder: Path, method: str, *, shape: str, model_dir: Path, data: Path, device: str, steps: int,
               micro_batch: int, tokens: int) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    ds = scale.ds_config(shape, nvme_dir=None, world=1, bf16=device == "cuda")
    (folder / "ds_config.json").write_text(json.dumps(ds, indent=2))
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "random_init": True},
        "method": method_section(method, scale.SHAPES[shape][2]),
        "head": {"type": "linear"},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data / "train.jsonl"),
                 "eval_split": str(data / "val.jsonl"), "max_length": tokens},
        "train": {"batch_size": micro_batch, "micro_batch_size": micro_batch, "eval_batch_size": micro_batch,
                  "max_steps": steps + 1, "eval_every": steps + 1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "run": {"log_every": 1, "output_dir": str(folder / "run"), "overwrite": True},
        "deepspeed": {"config": str(folder / "ds_config.json")},
    }))
    return path


def run_method(folder: Path, config: Path, *, device: str, timeout_s: float) -> dict:
    """Train one method in its own process; what it logged, and whether the CUDA path held up."""
    env = {**os.environ, "IPT_DS_PEAK_RSS_DIR": str(folder / "peak")}
    if device == "cpu":
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    with open(folder / "train.log", "w") as log:
        try:
            code = subprocess.run([sys.executable, "-m", "benchmarks.peak_rss", "train", str(config)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = f"did not finish within {timeout_s:.0f} s"
    wall = time.perf_counter() - start
    run = folder / "run"
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] \
        if (run / "log.jsonl").exists() else []
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    problems = []
    if code != 0:
        problems.append(code if isinstance(code, str) else f"exit status {code}")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"losses {losses}")
    for needed in ("results.json", "best/model.safetensors"):
        if not (run / needed).exists():
            problems.append(f"no {needed}")
    peak = folder / "peak" / "rank0.json"
    measured = {"status": "; ".join(problems) or "ok", "wall_s": round(wall, 1), "losses": losses,
                "samples_per_s": [r["train/samples_per_s"] for r in rows
                                  if "train/samples_per_s" in r and r["step"] > 1],
                **(json.loads(peak.read_text()) if peak.exists() else {})}
    if problems:
        measured["log_tail"] = (folder / "train.log").read_text()[-3000:]
    return measured


def build_row(method: str, measured: dict, gemm: dict, *, shape: str, micro_batch: int, tokens: int) -> dict:
    row = {"method": method, "status": measured["status"], "wall_s": measured["wall_s"],
           "losses": measured["losses"], "step_flops": useful_flops(shape, method, sequences=micro_batch,
                                                                   tokens=tokens)}
    if measured["samples_per_s"]:
        step = micro_batch / statistics.median(measured["samples_per_s"])
        row |= {"step_s": step, "useful_flops_per_s": row["step_flops"] / step,
                "fraction_of_gemm": row["step_flops"] / step / gemm["shapes"]["square"]["flops_per_s"]}
        if gemm.get("dense_bf16_peak"):
            row["mfu"] = row["step_flops"] / step / gemm["dense_bf16_peak"]
    for key in ("peak_rss_bytes", "peak_gpu_allocated_bytes"):
        if key in measured:
            row[key] = measured[key]
    return row


def write_report(out: Path, rows: list[dict], gemm: dict, settings: dict, command: str) -> None:
    (out / "results.json").write_text(json.dumps({"settings": settings, "gemm": gemm, "rows": rows}, indent=2))
    device = gemm.get("device_name", settings["device"])
    square = gemm["shapes"]["square"]
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             f"{device}; shape {settings['shape']} ({scale.SHAPES[settings['shape']][5]}), {settings['dtype']}, "
             f"ZeRO-3, 1 rank, micro-batch {settings['micro_batch']} x {settings['tokens']} tokens, "
             f"{settings['steps']} timed steps after 1 warm-up; load average {gemm['load_average']:.2f} at the start.",
             f"GEMM ({square['dtype']} torch.mm {square['m']}^3, this run): {square['flops_per_s'] / 1e12:.1f} "
             "TFLOP/s" + (f"; dense bf16 peak {gemm['dense_bf16_peak'] / 1e12:.0f} TFLOP/s"
                          if gemm.get("dense_bf16_peak") else ""), "",
             "| method | status | step s (median) | useful TFLOP/s | of GEMM | MFU | peak GPU memory GiB | "
             "peak RSS GiB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["method"], r["status"]]
        timed = [f"{r['step_s']:.3f}", f"{r['useful_flops_per_s'] / 1e12:.2f}", f"{100 * r['fraction_of_gemm']:.0f} %"]
        cells += timed if "step_s" in r else ["", "", ""]
        cells.append(f"{100 * r['mfu']:.1f} %" if "mfu" in r else "-")
        cells += [f"{r[key] / 2**30:.1f}" if key in r else "-"
                  for key in ("peak_gpu_allocated_bytes", "peak_rss_bytes")]
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, rows, key="mfu" if any("mfu" in r for r in rows) else "fraction_of_gemm")


def plot(out: Path, rows: list[dict], key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["method"] for r in rows], [100 * r.get(key, 0) for r in rows])
    ax.set_ylabel("MFU (% of dense bf16 peak)" if key == "mfu" else "useful FLOP/s, % of this run's GEMM")
    fig.tight_layout()
    fig.savefig(out / "gpu_check.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same runs on the CPU: tiny shape, fp32, gloo")
    parser.add_argument("--shape", choices=list(scale.SHAPES), help="default: 1b (tiny with --dry-run)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--methods", nargs="+", choices=["ipt", "lpt", "prefix"], default=["ipt", "lpt", "prefix"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check"))
    parser.add_argument("--timeout", type=float, default=150, help="seconds one method's run may take")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: no CUDA device is visible; run on a GPU machine, or pass --dry-run")
    shape = args.shape or ("tiny" if args.dry_run else "1b")
    micro_batch, tokens = (2, 64) if args.dry_run else (16, 256)
    runs = args.out / "runs"
    data, model_dir = runs / "data", runs / "models" / shape
    if not (data / "val.jsonl").exists():
        write_long_pairs(data, {"train": 8 * micro_batch, "val": micro_batch}, premise_words=2 * tokens,
                         hypothesis_words=10)
    if not (model_dir / "config.json").exists():
        scale.write_model_dir(model_dir, shape)
    gemm = scale.measure_gemm(device=device, world=1, shapes={"square": (2048, 2048, 2048) if args.dry_run
                                                                else (8192, 8192, 8192)})
    settings = {"device": device, "shape": shape, "dtype": "bf16" if device == "cuda" else "fp32", "steps": args.steps,
                "micro_batch": micro_batch, "tokens": tokens}
    rows = []
    for method in args.methods:
        folder = runs / method
        config = run_config(folder, method, shape=shape, model_dir=model_dir, data=data, device=device,
                            steps=args.steps, micro_batch=micro_batch, tokens=tokens)
        measured = run_method(folder, config, device=device, timeout_s=args.timeout)
        rows.append(build_row(method, measured, gemm, shape=shape, micro_batch=micro_batch, tokens=tokens))
        print(f"{method}: {measured['status']}, {measured['wall_s']:.0f} s", flush=True)
        write_report(args.out, rows, gemm, settings, "python -m benchmarks.gpu_check " + " ".join(sys.argv[1:]))
    print((args.out / "results.md").read_text())
    failed = [r["method"] for r in rows if r["status"] != "ok"]
    if failed:
        raise SystemExit(f"error: {', '.join(failed)} failed; see {args.out}/runs/<method>/train.log")


if __name__ == "__main__":
    main()
