"""Mixed-task prediction: rows of two tasks in one file, each answered by its own export over one shared backbone,
in one process (the comparison with `ipt-ds predict`: tests/distributed/test_mixed.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ipt_ds import checkpoint, mixed
from ipt_ds.config import load_config
from ipt_ds.data.tasks import get_task
from ipt_ds.model import build_model

DS_CONFIG = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 4, "zero_optimization": {"stage": 0}}


def make_export(out: Path, backbone: Path, task: str, method: dict, seed: int) -> Path:
    """An export with randomly initialised trainable tensors: routing does not need trained ones."""
    torch.manual_seed(seed)
    overrides = {"model.name_or_path": str(backbone), "data.task": task, "data.max_length": 32,
                 **{f"method.{k}": v for k, v in method.items()}}
    cfg = load_config(None, overrides)
    model, _ = build_model(cfg, get_task(task), dtype=torch.float32, ds_config=None)
    checkpoint.export_trainable(model, out, {"config": cfg.to_dict(), "ds_config": DS_CONFIG}, rank=0)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("mixed")
    bert = tiny_models["bert"]
    return {"rte": make_export(root / "rte", bert, "rte", {"name": "prompt_tuning", "num_virtual_tokens": 4}, 1),
            "cb": make_export(root / "cb", bert, "cb", {"name": "lpt", "num_virtual_tokens": 3, "layer": 1}, 2),
            "sst": make_export(root / "sst", bert, "sst2", {"name": "bitfit"}, 3)}


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"export": "cb", "premise": "The cat sat on the mat.", "hypothesis": "A cat sat."},
    {"export": "rte", "premise": "Rain fell all day.", "hypothesis": "It was dry."},
    {"export": "sst", "sentence": "a warm and funny film"},
    {"export": "rte", "premise": "The shop opens at nine.", "hypothesis": "The shop opens."},
    {"export": "cb", "premise": "She said he might come.", "hypothesis": "he will come"},
]


def test_prompt_exports_share_one_backbone_in_memory(exports):
    routes = mixed.load_routes({name: str(path) for name, path in exports.items()})
    assert routes["rte"].model.backbone is routes["cb"].model.backbone
    assert routes["sst"].model.backbone is not routes["rte"].model.backbone


@pytest.mark.parametrize(("rows", "message"), [
    ([{"export": "nope", "sentence": "x"}], r"mixed.jsonl:1: 'export' must name one of the exports \['cb', 'rte'"),
    (["not json"], r"mixed.jsonl:1: not a JSON object"),
    ([{"export": "rte", "premise": "only a premise"}], r"mixed.jsonl:1"),
])
def test_bad_rows_name_their_line_and_write_nothing(tmp_path, exports, rows, message):
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        mixed.predict_mixed({name: str(p) for name, p in exports.items()}, str(path), str(tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_exports_spec_is_checked():
    assert mixed.parse_exports("a=x,b=y/z") == {"a": "x", "b": "y/z"}
    with pytest.raises(ValueError, match="expected name=export_dir"):
        mixed.parse_exports("a=x,b")
