"""E2E NLG study: prompt methods on a decoder against the frozen model's zero-shot output, BLEU and ROUGE-L on the
E2E test set; resumable.

    python -m benchmarks.e2e [--configs configs/e2e/*.yaml] [--seeds 1] [--override=--train.max_steps=120]
        [--name e2e]

Each (config, seed) cell trains with `ipt-ds train` (dev BLEU selects the checkpoint, the test split is scored at the
end); the zero-shot cell decodes the test split with the frozen backbone, the same template and the same decoding
settings as the first config (no prompt, nothing trained). A cell whose results.json exists is skipped. Writes
results.json, results.md and results.png under benchmarks/results/<name>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.accuracy import parse_overrides, run_cell

METRICS = ("bleu", "rouge_l")


def zero_shot_cell(out: Path, config: Path, overrides: list[str]) -> dict:
    """Decode the eval and test splits with the frozen backbone (method linear_probe: no prompt, nothing trained)."""
    run = out / "runs" / "zero-shot"
    if (run / "results.json").exists():
        return json.loads((run / "results.json").read_text())
    import torch

    from ipt_ds.config import config_from_dict
    from ipt_ds.confload import read_yaml
    from ipt_ds.data.generation import collate_left, load_generation_split
    from ipt_ds.data.tasks import get_task
    from ipt_ds.metrics import generation_metrics
    from ipt_ds.model import build_model
    from ipt_ds.recipes.generation import generate, write_generations

    start = time.perf_counter()
    sections = {**read_yaml(config.read_text()), "method": {"name": "linear_probe"}}
    cfg = config_from_dict(sections, parse_overrides(overrides), source=str(config))
    task = get_task(cfg.data.task)
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    model.eval()
    results = {"task": task.name, "method": "zero-shot", "parameters": model.parameter_report()}
    run.mkdir(parents=True, exist_ok=True)
    for key, split in (("eval", cfg.data.eval_split), ("test", cfg.data.test_split)):
        limit = cfg.generation.test_limit if key == "test" else 0
        examples = load_generation_split(cfg.data, split)[: limit or None]
        texts = []
        for i in range(0, len(examples), cfg.train.eval_batch_size):
            chunk = [encoder(e) for e in examples[i : i + cfg.train.eval_batch_size]]
            ids = generate(model, collate_left(chunk, encoder.tokenizer.pad_token_id), cfg.generation,
                           encoder.tokenizer)
            texts += [encoder.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
        results[key] = generation_metrics(task.metrics, predictions=texts, references=[e.references for e in examples])
        write_generations(run / f"generations_{split}.jsonl", examples, texts)
    (run / "results.json").write_text(json.dumps(results, indent=2))
    print(f"zero-shot: {time.perf_counter() - start:.0f} s", flush=True)
    return results


def summarize(cells: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, results in cells.items():
        row = {"config": name, "method": results[0]["method"], "seeds": len(results),
               "trainable": results[0]["parameters"]["trainable"]}
        for split in ("eval", "test"):
            for metric in METRICS:
                scores = [r[split][metric] for r in results]
                row[f"{split}_{metric}"] = {"mean": statistics.mean(scores), "scores": scores,
                                            "sd": statistics.stdev(scores) if len(scores) > 1 else 0.0}
        rows.append(row)
    return rows


def write_report(out: Path, rows: list[dict], command: str) -> None:
    (out / "results.json").write_text(json.dumps(rows, indent=2))

    def cell(stat: dict) -> str:
        return f"{stat['mean']:.1f} ± {stat['sd']:.1f}"

    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             "| config | method | trainable params | test BLEU | test ROUGE-L | dev BLEU | dev ROUGE-L | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['method']} | {r['trainable']:,} | {cell(r['test_bleu'])} | "
                     f"{cell(r['test_rouge_l'])} | {cell(r['eval_bleu'])} | {cell(r['eval_rouge_l'])} | {r['seeds']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.6 * len(rows)))
    positions = range(len(rows))
    for offset, metric, color in ((-0.2, "bleu", "tab:blue"), (0.2, "rouge_l", "tab:orange")):
        ax.barh([p + offset for p in positions], [r[f"test_{metric}"]["mean"] for r in rows], height=0.4,
                xerr=[r[f"test_{metric}"]["sd"] for r in rows], color=color, label=f"test {metric}")
    ax.set_yticks(list(positions), [r["config"] for r in rows])
    ax.set_xlabel("E2E test score (mean ± sd over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, default=sorted(Path("configs/e2e").glob("*.yaml")))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--override", action="append", default=[], help="flag passed to every run, e.g. "
                        "--override=--train.max_steps=120 (repeatable)")
    parser.add_argument("--name", default="e2e")
    args = parser.parse_args(argv)
    out = Path("benchmarks/results") / args.name
    out.mkdir(parents=True, exist_ok=True)
    cells = {"zero-shot": [zero_shot_cell(out, args.configs[0], args.override)]}
    for config in args.configs:
        name = f"{config.parent.name}/{config.stem}"
        cells[name] = [run_cell(out, config, seed, 1, args.override) for seed in args.seeds]
    write_report(out, summarize(cells), "python -m benchmarks.e2e " + " ".join(sys.argv[1:]))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
