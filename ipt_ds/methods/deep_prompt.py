"""Deep key/value prompts at every layer: P-tuning v2 (Liu et al., 2022) and prefix tuning (Li and Liang, 2021).

Both give each of the L layers P trainable key and value vectors that every input position attends to; the backbone
stays frozen. P-tuning v2 learns the (P, L*2*kv) table directly (optionally through a projection) and applies
dropout to it, as its reference code does. Prefix tuning always reparameterizes: an embedding (P, H) -> Linear ->
tanh -> Linear(-> L*2*kv), which stabilizes training; after training the MLP is folded into the plain table that it
produces, which is what the export holds. kv = kv_heads * head_dim, so grouped-query models get kv-head shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.confload import at_least
from ipt_ds.methods.base import MethodConfig, MethodModule, MethodOutput, first_prefix_layer, run_with_prefix
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class PTuningV2Config(MethodConfig):
    name: str = "ptuning_v2"
    num_virtual_tokens: int = 16
    """Prefix length P at every layer."""
    projection: bool = False
    """Produce the table through embedding -> Linear -> tanh -> Linear (P-tuning v2's --prefix_projection)."""
    projection_hidden: int = 512
    """Hidden width of that projection."""
    dropout: float = 0.1
    """Dropout on the prefix vectors during training (P-tuning v2 uses the backbone's hidden dropout, 0.1)."""

    def validate(self) -> list[str]:
        problems = at_least(self, "method", 1, "num_virtual_tokens", "projection_hidden")
        if not 0 <= self.dropout < 1:
            problems.append(f"method.dropout must be in [0, 1), got {self.dropout}")
        return problems


@dataclass(kw_only=True)
class PrefixConfig(PTuningV2Config):
    name: str = "prefix"
    num_virtual_tokens: int = 10
    projection: bool = True
    dropout: float = 0.0

    def validate(self) -> list[str]:
        problems = super().validate()
        if not self.projection:
            problems.append("method.projection must stay true for prefix tuning; use method.name ptuning_v2 for a "
                            "plain prefix table")
        return problems


class DeepPrompt(MethodModule):
    def __init__(self, cfg: PTuningV2Config, backbone: Backbone):
        super().__init__()
        self.num_kv_heads, self.head_dim = backbone.num_kv_heads, backbone.head_dim
        width = backbone.prefix_layers * 2 * self.num_kv_heads * self.head_dim
        num_tokens = cfg.num_virtual_tokens
        self.num_cached_prompts = num_tokens  # key/value prefixes only: nothing passes through the embeddings
        self.first_trained_layer = first_prefix_layer(backbone)
        if cfg.projection:
            self.embedding = nn.Parameter(torch.randn(num_tokens, backbone.hidden_size) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(backbone.hidden_size, cfg.projection_hidden), nn.Tanh(),
                                     nn.Linear(cfg.projection_hidden, width))
        else:
            self.table = nn.Parameter(torch.randn(num_tokens, width) * 0.02)
        self.dropout = nn.Dropout(cfg.dropout)

    def prefix_table(self) -> torch.Tensor:
        """(P, L * 2 * kv) keys and values of every layer."""
        return self.mlp(self.embedding) if hasattr(self, "mlp") else self.table

    def peft_adapter(self) -> tuple[dict, torch.Tensor]:
        """PEFT's prefix tuning in inference mode reads the folded (P, L * 2 * kv) table; kv heads for GQA models."""
        fields = {"peft_type": "PREFIX_TUNING", "prefix_projection": hasattr(self, "mlp"),
                  "num_attention_heads": self.num_kv_heads, "token_dim": self.num_kv_heads * self.head_dim}
        return fields, self.prefix_table()

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        return run_with_prefix(backbone, self.dropout(self.prefix_table()), batch)


@register("ptuning_v2", PTuningV2Config)
def build_ptuning_v2(cfg: PTuningV2Config, backbone: Backbone, tokenizer) -> nn.Module:
    return DeepPrompt(cfg, backbone)


@register("prefix", PrefixConfig)
def build_prefix(cfg: PrefixConfig, backbone: Backbone, tokenizer) -> nn.Module:
    return DeepPrompt(cfg, backbone)
