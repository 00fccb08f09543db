"""The speed study: every method, ours against PEFT + HF Trainer, with the first epoch and the later ones apart.

    python -m benchmarks.speed [--backbones minilm smollm2] [--methods prompt_tuning ... full] [--epochs 3]
        [--repeats 1] [--cores 0] [--name speed]

Backbones and data, as in the accuracy tables: `minilm` trains on SuperGLUE CB (250 examples, batch 16, the
configs/cb/*_minilm.yaml), `smollm2` on LM-BFF SST-2 16-shot (32 examples, batch 8, configs/sst2/*_smollm2.yaml,
label words). LPT and the linear probe run with `train.frozen_cache: true`; the linear probe on SmolLM2 is the full
fine-tuning config with method linear_probe, a linear head and no dropout. Arms, each one process
(benchmarks/hygiene.py: pinned to --cores, one thread per core, with the load it ran under):
- `ours`: `ipt-ds train` on 1 rank (DeepSpeed, the config's ZeRO-2 JSON) for --epochs epochs, logging once per epoch;
- `peft`: `benchmarks.peft_trainer` fed exactly our batches in our order (it isolates the trainers);
- `peft_default`: the same with the Trainer's default random batches, as its users run it;
where PEFT has the method (prompt tuning, P-tuning, prefix tuning, P-tuning v2; full fine-tuning with a linear head);
- `kernel`: the step kernel alone on our batches: the same model, batches, gradient clipping and fused AdamW in a
  bare loop (forward, backward, clip, step), no DeepSpeed, no logging; with the cache, its states computed once in
  epoch 1 (for the train split only: ours also caches the evaluation splits there).
  ours / kernel is the share of the end-to-end time that is the model's own compute.
Each run is split into its first epoch (for ours with the cache: plus the pass that computes it) and the later ones;
every row is (backbone, method, arm, phase) with samples/s, the process's peak RSS (ru_maxrss: loading and the final
evaluation included), useful FLOP/s and their fraction of the fp32 GEMM rate measured at the start and end of the
same run. Useful FLOPs per sample: `step_cost.useful_flops` of the method on each training example's own tokens
(no padding), averaged; in the later epochs of a cached method the layers below its first trained layer are not
counted, as they do not run. No evaluation before the last step. Cells run interleaved (the arms of a method in
turn, reversed in every other repeat); finished cells (runs/<id>.json) are reused.
Writes benchmarks/results/<name>/{results.json, results.md, results.png}.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from benchmarks import hygiene
from benchmarks.accuracy import parse_overrides
from benchmarks.step_cost import useful_flops

CACHED = ["--train.frozen_cache=true"]
NO_TEST = ["--data.test_split="]
STUDIES = {  # backbone -> method -> (config, overrides)
    "minilm": {
        "prompt_tuning": ("configs/cb/prompt_tuning_minilm.yaml", []),
        "ptuning_v1": ("configs/cb/ptuning_v1_minilm.yaml", []),
        "prefix": ("configs/cb/prefix_minilm.yaml", []),
        "ptuning_v2": ("configs/cb/ptuning_v2_minilm.yaml", []),
        "ipt": ("configs/cb/ipt_cnn_minilm.yaml", []),
        "lpt": ("configs/cb/lpt_minilm.yaml", CACHED),
        "linear_probe": ("configs/cb/linear_probe_minilm.yaml", CACHED),
        "full": ("configs/cb/full_minilm.yaml", []),
    },
    "smollm2": {  # the test split (872 examples) is left out: the runs evaluate once, on dev, after the last step
        "prompt_tuning": ("configs/sst2/prompt_tuning_smollm2.yaml", NO_TEST),
        "ptuning_v1": ("configs/sst2/ptuning_v1_smollm2.yaml", NO_TEST),
        "prefix": ("configs/sst2/prefix_smollm2.yaml", NO_TEST),
        "ptuning_v2": ("configs/sst2/ptuning_v2_smollm2.yaml", NO_TEST),
        "ipt": ("configs/sst2/ipt_cnn_residual_smollm2.yaml", NO_TEST),
        "lpt": ("configs/sst2/lpt_smollm2.yaml", [*NO_TEST, *CACHED]),
        "linear_probe": ("configs/sst2/full_smollm2.yaml", ["--method.name=linear_probe", "--model.dropout=false",
                                                            "--head.type=linear", "--optim.lr=1e-3", *NO_TEST,
                                                            *CACHED]),
        "full": ("configs/sst2/full_smollm2.yaml", NO_TEST),
    },
}
ARMS = ("ours", "kernel", "peft", "peft_default")


def built(config: str, overrides: list[str]):
    """(config, model, pad id, encoded training examples) of a cell, built in this process as `ipt-ds train` does."""
    import torch

    from ipt_ds.config import load_config
    from ipt_ds.data.pipeline import load_task_splits
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    cfg = load_config(Path(config), parse_overrides(overrides))
    torch.manual_seed(cfg.run.seed)
    _, train, _, _ = load_task_splits(cfg.data, cfg.run.seed)
    model, encoder = build_model(cfg, get_task(cfg.data.task), dtype=torch.float32, ds_config=None)
    return cfg, model, encoder.tokenizer.pad_token_id, [encoder(e) for e in train]


def workload(config: str, overrides: list[str]) -> dict:
    """What the arms share: the train split's size, our steps per epoch, and the useful FLOPs per sample with and
    without the frozen layers (the model built in this process, on the real training examples)."""
    from benchmarks.peft_trainer import has_counterpart
    from ipt_ds.data.pipeline import global_train_batches

    cfg, model, _, features = built(config, overrides)
    lengths = [len(f["input_ids"]) for f in features]
    per_sample = {cached: statistics.mean(useful_flops(model, batch_size=1, seq_len=n, cached=cached)
                                          for n in lengths) for cached in (False, True)}
    return {"examples": len(features), "batch_size": cfg.train.batch_size, "flops_per_sample": per_sample[False],
            "flops_per_sample_cached": per_sample[True], "cached": cfg.train.frozen_cache,
            "steps_per_epoch": len(global_train_batches(lengths, batch_size=cfg.train.batch_size, seed=cfg.run.seed)),
            "peft": has_counterpart(cfg), "trainable": model.parameter_report()["trainable"]}


def measure(out: Path, cell: dict, work: dict, cores: list[int]) -> dict:
    """One arm's run; its epochs as (samples, seconds) windows."""
    run = out / "runs" / cell["id"]
    epochs, batch = cell["epochs"], work["batch_size"]
    if cell["arm"] == "kernel":
        cmd = [sys.executable, "-m", "benchmarks.speed", "--kernel", json.dumps(cell)]
    elif cell["arm"] == "ours":
        per_epoch = work["steps_per_epoch"]
        cmd = [sys.executable, "-m", "ipt_ds", "train", cell["config"], "--run.seed=1", f"--run.output_dir={run}",
               "--run.overwrite=true", f"--train.epochs={epochs}", "--train.eval_every=1000000",
               f"--run.log_every={per_epoch}", *cell["overrides"]]
    else:
        per_epoch = -(-work["examples"] // batch)
        spec = {"config": cell["config"], "seed": 1, "output_dir": str(run),
                "overrides": parse_overrides(cell["overrides"]),
                "speed": {"steps": epochs * per_epoch, "window": per_epoch,
                          "batches": "ours" if cell["arm"] == "peft" else "default"}}
        cmd = [sys.executable, "-m", "benchmarks.peft_trainer", json.dumps(spec)]
    done = hygiene.run_watched(cmd, cores=cores, log=out / "runs" / f"{cell['id']}.log")
    if done["returncode"] != 0:
        raise SystemExit(f"{cell['id']} failed (exit {done['returncode']}); see {out / 'runs' / cell['id']}.log")
    if cell["arm"] == "ours":
        rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        rates = [r["train/samples_per_s"] for r in rows if "train/samples_per_s" in r]
        # The loop counts a full batch per step; an epoch holds the split's examples once.
        windows = [{"samples": work["examples"], "seconds": batch * per_epoch / rate} for rate in rates]
        precompute = re.search(r"frozen-state cache: .* computed in ([\d.]+) s",
                               (out / "runs" / f"{cell['id']}.log").read_text())
        if precompute:
            windows[0]["seconds"] += float(precompute.group(1))
    else:  # the kernel and PEFT print theirs
        windows = json.loads(done["stdout"].strip().splitlines()[-1])["windows"]
    return {**cell, **hygiene.machine(done), "peak_rss_mib": done["peak_rss_mib"], "windows": windows,
            "wall_s": done["wall_s"]}


def kernel(cell: dict) -> dict:
    """The `kernel` arm, in this process: our model on our batches, timed per epoch."""
    import torch

    from ipt_ds.data.encode import collate
    from ipt_ds.data.pipeline import global_train_batches
    from ipt_ds.engine import build_optimizer

    cfg, model, pad_id, features = built(cell["config"], [*cell["overrides"], "--run.seed=1"])
    lengths = [len(f["input_ids"]) for f in features]
    optimizer, _ = build_optimizer(model, cfg, total_steps=1)
    windows = []
    for epoch in range(cell["epochs"]):
        begin = time.perf_counter()
        if cfg.train.frozen_cache and epoch == 0:
            model.eval()
            with torch.no_grad(), model.computing_frozen_states():
                order = sorted(range(len(features)), key=lengths.__getitem__)  # every example, by length
                for start in range(0, len(order), cfg.train.eval_batch_size):
                    indices = order[start : start + cfg.train.eval_batch_size]
                    states, _ = model(collate([features[i] for i in indices], pad_id))
                    for row, i in enumerate(indices):
                        features[i]["frozen_states"] = states[row, : lengths[i]].clone()
        model.train()
        for indices in global_train_batches(lengths, batch_size=cfg.train.batch_size, seed=cfg.run.seed + epoch):
            _, loss = model(collate([features[i] for i in indices], pad_id))
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        windows.append({"samples": len(features), "seconds": time.perf_counter() - begin})
    return {"windows": windows}


def run_cell(out: Path, cell: dict, work: dict, cores: list[int]) -> dict:
    path = out / "runs" / f"{cell['id']}.json"
    if not path.exists():
        path.write_text(json.dumps(measure(out, cell, work, cores)))
        print(f"{cell['id']}: done", flush=True)
    return json.loads(path.read_text())


def phase_rows(cell: dict, work: dict, gemm_rate: float) -> list[dict]:
    """(first, later) rows of one cell."""
    rows = []
    for phase, windows in (("first", cell["windows"][:1]), ("later", cell["windows"][1:])):
        rate = sum(w["samples"] for w in windows) / sum(w["seconds"] for w in windows)
        cached = work["cached"] and cell["arm"] in ("ours", "kernel") and phase == "later"
        flops = rate * work["flops_per_sample_cached" if cached else "flops_per_sample"]
        rows.append({key: cell[key] for key in ("backbone", "method", "arm", "repeat", "peak_rss_mib",
                                                 "load_average", "runnable_threads", "oversubscribed")}
                    | {"phase": phase, "samples_per_s": rate, "useful_flops_per_s": flops,
                       "fraction_of_gemm": flops / gemm_rate})
    return rows


def median(rows: list[dict], key: str, **match) -> float | None:
    values = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
    return statistics.median(values) if values else None


def report(rows: list[dict], works: dict) -> tuple[list[str], list[str]]:
    """The table per backbone and the targets of the speed issue, each met or not with its figure."""
    lines, targets = [], []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone]
        lines += [f"### {backbone}", "", "| method | arm | samples/s, epoch 1 | samples/s, later | ours / arm, later | "
                  "peak RSS (MiB) | ours / arm, RSS | useful GFLOP/s, later | of GEMM |", "|---" * 9 + "|"]
        for method in dict.fromkeys(r["method"] for r in mine):
            ours_rate = median(mine, "samples_per_s", method=method, arm="ours", phase="later")
            ours_rss = median(mine, "peak_rss_mib", method=method, arm="ours", phase="later")
            for arm in ARMS:
                later = [r for r in mine if r["method"] == method and r["arm"] == arm and r["phase"] == "later"]
                if not later:
                    continue
                busy = "*" if any(r["oversubscribed"] for r in later) else ""
                rate, rss = median(later, "samples_per_s"), median(later, "peak_rss_mib")
                mine_too = arm != "ours" and ours_rate is not None  # a ratio where the study ran ours as well
                ratio = f"{ours_rate / rate:.2f}" if mine_too else ""
                rss_ratio = f"{ours_rss / rss:.2f}" if mine_too else ""
                lines.append(f"| {method}{busy} | {arm} | "
                             f"{median(mine, 'samples_per_s', method=method, arm=arm, phase='first'):.2f} | "
                             f"{rate:.2f} | {ratio} | {rss:,.0f} | {rss_ratio} | "
                             f"{median(later, 'useful_flops_per_s') / 1e9:.1f} | "
                             f"{median(later, 'fraction_of_gemm'):.2f} |")
            for arm, goal in (("peft", 1.0), ("peft_default", 1.25)):  # where the study ran those arms
                theirs = median(mine, "samples_per_s", method=method, arm=arm, phase="later")
                if theirs and ours_rate:
                    targets.append(target(f"{backbone} {method}: samples/s ≥ {goal}x {arm}", ours_rate / theirs, goal))
            theirs = median(mine, "peak_rss_mib", method=method, arm="peft", phase="later")
            if theirs and ours_rss:
                targets.append(target(f"{backbone} {method}: peak RSS ≤ 1.0x PEFT on our batches", ours_rss / theirs,
                                      1.0, below=True))
        later = {m: median(mine, "samples_per_s", method=m, arm="ours", phase="later") for m in works[backbone]}
        for method in works[backbone]:
            bare = median(mine, "samples_per_s", method=method, arm="kernel", phase="later")
            if bare and later[method]:
                targets.append(target(f"{backbone} {method}: samples/s ≥ 0.9x the step kernel's", later[method] / bare,
                                      0.9))
        peak = {m: median(mine, "peak_rss_mib", method=m, arm="ours", phase="later") for m in works[backbone]}
        if later.get("lpt") and later.get("ptuning_v2"):
            targets.append(target(f"{backbone} LPT from epoch 2: samples/s ≥ 2x P-tuning v2",
                                  later["lpt"] / later["ptuning_v2"], 2.0))
            targets.append(target(f"{backbone} LPT: peak RSS ≤ 0.7x P-tuning v2", peak["lpt"] / peak["ptuning_v2"],
                                  0.7, below=True))
        if later.get("linear_probe") and later.get("full"):
            targets.append(target(f"{backbone} linear probe from epoch 2: samples/s ≥ 10x full fine-tuning",
                                  later["linear_probe"] / later["full"], 10.0))
        if backbone == "minilm":
            for method in ("prompt_tuning", "full"):
                fraction = median(mine, "fraction_of_gemm", method=method, arm="ours", phase="later")
                if fraction is not None:
                    targets.append(target(f"minilm {method}: useful FLOP/s ≥ 0.70 of the GEMM rate", fraction, 0.7))
        lines.append("")
    return lines, targets


def target(name: str, value: float, goal: float, below: bool = False) -> str:
    met = value <= goal if below else value >= goal
    return f"| {name} | {value:.2f} | {'met' if met else 'not met'} |"


def plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(backbones), figsize=(6 * len(backbones), 4.5), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        mine = [r for r in rows if r["backbone"] == backbone and r["phase"] == "later"]
        methods = list(dict.fromkeys(r["method"] for r in mine))
        for offset, arm, color in ((-0.3, "ours", "tab:green"), (-0.1, "kernel", "tab:gray"),
                                   (0.1, "peft", "tab:blue"), (0.3, "peft_default", "tab:orange")):
            values = [median(mine, "samples_per_s", method=m, arm=arm) or 0 for m in methods]
            ax.barh([i + offset for i in range(len(methods))], values, height=0.2, color=color, label=arm)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_xscale("log")
        ax.set_xlabel("training samples/s from epoch 2 (log scale)")
        ax.set_title(backbone)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--methods", nargs="+", default=list(STUDIES["minilm"]), choices=list(STUDIES["minilm"]))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (at least 2)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cores", default="0", help="the CPUs each cell is pinned to, e.g. 0 or 0,1")
    parser.add_argument("--name", default="speed", help="study folder under benchmarks/results/")
    parser.add_argument("--kernel", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel:
        print(json.dumps(kernel(json.loads(args.kernel))))
        return
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the later epochs are reported apart from the first")
    cores = [int(c) for c in args.cores.split(",")]
    out = Path("benchmarks/results") / args.name
    (out / "runs").mkdir(parents=True, exist_ok=True)
    gemm_rates = [hygiene.gemm(cores)]
    works = {b: {m: workload(*STUDIES[b][m]) for m in args.methods} for b in args.backbones}
    cells = []
    for repeat in range(args.repeats):
        for backbone in args.backbones:
            for method in args.methods:
                config, overrides = STUDIES[backbone][method]
                arms = [a for a in args.arms if not a.startswith("peft") or works[backbone][method]["peft"]]
                for arm in arms if repeat % 2 == 0 else arms[::-1]:
                    cell = {"id": f"{backbone}-{method}-{arm}-e{args.epochs}-r{repeat}", "backbone": backbone,
                            "method": method, "arm": arm, "repeat": repeat, "epochs": args.epochs,
                            "config": config, "overrides": overrides}
                    cells.append(run_cell(out, cell, works[backbone][method], cores))
    gemm_rates.append(hygiene.gemm(cores))
    gemm_rate = statistics.mean(gemm_rates)
    rows = [row for cell in cells for row in phase_rows(cell, works[cell["backbone"]][cell["method"]], gemm_rate)]
    table, targets = report(rows, works)
    command = "python -m benchmarks.speed " + " ".join(sys.argv[1:])
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}",
             f"fp32, 1 process per run pinned to CPUs {args.cores}, {args.epochs} epochs, {args.repeats} repeat(s); "
             "epoch 1 of a cached method includes its precompute pass; useful FLOP/s against the mean of the run's "
             "two GEMM rates; ratios ours / arm from epoch 2.", hygiene.machine_note(gemm_rates, cells), "",
             *table, "### Targets", "", "| target | figure | |", "|---|---|---|", *targets, "",
             "![speed](results.png)", ""]
    (out / "results.json").write_text(json.dumps({"gemm_flops_per_s": gemm_rates, "workloads": works,
                                                  "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(lines))
    plot(out, rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
