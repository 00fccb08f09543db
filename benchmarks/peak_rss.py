"""Run `python -m ipt_ds ARGS` in this process and record its peak RSS (ru_maxrss) when it ends.

benchmarks/memory.py starts this module on every rank through the deepspeed launcher:
    deepspeed --num_gpus 2 --module benchmarks.peak_rss train CONFIG.yaml [--key=value ...]
Each rank writes {"rank": R, "peak_rss_bytes": N} to $IPT_DS_PEAK_RSS_DIR/rank<R>.json, on a GPU also
"peak_gpu_allocated_bytes" (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def main() -> None:
    from ipt_ds.cli import main as cli_main

    try:
        cli_main()
    finally:
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # KiB
        torch = sys.modules.get("torch")  # imported by the run; a run that failed before may not have got that far
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            record["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out = Path(os.environ["IPT_DS_PEAK_RSS_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
