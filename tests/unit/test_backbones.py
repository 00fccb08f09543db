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


def test_compiled_layers_give_the_eager_losses_and_gradients(tmp_path):
    """`model.compile`: each layer of the stack is compiled once for every input length (dynamic shapes), and LPT
    (a forward hook and a second pass from layer k) on a grouped-query decoder trains as in eager mode: losses and
    gradients within fp32 rounding, over batches of three lengths."""
    import json

    import torch
    from torch._dynamo.utils import counters

    from ipt_ds.config import load_config
    from ipt_ds.data.encode import collate
    from ipt_ds.data.readers import read_split
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    model_dir = save_tiny("llama", tmp_path / "llama")
    train = tmp_path / "train.jsonl"
    words = "cat dog bird fish horse cow sheep goat lion tiger bear wolf".split()
    train.write_text("".join(json.dumps({"premise": " ".join(words[: 2 + i]), "hypothesis": words[i], "idx": i,
                                         "label": ["entailment", "not_entailment"][i % 2]}) + "\n" for i in range(10)))
    torch._dynamo.reset()
    counters.clear()
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = load_config(None, {"model.name_or_path": str(model_dir), "model.compile": compiled, "method.name": "lpt",
                                 "method.num_virtual_tokens": 3, "method.dropout": 0.0, "head.dropout": 0.0})
        model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
        assert all((layer._compiled_call_impl is not None) == compiled for layer in model.backbone.layer_stack())
        model.train()
        features = [encoder(e) for e in read_split(train, get_task("rte"))]
        trained = [p for p in model.parameters() if p.requires_grad]
        results[compiled] = []
        for rows in ([0, 1, 2], [3, 4, 5, 6], [7, 8], [9]):
            model.zero_grad()
            _, loss = model(collate([features[i] for i in rows], encoder.tokenizer.pad_token_id))
            loss.backward()
            results[compiled].append((loss.detach(), [p.grad.clone() for p in trained]))
    assert len({len(f["input_ids"]) for f in features}) > 5, "the batches must differ in length"
    assert counters["stats"]["unique_graphs"] > 0, "the compiled layers ran compiled"
    for (eager_loss, eager_grads), (compiled_loss, compiled_grads) in zip(results[False], results[True]):
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-6)
        for eager, compiled in zip(eager_grads, compiled_grads, strict=True):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compile_is_refused_under_zero3(tmp_path):
    """ZeRO-3 runs compiled layers correctly, but its gather hooks break every layer's graph into pieces (seen with
    TORCH_LOGS=graph_breaks in a real run), so the combination is refused before the model loads."""
    import torch

    from ipt_ds.backbone import ModelConfig, load_backbone

    cfg = ModelConfig(name_or_path=str(save_tiny("llama", tmp_path / "llama")), compile=True)
    with pytest.raises(ValueError, match="model.compile: under ZeRO-3"):
        load_backbone(cfg, dtype=torch.float32, with_lm_head=False, ds_config={"zero_optimization": {"stage": 3}})
