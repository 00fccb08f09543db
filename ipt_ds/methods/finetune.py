"""Baselines without prompts: full fine-tuning (every backbone weight trains) and a linear probe (only the head).

Both run the backbone unchanged (`NoPrompt`, as BitFit); they differ only in which backbone parameters carry gradients.
The linear probe can also start from the frozen-state cache (`train.frozen_cache`): the last layer's output, computed
once per example, so that a step runs only what follows the stack (a final norm) and the head.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods.base import MethodConfig, MethodOutput, NoPrompt
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


class LinearProbe(NoPrompt):
    """The frozen backbone; with cached states (the output of its last layer) nothing of the stack runs."""

    reads_frozen_states = True

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        states = batch.get("frozen_states")  # (B, T, H)
        if states is None:
            return super().forward(backbone, batch)
        hidden = backbone.encode_late(None, batch["attention_mask"], batch.get("token_type_ids"),
                                      layer=self.first_trained_layer, make_prompt=lambda states: states[:, :0],
                                      num_prompt=0, states=states)
        return MethodOutput(hidden, batch["attention_mask"], 0)


@register("linear_probe", LinearProbeConfig, inputs=("text", "image"))
def build_linear_probe(cfg: LinearProbeConfig, backbone: Backbone, tokenizer) -> nn.Module:
    return LinearProbe(backbone)
