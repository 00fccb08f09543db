"""What a vision backbone expects as input."""

from __future__ import annotations

from dataclasses import dataclass

from ipt_ds.backbone.families import VISION_TYPES


@dataclass(frozen=True)
class ImageSpec:
    """What a vision backbone expects as input: from its config.json and, when present, preprocessor_config.json."""

    size: tuple[int, int]
    """(height, width) that images are resized to."""
    num_channels: int
    mean: tuple[float, ...]
    """Per-channel normalisation: (pixel in [0, 1] - mean) / std; 0.5 / 0.5 without a preprocessor_config.json."""
    std: tuple[float, ...]
    patch_size: int
    num_leading_tokens: int
    """Tokens before the patches in the embeddings' output (CLS; DeiT's distillation token)."""


def image_spec(path: str, hf_config, **common) -> ImageSpec:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(path, **common)
    except (OSError, ValueError):  # no preprocessor_config.json (a random ViT made here): ViT's own defaults
        processor = {}
    channels = hf_config.num_channels
    size = hf_config.image_size
    for key in ("crop_size", "size") if processor.get("do_center_crop") else ("size",):
        if isinstance(processor.get(key), dict) and {"height", "width"} <= processor[key].keys():
            size = (processor[key]["height"], processor[key]["width"])
            break
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    mean, std = processor.get("image_mean", 0.5), processor.get("image_std", 0.5)
    per_channel = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * channels))  # noqa: E731
    patch = hf_config.patch_size
    return ImageSpec(size=size, num_channels=channels, mean=per_channel(mean), std=per_channel(std),
                     patch_size=patch if isinstance(patch, int) else patch[0],
                     num_leading_tokens=VISION_TYPES[hf_config.model_type])
