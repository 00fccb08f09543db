"""Late Prompt Tuning: the restarted layer stack is exact, nothing below the insertion layer enters autograd, and
every generator trains, on encoder and decoder families (tiny random models, real tokenizers)."""

from __future__ import annotations

import pytest
import torch

from ipt_ds.backbone import ModelConfig, load_backbone
from ipt_ds.config import load_config
from ipt_ds.data.encode import collate
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import get_task
from ipt_ds.methods.lpt import segment_pool
from ipt_ds.model import build_model
from tests.conftest import FAMILIES, train_losses, write_entailment_task, write_topic_task


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = write_entailment_task(tmp_path_factory.mktemp("lpt-data"), num_train=8, num_eval=8)
    return {**paths, "topic": write_topic_task(tmp_path_factory.mktemp("lpt-topic"))}


def padded_batch(tokenizer):
    enc = tokenizer(["a short one", "a somewhat longer sentence with more words in it"], padding=True,
                    return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc


@pytest.mark.parametrize("how", ["avg", "max"])
def test_segment_pool_splits_like_adaptive_pooling_whatever_the_padding(how):
    torch.manual_seed(0)
    reference = {"avg": torch.nn.functional.adaptive_avg_pool1d, "max": torch.nn.functional.adaptive_max_pool1d}[how]
    for length, num_segments in [(11, 5), (5, 5), (3, 5), (1, 2)]:
        x = torch.randn(1, length, 6)
        expected = reference(x.transpose(1, 2), num_segments).transpose(1, 2)  # (1, n, 6)
        pad = torch.randn(1, 4, 6) * 100  # padding rows must not leak into any segment
        ones, zeros = torch.ones(1, length, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
        for states, mask in [(x, ones), (torch.cat([x, pad], 1), torch.cat([ones, zeros], 1)),
                             (torch.cat([pad, x], 1), torch.cat([zeros, ones], 1))]:
            torch.testing.assert_close(segment_pool(states, mask, num_segments, how), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_restarted_stack_reproduces_the_plain_forward(family, tiny_models):
    """With an empty prompt, running layers below k, capturing, and restarting from k equals one plain forward; the
    states handed to the generator are exactly the input of layer k."""
    backbone, tokenizer = load_backbone(ModelConfig(name_or_path=str(tiny_models[family])), dtype=torch.float32,
                                        with_lm_head=False)
    enc = padded_batch(tokenizer)
    embeds = backbone.embed(enc["input_ids"])
    plain = backbone.base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                          token_type_ids=enc.get("token_type_ids"), output_hidden_states=True)
    seen = []

    def empty_prompt(states):
        seen.append(states)
        return states[:, :0]

    late = backbone.encode_late(embeds, enc["attention_mask"], enc.get("token_type_ids"), layer=1,
                                make_prompt=empty_prompt, num_prompt=0)
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(seen[0][real], plain.hidden_states[1][real])
    torch.testing.assert_close(late[real], plain.last_hidden_state[real], rtol=1e-4, atol=1e-5)


def test_inserted_prompt_matches_a_hand_written_bert_forward(tiny_models):
    """BERT layers called one by one: embeddings, layer 0 on the text, then [prompt; states] through layer 1."""
    backbone, tokenizer = load_backbone(ModelConfig(name_or_path=str(tiny_models["bert"])), dtype=torch.float32,
                                        with_lm_head=False)
    enc = padded_batch(tokenizer)
    mask = enc["attention_mask"]
    prompt = torch.randn(2, 3, backbone.hidden_size)
    late = backbone.encode_late(backbone.embed(enc["input_ids"]), mask, enc["token_type_ids"], layer=1,
                                make_prompt=lambda states: prompt, num_prompt=3)

    def additive(mask):  # (B, S) -> (B, 1, 1, S): 0 where visible, a large negative number where padded
        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    layers = backbone.base.encoder.layer
    states = backbone.base.embeddings(input_ids=enc["input_ids"], token_type_ids=enc["token_type_ids"])
    states = layers[0](states, additive(mask))
    full_mask = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
    expected = layers[1](torch.cat([prompt, states], 1), additive(full_mask))
    real = full_mask.bool()
    torch.testing.assert_close(late[real], expected[real], rtol=1e-4, atol=1e-5)


LPT = {"method.name": "lpt", "method.num_virtual_tokens": 3, "method.dropout": 0.0}


def build(family, models, overrides, method=LPT):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "head.dropout": 0.0, "head.pool": "mean",
                             "data.max_length": 32, **method, **overrides})
    return build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)


def batch_of(encoder, path):
    return collate([encoder(e) for e in read_split(path, get_task("rte"))], encoder.tokenizer.pad_token_id)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_no_autograd_below_the_insertion_layer(family, tiny_models, data):
    model, encoder = build(family, tiny_models, {})
    batch = batch_of(encoder, data["topic"])
    needs_grad = {}
    layers = model.backbone.layer_stack()
    for index, layer in enumerate(layers):
        layer.register_forward_hook(lambda m, a, out, index=index: needs_grad.__setitem__(
            index, (out[0] if isinstance(out, tuple) else out).requires_grad))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        _, loss = model(batch)
    loss.backward()
    assert model.method.layer == 1
    assert needs_grad == {0: False, 1: True}, "layer 0 runs without autograd, layer 1 with it"
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.method.parameters())

    # The same prompt at the input (prompt tuning) keeps the activations of both layers.
    prompt_tuning, _ = build(family, tiny_models, {}, {"method.name": "prompt_tuning", "method.num_virtual_tokens": 3})
    saved_pt = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_pt.append(t.numel()) or t, lambda t: t):
        prompt_tuning(batch)
    assert sum(saved) < 0.75 * sum(saved_pt), (sum(saved), sum(saved_pt))


@pytest.mark.parametrize("generator", ["appg", "mppg", "static", "cnn", "mlp", "lstm"])
def test_every_generator_trains(generator, tiny_models, data):
    model, encoder = build("llama", tiny_models, {"method.generator": generator, "method.generator_width": 16})
    batch = batch_of(encoder, data["topic"])
    losses = train_losses(model, batch, [p for p in model.parameters() if p.requires_grad], steps=20)
    assert min(losses[-5:]) < 0.8 * losses[0], losses


def test_insertion_layer_outside_the_stack_is_a_clear_error(tiny_models):
    for layer in (0, 2):
        with pytest.raises(ValueError, match=r"method.layer .*layers 1..1"):
            build("bert", tiny_models, {"method.layer": layer})


def test_checkpointing_above_the_insertion_layer_keeps_loss_and_gradients(tiny_models, data):
    grads, calls = [], {}
    for checkpointing in (False, True):
        model, encoder = build("llama", tiny_models, {"model.gradient_checkpointing": checkpointing})
        model.train()
        upper = next(model.backbone.layer_stack()[1].children())  # a checkpointed layer reruns its children
        upper.register_forward_hook(lambda *_, key=checkpointing: calls.__setitem__(key, calls.get(key, 0) + 1))
        _, loss = model(batch_of(encoder, data["topic"]))
        loss.backward()
        grads.append((loss.detach(), [p.grad for p in model.method.parameters()]))
    assert calls == {False: 1, True: 2}, "the layer above k is recomputed in backward under checkpointing"
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for checkpointed, plain in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
