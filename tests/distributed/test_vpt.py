"""Visual prompt tuning on real ranks: the shipped digits config through the deepspeed launcher under ZeRO-3."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ipt_ds.recipes.image import make_vit
from tests.conftest import read_log, run_cli
from tests.unit import test_vpt as in_process

digits = in_process.digits  # the module-scoped fixture: the digits are written again for this module


def test_vpt_trains_on_digits_on_two_ranks_with_zero3(digits, tmp_path):
    """The shipped config through the deepspeed launcher: 2 ranks, the backbone partitioned by ZeRO-3."""
    make_vit(str(tmp_path / "vit"), image_size=16, hidden_size=32, num_layers=2, intermediate_size=64,
             initializer_range=0.2)
    assert json.loads((tmp_path / "vit" / "config.json").read_text())["model_type"] == "vit"
    result = run_cli("train", "configs/digits/vpt_deep_vit.yaml", f"--model.name_or_path={tmp_path / 'vit'}",
                     f"--data.root={digits}", "--deepspeed.config=ds_configs/zero3.json",
                     f"--run.output_dir={tmp_path / 'run'}", "--method.num_tokens=4", "--train.max_steps=15",
                     "--train.eval_every=15", "--optim.lr=0.05", "--run.log_every=1", num_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    on_rank, total = map(float, re.search(r"backbone bytes on rank 0: ([\d.]+) MiB of ([\d.]+) MiB",
                                          result.stderr).groups())
    assert 0 < total and on_rank < total  # partitioned (the log rounds to 0.1 MiB: 0.0 of 0.1 for this tiny ViT)
    losses = read_log(tmp_path / "run", "train/loss")
    assert len(losses) == 15 and np.mean(losses[-5:]) < losses[0] - 0.3, losses
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["parameters"]["trainable"] == 2 * 4 * 32 + 32 * 10 + 10  # L·P·H prompts + the head
    assert results["eval"]["acc"] > 2 * results["eval_majority_acc"] and results["test"]["acc"] > 20, results
    assert results["test_baseline"]["acc"] == pytest.approx(results["test_majority_acc"])
    assert results["test_not_above_baseline"] == []
    from safetensors.torch import load_file

    assert load_file(tmp_path / "run" / "best" / "model.safetensors")["method.prompts"].shape == (2, 4, 32)
    from ipt_ds.infer import load_for_inference

    with pytest.raises(ValueError, match="is an image classification export; evaluate and predict take text"):
        load_for_inference(str(tmp_path / "run" / "best"), {})
