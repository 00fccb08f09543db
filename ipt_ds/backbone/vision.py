"""Adapter of vision transformers (ViT, DeiT, DINOv2): pixels in, prompts put in by hooks; no tokenizer, no text."""

from __future__ import annotations

import torch

from ipt_ds.backbone.adapter import FamilyAdapter
from ipt_ds.backbone.images import image_spec


class VisionAdapter(FamilyAdapter):
    family = "vision"
    takes_images = True

    def finish_loading(self, path: str, hf_config, common: dict) -> None:
        self.backbone.image = image_spec(path, hf_config, **common)
        self.backbone.model.embeddings.mask_token = None  # masked-image pretraining only; no forward here uses it

    def check_text_task(self, task, model_name: str) -> None:
        raise ValueError(f"model.name_or_path '{model_name}' is a vision transformer; text tasks need a language "
                         "model (for images set data.format to imagefolder or npz)")

    def encode_image(self, pixel_values: torch.Tensor, *, edit_embeddings=None, edit_layer_input=None) -> torch.Tensor:
        """`Backbone.encode_image`: the edits run as hooks inside the model's own forward."""
        backbone = self.backbone
        handles = []
        try:
            if edit_embeddings is not None:
                embeddings = backbone.base.embeddings
                handles.append(embeddings.register_forward_hook(lambda module, args, out: edit_embeddings(out)))
            if edit_layer_input is not None:
                for index, layer in enumerate(backbone.layer_stack()):  # every family calls layer(hidden_states, ...)
                    handles.append(layer.register_forward_pre_hook(
                        lambda module, args, index=index: (edit_layer_input(index, args[0]), *args[1:])))
            return backbone.base(pixel_values=pixel_values).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
