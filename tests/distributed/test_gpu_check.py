"""The GPU check's CPU dry run: the same three real training processes (IPT, LPT, prefix tuning under ZeRO-3) on a
tiny LLaMA shape in fp32. Only the device differs from `python -m benchmarks.gpu_check` on a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from benchmarks import gpu_check, scale
from tests.conftest import REPO


def test_useful_flops_count_every_layer_for_input_prompts_and_only_the_forward_below_lpt_layer():
    hidden, _, layers, *_ = scale.SHAPES["1b"]
    tokens, prompt = 256, gpu_check.PROMPT
    ipt = gpu_check.useful_flops("1b", "ipt", sequences=4, tokens=tokens)
    assert ipt == scale.step_flops("1b", sequences=4, positions=tokens + prompt)  # the formula scale.py measures with
    assert gpu_check.useful_flops("1b", "prefix", sequences=4, tokens=tokens) == \
        scale.step_flops("1b", sequences=4, positions=tokens)
    per_layer = scale.matmul_params("1b") / layers
    below = layers // 2 * (2 * per_layer * tokens + 4 * tokens**2 * hidden)  # forward only, no prompt yet
    above = (layers - layers // 2) * (4 * per_layer * (tokens + prompt) + 12 * (tokens + prompt) ** 2 * hidden)
    assert gpu_check.useful_flops("1b", "lpt", sequences=4, tokens=tokens) == 4 * (below + above)


def test_dry_run_trains_ipt_lpt_and_prefix_under_zero3_and_reports_each_against_the_gemm(tmp_path):
    out = tmp_path / "check"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--steps", "2",
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"] | {"device": "cpu", "shape": "tiny", "dtype": "fp32"} == report["settings"]
    assert [r["method"] for r in report["rows"]] == ["ipt", "lpt", "prefix"]
    for row in report["rows"]:
        assert row["status"] == "ok", row
        assert len(row["losses"]) == 3 and all(math.isfinite(x) for x in row["losses"])
        assert row["step_s"] > 0 and 0 < row["fraction_of_gemm"] < 1.5, row
        assert row["peak_rss_bytes"] > 0 and "mfu" not in row  # no GPU: no peak to divide by
    ds = json.loads((out / "runs" / "lpt" / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert (out / "results.md").read_text().count("| ok |") == 3 and (out / "gpu_check.png").stat().st_size > 0
