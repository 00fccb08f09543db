"""Visual prompt tuning on tiny random vision transformers: where the prompts enter, that deep prompts replace the
previous layer's prompt positions instead of piling up, the image readers and their errors, the `make-digits` and
`make-vit` commands (the 2-rank ZeRO-3 run on the digits: tests/distributed/test_vpt.py). The count / gradient /
frozen-weight checks of every image method live in the registry grid (test_methods_grid.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

from ipt_ds.backbone import Backbone, ImageSpec, ModelConfig, load_backbone
from ipt_ds.config import load_config
from ipt_ds.data.images import ImageBatcher, read_image_split, write_digits
from ipt_ds.methods.vpt import VisualPrompt
from ipt_ds.recipes.image import build_image_model
from tests.conftest import two_class_images

NUM_TOKENS = 3


def image_batch(spec: ImageSpec, num: int = 4) -> dict:
    images, labels = two_class_images(num)
    return ImageBatcher(spec)([{"image": torch.from_numpy(image)[None], "labels": int(label)}
                               for image, label in zip(images, labels)])


def vit_backbone(num_layers: int = 3) -> Backbone:
    """An in-memory random ViT (16 x 16 input, 16 patches of 4 x 4) wrapped as a frozen backbone."""
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=num_layers,
                               num_attention_heads=4, intermediate_size=64, initializer_range=0.2),
                     add_pooling_layer=False)
    backbone = Backbone(model, keep_dropout=False)
    backbone.image = ImageSpec(size=(16, 16), num_channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, patch_size=4,
                               num_leading_tokens=1)
    return backbone


def layer_io(backbone: Backbone):
    """Hooks that record what every layer read (after any pre-hook's edit) and wrote; returns (inputs, outputs,
    remove)."""
    inputs, outputs = {}, {}

    def record(index, args, out):
        inputs[index], outputs[index] = args[0], out[0] if isinstance(out, tuple) else out

    handles = [layer.register_forward_hook(lambda m, args, out, i=i: record(i, args, out))
               for i, layer in enumerate(backbone.layer_stack())]
    return inputs, outputs, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("family", ["vit", "deit", "dinov2"])
@pytest.mark.parametrize("deep", [False, True])
def test_no_prompt_is_the_plain_backbone(family, deep, tiny_vision_models):
    backbone, _ = load_backbone(ModelConfig(name_or_path=str(tiny_vision_models[family])), dtype=torch.float32,
                                with_lm_head=False)
    empty = torch.zeros(backbone.num_layers if deep else 1, 0, backbone.hidden_size)
    method = VisualPrompt(empty, num_leading=backbone.image.num_leading_tokens, deep=deep, dropout=0.0)
    batch = image_batch(backbone.image)
    with torch.no_grad():
        out = method(backbone, batch)
        plain = backbone.base(pixel_values=batch["pixel_values"]).last_hidden_state
    assert torch.equal(out.hidden, plain)


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_shallow_prompts_sit_between_the_leading_tokens_and_the_patches(family, tiny_vision_models):
    backbone, _ = load_backbone(ModelConfig(name_or_path=str(tiny_vision_models[family])), dtype=torch.float32,
                                with_lm_head=False)
    start = backbone.image.num_leading_tokens
    assert start == (2 if family == "deit" else 1)  # DeiT: CLS and the distillation token
    prompts = torch.randn(1, NUM_TOKENS, backbone.hidden_size)
    method = VisualPrompt(prompts, num_leading=start, deep=False, dropout=0.0)
    embedded = []
    handle = backbone.base.embeddings.register_forward_hook(lambda m, args, out: embedded.append(out))
    inputs, outputs, remove = layer_io(backbone)
    with torch.no_grad():
        out = method(backbone, image_batch(backbone.image))
    handle.remove()
    remove()
    tokens, first = embedded[0], inputs[0]  # (B, K + N, H) from the embeddings; (B, K + P + N, H) into layer 0
    assert first.shape[1] == tokens.shape[1] + NUM_TOKENS == out.hidden.shape[1]
    assert torch.equal(first[:, :start], tokens[:, :start])
    assert torch.equal(first[:, start : start + NUM_TOKENS], prompts[0].expand(len(first), -1, -1))
    assert torch.equal(first[:, start + NUM_TOKENS :], tokens[:, start:])
    assert torch.equal(inputs[1], outputs[0])  # shallow: nothing replaced after the first layer


def test_deep_prompts_replace_the_previous_layers_prompt_positions():
    backbone = vit_backbone(num_layers=3)
    method = VisualPrompt(torch.randn(3, NUM_TOKENS, backbone.hidden_size), num_leading=1, deep=True, dropout=0.0)
    inputs, outputs, remove = layer_io(backbone)
    batch = image_batch(backbone.image)
    out = method(backbone, batch)
    remove()
    length = 1 + NUM_TOKENS + 16
    prompt_positions = slice(1, 1 + NUM_TOKENS)
    for layer in range(3):
        assert inputs[layer].shape[1] == length, "prompts must not pile up from layer to layer"
        assert torch.equal(inputs[layer][:, prompt_positions], method.prompts[layer].expand(4, -1, -1).detach())
    for layer in (1, 2):  # CLS and patches flow on; only the P prompt positions are new
        assert torch.equal(inputs[layer][:, :1], outputs[layer - 1][:, :1])
        assert torch.equal(inputs[layer][:, 1 + NUM_TOKENS :], outputs[layer - 1][:, 1 + NUM_TOKENS :])
        assert not torch.allclose(outputs[layer - 1][:, prompt_positions], inputs[layer][:, prompt_positions])
    # a plain sum of layer-normed features is constant (its gradient is zero): weight the features instead
    (out.hidden[:, 0] @ torch.arange(backbone.hidden_size, dtype=torch.float32)).sum().backward()
    assert all(method.prompts.grad[layer].abs().sum() > 0 for layer in range(3)), "every layer's prompts train"


def test_only_prompts_and_head_train_and_the_init_follows_the_patch_size(tiny_vision_models):
    cfg = load_config(None, {"model.name_or_path": str(tiny_vision_models["vit"]), "data.format": "npz",
                             "data.task": "halves", "method.name": "vpt", "method.depth": "deep",
                             "method.num_virtual_tokens": 50})
    model = build_image_model(cfg, 2, dtype=torch.float32, ds_config=None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"method.prompts", "head.linear.weight",
                                                                          "head.linear.bias"}
    bound = (6 / (3 * 4 * 4 + 32)) ** 0.5  # Xavier from a 4 x 4 x 3 patch projected to 32
    prompts = model.method.prompts.detach()
    assert prompts.shape == (2, 50, 32)
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.9 * bound


def test_gradient_checkpointing_gives_the_same_deep_prompt_gradients(tiny_vision_models):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        cfg = load_config(None, {"model.name_or_path": str(tiny_vision_models["vit"]), "data.format": "npz",
                                 "data.task": "halves", "method.name": "vpt", "method.depth": "deep",
                                 "method.num_virtual_tokens": NUM_TOKENS, "method.dropout": 0.0, "head.dropout": 0.0,
                                 "model.gradient_checkpointing": checkpointing})
        model = build_image_model(cfg, 2, dtype=torch.float32, ds_config=None).train()
        _, loss = model(image_batch(model.backbone.image, num=8))
        loss.backward()
        grads.append(model.method.prompts.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_methods_and_backbones_that_do_not_pair(tiny_vision_models, tiny_bert, tmp_path):
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    image_cfg = {"data.format": "npz", "data.task": "halves"}
    with pytest.raises(ValueError, match="'prompt_tuning' works on text; .* one of: bitfit, full, linear_probe, vpt"):
        build_image_model(load_config(None, {"model.name_or_path": str(tiny_vision_models["vit"]), **image_cfg}), 2,
                          dtype=torch.float32, ds_config=None)
    with pytest.raises(ValueError, match="is a 'bert' model; data.format npz needs a vision transformer"):
        build_image_model(load_config(None, {"model.name_or_path": str(tiny_bert), "method.name": "vpt",
                                             **image_cfg}), 2, dtype=torch.float32, ds_config=None)
    with pytest.raises(ValueError, match="'vpt' works on images; set data.format to imagefolder or npz"):
        build_model(load_config(None, {"model.name_or_path": str(tiny_bert), "method.name": "vpt"}), get_task("rte"),
                    dtype=torch.float32, ds_config=None)
    with pytest.raises(ValueError, match="is a vision transformer; text tasks need a language model"):
        build_model(load_config(None, {"model.name_or_path": str(tiny_vision_models["vit"]),
                                       "method.name": "linear_probe"}), get_task("rte"), dtype=torch.float32,
                    ds_config=None)
    from ipt_ds.memory import report

    with pytest.raises(ValueError, match="estimate-memory models token sequences; it does not cover image configs"):
        report(load_config(None, {"model.name_or_path": str(tiny_vision_models["vit"]), "method.name": "vpt",
                                  **image_cfg}))


def test_npz_reader(tmp_path):
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(tmp_path / "train.npz", images=grey, labels=np.array([1, 0]), class_names=np.array(["cat", "dog"]))
    split = read_image_split("npz", str(tmp_path), "train")
    assert split.class_names == ["cat", "dog"] and split.labels == [1, 0]
    assert split.images[0].shape == (1, 4, 4) and torch.equal(split.images[1][0], torch.from_numpy(grey[1]))
    colour = np.full((3, 2, 2, 3), 0.5, dtype=np.float32)
    np.savez(tmp_path / "val.npz", images=colour, labels=np.array([0, 1, 1]))
    split = read_image_split("npz", "", str(tmp_path / "val.npz"), class_names=["cat", "dog"])
    assert split.images[0].shape == (3, 2, 2) and int(split.images[0].max()) == 128  # floats in [0, 1] -> uint8


@pytest.mark.parametrize(("arrays", "message"), [
    ({"images": np.zeros((2, 4, 4), np.uint8)}, "no array 'labels'"),
    ({"images": np.zeros((2, 4, 4, 2), np.uint8), "labels": np.zeros(2, int)}, r"expected \(N, H, W\) or"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, int)}, r"'labels' has shape \(3,\) for 2"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0.0, 1.0])}, "expected integer class indices"),
    ({"images": np.full((2, 4, 4), 2.0), "labels": np.zeros(2, int)}, r"uint8 \(0..255\) or float in \[0, 1\]"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, 2]), "class_names": np.array(["a", "b"])},
     r"labels span \[0, 2\] but there are 2 classes"),
])
def test_npz_errors_name_the_file(tmp_path, arrays, message):
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(ValueError, match=message) as err:
        read_image_split("npz", str(tmp_path), "train")
    assert str(tmp_path / "train.npz") in str(err.value)


def test_missing_data_says_how_to_make_it(tmp_path):
    with pytest.raises(ValueError, match="data.root is empty.*ipt-ds make-digits DIR"):
        read_image_split("npz", "", "train")
    with pytest.raises(ValueError, match=f"not found at '{tmp_path}/train.npz'.*ipt-ds make-digits DIR"):
        read_image_split("npz", str(tmp_path), "train")
    with pytest.raises(ValueError, match="expected <root>/<split>/<class name>/<image files>"):
        read_image_split("imagefolder", str(tmp_path), "train")


def test_imagefolder_reader_and_errors(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("b", "a")), ("val", ("b",))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (5, 4), (255, 0, 0)).save(tmp_path / split / name / "x.png")
            Image.new("L", (3, 3), 7).save(tmp_path / split / name / "y.jpg")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")  # other files are ignored
    train = read_image_split("imagefolder", str(tmp_path), "train")
    assert train.class_names == ["a", "b"] and train.labels == [0, 0, 1, 1]  # sorted names, not creation order
    assert train.images[0].shape == (3, 4, 5) and train.images[1].shape == (1, 3, 3)
    val = read_image_split("imagefolder", str(tmp_path), "val", class_names=train.class_names)
    assert val.labels == [1, 1]  # 'b' keeps the training split's index
    (tmp_path / "val" / "c").mkdir()
    Image.new("L", (3, 3)).save(tmp_path / "val" / "c" / "z.png")
    with pytest.raises(ValueError, match=r"classes \['c'\] are not in the training split's classes"):
        read_image_split("imagefolder", str(tmp_path), "val", class_names=train.class_names)
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"{tmp_path}/train/a/broken.png: cannot read this image"):
        read_image_split("imagefolder", str(tmp_path), "train")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"{tmp_path}/empty/a: no image files"):
        read_image_split("imagefolder", str(tmp_path), "empty")


def test_batches_take_the_backbones_size_channels_and_normalisation(tmp_path, tiny_vision_models):
    import shutil

    model_dir = tmp_path / "vit"
    shutil.copytree(tiny_vision_models["vit"], model_dir)
    (model_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 16, "width": 16},
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.25, 0.2]}))
    backbone, _ = load_backbone(ModelConfig(name_or_path=str(model_dir)), dtype=torch.float32, with_lm_head=False)
    assert backbone.image.mean == (0.1, 0.2, 0.3) and backbone.image.std == (0.5, 0.25, 0.2)
    grey = torch.full((1, 8, 8), 255, dtype=torch.uint8)  # a white grey-scale image, half the size
    batch = ImageBatcher(backbone.image)([{"image": grey, "labels": 0}, {"image": grey[:, :4], "labels": 1}])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["labels"].tolist() == [0, 1]
    expected = (1 - torch.tensor([0.1, 0.2, 0.3])) / torch.tensor([0.5, 0.25, 0.2])
    torch.testing.assert_close(batch["pixel_values"][:, :, 5, 7], expected.expand(2, -1))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "digits"
    assert write_digits(str(out)) == {"train": 1077, "val": 360, "test": 360}
    return out


def test_make_commands_write_once_and_refuse_to_overwrite(digits, tmp_path, capsys):
    from ipt_ds import cli

    train = read_image_split("npz", str(digits), "train")
    assert train.class_names == [str(d) for d in range(10)] and train.images[0].shape == (1, 8, 8)
    assert np.bincount(train.labels).min() >= 100  # stratified
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "notes.txt").write_text("someone's file")
    for command, target in ((cli.make_digits, digits), (cli.make_vit, tmp_path / "vit")):
        with pytest.raises(SystemExit) as exit_code:
            command(str(target))
        assert exit_code.value.code == 2
        assert "is not an empty directory; choose a new one (nothing is overwritten)" in capsys.readouterr().err
    assert sorted(p.name for p in digits.iterdir()) == ["test.npz", "train.npz", "val.npz"]
    assert [p.name for p in (tmp_path / "vit").iterdir()] == ["notes.txt"]
