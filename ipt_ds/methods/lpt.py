"""Late Prompt Tuning (Liu, Sun, Huang, Qiu, Findings of EMNLP 2022, "Late Prompt Tuning: A Late Prompt Could Be
Better Than Many Prompts").

One prompt of n vectors is inserted in front of the hidden states entering one intermediate layer k, and a small
generator builds it from the states there, so each input gets its own prompt. Layers below k take no part in
training: they run once without autograd (no activations kept, no gradients), which is where LPT's speed and memory
come from. Generators (width r, `generator_width`):
- `npg`: the summary state (CLS on encoders, the last token of the template stem on decoders) -> Linear(H, r) ->
  ReLU -> Linear(r, n * H);
- `appg` / `mppg`: Linear(H, r) on every real token -> average / max pooling into n segments (as adaptive pooling
  splits a sequence) -> ReLU -> Linear(r, H);
- `static`: no generator, n trained vectors (the paper's late static prompt ablation);
- `cnn`, `mlp`, `lstm`: the IPT instance generators (width r) over the first n states, so one generator module
  serves both insertion points (IPT at the input, here at layer k).
Dropout follows the prompt, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.confload import at_least
from ipt_ds.methods.base import MethodConfig, MethodModule, MethodOutput, leading, source_mask
from ipt_ds.methods.generators import build_generator
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class LPTConfig(MethodConfig):
    name: str = "lpt"
    renamed: ClassVar[dict[str, str]] = {"num_tokens": "num_virtual_tokens", "bottleneck": "generator_width"}
    layer: int = -1
    """k: the prompt enters layer k (0-based), i.e. k frozen layers run below it without autograd; -1: the middle
    layer (num_layers // 2), the reference's choice for RoBERTa-large (12 of 24) and GPT2-large (18 of 36)."""
    num_virtual_tokens: int = 5
    """n: prompt length."""
    generator: Literal["npg", "appg", "mppg", "static", "cnn", "mlp", "lstm"] = "npg"
    """Prompt generator; `static` trains n vectors without one."""
    generator_width: int = 128
    """r: the generator's width: the bottleneck of npg/appg/mppg, the width of the cnn/mlp/lstm generators."""
    dropout: float = 0.1
    """Dropout on the generated prompt (training only)."""

    def validate(self) -> list[str]:
        problems = at_least(self, "method", 1, "num_virtual_tokens", "generator_width")
        problems += at_least(self, "method", -1, "layer")
        if not 0 <= self.dropout < 1:
            problems.append(f"method.dropout must be in [0, 1), got {self.dropout}")
        return problems


def segment_pool(x: torch.Tensor, mask: torch.Tensor, num_segments: int, how: str) -> torch.Tensor:
    """Pool each example's real tokens into `num_segments` (B, T, D) -> (B, n, D), whatever the padding side.

    Segment i of a length-l sequence covers [floor(i l / n), ceil((i + 1) l / n)), like torch's adaptive pooling;
    it is never empty, also when l < n.
    """
    rank = mask.cumsum(dim=1) - 1  # (B, T): index among the real tokens
    length = mask.sum(dim=1, keepdim=True)  # (B, 1)
    i = torch.arange(num_segments, device=x.device)
    start = i * length // num_segments  # (B, n)
    end = ((i + 1) * length + num_segments - 1) // num_segments
    member = (rank[:, None] >= start[..., None]) & (rank[:, None] < end[..., None]) & mask[:, None].bool()  # (B, n, T)
    if how == "avg":
        weights = member.to(x.dtype)
        return weights @ x / weights.sum(dim=-1, keepdim=True)
    return x[:, None].masked_fill(~member[..., None], float("-inf")).amax(dim=2)


class LPT(MethodModule):
    def __init__(self, cfg: LPTConfig, backbone: Backbone, layer: int):
        super().__init__()
        self.cfg, self.layer, self.causal = cfg, layer, backbone.adapter.causal
        num_tokens, hidden, width = cfg.num_virtual_tokens, backbone.hidden_size, cfg.generator_width
        self.num_prefix_positions = num_tokens
        self.first_trained_layer = layer  # the layers below run without autograd on the input alone
        self.reads_frozen_states = True
        self.num_embedded_prompts = 0  # the prompt enters above the embeddings: it takes no position ids
        if cfg.generator == "npg":
            self.down, self.up = nn.Linear(hidden, width), nn.Linear(width, num_tokens * hidden)
        elif cfg.generator in ("appg", "mppg"):
            self.down, self.up = nn.Linear(hidden, width), nn.Linear(width, hidden)
        elif cfg.generator == "static":
            self.prompt = nn.Parameter(torch.randn(num_tokens, hidden))  # nn.Embedding's N(0, 1), as the reference
        else:
            self.generator = build_generator(cfg.generator, hidden, hidden, width)
        self.dropout = nn.Dropout(cfg.dropout)

    def make_prompt(self, states: torch.Tensor, batch: dict) -> torch.Tensor:
        """(B, T, H) states entering layer k -> (B, n, H) prompt."""
        states = states.to(next(self.parameters()).dtype)  # the generator's dtype (bf16 under mixed precision)
        batch_size, num_tokens = states.shape[0], self.cfg.num_virtual_tokens
        mask = source_mask(batch)
        kind = self.cfg.generator
        if kind == "npg":
            rows = torch.arange(batch_size, device=states.device)
            if not self.causal:
                index = torch.zeros_like(rows)  # CLS (an encoder-decoder's encoder: its first token)
            else:  # causal: the end of the template stem has seen the whole input
                index = batch.get("label_position", mask.sum(dim=1) - 1)
            summary = states[rows, index]  # (B, H)
            prompt = self.up(torch.relu(self.down(summary))).view(batch_size, num_tokens, -1)
        elif kind in ("appg", "mppg"):
            pooled = segment_pool(self.down(states), mask, num_tokens, "avg" if kind == "appg" else "max")  # (B, n, r)
            prompt = self.up(torch.relu(pooled))
        elif kind == "static":
            prompt = self.prompt.expand(batch_size, -1, -1)
        else:
            prompt = self.generator(leading(states, mask, num_tokens, 0.0))  # (B, n, H)
        return self.dropout(prompt)

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        mask = batch["attention_mask"]
        states = batch.get("frozen_states")  # (B, T, H) from the frozen-state cache: the lower layers do not run
        embeds = backbone.embed(batch["input_ids"]) if states is None else None
        hidden = backbone.encode_late(embeds, mask, batch.get("token_type_ids"), layer=self.layer,
                                      make_prompt=lambda states: self.make_prompt(states, batch),
                                      num_prompt=self.cfg.num_virtual_tokens, states=states)
        full_mask = torch.cat([mask.new_ones(mask.shape[0], self.cfg.num_virtual_tokens), mask], dim=1)
        return MethodOutput(hidden, full_mask, self.cfg.num_virtual_tokens)


@register("lpt", LPTConfig)
def build(cfg: LPTConfig, backbone: Backbone, tokenizer) -> nn.Module:
    layer = backbone.num_layers // 2 if cfg.layer == -1 else cfg.layer
    if not 1 <= layer < backbone.num_layers:
        raise ValueError(f"method.layer {cfg.layer}: the prompt must enter one of layers 1..{backbone.num_layers - 1} "
                         "of this backbone (-1 picks the middle); for a prompt at the input use prompt_tuning")
    return LPT(cfg, backbone, layer)
