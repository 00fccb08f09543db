"""The frozen pretrained backbone: the only package that knows transformers internals.

- loading.py: `ModelConfig`, packaged short names, GGUF conversion, `load_backbone` (plain or ZeRO-3 partitioned);
- families.py: which family a model type belongs to;
- frozen.py: `Backbone`, what methods and heads call, and the choice of its family adapter;
- adapter.py, text.py, seq2seq.py, vision.py: what differs by family (forward, late insertion, LM head, facts);
- caches.py: the transformers caches that carry prompts;
- images.py: what a vision backbone expects as input;
- zero3.py: sizes and gathers of ZeRO-3 partitioned parameters.
"""

from ipt_ds.backbone.families import VISION_TYPES
from ipt_ds.backbone.frozen import Backbone
from ipt_ds.backbone.images import ImageSpec
from ipt_ds.backbone.loading import ModelConfig, hub_reachable, load_backbone, resolve_model_path
from ipt_ds.backbone.zero3 import embedding_rows, gathered, local_bytes, num_elements

# What the rest of the trainer imports from the package; the modules hold the rest.
__all__ = [
    "VISION_TYPES", "Backbone", "ImageSpec", "ModelConfig", "embedding_rows", "gathered", "hub_reachable",
    "load_backbone", "local_bytes", "num_elements", "resolve_model_path",
]
