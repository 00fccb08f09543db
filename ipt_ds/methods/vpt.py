"""Visual Prompt Tuning (Jia, Tang, Chen, Cardie, Belongie, Hariharan and Lim, ECCV 2022, arXiv 2203.12119).

P trainable vectors enter a frozen vision transformer's token sequence right after its leading token(s) (CLS; DeiT's
distillation token too) and before the patch tokens, once the embeddings (patch projection, CLS, position
embeddings) have been formed. VPT-shallow (`depth: shallow`) inserts them before the first layer and lets them flow
through the stack. VPT-deep (`depth: deep`) gives each of the L layers its own P vectors: the first set is inserted
like the shallow one, and at every later layer the P positions that the previous layer produced are replaced by that
layer's new vectors, so prompts never accumulate. Only the prompts and a linear head on the final CLS state train.
As in the reference code (github.com/kmnp/vpt), prompts start uniform in +-sqrt(6 / (C·p² + H)), Xavier's bound for
a p x p patch of C channels projected to H (`init: xavier`), and dropout applies to them in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.confload import at_least
from ipt_ds.methods.base import MethodConfig, MethodModule, MethodOutput
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class VPTConfig(MethodConfig):
    name: str = "vpt"
    renamed: ClassVar[dict[str, str]] = {"num_tokens": "num_virtual_tokens"}
    depth: Literal["shallow", "deep"] = "shallow"
    """shallow: P prompts before the first layer; deep: new P prompts at every layer (L·P vectors)."""
    num_virtual_tokens: int = 10
    """Prompt length P (the paper picks it per task from 1 to 200)."""
    init: Literal["xavier", "uniform", "normal"] = "xavier"
    """xavier: U(+-sqrt(6 / (C·p² + H))) from the patch size, as the reference; uniform: U(+-init_scale);
    normal: N(0, init_scale²)."""
    init_scale: float = 0.02
    """Half-width (uniform) or standard deviation (normal) of the initial prompts; unused by xavier."""
    dropout: float = 0.1
    """Dropout on the prompt vectors in training (0.1 in the reference configs)."""

    def validate(self) -> list[str]:
        problems = at_least(self, "method", 1, "num_virtual_tokens")
        if not 0 <= self.dropout < 1:
            problems.append(f"method.dropout must be in [0, 1), got {self.dropout}")
        if not self.init_scale > 0:
            problems.append(f"method.init_scale must be > 0, got {self.init_scale}")
        return problems


class VisualPrompt(MethodModule):
    def __init__(self, prompts: torch.Tensor, *, num_leading: int, deep: bool, dropout: float):
        super().__init__()
        self.prompts = nn.Parameter(prompts)  # (L or 1, P, H)
        self.num_leading, self.deep = num_leading, deep
        self.num_prefix_positions = prompts.shape[1]  # after the embeddings: they take no position ids
        self.dropout = nn.Dropout(dropout)

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        pixels = batch["pixel_values"]  # (B, C, H, W)
        batch_size, start = pixels.shape[0], self.num_leading
        end = start + self.prompts.shape[1]

        def prompt(layer: int, like: torch.Tensor) -> torch.Tensor:  # (B, P, H); dropout per sample, as the reference
            return self.dropout(self.prompts[layer].expand(batch_size, -1, -1)).to(like.dtype)

        def insert(tokens: torch.Tensor) -> torch.Tensor:  # (B, K + N, H) -> (B, K + P + N, H)
            return torch.cat([tokens[:, :start], prompt(0, tokens), tokens[:, start:]], dim=1)

        def replace(layer: int, states: torch.Tensor) -> torch.Tensor:  # (B, K + P + N, H), same shape out
            if layer == 0:  # its prompts were inserted after the embeddings
                return states
            return torch.cat([states[:, :start], prompt(layer, states), states[:, end:]], dim=1)

        hidden = backbone.encode_image(pixels, edit_embeddings=insert, edit_layer_input=replace if self.deep else None)
        # The head pools CLS (position 0); prompt outputs stay in the sequence, as in the reference.
        return MethodOutput(hidden, hidden.new_ones(hidden.shape[:2], dtype=torch.long), 0)


def initial_prompts(cfg: VPTConfig, backbone: Backbone) -> torch.Tensor:
    image = backbone.image
    shape = (backbone.num_layers if cfg.depth == "deep" else 1, cfg.num_virtual_tokens, backbone.hidden_size)
    if cfg.init == "normal":
        return torch.randn(shape) * cfg.init_scale
    if cfg.init == "uniform":
        bound = cfg.init_scale
    else:  # read from the configs, never from (possibly partitioned) weights
        bound = math.sqrt(6.0 / (image.num_channels * image.patch_size**2 + backbone.hidden_size))
    return torch.empty(shape).uniform_(-bound, bound)


@register("vpt", VPTConfig, inputs=("image",))
def build(cfg: VPTConfig, backbone: Backbone, tokenizer) -> nn.Module:
    if backbone.image is None:
        raise ValueError(f"method.name vpt needs a vision transformer backbone; '{backbone.model.config.model_type}' "
                         "is not one (supported: vit, deit, dinov2)")
    return VisualPrompt(initial_prompts(cfg, backbone), num_leading=backbone.image.num_leading_tokens,
                        deep=cfg.depth == "deep", dropout=cfg.dropout)
