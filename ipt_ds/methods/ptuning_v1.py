"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

P virtual-token embeddings are reparameterized by a small encoder, a bidirectional 2-layer LSTM followed by an MLP
(or an MLP alone), and placed at the input: all before it, or split around it as P-tuning's templates do (the first
half before the input, the second half before text_b, or before the mask for single texts). The module layout follows
PEFT's PromptEncoder, so that the folded prompt can be exported in PEFT's adapter format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.confload import at_least
from ipt_ds.methods.base import MethodConfig, MethodModule, MethodOutput, run_with_input_prompt
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class PTuningV1Config(MethodConfig):
    name: str = "ptuning_v1"
    num_virtual_tokens: int = 8
    """Number of virtual tokens P."""
    encoder: Literal["lstm", "mlp"] = "lstm"
    """Reparameterization: bidirectional 2-layer LSTM + MLP, or a 3-layer MLP."""
    encoder_hidden: int = 0
    """Hidden width of the encoder; 0: the backbone's hidden size."""
    placement: Literal["prefix", "split"] = "prefix"
    """prefix: all virtual tokens before the input; split: half before the input, half before text_b (or the mask)."""

    def validate(self) -> list[str]:
        return at_least(self, "method", 1, "num_virtual_tokens") + at_least(self, "method", 0, "encoder_hidden")


class PTuningV1(MethodModule):
    def __init__(self, cfg: PTuningV1Config, hidden_size: int):
        super().__init__()
        self.placement = cfg.placement
        self.num_prefix_positions = self.num_embedded_prompts = cfg.num_virtual_tokens
        width = cfg.encoder_hidden or hidden_size
        self.embedding = nn.Embedding(cfg.num_virtual_tokens, hidden_size)
        if cfg.encoder == "lstm":
            self.lstm_head = nn.LSTM(hidden_size, width, num_layers=2, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, hidden_size))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                          nn.Linear(width, hidden_size))

    def prompt(self) -> torch.Tensor:
        """(P, H) virtual-token embeddings: the encoder applied to the trained input embeddings."""
        x = self.embedding.weight.unsqueeze(0)  # (1, P, H)
        if hasattr(self, "lstm_head"):
            x = self.lstm_head(x)[0]  # (1, P, 2 * width)
        return self.mlp_head(x)[0]

    def peft_adapter(self) -> tuple[dict, torch.Tensor] | None:
        if self.placement != "prefix":
            return None  # PEFT's P-tuning only prepends
        fields = {"peft_type": "P_TUNING", "encoder_hidden_size": self.embedding.weight.shape[1],
                  "encoder_reparameterization_type": "LSTM" if hasattr(self, "lstm_head") else "MLP"}
        return fields, self.prompt()

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        batch_size = batch["input_ids"].shape[0]
        prompt = self.prompt().expand(batch_size, -1, -1)  # (B, P, H)
        if self.placement == "prefix":
            return run_with_input_prompt(backbone, prompt, batch)
        return run_with_split_prompt(backbone, prompt, batch)


def run_with_split_prompt(backbone: Backbone, prompt: torch.Tensor, batch: dict) -> MethodOutput:
    """Put the first ceil(P/2) prompt vectors before the input and the rest at `split_position`; return the hidden
    states reordered as [prompt; tokens] so that heads see the same layout as with a plain prefix."""
    embeds, mask = backbone.embed(batch["input_ids"]), batch["attention_mask"]  # (B, T, H), (B, T)
    (batch_size, num_tokens, hidden), num_prompt = embeds.shape, prompt.shape[1]
    first = (num_prompt + 1) // 2
    j = torch.arange(num_prompt + num_tokens, device=embeds.device).expand(batch_size, -1)  # output positions
    split = batch["split_position"].unsqueeze(1)  # (B, 1)
    # Index into [prompt; tokens] (length P + T) for every output position j.
    source = torch.where(j < first, j, torch.where(j < first + split, num_prompt + j - first,
                                                   torch.where(j < num_prompt + split, j - split, j)))
    merged = torch.cat([prompt.to(embeds.dtype), embeds], 1).gather(1, source.unsqueeze(-1).expand(-1, -1, hidden))
    full_mask = torch.cat([mask.new_ones(batch_size, num_prompt), mask], 1)
    token_types = batch.get("token_type_ids")
    if token_types is not None:
        token_types = torch.cat([torch.zeros_like(full_mask[:, :num_prompt]), token_types], 1).gather(1, source)
    hidden_states = backbone.encode(merged, full_mask.gather(1, source), token_types)
    back = source.argsort(dim=1)  # output position of each [prompt; tokens] element
    hidden_states = hidden_states.gather(1, back.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))
    return MethodOutput(hidden_states, full_mask, num_prompt)


@register("ptuning_v1", PTuningV1Config)
def build(cfg: PTuningV1Config, backbone: Backbone, tokenizer) -> nn.Module:
    return PTuningV1(cfg, backbone.hidden_size)
