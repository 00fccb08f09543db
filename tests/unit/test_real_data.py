"""The data root with the real benchmark files is there, and a one-label training split is warned about (the
training run on real CB files: tests/distributed/test_real_data.py)."""

from __future__ import annotations

from ipt_ds.data.readers import default_data_root


def test_data_root_is_available():
    root = default_data_root()
    assert root is not None and (root / "superglue" / "CB" / "val.jsonl").is_file(), (
        "set IPT_DS_DATA to the benchmark data directory (see README, 'Tasks and data')")


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
