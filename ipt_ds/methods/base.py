"""What every method shares: its config base class, its output, and the input-level prompt path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ipt_ds.backbone import Backbone


@dataclass(kw_only=True)
class MethodConfig:
    name: str
    """Registered method name (see `ipt-ds methods`)."""

    def validate(self) -> list[str]:
        return []


class MethodOutput(NamedTuple):
    hidden: torch.Tensor
    """(B, P + T, H) last hidden states; P = `num_prefix` positions the method put before the T input tokens."""
    attention_mask: torch.Tensor
    """(B, P + T) mask matching `hidden`."""
    num_prefix: int


def run_with_input_prompt(backbone: Backbone, prompt: torch.Tensor | None, batch: dict) -> MethodOutput:
    """Prepend `prompt` (B, P, H) to the input's word embeddings and run the backbone (P = 0 for no prompt).
    Without a prompt, images run through their vision backbone unchanged."""
    if "pixel_values" in batch:
        assert prompt is None, "input prompts are for token embeddings; images take visual prompts (methods/vpt.py)"
        hidden = backbone.encode_image(batch["pixel_values"])  # (B, S, H)
        return MethodOutput(hidden, hidden.new_ones(hidden.shape[:2], dtype=torch.long), 0)
    embeds = backbone.embed(batch["input_ids"])  # (B, T, H)
    mask = batch["attention_mask"]
    num_prefix = 0
    if prompt is not None:
        num_prefix = prompt.shape[1]
        embeds = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)  # (B, P + T, H)
        mask = torch.cat([mask.new_ones(mask.shape[0], num_prefix), mask], dim=1)
    hidden = backbone.encode(embeds, mask, batch.get("token_type_ids"))
    return MethodOutput(hidden, mask, num_prefix)


def source_mask(batch: dict) -> torch.Tensor:
    """(B, T) the tokens a prompt generator may read: a generation example's source (never its target), else every
    real token."""
    return batch.get("source_mask", batch["attention_mask"])


def leading(x: torch.Tensor, mask: torch.Tensor, n: int, fill: float | int) -> torch.Tensor:
    """The first `n` positions of `x` (B, T, ...) where `mask` (B, T) is set, in order and whatever the padding side;
    `fill` where a row has fewer. Returns (B, n, ...)."""
    order = torch.argsort((mask == 0).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, min(n, T))
    index = order.view(*order.shape, *[1] * (x.dim() - 2)).expand(-1, -1, *x.shape[2:])
    picked = x.gather(1, index)
    present = torch.arange(order.shape[1], device=x.device) < mask.sum(dim=1, keepdim=True)  # (B, min(n, T))
    picked = picked.masked_fill(~present.view(*present.shape, *[1] * (x.dim() - 2)), fill)
    missing = n - picked.shape[1]
    if missing > 0:
        picked = torch.cat([picked, picked.new_full((x.shape[0], missing, *x.shape[2:]), fill)], dim=1)
    return picked
