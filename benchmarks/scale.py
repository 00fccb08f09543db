"""Scale and efficiency: prompt tuning of random-init LLaMA-shape backbones of growing size under ZeRO-3, per-rank
peak memory, step time and achieved FLOP/s against the machine's measured GEMM peak; past RAM with ZeRO-Infinity
(parameter partitions on NVMe, read through DeepSpeed's async I/O).

    python -m benchmarks.scale [--cells 125m 1b 1.5b 3b 4b 7b 7b-nvme 125m-glibc] [--steps 3] [--device cpu|cuda]
        [--nvme-dir DIR] [--margin-gib 1.5] [--wait-for-memory 0] [--name scale]

A cell is a shape (`SHAPES`, published LLaMA-family widths and depths with SmolLM2's 49,152-token vocabulary) and
where its weights live: in memory, or `-nvme` (ZeRO-Infinity, `offload_param.device: nvme` under `--nvme-dir`). Each
cell writes a model directory holding only config.json and a tokenizer, and runs the real trainer on it:
`deepspeed --module benchmarks.peak_rss train` with `model.random_init: true` (the backbone is created partitioned
under zero.Init, never whole on one rank), prompt tuning (8 prompt vectors, linear head), micro-batch 1 x 64 tokens
per rank, fp32 on CPU (2 ranks, gloo, 1 thread each) or bf16 on CUDA (every visible GPU), 1 warm-up step then
`--steps` timed steps, one evaluation and checkpoint at the end. Step time: the median of the logged per-step rates
after the warm-up; memory: each rank's lifetime peak RSS (benchmarks/peak_rss.py) next to `ipt-ds estimate-memory`
for the same config. A cell whose estimate (both ranks, plus a margin) exceeds the available memory is not started;
the table says so; a running cell is stopped when the machine's available memory falls below --min-free-gib (each
rank's RSS over time goes to runs/<cell>/rss.tsv). Finished cells are reused (runs/<cell>/measured.json). Ranks run
as the trainer sets them up on CPU (ZeRO-3 frees each gather to the kernel: ipt_ds.engine.unmap_freed_gathers), except
in cells named SHAPE-glibc, which keep freed gathers in glibc's heap (`MALLOC_MMAP_THRESHOLD_` at 32 MiB).

FLOPs of one step with a frozen backbone and a prompt at the input, per sequence of T positions (prompt included):
forward 2 N T + 4 L T^2 D, backward through the activations only (no weight gradients) 2 N T + 8 L T^2 D, where N
counts the parameters of the layers' matrix products (embeddings and norms do none), L the layers and D the attention
width; the head's few products are left out. Achieved FLOP/s = that x sequences per step / step time. The GEMM peak
is measured by this script with the training's layout: one fp32 torch.mm process per rank, each with the rank's
thread count, running at once (on CUDA: bf16 torch.mm, and MFU against the device's dense bf16 peak).
Writes results.json, results.md and scale.png under benchmarks/results/<name>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.memory import write_long_pairs
from ipt_ds.engine import MMAP_THRESHOLD

SHAPES = {  # name -> hidden, intermediate, layers, attention heads, key/value heads, the published model of that shape
    "tiny": (64, 128, 2, 4, 2, "a tiny LLaMA (tests of this script)"),
    "125m": (768, 2048, 12, 12, 12, "LLaMA-style 125M (GPT-3 Small widths)"),
    "1b": (2048, 5632, 22, 32, 4, "TinyLlama-1.1B"),
    "1.5b": (1536, 8960, 28, 12, 2, "Qwen2.5-1.5B, as a LLaMA"),
    "3b": (3072, 8192, 28, 24, 8, "Llama-3.2-3B"),
    "4b": (3072, 8192, 32, 32, 32, "Phi-3-mini (3.8B), as a LLaMA"),
    "7b": (4096, 11008, 32, 32, 32, "LLaMA-7B / Llama-2-7B"),
}
DEFAULT_CELLS = ["125m", "1b", "1.5b", "3b", "4b", "7b", "7b-nvme", "125m-glibc"]
# -glibc cells: glibc's mmap threshold at the top of its default range (it grows up to 32 MiB), as in a process that
# has not run unmap_freed_gathers: ZeRO-3's freed parameter gathers stay in the heap below the activations after them.
HEAP_THRESHOLD = 32 * 2**20
VOCAB = 49_152  # SmolLM2's tokenizer (LLaMA-1/2 have 32,000 tokens, Llama-3 128,256): only the embedding differs
SEQ_LEN, NUM_PROMPT, MICRO_BATCH = 64, 8, 1
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # no sparsity


def parse_cell(cell: str) -> tuple[str, bool, bool]:
    """SHAPE[-nvme][-glibc] -> (shape, weights on NVMe, freed gathers left in glibc's heap)."""
    shape, *options = cell.split("-")
    if shape not in SHAPES or len(set(options)) < len(options) or not set(options) <= {"nvme", "glibc"}:
        raise ValueError(f"cell '{cell}': expected SHAPE[-nvme][-glibc] with SHAPE one of {', '.join(SHAPES)}")
    return shape, "nvme" in options, "glibc" in options


def matmul_params(shape: str) -> int:
    """Parameters of one layer stack's matrix products (q, k, v, o and the gated MLP's three), all layers."""
    hidden, inter, layers, heads, kv_heads, _ = SHAPES[shape]
    head_dim = hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    return layers * (attention + 3 * hidden * inter)


def step_flops(shape: str, *, sequences: int, positions: int) -> float:
    """Frozen backbone, prompt at the input: forward 2NT + 4LT^2D, backward (activations only) 2NT + 8LT^2D."""
    hidden, _, layers, _, _, _ = SHAPES[shape]
    per_sequence = 4 * matmul_params(shape) * positions + 12 * layers * positions**2 * hidden
    return sequences * per_sequence


def write_model_dir(directory: Path, shape: str) -> None:
    """config.json of the shape and SmolLM2's tokenizer; no weights (the trainer initialises them at random)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from ipt_ds.backbone import ModelConfig, resolve_model_path
    from ipt_ds.backbone.loading import _gguf_cache

    path, gguf = resolve_model_path(ModelConfig(name_or_path="smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(_gguf_cache(path, gguf, torch.float32))
    hidden, inter, layers, heads, kv_heads, _ = SHAPES[shape]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    tmp = directory.with_name(directory.name + ".tmp")
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)


def write_data(data: Path) -> None:
    """RTE-format jsonl whose premises are longer than SEQ_LEN tokens, so every batch has the length estimated."""
    write_long_pairs(data, {"train": 64, "val": 2}, premise_words=120, hypothesis_words=10)


def ds_config(shape: str, *, nvme_dir: Path | None, world: int, bf16: bool) -> dict:
    """ZeRO-3 for billions of frozen parameters: release every module after use (no reuse distance and no prefetch,
    ds_configs/zero3.json's settings), so a rank holds its partition plus the module it runs; with NVMe, swap buffers
    that fit the largest partition (the embedding)."""
    zero = {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 0}
    config = {"zero_optimization": zero, "bf16": {"enabled": bf16}, "fp16": {"enabled": False},
              "wall_clock_breakdown": False}
    if nvme_dir is not None:
        hidden, inter, *_ = SHAPES[shape]
        largest = -(-max(VOCAB * hidden, hidden * inter) // world)
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(nvme_dir), "pin_memory": False, "buffer_count": 4,
                                 "buffer_size": (largest // 2**20 + 1) * 2**20}
        config["aio"] = {"block_size": 1_048_576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                         "overlap_events": True}
    return config


def cell_config(runs: Path, cell: str, model_dir: Path, *, world: int, device: str, steps: int, nvme_root: Path):
    import yaml

    shape, nvme, _ = parse_cell(cell)
    folder = runs / cell
    folder.mkdir(parents=True, exist_ok=True)
    ds = ds_config(shape, nvme_dir=nvme_root / cell if nvme else None, world=world, bf16=device == "cuda")
    (folder / "ds_config.json").write_text(json.dumps(ds, indent=2))
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "random_init": True},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": NUM_PROMPT},
        "head": {"type": "linear"},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(runs / "data" / "train.jsonl"),
                 "eval_split": str(runs / "data" / "val.jsonl"), "max_length": SEQ_LEN},
        "train": {"batch_size": MICRO_BATCH * world, "micro_batch_size": MICRO_BATCH, "eval_batch_size": 1,
                  "max_steps": steps + 1, "eval_every": steps + 1},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "run": {"log_every": 1, "output_dir": str(folder / "run"), "overwrite": True},
        "deepspeed": {"config": str(folder / "ds_config.json")},
    }))
    return path


def estimate(config: Path, *, world: int, accelerator: str) -> dict:
    from ipt_ds.config import load_config
    from ipt_ds.memory import in_memory, report

    _, parts, job = report(load_config(config), world_size=world, accelerator=accelerator)
    return {"per_rank_bytes": in_memory(parts), "positions": job.seq_len,
            "parts_mib": {p.name: p.bytes / 2**20 for p in parts}}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gemm_shapes(shape: str, device: str) -> dict[str, tuple[int, int, int]]:
    """A large square product (larger on a GPU, which 2048 does not fill), and the shape's own MLP up-projection at
    the training's tokens per rank."""
    hidden, inter, *_ = SHAPES[shape]
    side = 2048 if device == "cpu" else 8192
    return {"square": (side, side, side), "MLP": (MICRO_BATCH * (SEQ_LEN + NUM_PROMPT), hidden, inter)}


def watch(launcher: subprocess.Popen, timeline: Path, *, min_free: float) -> int | str:
    """Wait for the run, writing each rank's RSS every 2 s to `timeline`; stop the whole run (its process group) when
    the machine's available memory falls below `min_free` bytes, before the kernel's out-of-memory killer acts."""
    import psutil

    start = time.perf_counter()
    with open(timeline, "w") as out:
        out.write("seconds\tavailable_mib\trank_rss_mib\n")
        while launcher.poll() is None:
            try:  # ranks come and go (a rank that has exited is a zombie until the launcher reaps it)
                ranks = [c for c in psutil.Process(launcher.pid).children(recursive=True)
                         if any(arg.startswith("--local_rank") for arg in c.cmdline())]
                rss = [round(c.memory_info().rss / 2**20) for c in ranks]
            except psutil.Error:
                rss = []
            out.write(f"{time.perf_counter() - start:.0f}\t{available_bytes() // 2**20}\t{rss}\n")
            out.flush()
            if available_bytes() < min_free:
                os.killpg(launcher.pid, 15)
                launcher.wait(timeout=60)
                return (f"stopped: available memory fell below {min_free / 2**30:.1f} GiB (ranks at {rss} MiB RSS "
                        f"after {time.perf_counter() - start:.0f} s)")
            time.sleep(2)
    return launcher.returncode


def run_cell(runs: Path, cell: str, config: Path, *, world: int, device: str, need: float, wait_s: float,
             min_free: float = 1.5 * 2**30) -> dict:
    """Measure the GEMM peak, then train the cell; returns both, or {"skipped": why} when the machine lacks the memory
    the estimate says the cell needs."""
    result = runs / cell / "measured.json"
    if result.exists():
        return json.loads(result.read_text())
    deadline = time.time() + wait_s
    while device == "cpu" and available_bytes() < need:
        if time.time() >= deadline:
            return {"skipped": f"needs {need / 2**30:.1f} GiB (estimate x {world} ranks + margin), "
                               f"{available_bytes() / 2**30:.1f} GiB available"}
        time.sleep(30)
    # Measured right before the run, so that both see the machine equally loaded.
    gemm = measure_gemm(device=device, world=world, shapes=gemm_shapes(parse_cell(cell)[0], device))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peaks = runs / cell / "peak"
    shutil.rmtree(peaks, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--master_port", str(port),
           "--module", "benchmarks.peak_rss", "train", str(config)]
    env = {**os.environ, "IPT_DS_PEAK_RSS_DIR": str(peaks)}
    if device == "cpu":
        env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads_per_rank(world))}
    if parse_cell(cell)[2]:
        env["MALLOC_MMAP_THRESHOLD_"] = str(HEAP_THRESHOLD)
    start = time.perf_counter()
    with open(runs / cell / "train.log", "w") as log:
        code = watch(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True),
                     runs / cell / "rss.tsv", min_free=min_free)
    for leftover in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):  # DeepSpeed's CPU comm buffers outlive the run
        leftover.unlink(missing_ok=True)
    _, nvme, _ = parse_cell(cell)
    swap = json.loads(Path(runs / cell / "ds_config.json").read_text())["zero_optimization"].get("offload_param", {})
    swap_bytes = sum(f.stat().st_size for f in Path(swap["nvme_path"]).rglob("*") if f.is_file()) if nvme else 0
    if nvme:
        shutil.rmtree(swap["nvme_path"], ignore_errors=True)  # gigabytes of swap files; the size is kept
    if code != 0:
        tail = (runs / cell / "train.log").read_text()[-3000:]
        return {"failed": code if isinstance(code, str) else f"exit status {code}", "log_tail": tail}
    run = runs / cell / "run"
    measured = {"peak_rss_bytes": [json.loads((peaks / f"rank{r}.json").read_text())["peak_rss_bytes"]
                                   for r in range(world)] if device == "cpu" else [],
                "step_s": [MICRO_BATCH * world / rate for rate in logged_rates(run / "log.jsonl", warmup=1)],
                "parameters": json.loads((run / "results.json").read_text())["parameters"],
                "nvme_swap_bytes": swap_bytes, "gemm": gemm, "wall_s": round(time.perf_counter() - start, 1),
                "date": time.strftime("%Y-%m-%d")}
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    result.write_text(json.dumps(measured, indent=2))
    return measured


def logged_rates(log: Path, *, warmup: int) -> list[float]:
    """The per-step samples/s that the trainer logs (run.log_every=1), after the first `warmup` steps."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r and r["step"] > warmup]


def threads_per_rank(world: int) -> int:
    return max(1, (os.cpu_count() or 1) // world)


def gemm_rate(spec: dict) -> float:
    """FLOP/s of torch.mm (m, k) x (k, n) in this process, repeated for about `seconds` after a warm-up."""
    import torch

    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    a = torch.randn(spec["m"], spec["k"], dtype=dtype, device=spec["device"])
    b = torch.randn(spec["k"], spec["n"], dtype=dtype, device=spec["device"])
    sync = torch.cuda.synchronize if spec["device"] == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    count, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < spec["seconds"]:
        torch.mm(a, b)
        count += 1
        if spec["device"] == "cuda" and count % 50 == 0:
            sync()
    sync()
    return 2 * spec["m"] * spec["k"] * spec["n"] * count / (time.perf_counter() - begin)


def measure_gemm(*, device: str, world: int, shapes: dict[str, tuple[int, int, int]]) -> dict:
    """Peak matrix-product rate with the training's layout: on CPU one process per rank at once, each with the rank's
    threads (their rates add up); on CUDA one GPU in bf16."""
    processes = world if device == "cpu" else 1
    result = {"device": device, "processes": processes, "load_average": os.getloadavg()[0], "shapes": {}}
    for name, (m, k, n) in shapes.items():
        spec = {"device": device, "dtype": "float32" if device == "cpu" else "bfloat16", "m": m, "k": k, "n": n,
                "threads": threads_per_rank(world) if device == "cpu" else 1, "seconds": 5}
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
        children = [subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--gemm", json.dumps(spec)], env=env,
                                     stdout=subprocess.PIPE, text=True) for _ in range(processes)]
        rates = [float(child.communicate()[0].strip().splitlines()[-1]) for child in children]
        result["shapes"][name] = {"m": m, "k": k, "n": n, "dtype": spec["dtype"], "threads": spec["threads"],
                                  "flops_per_s": sum(rates), "per_process": rates}
    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        result["device_name"] = name
        result["dense_bf16_peak"] = next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)
    return result


def build_rows(cells: list[str], estimates: dict, measured: dict, *, world: int) -> list[dict]:
    """One row per cell: sizes, estimate vs measured memory, step time, achieved FLOP/s and its share of the GEMM
    peak measured just before the cell."""
    rows = []
    for cell in cells:
        shape, nvme, heap = parse_cell(cell)
        est, got = estimates[cell], measured.get(cell, {})
        flops = step_flops(shape, sequences=MICRO_BATCH * world, positions=est["positions"])
        row = {"cell": cell, "shape": SHAPES[shape][5], "weights": "NVMe" if nvme else "memory",
               "allocator": f"mmap threshold {(HEAP_THRESHOLD if heap else MMAP_THRESHOLD) // 2**20} MiB", "heap": heap,
               "matmul_params": matmul_params(shape), "positions": est["positions"], "step_flops": flops,
               "estimate_mib": est["per_rank_bytes"] / 2**20, "estimate_parts_mib": est["parts_mib"],
               "status": "measured" if "step_s" in got else got.get("skipped") or got.get("failed") or "not run"}
        if "step_s" in got:
            step = statistics.median(got["step_s"])
            peak_rss = [b / 2**20 for b in got["peak_rss_bytes"]]
            gemm = {name: g["flops_per_s"] for name, g in got["gemm"]["shapes"].items()}
            row |= {"params": got["parameters"]["total"], "trainable": got["parameters"]["trainable"],
                    "peak_rss_mib": peak_rss, "step_s": step, "step_s_all": got["step_s"],
                    "achieved_flops_per_s": flops / step, "gemm_flops_per_s": gemm,
                    "fraction_of_gemm_peak": flops / step / gemm["square"],
                    "nvme_swap_gib": got.get("nvme_swap_bytes", 0) / 2**30, "wall_s": got["wall_s"],
                    **({"note": got["note"]} if "note" in got else {})}
            if peak_rss:
                row["estimate_error_pct"] = 100 * (row["estimate_mib"] - max(peak_rss)) / max(peak_rss)
            if got["gemm"].get("dense_bf16_peak"):
                row["mfu"] = flops / step / world / got["gemm"]["dense_bf16_peak"]
        rows.append(row)
    return rows


def scale_table(rows: list[dict]) -> list[str]:
    lines = ["| cell | shape | params (trainable) | weights | allocator | estimate MiB/rank | peak RSS MiB (rank 0, 1) "
             "| error | step s (median) | wall s (whole run) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"| {r['cell']} | {r['shape']} | | {r['weights']} | {r['allocator']} | "
                         f"{r['estimate_mib']:,.0f} | {'not run: ' if r['status'].startswith('needs') else ''}"
                         f"{r['status']} | | | |")
            continue
        rss = " / ".join(f"{m:,.0f}" for m in r["peak_rss_mib"])
        error = f"{r['estimate_error_pct']:+.1f} %" if "estimate_error_pct" in r else ""
        lines.append(f"| {r['cell']} | {r['shape']} | {r['params']:,} ({r['trainable']:,}) | {r['weights']} | "
                     f"{r['allocator']} | {r['estimate_mib']:,.0f} | {rss} | {error} | {r['step_s']:.2f} | "
                     f"{r['wall_s']:,.0f} |")
    return lines


def efficiency_table(rows: list[dict]) -> list[str]:
    done = [r for r in rows if r["status"] == "measured"]
    mfu = any("mfu" in r for r in done)
    lines = ["| cell | N (matrix-product params) | T | TFLOP/step | step s | achieved GFLOP/s | GEMM square GFLOP/s "
             "| GEMM MLP-shape GFLOP/s | achieved / square GEMM |" + (" MFU (dense bf16 peak) |" if mfu else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if mfu else "")]
    for r in done:
        g = r["gemm_flops_per_s"]
        lines.append(f"| {r['cell']} | {r['matmul_params']:,} | {r['positions']} | {r['step_flops'] / 1e12:.3f} | "
                     f"{r['step_s']:.2f} | {r['achieved_flops_per_s'] / 1e9:,.1f} | {g['square'] / 1e9:,.1f} | "
                     f"{g['MLP'] / 1e9:,.1f} | {100 * r['fraction_of_gemm_peak']:.0f} % |"
                     + (f" {100 * r['mfu']:.1f} % |" if mfu else ""))
    return lines


def write_report(out: Path, rows: list[dict], command: str, *, world: int, device: str) -> None:
    (out / "results.json").write_text(json.dumps({"rows": rows, "world": world, "device": device}, indent=2))
    fitted = [r for r in rows if r["status"] == "measured" and r["weights"] == "memory"]
    largest = max(fitted, key=lambda r: r["params"], default=None)
    threads = threads_per_rank(world) if device == "cpu" else "-"
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             f"{world} ranks on {device} ({threads} thread(s) each), ZeRO-3, prompt tuning ({NUM_PROMPT} vectors, "
             f"linear head), micro-batch {MICRO_BATCH} x {SEQ_LEN} tokens per rank, random-init LLaMA shapes with a "
             f"{VOCAB:,}-token vocabulary; step time: median of the steps after 1 warm-up step.", "",
             *scale_table(rows), "",
             "FLOPs per sequence of T positions (prompt included), frozen backbone: 4 N T + 12 L T^2 D (forward "
             "2NT + 4LT^2D, backward through the activations only 2NT + 8LT^2D; no weight gradients). GEMM: fp32 "
             "torch.mm, one process per rank at once, measured just before each cell.", "",
             *efficiency_table(rows), ""]
    lines += [f"Note on {r['cell']}: {r['note']}." for r in rows if "note" in r]
    if largest:
        lines.append(f"Largest backbone trained with its weights in memory: {largest['cell']} "
                     f"({largest['params']:,} parameters).")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out, rows)


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "measured"]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(12, 4.5))
    for weights, marker in (("memory", "o"), ("NVMe", "s")):
        some = sorted((r for r in done if r["weights"] == weights and not r["heap"]),
                      key=lambda r: r["params"])
        if not some:
            continue
        billions = [r["params"] / 1e9 for r in some]
        mem.plot(billions, [max(r["peak_rss_mib"] or [0]) / 1024 for r in some], marker=marker,
                 label=f"measured peak RSS (larger rank), weights in {weights}")
        mem.plot(billions, [r["estimate_mib"] / 1024 for r in some], marker=marker, linestyle=":",
                 label=f"estimate-memory, weights in {weights}")
        speed.plot(billions, [r["achieved_flops_per_s"] / 1e9 for r in some], marker=marker,
                   label=f"achieved (training step), weights in {weights}")
        speed.plot(billions, [r["gemm_flops_per_s"]["square"] / 1e9 for r in some], marker=marker, linestyle="none",
                   color="grey", label="GEMM peak (square), measured with each cell" if marker == "o" else None)
    heap = [r for r in done if r["heap"]]
    if heap:
        mem.plot([r["params"] / 1e9 for r in heap], [max(r["peak_rss_mib"] or [0]) / 1024 for r in heap],
                 marker="x", linestyle="none", color="black", label="measured peak RSS, gathers left in the heap")
    skipped = [r["cell"] for r in rows if r["status"] != "measured"]
    if skipped:
        mem.set_title(f"not run: {', '.join(skipped)}", fontsize=8)
    mem.set_xlabel("backbone parameters (billions)")
    mem.set_ylabel("GiB per rank")
    mem.legend(fontsize=7)
    speed.set_xlabel("backbone parameters (billions)")
    speed.set_ylabel("GFLOP/s (all ranks)")
    speed.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gemm", help=argparse.SUPPRESS)
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--nvme-dir", type=Path, default=Path("/tmp/ipt_ds_nvme"), help="folder for NVMe swap files")
    parser.add_argument("--margin-gib", type=float, default=1.5, help="free memory kept beyond the ranks' estimate")
    parser.add_argument("--min-free-gib", type=float, default=1.5,
                        help="stop a running cell when the machine's available memory falls below this")
    parser.add_argument("--wait-for-memory", type=float, default=0, help="seconds to wait for free memory per cell")
    parser.add_argument("--name", help="study folder under benchmarks/results/ (default: scale, or scale_cuda)")
    args = parser.parse_args()
    if args.gemm:
        print(gemm_rate(json.loads(args.gemm)))
        return
    for cell in args.cells:
        parse_cell(cell)
    if args.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
        world = 2
    else:
        import torch

        world = torch.cuda.device_count()
    out = Path("benchmarks/results") / (args.name or ("scale" if args.device == "cpu" else "scale_cuda"))
    runs = out / "runs"
    if not (runs / "data" / "val.jsonl").exists():
        write_data(runs / "data")
    estimates, measured = {}, {}
    for cell in args.cells:
        shape = parse_cell(cell)[0]
        model_dir = runs / "models" / shape
        if not (model_dir / "config.json").exists():
            write_model_dir(model_dir, shape)
        config = cell_config(runs, cell, model_dir, world=world, device=args.device, steps=args.steps,
                             nvme_root=args.nvme_dir)
        estimates[cell] = estimate(config, world=world, accelerator=args.device)
        need = world * estimates[cell]["per_rank_bytes"] + args.margin_gib * 2**30
        print(f"{cell}: estimate {estimates[cell]['per_rank_bytes'] / 2**30:.1f} GiB per rank, "
              f"{available_bytes() / 2**30:.1f} GiB available", flush=True)
        measured[cell] = run_cell(runs, cell, config, world=world, device=args.device, need=need,
                                  wait_s=args.wait_for_memory, min_free=args.min_free_gib * 2**30)
        print(f"{cell}: {json.dumps({k: v for k, v in measured[cell].items() if k != 'log_tail'})}", flush=True)
        rows = build_rows([c for c in args.cells if c in estimates], estimates, measured, world=world)
        write_report(out, rows, "python -m benchmarks.scale " + " ".join(sys.argv[1:]), world=world,
                     device=args.device)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
