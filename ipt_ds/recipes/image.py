"""Image classification on a frozen vision transformer: the recipe of runs whose `data.format` is an image layout
(imagefolder, npz), and `make_vit`, which saves a small ViT with random weights (`ipt-ds make-vit`).

The loop, DeepSpeed engine, checkpoints and exports are those of the text tasks; only the data (pixels instead of
token ids) and the methods that accept them (`inputs` in the method registry) differ.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch

from ipt_ds import checkpoint
from ipt_ds.backbone import VISION_TYPES, load_backbone
from ipt_ds.config import Config
from ipt_ds.data.images import ImageBatcher, ImageSplit, class_names_of, read_image_split
from ipt_ds.data.pipeline import logits_of, predict_sharded
from ipt_ds.data.sampling import sample_per_class
from ipt_ds.engine import TrainState, ds_dtype
from ipt_ds.heads import build_head
from ipt_ds.methods import METHODS, get_method
from ipt_ds.metrics import compute_metrics, constant_baseline, log_split, record_split
from ipt_ds.model import PromptModel
from ipt_ds.recipes.base import best_results

log = logging.getLogger("ipt_ds")
METRICS = ("acc", "macro_f1")


def features_of(split: ImageSplit) -> list[dict]:
    return [{"image": image, "labels": label} for image, label in zip(split.images, split.labels)]


def build_image_model(cfg: Config, num_labels: int, *, dtype: torch.dtype, ds_config: dict | None) -> PromptModel:
    """The frozen vision backbone with the configured method and a linear head; clear errors for what cannot pair."""
    spec = get_method(cfg.method.name)
    if "image" not in spec.inputs:
        usable = ", ".join(sorted(name for name, s in METHODS.items() if "image" in s.inputs))
        raise ValueError(f"method.name '{cfg.method.name}' works on text; for images (data.format "
                         f"{cfg.data.format}) use one of: {usable}")
    if cfg.head.type != "linear" or cfg.head.siamese:
        raise ValueError("image tasks take head.type linear without head.siamese (a verbalizer needs a vocabulary)")
    backbone, _ = load_backbone(cfg.model, dtype=dtype, with_lm_head=False, ds_config=ds_config)
    if not backbone.adapter.takes_images:
        raise ValueError(f"model.name_or_path '{cfg.model.name_or_path}' is a '{backbone.model.config.model_type}' "
                         f"model; data.format {cfg.data.format} needs a vision transformer ({', '.join(VISION_TYPES)})")
    method = spec.build(cfg.method, backbone, None)
    return PromptModel(backbone, method, build_head(cfg.head, backbone, num_labels=num_labels, label_token_ids=[]))


class ImageRecipe:
    """Image classification on `cfg.data` (`ipt-ds train` with data.format imagefolder or npz)."""

    kind = "image"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def prepare(self, engine) -> None:
        pass

    def load_model(self, *, dtype: torch.dtype, ds_config: dict | None) -> PromptModel:
        """The model of `cfg` as before training; reads only the class names of the training split."""
        data = self.cfg.data
        num_labels = len(class_names_of(data.format, data.root, data.train_split))
        return build_image_model(self.cfg, num_labels, dtype=dtype, ds_config=ds_config)

    def build(self, ds_config: dict) -> tuple[PromptModel, list[dict], dict]:
        data = self.cfg.data
        train = read_image_split(data.format, data.root, data.train_split)
        self.class_names = train.class_names
        self.eval_features = features_of(read_image_split(data.format, data.root, data.eval_split,
                                                          class_names=self.class_names))
        self.test_features = features_of(read_image_split(data.format, data.root, data.test_split,
                                                          class_names=self.class_names)) if data.test_split else []
        features = features_of(train)
        if data.num_shots:  # sample_per_class reads only .guid and .label
            rows = [SimpleNamespace(guid=str(i), label=f["labels"], index=i) for i, f in enumerate(features)]
            features = [features[row.index] for row in sample_per_class(rows, data.num_shots, self.cfg.run.seed)]
        model = build_image_model(self.cfg, len(self.class_names), dtype=ds_dtype(ds_config), ds_config=ds_config)
        self.batcher = ImageBatcher(model.backbone.image)
        log.info("%d training images, %d classes; input %s x %d channels", len(features), len(self.class_names),
                 "x".join(map(str, model.backbone.image.size)), model.backbone.image.num_channels)
        return model, features, {"task": data.task, "label_names": self.class_names}

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return self.batcher(features)

    def lengths(self, features: list[dict]) -> list[int]:
        return [1] * len(features)  # one input size: batches are drawn at random, not bucketed by length

    def loss_terms(self, features: list[dict]) -> None:
        return None  # a mean over images

    def evaluate(self, engine) -> dict[str, float]:
        return self.score(engine, self.eval_features)

    def score(self, engine, features: list[dict]) -> dict[str, float]:
        scores = predict_images(engine, features, self.batcher, self.cfg.train.eval_batch_size)
        predictions = [max(range(len(s)), key=s.__getitem__) for s in scores]
        return compute_metrics(METRICS, predictions=predictions, labels=[f["labels"] for f in features])

    def export(self, engine, path: Path, meta: dict, rank: int) -> None:
        checkpoint.export_trainable(engine.module, path, meta, rank=rank)

    def finish(self, engine, state: TrainState, out: Path, rank: int) -> dict:
        """Score the best export on the eval (and test) split; rank 0 writes results.json."""
        cfg = self.cfg
        results = best_results(engine, cfg, state, out, cfg.data.task)
        for split, features in (("eval", self.eval_features), ("test", self.test_features)):
            if features:
                labels = [f["labels"] for f in features]
                record_split(results, split, self.score(engine, features),
                             constant_baseline(METRICS, labels, regression=False))
                results[f"{split}_majority_acc"] = 100 * max(Counter(labels).values()) / len(features)
        if rank == 0:
            checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=2))
            for split in ("eval", "test"):
                if split in results:
                    log_split(log, results, split, getattr(cfg.data, f"{split}_split"))
        return results


def predict_images(engine, features: list[dict], batcher: ImageBatcher, batch_size: int) -> list[list[float]]:
    """Logits of every image, each run once across all ranks; every rank gets all of them back, in input order."""
    return predict_sharded(engine, [1] * len(features), batch_size,
                           lambda indices: batcher([features[i] for i in indices]),
                           lambda batch: logits_of(engine, batch))


def make_vit(directory: str, *, image_size: int = 32, patch_size: int = 4, hidden_size: int = 64, num_layers: int = 4,
             num_heads: int = 4, intermediate_size: int = 128, num_channels: int = 3, initializer_range: float = 0.02,
             seed: int = 0) -> Path:
    """Save a ViT with random weights (transformers' own initialisation, seeded) in HF layout to `directory`, which
    must be new or empty. It has no preprocessor_config.json, so inputs are normalised with mean = std = 0.5."""
    from transformers import ViTConfig, ViTModel

    out = Path(directory).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"'{out}' exists and is not an empty directory; choose a new one (nothing is overwritten)")
    if image_size % patch_size:
        raise ValueError(f"--image_size {image_size} is not a multiple of --patch_size {patch_size}")
    if hidden_size % num_heads:
        raise ValueError(f"--hidden_size {hidden_size} is not a multiple of --num_heads {num_heads}")
    torch.manual_seed(seed)
    config = ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       intermediate_size=intermediate_size, num_channels=num_channels,
                       initializer_range=initializer_range)
    ViTModel(config).save_pretrained(out)  # with the pooler that pretrained ViTs ship (loading drops it)
    return out
