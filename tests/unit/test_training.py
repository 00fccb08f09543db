"""`ipt-ds` commands that start no training: a run directory that is never overwritten, and the parameter counts."""

from __future__ import annotations

from tests.conftest import run_cli
from tests.distributed.test_training import tiny_config


def test_existing_run_is_never_overwritten_without_asking(tmp_path, tiny_bert):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = run_cli("train", str(tiny_config(tmp_path, tiny_bert)), f"--run.output_dir={out}")
    assert result.returncode == 2
    assert "already holds a run; pass --run.resume=true" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_estimate_prints_the_counts_before_a_run(tmp_path, tiny_bert):
    result = run_cli("estimate", str(tiny_config(tmp_path, tiny_bert)))
    assert result.returncode == 0, result.stderr[-3000:]
    hidden, num_prompt, num_labels = 32, 4, 2
    trainable = num_prompt * hidden + hidden * num_labels + num_labels
    assert f"total     {trainable:>14,} trainable of" in result.stdout
