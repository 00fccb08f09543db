"""Run `python -m ipt_ds ARGS` in this process and record its peak RSS (ru_maxrss) when it ends.

benchmarks/memory.py starts this module on every rank through the deepspeed launcher:
    deepspeed --num_gpus 2 --module benchmarks.peak_rss train CONFIG.yaml [--key=value ...]
Each rank writes {"rank": R, "peak_rss_bytes": N} to $IPT_DS_PEAK_RSS_DIR/rank<R>.json.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path


def main() -> None:
    from ipt_ds.cli import main as cli_main

    try:
        cli_main()
    finally:
        rank = int(os.environ.get("RANK", "0"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out = Path(os.environ["IPT_DS_PEAK_RSS_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "peak_rss_bytes": peak}))


if __name__ == "__main__":
    main()
