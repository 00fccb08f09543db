"""Accuracy study: shipped configs x seeds on real data, mean and spread per config; resumable.

    python -m benchmarks.accuracy --configs configs/cb/*_minilm.yaml --seeds 1 2 3 [--num-ranks 1]
        [--override=--train.epochs=3] [--data-seeds 13 21 42] [--name accuracy]

Every cell (config, seed) trains with `ipt-ds train` into benchmarks/results/<name>/runs/<config>-seed<seed>; a cell
whose results.json exists is skipped, so an interrupted study continues where it stopped. Protocol: the config's eval
split selects the checkpoint (best evaluation); with a labelled test split (LM-BFF k-shot: dev selects, test reports)
the test split is reported, otherwise the eval split is, as in the IPT and P-tuning v2 reference runs. The number to
beat is the baseline of the reported split in the reported metric: the best score of one answer given to every example
(the majority class for accuracy, always-positive for F1; 0 for the correlations of regression tasks).
`--data-seeds` pairs each seed with an LM-BFF data seed (`data.lmbff_seed`: which k-shot sample trains), so that
seeds vary the data as LM-BFF's protocol does. `--zero-shot CONFIG` adds a row `zero-shot`: CONFIG's backbone, template
and label words scoring the same splits with nothing trained (a verbalizer head; one cell, the data seeds change no
dev or test file).
`--peft` adds, after each config that PEFT + HF Trainer can reproduce (prompt tuning, prefix tuning, P-tuning v1 and
v2; full fine-tuning with a linear head), a row `peft/<config>`: the same cells run by `benchmarks.peft_trainer` (same
seeds, data seeds and overrides) into runs/peft-<config>-seed<seed>, resumable the same way; `--peft CONFIG ...`
adds those rows for the configs named only.
Writes results.json, results.md and results.png in the study folder.
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


def cell_name(config: Path, seed: int, data_seed: int) -> str:
    return f"{config.parent.name}-{config.stem}-seed{seed}{f'-data{data_seed}' if data_seed else ''}"


def parse_overrides(overrides: list[str]) -> dict:
    """`--section.key=value` flags as the {key: value} overrides of `load_config`."""
    return dict(flag.removeprefix("--").split("=", 1) for flag in overrides)


def run_cell(out: Path, config: Path, seed: int, num_ranks: int, overrides: list[str], data_seed: int = 0) -> dict:
    run = out / "runs" / cell_name(config, seed, data_seed)
    if data_seed:
        overrides = [*overrides, f"--data.lmbff_seed={data_seed}"]
    if not (run / "results.json").exists():
        args = ["train", str(config), f"--run.seed={seed}", f"--run.output_dir={run}", "--run.overwrite=true",
                *overrides]
        if num_ranks == 1:
            cmd = [sys.executable, "-m", "ipt_ds", *args]
        else:
            cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks), "--module", "ipt_ds",
                   *args]
        start = time.perf_counter()
        result = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{config} seed {seed} failed:\n{result.stderr[-2000:]}")
        print(f"{config} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((run / "results.json").read_text())


def run_peft(run: Path, cell: dict, what: str) -> dict:
    """`benchmarks.peft_trainer` on `cell` in its own process, its result saved as run/results.json; a run whose
    results.json exists is read, not trained again."""
    if not (run / "results.json").exists():
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "benchmarks.peft_trainer",
                                 json.dumps({**cell, "output_dir": str(run / "trainer")})],
                                env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{what} failed:\n{result.stderr[-3000:]}")
        run.mkdir(parents=True, exist_ok=True)
        (run / "results.json").write_text(result.stdout.strip().splitlines()[-1])
        print(f"{what}: {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((run / "results.json").read_text())


def run_peft_cell(out: Path, config: Path, seed: int, overrides: list[str], data_seed: int = 0) -> dict:
    """The PEFT + HF Trainer counterpart of `run_cell`: the same config, seed, data seed and `--section.key=value`
    overrides, into runs/peft-<config>-seed<seed>[-data<data seed>]."""
    cell = {"config": str(config), "seed": seed, "data_seed": data_seed,
            "overrides": parse_overrides(overrides)}
    return run_peft(out / "runs" / f"peft-{cell_name(config, seed, data_seed)}", cell, f"PEFT {config} seed {seed}")


def zero_shot_cell(out: Path, config: Path, overrides: list[str]) -> dict:
    """Score the eval and test splits of `config` with the frozen backbone and its verbalizer head (method
    linear_probe: no prompt; nothing trains), in this process, as a one-rank process group; the results.json of a
    trained cell."""
    run = out / "runs" / f"{config.parent.name}-zero-shot"
    if (run / "results.json").exists():
        return json.loads((run / "results.json").read_text())
    import socket

    import torch

    from ipt_ds.config import config_from_dict
    from ipt_ds.confload import read_yaml
    from ipt_ds.data.pipeline import load_task_splits
    from ipt_ds.metrics import constant_baseline, record_split
    from ipt_ds.model import build_model
    from ipt_ds.recipes.text import evaluate

    start = time.perf_counter()
    sections = {**read_yaml(config.read_text()), "method": {"name": "linear_probe"}}
    cfg = config_from_dict(sections, parse_overrides(overrides), source=str(config))
    if cfg.head.type != "verbalizer":
        raise SystemExit(f"--zero-shot {config}: head.type is {cfg.head.type!r}; a zero-shot row needs the verbalizer")
    task, _, eval_examples, test_examples = load_task_splits(cfg.data, cfg.run.seed)
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    results = {"task": task.name, "method": "zero-shot", "parameters": {"trainable": 0}}
    for split, examples in (("eval", eval_examples), ("test", test_examples)):
        if examples:
            scores = evaluate(model, encoder, task, examples, cfg.train.eval_batch_size)
            record_split(results, split, scores, constant_baseline(task.metrics, [e.label for e in examples],
                                                                   regression=task.is_regression,
                                                                   groups=[e.group for e in examples]))
    torch.distributed.destroy_process_group()
    run.mkdir(parents=True, exist_ok=True)
    (run / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{config} zero-shot: {time.perf_counter() - start:.0f} s", flush=True)
    return results


def baseline_of(result: dict, split: str, metric: str) -> float | None:
    """The split's baseline in `metric` from a run's results.json; runs written before baselines were recorded per
    metric only have the majority class's accuracy, which is no baseline for any other metric."""
    baseline = result.get(f"{split}_baseline", {}).get(metric)
    if baseline is None and metric == "acc":
        baseline = result.get(f"{split}_majority_acc")
    return baseline


def summarize(cells: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, results in cells.items():
        split = "test" if "test" in results[0] else "eval"  # with a test split, eval only selected the checkpoint
        metric = next(iter(results[0][split]))
        scores = [r[split][metric] for r in results]
        rows.append({"config": name, "task": results[0]["task"], "method": results[0]["method"], "split": split,
                     "metric": metric, "mean": statistics.mean(scores),
                     "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0, "seeds": len(scores),
                     "scores": scores, "baseline": baseline_of(results[0], split, metric),
                     "trainable": results[0]["parameters"]["trainable"]})
    return rows


def write_report(out: Path, rows: list[dict], command: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| config | task | method | trainable params | split | metric | mean ± sd | seeds | baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        baseline = "-" if r["baseline"] is None else f"{r['baseline']:.1f}"
        lines.append(f"| {r['config']} | {r['task']} | {r['method']} | {r['trainable']:,} | {r['split']} | "
                     f"{r['metric']} | {r['mean']:.1f} ± {r['sd']:.1f} | {r['seeds']} | {baseline} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * len(rows)))
    ax.barh([r["config"] for r in rows], [r["mean"] for r in rows], xerr=[r["sd"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        if r["baseline"] is not None:
            ax.plot([r["baseline"]] * 2, [i - 0.4, i + 0.4], color="black", linestyle="--")
    ax.set_xlabel("reported metric (mean ± sd over seeds); dashed: one constant answer's score")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def has_peft_counterpart(config: Path) -> bool:
    from benchmarks.peft_trainer import has_counterpart
    from ipt_ds.config import load_config

    return has_counterpart(load_config(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", type=Path, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--data-seeds", nargs="+", type=int, default=[],
                        help="LM-BFF data seeds, one per --seeds entry")
    parser.add_argument("--num-ranks", type=int, default=1)
    parser.add_argument("--override", nargs="*", action="extend", default=[],
                        help="--section.key=value flags for every cell (repeatable)")
    parser.add_argument("--name", default="accuracy", help="study folder under benchmarks/results/")
    parser.add_argument("--peft", nargs="*", type=Path, metavar="CONFIG",
                        help="also run each config's PEFT + HF Trainer counterpart (rows peft/<config>); with CONFIGs, "
                             "only theirs")
    parser.add_argument("--zero-shot", type=Path, metavar="CONFIG",
                        help="add a zero-shot row: CONFIG's backbone, template and label words, nothing trained")
    args = parser.parse_args()
    if args.data_seeds and len(args.data_seeds) != len(args.seeds):
        parser.error(f"--data-seeds needs one value per seed ({len(args.seeds)}), got {len(args.data_seeds)}")
    bad = [flag for flag in args.override if not (flag.startswith("--") and "=" in flag)]
    if bad:
        parser.error(f"--override {bad[0]}: give flags as --section.key=value")
    out = Path("benchmarks/results") / args.name
    out.mkdir(parents=True, exist_ok=True)
    data_seeds = args.data_seeds or [0] * len(args.seeds)
    cells = {"zero-shot": [zero_shot_cell(out, args.zero_shot, args.override)]} if args.zero_shot else {}
    for c in args.configs:
        cells[f"{c.parent.name}/{c.stem}"] = [run_cell(out, c, seed, args.num_ranks, args.override, data_seed)
                                              for seed, data_seed in zip(args.seeds, data_seeds)]
        if args.peft is not None and (not args.peft or c in args.peft) and has_peft_counterpart(c):
            cells[f"peft/{c.parent.name}/{c.stem}"] = [run_peft_cell(out, c, seed, args.override, data_seed)
                                                       for seed, data_seed in zip(args.seeds, data_seeds)]
    write_report(out, summarize(cells), "python -m benchmarks.accuracy " + " ".join(sys.argv[1:]))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
