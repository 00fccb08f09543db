"""Step cost study: training step time and peak memory of methods side by side, and LPT's insertion-layer sweep.

    python -m benchmarks.step_cost [--backbones minilm roberta-large-shape:4x64] [--methods ptuning_v2 lpt full]
        [--repeats 3] [--batch-size 8] [--seq-len 128] [--steps 4] [--sweep]

Each measurement is one fresh process (`--cell`), so peak memory is its own: build the model, run the warm-up steps
(they also page in weights that loading left memory-mapped), reset the kernel's peak-RSS mark
(/proc/self/clear_refs), then run the timed steps of forward, backward and AdamW on one fixed batch (random token ids
of the full length: speed and memory do not depend on the text), and report the median step time, the RSS before the
timed steps and the peak RSS during them (the whole process: weights, optimizer state, activations and the ~500 MiB
of the Python/torch process itself; the allocator keeps what the warm-up step freed, so the peak is the steady
state of training). Cells
run interleaved (A B C A B C ...), and every ratio is taken within one repeat, against the first method, so that a
noisy machine shifts numerator and denominator alike. One process, no DeepSpeed: it isolates what the method costs.
`roberta-large-shape` is a randomly initialised RoBERTa-large-sized encoder (24 layers, H = 1024; the MiniLM
vocabulary), written once under the study's runs/ folder; random weights are fine for measuring speed and memory.
A backbone may carry its own batch shape, `name:BxT` (batch B of T tokens); others use --batch-size x --seq-len.
`--sweep` adds LPT at every insertion layer k of the first backbone, with the same step measurement;
`--sweep-accuracy RUN_DIR...` adds the accuracy of finished LPT training runs (e.g. accuracy-study cells trained with
`--override=--method.layer=K`), grouped by the `method.layer` in each run's config.yaml, to the same plot.
Writes benchmarks/results/<name>/{results.json, results.md, step_cost_sweep.png}; finished cells are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import hygiene

METHODS = {
    "lpt": {"method.name": "lpt", "method.num_virtual_tokens": 5},
    "ptuning_v2": {"method.name": "ptuning_v2", "method.num_virtual_tokens": 5},
    "prompt_tuning": {"method.name": "prompt_tuning", "method.num_virtual_tokens": 5},
    "ipt": {"method.name": "ipt", "method.num_virtual_tokens": 5, "method.encoder": "cnn",
            "method.generator_width": 64},
    "prefix_task": {"method.name": "ipt", "method.method": "prefix-tuning", "method.instance": False,
                    "method.num_virtual_tokens": 5},  # IPT's own task-level prefix: the baseline of the prefix path
    "ipt_prefix": {"method.name": "ipt", "method.method": "prefix-tuning", "method.num_virtual_tokens": 5,
                   "method.encoder": "cnn", "method.generator_width": 64},
    "full": {"method.name": "full"},
}


def backbone_path(name: str, out: Path) -> str:
    if name != "roberta-large-shape":
        return name
    path = out / "runs" / "models" / name
    if not (path / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, RobertaConfig, RobertaModel

        from ipt_ds.backbone import ModelConfig, resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(ModelConfig(name_or_path="minilm"))[0])
        torch.manual_seed(0)
        config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                               pad_token_id=tokenizer.pad_token_id)
        RobertaModel(config, add_pooling_layer=False).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return str(path)


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(cell: dict) -> dict:
    """One cell in this process: build, reset the peak mark, time the steps."""
    import torch

    from ipt_ds.config import load_config
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": cell["backbone"], "data.max_length": cell["seq_len"],
                             "head.pool": "cls", **cell["overrides"]})
    model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    model.train()
    batch_size, seq_len = cell["batch_size"], cell["seq_len"]
    vocab = len(encoder.tokenizer)
    batch = {"input_ids": torch.randint(1000, vocab, (batch_size, seq_len)),
             "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
             "token_type_ids": torch.zeros(batch_size, seq_len, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch_size,))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    def step() -> float:
        begin = time.perf_counter()
        _, loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - begin

    for _ in range(cell["warmup"]):  # also pages in weights that loading left memory-mapped, and the optimizer state
        step()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    start_rss = rss_mib("VmRSS")
    step_s = statistics.median(step() for _ in range(cell["steps"]))
    counts = model.parameter_report()
    flops = useful_flops(model, batch_size=batch_size, seq_len=seq_len)
    return {**cell, "step_s": step_s, "start_rss_mib": start_rss,
            "peak_rss_mib": rss_mib("VmHWM"), "trainable": counts["trainable"], "backbone": counts["backbone"],
            "layer": getattr(model.method, "layer", None), "num_layers": model.backbone.num_layers,
            "step_flops": flops, "useful_flops_per_s": flops / step_s}


def useful_flops(model, *, batch_size: int, seq_len: int, cached: bool = False) -> float:
    """Matrix-product FLOPs of one training step in the backbone's layers, from what the method declares
    (methods/base.py): N = a layer's 2-D weights, H the hidden size, t its positions. Below the first trained layer a
    layer runs forward only (2 N t + 4 t^2 H) on the input and its embedded prompts; from it up, forward and the
    backward through its activations (2 N t + 8 t^2 H) on the input and every prompt position, plus the weight
    gradients (2 N t) where its weights train. Embeddings, the head, key/value prefixes' extra keys and the
    methods' own small products are left out. `cached`: the layers below the first trained one do not run (the
    frozen-state cache) and are not counted."""
    method, layers = model.method, model.backbone.layer_stack()
    hidden = model.backbone.hidden_size
    below, above = seq_len + method.num_embedded_prompts, seq_len + method.num_prefix_positions
    total = 0.0
    for index, layer in enumerate(layers):
        weights = [p for p in layer.parameters() if p.dim() == 2]
        n = sum(p.numel() for p in weights)
        if index < method.first_trained_layer:
            total += 0 if cached else 2 * n * below + 4 * below**2 * hidden
        else:
            total += 4 * n * above + 12 * above**2 * hidden + (2 * n * above if any(p.requires_grad for p in weights)
                                                               else 0)
    return batch_size * total


def run_cell(out: Path, cell: dict, cores: list[int]) -> dict:
    """One cell in its own process pinned to `cores` (benchmarks/hygiene.py), with the load it ran under."""
    path = out / "runs" / f"{cell['id']}.json"
    if not path.exists():
        run = hygiene.run_watched([sys.executable, "-m", "benchmarks.step_cost", "--cell", json.dumps(cell)],
                                  cores=cores, log=out / "runs" / f"{cell['id']}.log")
        if run["returncode"] != 0:
            raise SystemExit(f"cell {cell['id']} failed; see {out / 'runs' / cell['id']}.log")
        path.write_text(json.dumps({**json.loads(run["stdout"].strip().splitlines()[-1]), **hygiene.machine(run)}))
        print(f"{cell['id']}: {json.loads(path.read_text())['step_s']:.3f} s/step", flush=True)
    return json.loads(path.read_text())


def ratios(results: list[dict], key: str, baseline: str) -> dict[str, tuple[float, float]]:
    """Per method: median and spread (min..max as ± half-range) of key / baseline's key within each repeat."""
    by_repeat: dict[int, dict[str, float]] = {}
    for r in results:
        by_repeat.setdefault(r["repeat"], {})[r["label"]] = r[key]
    out = {}
    for label in {r["label"] for r in results}:
        values = [rep[label] / rep[baseline] for rep in by_repeat.values() if label in rep and baseline in rep]
        out[label] = (statistics.median(values), (max(values) - min(values)) / 2)
    return out


def table(results: list[dict], baseline: str, gemm_rate: float) -> list[str]:
    """Per method: medians, ratios to `baseline` within each repeat, and the useful FLOP/s as a fraction of the run's
    GEMM rate; * marks a method with an oversubscribed cell (benchmarks/hygiene.py)."""
    step = ratios(results, "step_s", baseline)
    peak = ratios(results, "peak_rss_mib", baseline)
    lines = [f"| method | trainable | step (s, median) | step / {baseline} | peak RSS (MiB) | peak / {baseline} | "
             "useful GFLOP/s | of GEMM |", "|---|---|---|---|---|---|---|---|"]
    labels = list(dict.fromkeys(r["label"] for r in results))
    for label in labels:
        rows = [r for r in results if r["label"] == label]
        busy = "*" if any(r.get("oversubscribed") for r in rows) else ""
        rate = statistics.median(r["useful_flops_per_s"] for r in rows)
        lines.append(f"| {label}{busy} | {rows[0]['trainable']:,} | "
                     f"{statistics.median(r['step_s'] for r in rows):.3f} | "
                     f"{step[label][0]:.2f} ± {step[label][1]:.2f} | "
                     f"{statistics.median(r['peak_rss_mib'] for r in rows):,.0f} | "
                     f"{peak[label][0]:.2f} ± {peak[label][1]:.2f} | {rate / 1e9:.1f} | {rate / gemm_rate:.2f} |")
    return lines


def accuracy_by_layer(run_dirs: list[Path]) -> dict[int, list[float]]:
    """Eval accuracy of finished LPT runs, grouped by the insertion layer in their config.yaml."""
    import yaml

    found: dict[int, list[float]] = {}
    for run in run_dirs:
        if (run / "results.json").exists():
            layer = yaml.safe_load((run / "config.yaml").read_text())["method"]["layer"]
            found.setdefault(layer, []).append(json.loads((run / "results.json").read_text())["eval"]["acc"])
    return dict(sorted(found.items()))


def plot(out: Path, sweep: list[dict], accuracy: dict[int, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in sweep})
    step = [statistics.median(r["step_s"] / next(b["step_s"] for b in sweep if b["repeat"] == r["repeat"]
                                                   and b["layer"] == layers[0]) for r in sweep if r["layer"] == k)
            for k in layers]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(layers, step, marker="o", color="tab:blue")
    ax.set_xlabel("insertion layer k (layers below k run without autograd)")
    ax.set_ylabel(f"step time / step time at k={layers[0]}", color="tab:blue")
    if accuracy:
        twin = ax.twinx()
        twin.errorbar(list(accuracy), [statistics.mean(a) for a in accuracy.values()],
                      yerr=[statistics.stdev(a) if len(a) > 1 else 0 for a in accuracy.values()],
                      marker="s", color="tab:red", capsize=3)
        twin.set_ylabel("accuracy (mean ± sd over seeds)", color="tab:red")
    ax.set_title(f"LPT on {sweep[0]['backbone_name']}: step time and accuracy against k")
    fig.tight_layout()
    fig.savefig(out / "step_cost_sweep.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    parser.add_argument("--backbones", nargs="+", default=["minilm", "roberta-large-shape"])
    parser.add_argument("--methods", nargs="+", default=["ptuning_v2", "lpt", "full"], choices=sorted(METHODS),
                        help="the first one is the baseline of the ratios")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="LPT at every k of the first backbone")
    parser.add_argument("--sweep-accuracy", nargs="*", type=Path, default=[], help="finished LPT run directories")
    parser.add_argument("--compile", action="store_true",
                        help="also run each method with model.compile (label METHOD+compile)")
    parser.add_argument("--cores", default="0", help="the CPUs each cell is pinned to, e.g. 0 or 0,1 (one thread "
                                                    "per CPU)")
    parser.add_argument("--name", default="step_cost", help="study folder under benchmarks/results/")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(measure(json.loads(args.cell))))
        return
    cores = [int(c) for c in args.cores.split(",")]
    out = Path("benchmarks/results") / args.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    variants = {method: METHODS[method] for method in args.methods}
    if args.compile:
        variants |= {f"{method}+compile": {**METHODS[method], "model.compile": True} for method in args.methods}
    gemm_rates = [hygiene.gemm(cores)]
    results: dict[str, list[dict]] = {}
    shapes = {}
    for spec in args.backbones:
        backbone, _, shape = spec.partition(":")
        batch_size, seq_len = map(int, shape.split("x")) if shape else (args.batch_size, args.seq_len)
        shapes[backbone] = {"backbone": backbone_path(backbone, out), "backbone_name": backbone,
                            "batch_size": batch_size, "seq_len": seq_len, "steps": args.steps, "warmup": args.warmup}
        for repeat in range(args.repeats):
            for label, overrides in variants.items():
                cell = {"id": f"{backbone}-{label}-b{batch_size}-t{seq_len}-r{repeat}", "label": label,
                        "repeat": repeat, "overrides": overrides, **shapes[backbone]}
                results.setdefault(backbone, []).append(run_cell(out, cell, cores))
    sweep = []
    if args.sweep:
        first = shapes[next(iter(shapes))]
        for repeat in range(args.repeats):
            for k in range(1, results[first["backbone_name"]][0]["num_layers"]):
                cell = {"id": f"{first['backbone_name']}-lpt-k{k}-b{first['batch_size']}-t{first['seq_len']}-r{repeat}",
                        "label": f"lpt k={k}", "repeat": repeat, "overrides": {**METHODS["lpt"], "method.layer": k},
                        **first}
                sweep.append(run_cell(out, cell, cores))
        plot(out, sweep, accuracy_by_layer(args.sweep_accuracy))
    gemm_rates.append(hygiene.gemm(cores))
    gemm_rate = statistics.mean(gemm_rates)
    cells = [cell for rows in (*results.values(), sweep) for cell in rows]
    command = "python -m benchmarks.step_cost " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}",
             f"fp32, {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} interleaved repeats; "
             "ratios: median ± half-range over repeats; each cell one process pinned to CPUs "
             f"{args.cores}; GEMM fraction against the mean of the run's two GEMM rates.",
             hygiene.machine_note(gemm_rates, cells), ""]
    for backbone, rows in results.items():
        lines += [f"### {backbone}, batch {rows[0]['batch_size']} x {rows[0]['seq_len']} tokens", "",
                  *table(rows, args.methods[0], gemm_rate), ""]
    if sweep:
        lines += [f"### LPT insertion layer sweep on {sweep[0]['backbone_name']} (baseline k=1)", "",
                  *table(sweep, "lpt k=1", gemm_rate), ""]
        accuracy = accuracy_by_layer(args.sweep_accuracy)
        if accuracy:
            lines += ["| k | eval accuracy (mean ± sd) | runs |", "|---|---|---|"]
            lines += [f"| {k} | {statistics.mean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0:.1f} | {len(a)} |"
                      for k, a in accuracy.items()]
        lines += ["", "![sweep](step_cost_sweep.png)", ""]
    (out / "results.json").write_text(json.dumps({"gemm_flops_per_s": gemm_rates, "results": results,
                                                  "sweep": sweep}, indent=2))
    (out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
