"""Baselines without prompts: full fine-tuning (every backbone weight trains) and a linear probe (only the head).

Both run the backbone unchanged (`NoPrompt`, as BitFit); they differ only in which backbone parameters carry gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods.base import MethodConfig, NoPrompt
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class FullConfig(MethodConfig):
    name: str = "full"


@dataclass(kw_only=True)
class LinearProbeConfig(MethodConfig):
    name: str = "linear_probe"


@register("full", FullConfig, inputs=("text", "image"))
def build_full(cfg: FullConfig, backbone: Backbone, tokenizer) -> nn.Module:
    for p in backbone.parameters():
        p.requires_grad_(True)
    return NoPrompt(backbone)


@register("linear_probe", LinearProbeConfig, inputs=("text", "image"))
def build_linear_probe(cfg: LinearProbeConfig, backbone: Backbone, tokenizer) -> nn.Module:
    return NoPrompt(backbone)
