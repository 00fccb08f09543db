"""Real pretrained MiniLM on real SuperGLUE CB files (read in place from the data root): the trainer learns."""

from __future__ import annotations

import json

from ipt_ds.data.readers import default_data_root
from tests.conftest import run_cli


def test_data_root_is_available():
    root = default_data_root()
    assert root is not None and (root / "superglue" / "CB" / "val.jsonl").is_file(), (
        "set IPT_DS_DATA to the benchmark data directory (see README, 'Tasks and data')")


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


def test_a_one_label_training_split_is_named_in_a_warning(caplog):
    """FewGLUE's WSC training set is all positive (PET generates the referent instead of classifying)."""
    import logging

    from ipt_ds.config import load_config
    from ipt_ds.data.pipeline import load_task_splits

    cfg = load_config(None, {"data.task": "wsc", "data.format": "fewglue", "data.train_split": "train",
                             "data.eval_split": "dev32"}).data
    with caplog.at_level(logging.WARNING):
        _, train, evaluation, _ = load_task_splits(cfg, seed=0)
    assert len(train) == 32 and len({e.label for e in evaluation}) == 2
    assert "data.train_split 'train' holds one label only (True)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_task_splits(load_config(None, {"data.task": "cb", "data.format": "fewglue", "data.train_split": "train",
                                            "data.eval_split": "dev32"}).data, seed=0)
    assert "one label only" not in caplog.text
