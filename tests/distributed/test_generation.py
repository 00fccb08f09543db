"""Generation on real ranks: train and decode on 2 ranks under ZeRO-3, then `ipt-ds predict` from the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_log, run_cli, write_config


def write_menu_task(directory: Path) -> dict[str, Path]:
    """A learnable table-to-text toy: 'name[X] food[Y]' -> 'X serves Y.', two references for some rows."""
    names, foods = ["Cat", "Dog", "Owl", "Fox", "Elk", "Bee"], ["fish", "rice", "soup", "cake"]
    rows = [{"source": f"name[{n}] food[{f}]", "target": f"{n} serves {f}."} for n in names for f in foods]
    rows += [{"source": r["source"], "target": r["target"].replace("serves", "has")} for r in rows[::3]]
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"train": directory / "train.jsonl", "val": directory / "val.jsonl"}
    paths["train"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["val"].write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))  # 7 sources: ranks get 4 and 3
    return paths


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_train_and_decode_on_two_ranks_with_zero3(tmp_path, tiny_models, family):
    data = write_menu_task(tmp_path / "data")
    cfg = write_config(tmp_path / "cfg.yaml", {
        "run": {"log_every": 1, "seed": 1},
        "model": {"name_or_path": str(tiny_models[family])},
        "method": {"name": "prefix", "num_virtual_tokens": 4},
        "head": {"type": "lm"},
        "data": {"task": "generation", "format": "jsonl", "train_split": str(data["train"]),
                 "eval_split": str(data["val"]), "test_split": str(data["val"]), "max_length": 32},
        "generation": {"max_new_tokens": 6, "num_beams": 2},
        "train": {"batch_size": 8, "micro_batch_size": 4, "eval_batch_size": 2, "max_steps": 6, "eval_every": 6},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0},
        "deepspeed": {"config": "ds_configs/zero3.json"},
    })
    result = run_cli("train", str(cfg), f"--run.output_dir={tmp_path / 'run'}", num_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = read_log(tmp_path / "run", "train/loss")
    assert len(losses) == 6 and losses[-1] < losses[0]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["eval"]) == {"bleu", "rouge_l"} and results["eval"] == results["test"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations_val.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == [json.loads(line)["source"] for line in
                                           data["val"].read_text().splitlines()]
    assert all(isinstance(r["prediction"], str) and r["references"] for r in rows)
    # the export decodes the same texts from a separate process (1 rank, no ZeRO-3)
    output = tmp_path / "predictions.jsonl"
    result = run_cli("predict", str(tmp_path / "run" / "best"), f"--input={data['val']}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["prediction"] for p in predicted] == [r["prediction"] for r in rows]
