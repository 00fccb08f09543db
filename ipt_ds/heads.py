"""Output heads: a trained linear head on a pooled state, or the backbone's own LM/MLM head as a verbalizer.

`linear`: pool the method's hidden states (first real token, mean of real tokens, or last real token) -> dropout ->
Linear(H, C); one output for regression. This is the P-tuning v2 / IPT head. With `siamese`, the two texts of a pair
are encoded apart and the head reads [u, v, |u - v|, u * v] (Sentence-BERT's classifier).
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
from ipt_ds.methods.base import MethodOutput


@dataclass(kw_only=True)
class HeadConfig:
    type: Literal["linear", "verbalizer", "lm"] = "linear"
    """linear: new Linear on a pooled state; verbalizer: the pretrained LM head scored at the label position;
    lm: the pretrained LM head on every target token (generation tasks)."""
    pool: Literal["auto", "cls", "mean", "last"] = "auto"
    """Linear head input. auto: first real token (CLS) for encoders and vision transformers, last real token for
    decoders."""
    dropout: float = 0.1
    """Dropout before the linear head (training only)."""
    label_words: list[str] = field(default_factory=list)
    """Verbalizer words, one per label in the task's label order; empty: the task's defaults."""
    template: str = ""
    """Verbalizer template with {a}, {b} and {mask}; {mask} must end it for decoders (and for generation, where the
    target follows). Empty: the task's default."""
    full_vocab_loss: bool = True
    """Verbalizer training loss over the whole vocabulary (True) or over the label words only (False)."""
    siamese: bool = False
    """Linear head on sentence pairs: encode text_a and text_b separately (same method, same prompts) and classify
    [u, v, |u - v|, u * v] of their pooled states, as Sentence-BERT does; suits sentence-embedding backbones."""

    def validate(self) -> list[str]:
        problems = []
        if self.siamese and self.type != "linear":
            problems.append("head.siamese needs head.type linear")
        if not 0 <= self.dropout < 1:
            problems.append(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.template and "{mask}" not in self.template:
            problems.append(f"head.template '{self.template}' has no {{mask}} placeholder")
        return problems


def pool_hidden(out: MethodOutput, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, H) summary of the T real tokens (right-padded, after the method's P prefix positions): the first (CLS),
    the last, or their mean."""
    hidden = out.hidden[:, out.num_prefix :].float()  # (B, T, H)
    if attention_mask is None:  # images: every position is real
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    index = torch.zeros_like(rows) if how == "cls" else attention_mask.sum(dim=1) - 1
    return hidden[rows, index]


class LinearHead(nn.Module):
    def __init__(self, hidden_size: int, num_outputs: int, *, pool: str, dropout: float, siamese: bool):
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(4 * hidden_size if siamese else hidden_size, num_outputs)

    def forward(self, out: MethodOutput, batch: dict, pair: MethodOutput | None = None):
        """Return (logits (B, C), or scores (B,) for regression; loss if the batch has labels)."""
        features = pool_hidden(out, batch.get("attention_mask"), self.pool)  # (B, H)
        if pair is not None:
            v = pool_hidden(pair, batch["pair_attention_mask"], self.pool)
            features = torch.cat([features, v, (features - v).abs(), features * v], dim=-1)  # (B, 4H)
        # Pooling averages in fp32; the head runs in its own dtype (bf16 / fp16 under DeepSpeed's mixed precision).
        logits = self.linear(self.dropout(features).to(self.linear.weight.dtype)).float()  # (B, C)
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


class LMHead(nn.Module):
    """Generation: the frozen pretrained LM head predicts each target token from the position before it."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self._vocab_logits = backbone.vocab_logits

    def forward(self, out: MethodOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (the target tokens' logits (N, V), their mean cross-entropy)."""
        if "decoder_input_ids" in batch:  # encoder-decoder: the decoder's hidden states, one per target token
            rows, cols = batch["decoder_attention_mask"].nonzero(as_tuple=True)
            logits = self._vocab_logits(out.hidden[rows, cols]).float()
            return logits, nn.functional.cross_entropy(logits, batch["target_ids"][rows, cols])
        target = batch["attention_mask"].bool() & ~batch["source_mask"].bool()  # (B, T)
        target[:, 0] = False  # nothing precedes the first token
        rows, cols = target.nonzero(as_tuple=True)
        logits = self._vocab_logits(out.hidden[rows, cols - 1 + out.num_prefix]).float()  # (N, V)
        return logits, nn.functional.cross_entropy(logits, batch["input_ids"][rows, cols])


def build_head(cfg: HeadConfig, backbone: Backbone, *, num_labels: int, label_token_ids: list[int]) -> nn.Module:
    if cfg.type == "lm":
        return LMHead(backbone)
    if cfg.type == "verbalizer":
        return VerbalizerHead(backbone, label_token_ids, full_vocab_loss=cfg.full_vocab_loss)
    pool = cfg.pool if cfg.pool != "auto" else backbone.adapter.default_pool
    return LinearHead(backbone.hidden_size, max(num_labels, 1), pool=pool, dropout=cfg.dropout, siamese=cfg.siamese)
