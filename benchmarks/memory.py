"""Memory estimator vs measured peak RSS: `ipt-ds estimate-memory` against real 2-rank DeepSpeed training on CPU.

    python -m benchmarks.memory [--cells tiny-prompt_tuning-zero2 ...] [--steps 3]

Cells: backbone x method x ZeRO stage. Backbones: `tiny` (a 2-layer, 32-wide BERT: what every run costs whatever the
model, i.e. the process overhead), `minilm` (the packaged MiniLM, 22.7M parameters), `bert-base` and `bert-large`
(BERT-base and BERT-large shapes, 109M and 335M parameters, random weights written once under the study folder, nothing
downloaded). Methods: prompt_tuning (16 prompt vectors, frozen backbone) and full fine-tuning (dropout on, as
configs/cb/full_minilm.yaml). Stages: the shipped ds_configs/zero2.json and zero3.json (fp32). Inputs are synthetic
texts long enough that every batch fills data.max_length=128, so the sequence length the estimate assumes is the one
that runs.

Each cell trains `--steps` optimizer steps with `ipt-ds train` on 2 ranks (eval and checkpoint at the end), and every
rank records its lifetime peak RSS (ru_maxrss; benchmarks/peak_rss.py). A cell whose measurement exists is skipped, and
one is put off while the machine lacks the memory its estimate says two ranks need. The estimate is recomputed from
the cell's config at report time. Writes results.json, results.md and memory.png under benchmarks/results/memory/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("benchmarks/results/memory")
BACKBONES = {  # name -> (model.name_or_path or random BERT sizes, micro-batch for prompt_tuning, for full)
    "tiny": (dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), 16, 16),
    "minilm": ("minilm", 16, 16),
    "bert-base": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), 8, 4),
    "bert-large": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096), 4, 2),
}
METHODS = {"prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 16}, "full": {"name": "full"}}
STAGES = ("zero2", "zero3")
CELLS = {f"{b}-{m}-{s}": (b, m, s) for b in BACKBONES for m in METHODS for s in STAGES}
WORDS = "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse frog red green blue black".split()


def write_random_bert(directory: Path, sizes: dict) -> None:
    """A BERT of the given sizes with random weights and MiniLM's tokenizer (same vocabulary), as an HF directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from ipt_ds.backbone import ModelConfig, resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(name_or_path="minilm"))[0])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                        **sizes)
    tmp = directory.with_name(directory.name + ".tmp")
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)


def write_long_pairs(data: Path, counts: dict[str, int], *, premise_words: int, hypothesis_words: int) -> None:
    """Synthetic RTE-format jsonl splits of random words, long enough that every input reaches the length studied."""
    data.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for split, count in counts.items():
        rows = [{"premise": " ".join(rng.choices(WORDS, k=premise_words)),
                 "hypothesis": " ".join(rng.choices(WORDS, k=hypothesis_words)),
                 "label": ("entailment", "not_entailment")[i % 2], "idx": i} for i in range(count)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare_inputs(runs: Path) -> dict[str, str]:
    """Synthetic RTE-format jsonl (every input longer than 128 tokens) and the random backbones; returns model paths."""
    data = runs / "data"
    if not (data / "val.jsonl").exists():
        write_long_pairs(data, {"train": 128, "val": 32}, premise_words=300, hypothesis_words=30)
    paths = {}
    for name, (model, _, _) in BACKBONES.items():
        if isinstance(model, str):
            paths[name] = model
            continue
        directory = runs / "models" / name
        if not (directory / "config.json").exists():  # in a child process: the orchestrator keeps no 1.3 GB heap
            child = multiprocessing.get_context("spawn").Process(target=write_random_bert, args=(directory, model))
            child.start()
            child.join()
            if child.exitcode != 0:
                raise SystemExit(f"writing the random {name} backbone failed")
        paths[name] = str(directory)
    return paths


def cell_config(runs: Path, cell: str, model_path: str) -> Path:
    backbone, method, stage = CELLS[cell]
    micro = BACKBONES[backbone][1 if method == "prompt_tuning" else 2]
    import yaml

    path = runs / cell / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": model_path, "dropout": method == "full"},
        "method": METHODS[method],
        "head": {"type": "linear", "pool": "mean"},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(runs / "data" / "train.jsonl"),
                 "eval_split": str(runs / "data" / "val.jsonl"), "max_length": 128},
        "train": {"batch_size": 2 * micro, "micro_batch_size": micro, "eval_batch_size": micro},
        "optim": {"lr": 1e-3},
        "deepspeed": {"config": f"ds_configs/{stage}.json"},
    }))
    return path


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(runs: Path, cell: str, config: Path, steps: int, need: float, wait_s: float) -> dict | None:
    """Train the cell on 2 ranks and return its per-rank peak RSS; None when the machine lacks the memory."""
    result = runs / cell / "measured.json"
    if result.exists():
        return json.loads(result.read_text())
    deadline = time.time() + wait_s
    while available_bytes() < need:
        if time.time() > deadline:
            print(f"{cell}: put off, {need / 2**30:.1f} GiB needed (margin included), "
                  f"{available_bytes() / 2**30:.1f} GiB available", flush=True)
            return None
        time.sleep(30)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peaks = runs / cell / "peak"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "--module", "benchmarks.peak_rss", "train", str(config), f"--run.output_dir={runs / cell / 'run'}",
           "--run.overwrite=true", f"--train.max_steps={steps}", f"--train.eval_every={steps}"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "IPT_DS_PEAK_RSS_DIR": str(peaks)}
    start = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for leftover in Path("/dev/shm").glob(f"deepspeed_*_{port}_*"):  # DeepSpeed's CPU comm buffers outlive the run
        leftover.unlink(missing_ok=True)
    if run.returncode != 0:
        raise SystemExit(f"{cell} failed:\n{run.stderr[-3000:]}")
    measured = {"peak_rss_bytes": [json.loads((peaks / f"rank{r}.json").read_text())["peak_rss_bytes"] for r in (0, 1)],
                "steps": steps, "wall_s": round(time.perf_counter() - start, 1)}
    for heavy in ("checkpoints", "best"):  # full fine-tuning of bert-large writes gigabytes; the numbers are kept
        subprocess.run(["rm", "-rf", str(runs / cell / "run" / heavy)], check=True)
    result.write_text(json.dumps(measured, indent=2))
    print(f"{cell}: peak RSS {[round(b / 2**20) for b in measured['peak_rss_bytes']]} MiB, {measured['wall_s']} s",
          flush=True)
    return measured


def estimate(config: Path):
    from ipt_ds.config import load_config
    from ipt_ds.memory import report

    _, parts, job = report(load_config(config), world_size=2, accelerator="cpu")
    return parts, job


def write_report(rows: list[dict], command: str) -> None:
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| cell | params (trainable) | micro-batch x positions | estimate MiB | measured peak RSS MiB (rank 0, 1) "
             "| error |", "|---|---|---|---|---|---|"]
    for r in rows:
        measured = " / ".join(f"{m:,.0f}" for m in r["measured_mib"]) if r["measured_mib"] else "not run"
        error = f"{r['error_pct']:+.1f} %" if r["error_pct"] is not None else ""
        params = f"{r['params_total']:,} ({r['params_trainable']:,})" if r["measured_mib"] else ""
        lines.append(f"| {r['cell']} | {params} | {r['micro_batch']} x "
                     f"{r['positions']} | {r['estimate_mib']:,.0f} | {measured} | {error} |")
    longest = max(rows, key=lambda r: len(r["estimate_parts_mib"]))  # a ZeRO-3 row: every part, in the table's order
    parts = list(dict.fromkeys([*longest["estimate_parts_mib"], *(n for r in rows for n in r["estimate_parts_mib"])]))
    lines += ["", "Estimate by part (MiB per rank):", "", "| cell | " + " | ".join(parts) + " |",
              "|---|" + "---|" * len(parts)]
    lines += [f"| {r['cell']} | " + " | ".join(f"{r['estimate_parts_mib'].get(p, 0):,.0f}" for p in parts) + " |"
              for r in rows]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 0.6 + 0.45 * len(rows)))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab20").colors
    for i, part in enumerate(parts):
        widths = [r["estimate_parts_mib"].get(part, 0) for r in rows]
        ax.barh([r["cell"] for r in rows], widths, left=left, color=colors[i % len(colors)], label=part)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, r in enumerate(rows):
        for m in r["measured_mib"]:
            ax.plot([m, m], [y - 0.4, y + 0.4], color="black", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("MiB per rank: estimate by part (bars), measured peak RSS of each rank (black lines)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(OUT / "memory.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--wait-for-memory", type=float, default=600, help="seconds to wait for free memory per cell")
    parser.add_argument("--margin-gib", type=float, default=1.0, help="free memory kept beyond 2 ranks' estimate")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    runs = OUT / "runs"
    paths = prepare_inputs(runs)
    rows = []
    for cell in args.cells:
        config = cell_config(runs, cell, paths[CELLS[cell][0]])
        parts, job = estimate(config)
        total = sum(p.bytes for p in parts)
        measured = measure(runs, cell, config, args.steps, 2 * total + args.margin_gib * 2**30, args.wait_for_memory)
        peak = max(measured["peak_rss_bytes"]) if measured else None
        counts = json.loads((runs / cell / "run" / "results.json").read_text())["parameters"] if measured else {}
        rows.append({"cell": cell, "estimate_mib": total / 2**20, "micro_batch": job.micro_batch_size,
                     "positions": job.seq_len,
                     "params_total": counts.get("total", 0), "params_trainable": counts.get("trainable", 0),
                     "estimate_parts_mib": {p.name: p.bytes / 2**20 for p in parts},
                     "measured_mib": [b / 2**20 for b in measured["peak_rss_bytes"]] if measured else [],
                     "error_pct": 100 * (total - peak) / peak if peak else None})
    write_report(rows, "python -m benchmarks.memory " + " ".join(sys.argv[1:]))
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    main()
