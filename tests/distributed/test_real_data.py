"""Real pretrained MiniLM trained on real SuperGLUE CB files (read in place from the data root) learns."""

from __future__ import annotations

import json

from tests.conftest import run_cli


def test_minilm_prompt_method_learns_cb_past_the_majority_class(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "configs/cb/ptuning_v2_minilm.yaml", f"--run.output_dir={out}", "--train.epochs=2",
                     env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["eval_majority_acc"] == 50.0  # 28 of the 56 CB validation examples are 'contradiction'
    assert results["eval"]["acc"] >= results["eval_majority_acc"] + 10, results
    checkpoint_bytes = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    assert checkpoint_bytes < 5 * 2**20, f"a prompt checkpoint must stay small, got {checkpoint_bytes} bytes"
    assert results["eval_baseline"]["acc"] == 50.0 and results["eval_not_above_baseline"] == []
    assert "eval val baseline (one answer for every example, the best per metric): acc=50.00" in result.stderr
