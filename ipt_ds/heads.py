"""Output heads: a trained linear head on a pooled state, or the backbone's own LM/MLM head as a verbalizer.

`linear`: pool the method's hidden states (first real token, mean of real tokens, or last real token) -> dropout ->
Linear(H, C); one output for regression. This is the P-tuning v2 / IPT head.
`verbalizer`: read the hidden state at the label position (the mask token for MLM encoders; the last token of the
template stem for decoders), score it with the frozen pretrained LM head, and keep the label words' logits. Training
uses cross-entropy over the full vocabulary with the gold label word as target (as LPT and null prompts do), or
over the label words only; prediction is the argmax over the label words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods import MethodOutput


@dataclass(kw_only=True)
class HeadConfig:
    type: Literal["linear", "verbalizer"] = "linear"
    """linear: new Linear on a pooled state; verbalizer: the pretrained LM head scored at the label position."""
    pool: Literal["auto", "cls", "mean", "last"] = "auto"
    """Linear head input. auto: first real token (CLS) for encoders, last real token for decoders."""
    dropout: float = 0.1
    """Dropout before the linear head (training only)."""
    label_words: list[str] = field(default_factory=list)
    """Verbalizer words, one per label in the task's label order; empty: the task's defaults."""
    template: str = ""
    """Verbalizer template with {a}, {b} and {mask}; {mask} must end it for decoders. Empty: the task's default."""
    full_vocab_loss: bool = True
    """Verbalizer training loss over the whole vocabulary (True) or over the label words only (False)."""

    def validate(self) -> list[str]:
        problems = []
        if not 0 <= self.dropout < 1:
            problems.append(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.template and "{mask}" not in self.template:
            problems.append(f"head.template '{self.template}' has no {{mask}} placeholder")
        return problems


def _real_token_index(out: MethodOutput, batch: dict, which: str) -> torch.Tensor:
    """(B,) position in `out.hidden` of each row's first or last real token (inputs are right-padded)."""
    lengths = batch["attention_mask"].sum(dim=1)
    index = torch.zeros_like(lengths) if which == "first" else lengths - 1
    return index + out.num_prefix


class LinearHead(nn.Module):
    def __init__(self, hidden_size: int, num_outputs: int, *, pool: str, dropout: float):
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_outputs)

    def forward(self, out: MethodOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (logits (B, C), or scores (B,) for regression; loss if the batch has labels)."""
        hidden = out.hidden.float()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pool == "mean":
            mask = out.attention_mask.unsqueeze(-1).float()  # (B, S, 1), prompt positions included
            pooled = (hidden * mask).sum(1) / mask.sum(1)
        else:
            pooled = hidden[rows, _real_token_index(out, batch, "first" if self.pool == "cls" else "last")]
        logits = self.linear(self.dropout(pooled))  # (B, C)
        if logits.shape[-1] == 1:
            scores = logits.squeeze(-1)
            return scores, nn.functional.mse_loss(scores, batch["labels"].float()) if "labels" in batch else None
        return logits, nn.functional.cross_entropy(logits, batch["labels"]) if "labels" in batch else None


class VerbalizerHead(nn.Module):
    def __init__(self, backbone: Backbone, label_token_ids: list[int], *, full_vocab_loss: bool):
        super().__init__()
        # A buffer, not a parameter: nothing new trains; the LM head is the backbone's own and stays frozen.
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids), persistent=False)
        self.full_vocab_loss = full_vocab_loss
        self._vocab_logits = backbone.vocab_logits

    def forward(self, out: MethodOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (label-word logits (B, C); loss if the batch has labels)."""
        rows = torch.arange(out.hidden.shape[0], device=out.hidden.device)
        hidden = out.hidden[rows, batch["label_position"] + out.num_prefix]  # (B, H)
        vocab_logits = self._vocab_logits(hidden).float()  # (B, V)
        logits = vocab_logits[:, self.label_token_ids]  # (B, C)
        if "labels" not in batch:
            return logits, None
        if self.full_vocab_loss:
            return logits, nn.functional.cross_entropy(vocab_logits, self.label_token_ids[batch["labels"]])
        return logits, nn.functional.cross_entropy(logits, batch["labels"])


def build_head(cfg: HeadConfig, backbone: Backbone, *, num_labels: int, label_token_ids: list[int]) -> nn.Module:
    if cfg.type == "verbalizer":
        return VerbalizerHead(backbone, label_token_ids, full_vocab_loss=cfg.full_vocab_loss)
    pool = cfg.pool if cfg.pool != "auto" else ("cls" if backbone.family == "encoder" else "last")
    return LinearHead(backbone.hidden_size, max(num_labels, 1), pool=pool, dropout=cfg.dropout)
