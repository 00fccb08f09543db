"""Baselines without prompts: full fine-tuning (every backbone weight trains) and a linear probe (only the head).

Both run the backbone unchanged; they differ only in which backbone parameters carry gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods import register
from ipt_ds.methods.base import MethodConfig, MethodOutput, run_with_input_prompt


class NoPrompt(nn.Module):
    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        return run_with_input_prompt(backbone, None, batch)


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
    return NoPrompt()


@register("linear_probe", LinearProbeConfig, inputs=("text", "image"))
def build_linear_probe(cfg: LinearProbeConfig, backbone: Backbone, tokenizer) -> nn.Module:
    return NoPrompt()
