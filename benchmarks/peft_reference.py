"""Reference rows: the same methods trained with PEFT + HF Trainer on CB, side by side with ours.

    python -m benchmarks.peft_reference --methods prompt_tuning prefix ptuning full --seeds 1 2 3 [--epochs 3]

Each PEFT cell (method, seed) runs `benchmarks.peft_trainer` as its own process into
benchmarks/results/peft_reference/runs/peft-<method>-seed<seed>/; a cell whose results.json exists is skipped. Setup,
budget, head and selection come from the method's configs/cb/*_minilm.yaml (see peft_trainer.py for what differs).
Our rows are read from the accuracy study (benchmarks/results/accuracy/results.json, same epochs); a method that study
lacks is trained here with `ipt-ds train` under runs/ours/ (the accuracy study's cells, cached the same way).
Writes results.json, results.md (the combined table) and results.png in benchmarks/results/peft_reference/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks import accuracy

CONFIGS = {  # our name for the comparison -> the config both sides are set up from
    "prompt_tuning": Path("configs/cb/prompt_tuning_minilm.yaml"),
    "prefix": Path("configs/cb/prefix_minilm.yaml"),
    "ptuning": Path("configs/cb/ptuning_v1_minilm.yaml"),
    "ptuning_v2": Path("configs/cb/ptuning_v2_minilm.yaml"),
    "full": Path("configs/cb/full_minilm.yaml"),
}
PEFT_NAMES = {"prompt_tuning": "PromptTuningConfig (SAMPLE_VOCAB)", "prefix": "PrefixTuningConfig (projection)",
              "ptuning": "PromptEncoderConfig (LSTM)", "ptuning_v2": "PrefixTuningConfig (no projection)",
              "full": "no PEFT, plain fine-tuning"}
DIFFERENCES = {
    "prompt_tuning": "PEFT draws the initial tokens from the whole vocabulary, we from the 5,000 most frequent",
    "prefix": "PEFT's prefix embedding starts at N(0, 1), ours at N(0, 0.02²)",
    "ptuning": "PEFT prepends all 8 virtual tokens; our config splits them (4 before the input, 4 before the "
               "hypothesis)",
    "ptuning_v2": "PEFT has no dropout on the prefix (ours 0.1) and starts it at N(0, 1), ours at N(0, 0.02²)",
    "full": "",
}


def run_cell(out: Path, method: str, seed: int, epochs: int) -> dict:
    return accuracy.run_peft(out / "runs" / f"peft-{method}-seed{seed}",
                             {"config": str(CONFIGS[method]), "seed": seed, "epochs": epochs},
                             f"PEFT {method} seed {seed}")


def our_rows(out: Path, methods: list[str], seeds: list[int], epochs: int, study: Path) -> dict[str, dict]:
    """Our row per method: from the accuracy study where it has the config, else trained here (cached)."""
    known = {row["config"]: row for row in json.loads(study.read_text())} if study.exists() else {}
    rows = {}
    for method in methods:
        name = f"{CONFIGS[method].parent.name}/{CONFIGS[method].stem}"
        if name not in known:
            cells = [accuracy.run_cell(out / "ours", CONFIGS[method], seed, 1, [f"--train.epochs={epochs}"])
                     for seed in seeds]
            known[name] = accuracy.summarize({name: cells})[0]
        rows[method] = known[name]
    return rows


def summarize(results: list[dict]) -> dict:
    scores = [r["eval"]["acc"] for r in results]
    return {"mean": statistics.mean(scores), "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "scores": scores, "seeds": len(scores), "trainable": results[0]["parameters"]["trainable"],
            "majority": results[0]["eval_majority_acc"]}


def combined_table(ours: dict[str, dict], peft: dict[str, dict]) -> list[str]:
    """One line per method: our config's accuracy next to PEFT + Trainer's, and their difference."""
    lines = ["| method | ours (config) | trainable | acc mean ± sd | PEFT + HF Trainer | trainable | "
             "acc mean ± sd | PEFT − ours |", "|---|---|---|---|---|---|---|---|"]
    for method, theirs in peft.items():
        mine = ours[method]
        lines.append(f"| {method} | {mine['config']} | {mine['trainable']:,} | {mine['mean']:.1f} ± {mine['sd']:.1f} "
                     f"({mine['seeds']}) | {PEFT_NAMES[method]} | {theirs['trainable']:,} | "
                     f"{theirs['mean']:.1f} ± {theirs['sd']:.1f} ({theirs['seeds']}) | "
                     f"{theirs['mean'] - mine['mean']:+.1f} |")
    return lines


def write_report(out: Path, ours: dict[str, dict], peft: dict[str, dict], command: str) -> None:
    (out / "results.json").write_text(json.dumps({"ours": ours, "peft": peft}, indent=2))
    notes = [f"- {method}: {DIFFERENCES[method]}" for method in peft if DIFFERENCES[method]]
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "CB val accuracy, best of the per-epoch evaluations; mean ± sd (seeds). Majority class: "
             f"{next(iter(peft.values()))['majority']:.1f}.", "", *combined_table(ours, peft), "",
             "What differs besides the trainer:", *notes]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(peft)
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.6 * len(methods)))
    positions = range(len(methods))
    ax.barh([p + 0.2 for p in positions], [ours[m]["mean"] for m in methods], height=0.4,
            xerr=[ours[m]["sd"] for m in methods], label="ipt-ds (DeepSpeed)", color="tab:blue")
    ax.barh([p - 0.2 for p in positions], [peft[m]["mean"] for m in methods], height=0.4,
            xerr=[peft[m]["sd"] for m in methods], label="PEFT + HF Trainer", color="tab:orange")
    ax.axvline(next(iter(peft.values()))["majority"], color="black", linestyle="--", label="majority class")
    ax.set_yticks(list(positions), methods)
    ax.set_xlabel("CB val accuracy (mean ± sd over seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["prompt_tuning", "prefix", "ptuning", "full"],
                        choices=sorted(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--epochs", type=int, default=3, help="the accuracy study's --override=--train.epochs=3")
    parser.add_argument("--ours", type=Path, default=Path("benchmarks/results/accuracy/results.json"),
                        help="the accuracy study whose rows are ours")
    parser.add_argument("--name", default="peft_reference", help="study folder under benchmarks/results/")
    args = parser.parse_args()
    out = Path("benchmarks/results") / args.name
    out.mkdir(parents=True, exist_ok=True)
    peft = {m: summarize([run_cell(out, m, seed, args.epochs) for seed in args.seeds]) for m in args.methods}
    ours = our_rows(out, args.methods, args.seeds, args.epochs, args.ours)
    write_report(out, ours, peft, "python -m benchmarks.peft_reference " + " ".join(sys.argv[1:]))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
