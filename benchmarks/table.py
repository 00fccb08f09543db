"""Methods x tasks: one table from finished accuracy studies, a column per study and a row per config.

    python -m benchmarks.table --studies fewglue32_cb fewglue32_rte fewglue32_boolq [--name fewglue32]

Reads benchmarks/results/<study>/results.json (written by `benchmarks.accuracy`), so the cells are the studies' own
numbers: mean ± sd over their seeds on the split each study reports. The last column averages a row's means over the
studies it has all of; the last row is each study's baseline (one constant answer, in the study's metric). Writes
results.json, results.md and results.png under benchmarks/results/<name>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks/results")


def assemble(studies: dict[str, list[dict]]) -> dict:
    """{"columns": [...], "rows": [{"config", "method", "cells": {study: row or None}, "mean"}], "baseline": {...}}."""
    configs: dict[str, str] = {}
    for rows in studies.values():
        for row in rows:
            configs.setdefault(row["config"], row["method"])
    table_rows = []
    for config, method in configs.items():
        cells = {study: next((r for r in rows if r["config"] == config), None) for study, rows in studies.items()}
        complete = all(cells.values())
        table_rows.append({"config": config, "method": method, "cells": cells,
                           "mean": statistics.mean(c["mean"] for c in cells.values()) if complete else None})
    # Studies summarized before per-metric baselines hold "majority" (the majority class's accuracy).
    baseline = {study: rows[0].get("baseline", rows[0].get("majority")) for study, rows in studies.items()}
    return {"columns": list(studies), "rows": table_rows, "baseline": baseline}


def write_report(out: Path, table: dict, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(table, indent=2))
    columns = table["columns"]
    header = []
    for study in columns:
        first = next(r["cells"][study] for r in table["rows"] if r["cells"][study])
        header.append(f"{study}<br>{first['task']} {first['split']} {first['metric']}")
    lines = [f"Command: `{command}`", f"Date: {time.strftime('%Y-%m-%d')}", "",
             f"| config | {' | '.join(header)} | mean |", "|---" * (len(columns) + 2) + "|"]
    for row in table["rows"]:
        cells = [f"{c['mean']:.1f} ± {c['sd']:.1f}" if c else "-" for c in row["cells"].values()]
        mean = f"{row['mean']:.1f}" if row["mean"] is not None else "-"
        lines.append(f"| {row['config']} | {' | '.join(cells)} | {mean} |")
    known = [v for v in table["baseline"].values() if v is not None]
    baseline = ["-" if table["baseline"][study] is None else f"{table['baseline'][study]:.1f}" for study in columns]
    mean = f"{statistics.mean(known):.1f}" if len(known) == len(columns) else "-"
    lines.append(f"| baseline (one constant answer) | {' | '.join(baseline)} | {mean} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, width = table["rows"], 0.8 / len(table["rows"])
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours: a table has up to about that many rows
    fig, ax = plt.subplots(figsize=(1.6 * len(columns) + 3, 4.5))
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
        cells = [row["cells"][study] for study in columns]
        ax.bar(xs, [c["mean"] if c else 0.0 for c in cells], width, yerr=[c["sd"] if c else 0.0 for c in cells],
               label=row["config"], color=colors[i % len(colors)])
    for j, study in enumerate(columns):
        if table["baseline"][study] is not None:
            ax.plot([j - 0.45, j + 0.45], [table["baseline"][study]] * 2, color="black", linestyle="--")
    ax.set_xticks(range(len(columns)), columns, rotation=20)
    ax.set_ylabel("mean ± sd over seeds\n(dashed: one constant answer)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(out / "results.png", dpi=120, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", nargs="+", required=True, help="study folders under benchmarks/results/")
    parser.add_argument("--name", default="table", help="output folder under benchmarks/results/")
    args = parser.parse_args()
    studies = {}
    for study in args.studies:
        path = RESULTS / study / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file; run `python -m benchmarks.accuracy --name {study} ...` first")
        studies[study] = json.loads(path.read_text())
    out = RESULTS / args.name
    write_report(out, assemble(studies), "python -m benchmarks.table " + " ".join(sys.argv[1:]))
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
