"""A backbone built from its config alone (`model.random_init`), in this process."""

from __future__ import annotations

import pytest

from tests.conftest import save_tiny


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
