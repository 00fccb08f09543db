"""Every registered method x every backbone family it takes, in-process on tiny random models (real tokenizers;
vision transformers for the methods that take images).

Per cell: forward and backward run, the trainable count equals the method's formula, frozen weights stay
bit-identical, the loss falls when fitting a small batch, and a zero-length prompt leaves the backbone's output
exactly unchanged where that holds. Generation cells (decoders and encoder-decoders, LM head) fit source -> target
pairs; their decoding is checked in test_generation.py. Real multi-rank runs live in test_distributed.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from ipt_ds.config import load_config
from ipt_ds.data.encode import collate
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import get_task
from ipt_ds.methods import METHODS, get_method
from ipt_ds.model import build_model
from tests.conftest import (
    FAMILIES,
    SEQ2SEQ_FAMILIES,
    VISION_FAMILIES,
    train_losses,
    two_class_images,
    write_entailment_task,
    write_topic_task,
)

NUM_PROMPT, NUM_LABELS = 4, 2
TEXT_METHODS = sorted(name for name, spec in METHODS.items() if "text" in spec.inputs)
IMAGE_CELLS = [pytest.param(name, {}, id=name) for name, spec in sorted(METHODS.items()) if "image" in spec.inputs]
IMAGE_CELLS.append(pytest.param("vpt", {"method.depth": "deep"}, id="vpt-deep"))
PREFIX_METHODS = {"ptuning_v2", "prefix"}  # key/value prefixes: DeBERTa's attention takes no cache


def lstm_params(inp: int, width: int) -> int:
    """A 2-layer bidirectional LSTM (PyTorch keeps two bias vectors per gate block)."""
    per_direction = lambda i: 4 * width * i + 4 * width * width + 8 * width  # noqa: E731
    return 2 * per_direction(inp) + 2 * per_direction(2 * width)


def generator_params(kind: str, d_in: int, d_out: int, width: int) -> int:
    if kind == "cnn":
        return sum(d_in * width * k + width for k in (3, 4, 5)) + 3 * width * d_out + d_out
    if kind == "mlp":
        return 2 * d_in * width + width + width * d_out + d_out
    return 2 * (4 * width * d_in + 4 * width * width + 8 * width) + 2 * width * d_out + d_out  # one bi-LSTM layer


def ipt_trainable(method, bb) -> int:
    """IPT: task prompt or prefix, lookup table (unless fix_emb), generator; see ipt.py for when each exists."""
    n, hidden, kv = method.num_virtual_tokens, bb.hidden_size, bb.num_kv_heads * bb.head_dim
    prefix_path = method.method == "prefix-tuning"
    width = 2 * kv if prefix_path else hidden
    total = n * bb.prefix_layers * 2 * kv if prefix_path else (n * hidden if method.has_task_prompt else 0)
    total += width if method.residual else 0  # the gate
    has_table = method.instance and (method.instance_pretrain or not method.encoder)
    total += bb.vocab_size * width if has_table and not method.fix_emb else 0
    if method.instance and method.encoder:
        total += generator_params(method.encoder, width if has_table else hidden, width, method.generator_width)
    return total


def expected_trainable(name: str, model, cfg) -> int | None:
    bb = model.backbone
    hidden, kv = bb.hidden_size, bb.prefix_layers * 2 * bb.num_kv_heads * bb.head_dim
    head = 0 if cfg.head.type == "lm" else hidden * NUM_LABELS + NUM_LABELS  # the LM head is the backbone's own
    method = cfg.method
    formulas = {
        "full": lambda: sum(p.numel() for p in bb.parameters()) + head,
        "linear_probe": lambda: head,
        "prompt_tuning": lambda: NUM_PROMPT * hidden + head,
        "ptuning_v2": lambda: NUM_PROMPT * kv + head,
        "prefix": lambda: (NUM_PROMPT * hidden + hidden * method.projection_hidden + method.projection_hidden
                           + method.projection_hidden * kv + kv + head),
        "ptuning_v1": lambda: (NUM_PROMPT * hidden + lstm_params(hidden, hidden)
                               + (2 * hidden) ** 2 + 2 * hidden + 2 * hidden * hidden + hidden + head),
        "ipt": lambda: ipt_trainable(method, bb) + head,
        "lpt": lambda: (hidden * method.generator_width + method.generator_width
                        + (method.generator_width + 1) * NUM_PROMPT * hidden + head),  # the default NPG generator
        "bitfit": lambda: sum(m.bias.numel() for m in bb.modules()
                              if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None) + head,
        "vpt": lambda: (bb.num_layers if method.depth == "deep" else 1) * NUM_PROMPT * hidden + head,
    }
    # A method added since has every other check of its cells; its count is checked once its formula is here.
    return formulas[name]() if name in formulas else None


def method_overrides(name: str, num_prompt: int = NUM_PROMPT) -> dict:
    fields = {f.name for f in dataclasses.fields(get_method(name).config_cls)}
    overrides = {"method.name": name}
    if "num_virtual_tokens" in fields:
        overrides["method.num_virtual_tokens"] = num_prompt
    if "dropout" in fields:
        overrides["method.dropout"] = 0.0
    return overrides


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    paths = write_entailment_task(tmp_path_factory.mktemp("grid-data"), num_train=8, num_eval=8)
    return {**paths, "train": write_topic_task(tmp_path_factory.mktemp("grid-topic"))}


def build(family: str, name: str, models, data):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "head.dropout": 0.0, "head.pool": "mean",
                             "data.max_length": 32, **method_overrides(name)})
    task = get_task("rte")
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    batch = collate([encoder(e) for e in read_split(data["train"], task)], encoder.tokenizer.pad_token_id)
    return cfg, model, batch


def assert_trains(model, cfg, batch, name: str, logits_shape: tuple | None = (16, NUM_LABELS), fall: float = 0.8,
                  steps: int = 25) -> None:
    """The trainable count matches the method's formula, every trainable tensor gets a gradient, the loss falls
    below `fall` x its start over `steps` Adam steps on one batch of 16, and no frozen weight moves."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = expected_trainable(name, model, cfg)
    assert expected is None or sum(p.numel() for p in trainable) == expected
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(steps):
        logits, loss = model(batch)
        assert logits_shape is None or logits.shape == logits_shape
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in trainable), "every trainable tensor is on the loss path"
        optimizer.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < fall * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", TEXT_METHODS)
def test_method_cell(family, name, tiny_models, data):
    if family == "deberta-v2" and name in PREFIX_METHODS:
        with pytest.raises(ValueError, match="not supported on DeBERTa"):
            cfg, model, batch = build(family, name, tiny_models, data)
            model(batch)
        return
    if family == "llama" and name == "bitfit":  # LLaMA has no bias vectors: BitFit would train nothing of its own
        with pytest.raises(ValueError, match="bitfit trains bias vectors, and this 'llama' backbone has none"):
            build(family, name, tiny_models, data)
        return
    cfg, model, batch = build(family, name, tiny_models, data)
    assert_trains(model, cfg, batch, name)


GENERATION_METHODS = ["prompt_tuning", "ptuning_v1", "prefix", "ptuning_v2", "ipt", "ipt_prefix", "lpt"]


def generation_cell(family: str, name: str, models):
    """(cfg, model, batch) of a generation cell: 16 source -> target pairs with the LM head; `name` may be `ipt_prefix`
    (IPT's prefix path)."""
    from ipt_ds.data.generation import GenExample

    overrides = method_overrides(name.removesuffix("_prefix"))
    if name == "ipt_prefix":
        overrides["method.method"] = "prefix-tuning"
    if name == "lpt":
        overrides["method.layer"] = 1
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "data.task": "generation",
                             "data.format": "jsonl", "head.type": "lm", **overrides})
    model, encoder = build_model(cfg, get_task("generation"), dtype=torch.float32, ds_config=None)
    animals, foods = ["cat", "dog", "owl", "fox"], ["fish", "rice", "soup", "cake"]
    examples = [GenExample(guid=f"{a}-{f}", source=f"name[{a}] food[{f}]", references=(f"{a} eats {f}",))
                for a in animals for f in foods]
    batch = collate([f for e in examples for f in encoder.training_features(e)], encoder.tokenizer.pad_token_id)
    return cfg, model, batch


@pytest.mark.parametrize("family", ["llama", *SEQ2SEQ_FAMILIES])
@pytest.mark.parametrize("name", GENERATION_METHODS)
def test_generation_method_cell(family, name, tiny_models):
    """Generation cells: 16 source -> target pairs with the LM head (loss on the targets only)."""
    cfg, model, batch = generation_cell(family, name, tiny_models)
    if family == "t5" and name == "lpt":
        with pytest.raises(ValueError, match="late prompt insertion does not support 't5'"):
            model({"input_ids": torch.ones(1, 3, dtype=torch.long),
                   "attention_mask": torch.ones(1, 3, dtype=torch.long),
                   "decoder_input_ids": torch.zeros(1, 1, dtype=torch.long),
                   "decoder_attention_mask": torch.ones(1, 1, dtype=torch.long)})
        return
    # Random tiny LMs spread their predictions almost evenly over 49k tokens (the loss starts near ln 49152 = 10.8)
    # and a 4-vector prompt moves them little in a few steps: the cell asks for a lower loss, not a fit.
    assert_trains(model, cfg, batch, name.removesuffix("_prefix"), logits_shape=None, fall=1.0, steps=10)


ZERO_PROMPT_METHODS = ["prompt_tuning", "ptuning_v2"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta-v2"])
@pytest.mark.parametrize("name", ZERO_PROMPT_METHODS)
def test_zero_length_prompt_is_the_plain_backbone(family, name, tiny_models, data):
    torch.manual_seed(0)
    overrides = {"model.name_or_path": str(tiny_models[family]), "data.max_length": 32,
                 **method_overrides(name, num_prompt=1)}
    cfg = load_config(None, overrides)
    task = get_task("rte")
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    cfg.method.num_virtual_tokens = 0  # past validation on purpose: the plumbing must handle an empty prompt
    model.method = get_method(name).build(cfg.method, model.backbone, encoder.tokenizer)
    model.eval()
    batch = collate([encoder(e) for e in read_split(data["val"], task)], encoder.tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.method(model.backbone, batch)
        plain = model.backbone.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch.get("token_type_ids")).last_hidden_state
    real = batch["attention_mask"].bool()
    assert out.num_prefix == 0
    assert torch.equal(out.hidden[real], plain[real])


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "deberta-v2"])
def test_split_placement_without_prompt_is_the_plain_backbone(family, tiny_models, data):
    from ipt_ds.methods.ptuning_v1 import run_with_split_prompt

    cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "data.max_length": 32,
                             **method_overrides("ptuning_v1")})
    task = get_task("rte")
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    batch = collate([encoder(e) for e in read_split(data["val"], task)], encoder.tokenizer.pad_token_id)
    with torch.no_grad():
        empty = torch.zeros(batch["input_ids"].shape[0], 0, model.backbone.hidden_size)
        out = run_with_split_prompt(model.backbone, empty, batch)
        plain = model.backbone.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    token_type_ids=batch.get("token_type_ids")).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.equal(out.hidden[real], plain[real])


def test_split_placement_puts_the_second_half_before_text_b(tiny_models, data):
    """The split prompt's second half sits right before text_b: check the merged positions directly."""
    from ipt_ds.methods import ptuning_v1

    cfg = load_config(None, {"model.name_or_path": str(tiny_models["bert"]), "data.max_length": 32,
                             **method_overrides("ptuning_v1"), "method.placement": "split"})
    model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    batch = collate([encoder(e) for e in read_split(data["val"], get_task("rte"))][:2], encoder.tokenizer.pad_token_id)
    seen = {}
    real_encode = model.backbone.encode
    model.backbone.encode = lambda embeds, mask, types=None, prefix=None: seen.update(embeds=embeds, types=types) \
        or real_encode(embeds, mask, types, prefix)
    with torch.no_grad():
        prompt = model.method.prompt()
        ptuning_v1.run_with_split_prompt(model.backbone, prompt.expand(2, -1, -1), batch)
        tokens = model.backbone.embed(batch["input_ids"])
    split, half = int(batch["split_position"][0]), (NUM_PROMPT + 1) // 2
    merged = seen["embeds"][0]
    assert torch.equal(merged[:half], prompt[:half])
    assert torch.equal(merged[half : half + split], tokens[0, :split])
    assert torch.equal(merged[half + split : NUM_PROMPT + split], prompt[half:])
    assert torch.equal(merged[NUM_PROMPT + split :], tokens[0, split:])
    assert seen["types"][0, NUM_PROMPT + split] == 1  # text_b keeps its segment id


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("name", ["ptuning_v2", "prompt_tuning"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family, name, tiny_models, data):
    """Checkpointed layers recompute in backward; prefixes must survive that (transformers drops a normal cache)."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "head.dropout": 0.0,
                                 "data.max_length": 32, "model.gradient_checkpointing": checkpointing,
                                 **method_overrides(name)})
        model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
        batch = collate([encoder(e) for e in read_split(data["train"], get_task("rte"))],
                        encoder.tokenizer.pad_token_id)
        model.train()
        calls = []  # forwards of the first layer's children: a checkpointed layer runs them again in backward
        first_layer = next(m for m in model.backbone.modules() if isinstance(m, GradientCheckpointingLayer))
        next(first_layer.children()).register_forward_hook(lambda *args, calls=calls: calls.append(1))
        _, loss = model(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.method.parameters()]))
        assert len(calls) == (2 if checkpointing else 1)
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    torch.testing.assert_close(loss_ckpt, loss)
    for grad, grad_ckpt in zip(grads, grads_ckpt):
        torch.testing.assert_close(grad_ckpt, grad)


IPT_VARIANTS = {
    "prompt-cnn": {"method.encoder": "cnn", "method.generator_width": 8},
    "prompt-lstm-task": {"method.encoder": "lstm", "method.generator_width": 8, "method.task_prompt": True},
    "prompt-mlp": {"method.encoder": "mlp", "method.generator_width": 8},
    "prefix-random": {"method.method": "prefix-tuning"},
    "prefix-cnn": {"method.method": "prefix-tuning", "method.encoder": "cnn", "method.generator_width": 8,
                   "method.instance_scale": 1.0},
    "prefix-task-only": {"method.method": "prefix-tuning", "method.instance": False},
    "prompt-cnn-residual": {"method.encoder": "cnn", "method.generator_width": 8, "method.residual": True,
                            "method.generator_dropout": 0.1},
    "prefix-mlp-residual": {"method.method": "prefix-tuning", "method.encoder": "mlp", "method.generator_width": 8,
                            "method.residual": True},
}


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("variant", sorted(IPT_VARIANTS))
def test_ipt_variants(family, variant, tiny_models, data):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "head.dropout": 0.0,
                             "head.pool": "mean", "data.max_length": 32, **method_overrides("ipt"),
                             **IPT_VARIANTS[variant]})
    task = get_task("rte")
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    batch = collate([encoder(e) for e in read_split(data["train"], task)], encoder.tokenizer.pad_token_id)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == ipt_trainable(cfg.method, model.backbone) + 2 * 32 + 2
    losses = train_losses(model, batch, trainable, steps=25)
    assert min(losses[-5:]) < 0.8 * losses[0], losses
    model.eval()  # the instance prompt depends on the input: two different inputs get different prompts
    vectors = (model.method.instance_vectors(model.backbone, batch["input_ids"], batch["attention_mask"])
               if cfg.method.instance else None)
    if vectors is not None:
        assert not torch.allclose(vectors[0], vectors[1])


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("path", ["prompt-tuning", "prefix-tuning"])
def test_residual_ipt_starts_as_its_task_level_method(family, path, tiny_models, data):
    """Residual IPT at step 0 gives the logits and loss of prompt tuning (prompt path) or P-tuning v2 (prefix path)
    holding its task-level prompt, label words scored by the backbone's own LM head; one step later the gate has
    moved and the generator gets gradients."""
    task, common = get_task("rte"), {"model.name_or_path": str(tiny_models[family]), "head.type": "verbalizer",
                                     "head.dropout": 0.0, "data.max_length": 32}
    torch.manual_seed(0)
    cfg = load_config(None, {**common, **method_overrides("ipt"), "method.method": path, "method.encoder": "cnn",
                             "method.generator_width": 8, "method.residual": True, "method.init": "vocab"})
    ipt, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    plain_name = "prompt_tuning" if path == "prompt-tuning" else "ptuning_v2"
    plain, _ = build_model(load_config(None, {**common, **method_overrides(plain_name)}), task, dtype=torch.float32,
                           ds_config=None)
    with torch.no_grad():
        task_level = ipt.method.task_prompt if path == "prompt-tuning" else ipt.method.task_prefix
        (plain.method.prompt if path == "prompt-tuning" else plain.method.table).copy_(task_level)
    plain.head.load_state_dict(ipt.head.state_dict())
    batch = collate([encoder(e) for e in read_split(data["train"], task)], encoder.tokenizer.pad_token_id)
    ipt.eval(), plain.eval()
    (logits, loss), (plain_logits, plain_loss) = ipt(batch), plain(batch)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    optimizer = torch.optim.Adam([p for p in ipt.parameters() if p.requires_grad], lr=1e-2)
    ipt.train()
    for _ in range(2):
        optimizer.zero_grad()
        ipt(batch)[1].backward()
        optimizer.step()
    assert ipt.method.gate.abs().min() > 0
    assert all(p.grad.abs().sum() > 0 for p in ipt.method.generator.parameters())


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_bitfit_with_null_prompt_trains_the_mlm_vocabulary_bias(family, tiny_models, data):
    cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "method.name": "bitfit",
                             "head.type": "verbalizer", "head.template": "{a} {mask} {b}", "data.max_length": 32})
    model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    vocab_bias = model.backbone.model.get_output_embeddings().bias
    assert vocab_bias.requires_grad and vocab_bias.numel() == model.backbone.vocab_size
    assert not model.backbone.model.get_output_embeddings().weight.requires_grad
    assert not any(p.requires_grad for p in model.head.parameters())  # nothing new: the MLM head scores the words
    batch = collate([encoder(e) for e in read_split(data["train"], get_task("rte"))], encoder.tokenizer.pad_token_id)
    _, loss = model(batch)
    loss.backward()
    assert vocab_bias.grad is not None and vocab_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_every_method_runs_in_bf16(name, tiny_models, data):
    """DeepSpeed's bf16 configs cast the whole module, method and head included: no fp32 tensor may meet them."""
    cfg, model, batch = build("bert", name, tiny_models, data)
    model.to(torch.bfloat16).train()
    logits, loss = model(batch)
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(loss)


def image_cell(family: str, name: str, options: dict, models):
    """(cfg, model, batch of 16 images) of an image cell."""
    from ipt_ds.data.images import ImageBatcher
    from ipt_ds.recipes.image import build_image_model

    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "data.format": "npz",
                             "data.task": "halves", "head.dropout": 0.0, **method_overrides(name), **options})
    model = build_image_model(cfg, NUM_LABELS, dtype=torch.float32, ds_config=None)
    images, labels = two_class_images(16)
    batch = ImageBatcher(model.backbone.image)([{"image": torch.from_numpy(image)[None], "labels": int(label)}
                                                for image, label in zip(images, labels)])
    return cfg, model, batch


@pytest.mark.parametrize("family", VISION_FAMILIES)
@pytest.mark.parametrize(("name", "options"), IMAGE_CELLS)
def test_image_method_cell(family, name, options, tiny_vision_models):
    """The image cells: trainable count, gradients, frozen weights, the loss falls on 16 images, and bf16 runs."""
    cfg, model, batch = image_cell(family, name, options, tiny_vision_models)
    assert_trains(model, cfg, batch, name)
    model.to(torch.bfloat16)
    logits, loss = model(batch)
    loss.backward()
    assert logits.dtype == torch.float32 and torch.isfinite(loss)


def layer_outputs(model, batch) -> dict[int, torch.Tensor]:
    """The output of every layer of the backbone's layer stack in one evaluation forward, by layer index."""
    outputs = {}

    def keep(index: int, out) -> None:  # returns None: the layer's output stays as it is
        outputs.setdefault(index, (out[0] if isinstance(out, tuple) else out).detach().clone())

    hooks = [layer.register_forward_hook(lambda module, args, out, i=i: keep(i, out))
             for i, layer in enumerate(model.backbone.layer_stack())]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


FIRST_LAYER_CELLS = [
    *(pytest.param("text", family, name, {}, id=f"{name}-{family}") for family in ("bert", "llama")
      for name in TEXT_METHODS if (family, name) != ("llama", "bitfit")),  # refused there: test_method_cell
    pytest.param("text", "bert", "ipt", {"method.method": "prefix-tuning"}, id="ipt_prefix-bert"),
    pytest.param("text", "bert", "ipt", {"method.fix_emb": True}, id="ipt_frozen_table-bert"),  # nothing trains
    *(pytest.param("generation", family, name, {}, id=f"{name}-{family}") for family in SEQ2SEQ_FAMILIES
      for name in ("prompt_tuning", "ptuning_v2", "ipt_prefix")),
    pytest.param("generation", "bart", "lpt", {}, id="lpt-bart"),
    *(pytest.param("image", "vit", *cell.values, id=f"{cell.id}-vit") for cell in IMAGE_CELLS),
]


@pytest.mark.parametrize(("kind", "family", "name", "options"), FIRST_LAYER_CELLS)
def test_first_trained_layer_is_the_lowest_layer_that_training_changes(kind, family, name, options, tiny_models,
                                                                      tiny_vision_models, data):
    """`first_trained_layer` (what a cache of frozen states relies on) is exact: after every trainable tensor moves,
    the layers below it give bit-identical outputs and every layer from it up gives different ones."""
    if kind == "text":
        cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "data.max_length": 32,
                                 **method_overrides(name), **options})
        model, encoder = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
        batch = collate([encoder(e) for e in read_split(data["val"], get_task("rte"))], encoder.tokenizer.pad_token_id)
    elif kind == "generation":
        _, model, batch = generation_cell(family, name, tiny_models)
    else:
        _, model, batch = image_cell(family, name, options, tiny_vision_models)
    model.eval()
    num_layers = model.backbone.num_layers
    first = model.method.first_trained_layer
    assert 0 <= first <= num_layers
    before = layer_outputs(model, batch)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    after = layer_outputs(model, batch)
    assert sorted(before) == sorted(after) == list(range(num_layers))
    unchanged = [i for i in range(num_layers) if before[i].shape == after[i].shape and torch.equal(before[i], after[i])]
    assert unchanged == list(range(first))
