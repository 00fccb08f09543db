"""Every backbone family trains end to end with every head it supports (tiny random weights, real tokenizers)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli, save_tiny, write_config, write_entailment_task


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_family_trains_with_head(tmp_path, tiny_models, family, head):
    data = write_entailment_task(tmp_path / "data", num_train=32, num_eval=16)
    cfg = write_config(tmp_path / "cfg.yaml", {
        "model": {"name_or_path": str(tiny_models[family])},
        "method": {"name": "ptuning_v2", "num_virtual_tokens": 3},
        "head": {"type": head},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 48},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 3},
        "run": {"log_every": 1},
    })
    out = tmp_path / "run"
    result = run_cli("train", str(cfg), f"--run.output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["train/loss"] for line in (out / "log.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)  # three finite steps
    correct = json.loads((out / "results.json").read_text())["eval"]["acc"] * 16 / 100
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= 16  # all 16 eval examples were scored


def test_random_init_builds_the_backbone_from_its_config_alone(tmp_path):
    """`model.random_init` needs only config.json and a tokenizer: no weights are read, and the seed fixes them."""
    import shutil

    import torch

    from ipt_ds.backbone import ModelConfig, load_backbone

    saved = save_tiny("llama", tmp_path / "llama")
    shape_only = tmp_path / "llama-shape"
    shutil.copytree(saved, shape_only, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ValueError, match="cannot read the weights"):
        load_backbone(ModelConfig(name_or_path=str(shape_only)), dtype=torch.float32, with_lm_head=False)

    def weights(seed: int) -> dict:
        torch.manual_seed(seed)
        backbone, _ = load_backbone(ModelConfig(name_or_path=str(shape_only), random_init=True), dtype=torch.float32,
                                    with_lm_head=False)
        return dict(backbone.model.named_parameters())

    first, again, other = weights(0), weights(0), weights(1)
    pretrained, _ = load_backbone(ModelConfig(name_or_path=str(saved)), dtype=torch.float32,
                                  with_lm_head=False)
    name = "layers.0.mlp.up_proj.weight"
    assert first.keys() == dict(pretrained.model.named_parameters()).keys()
    torch.testing.assert_close(first[name], again[name])
    assert not torch.equal(first[name], other[name])
    assert not torch.equal(first[name], dict(pretrained.model.named_parameters())[name])
    assert all(not p.requires_grad for p in first.values())
