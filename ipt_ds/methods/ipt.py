"""Instance-wise Prompt Tuning (Jiang et al., 2022, "Instance-wise Prompt Tuning for Pretrained Language Models").

Every input gets its own prompt, built from its first N tokens, while the backbone stays frozen. The config keys are
the reference's: `method` picks the path, `instance` turns the instance prompt on, `instance_pretrain` loads the
lookup table from `emb_checkpoints`, `fix_emb` freezes it, and `encoder` adds a generator (cnn, mlp, lstm).
- Prompt path (`method: prompt-tuning`): the N instance vectors are prepended to the input embeddings (with
  `task_prompt`, after N task-level vectors); with `instance: false` this is plain prompt tuning.
- Prefix path (`method: prefix-tuning`): a task-level key/value prefix of N positions at every layer; the instance
  term (N vectors of 2 x kv) is scaled by `instance_scale` (0.05) and added to the prefixes of `instance_layers` ([0]).
Instance vectors: rows of a (V, D) lookup table indexed by the first N token ids (random or pretrained), optionally
passed through a generator; a generator without a pretrained table reads the backbone's own embeddings of those
tokens (activations, so nothing partitioned is read under ZeRO-3). docs/methods/ipt.md lists the deliberate
differences from the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods import register
from ipt_ds.methods.base import MethodConfig, MethodOutput, run_with_input_prompt
from ipt_ds.methods.generators import build_generator


@dataclass(kw_only=True)
class IPTConfig(MethodConfig):
    name: str = "ipt"
    method: Literal["prompt-tuning", "prefix-tuning"] = "prompt-tuning"
    """Where the prompt enters: the input embeddings, or the per-layer key/value prefixes."""
    instance: bool = True
    """Instance-wise prompts; false gives the task-level baseline of the chosen path."""
    instance_pretrain: bool = False
    """Load the instance lookup table from emb_checkpoints instead of initialising it randomly."""
    encoder: Literal["", "cnn", "mlp", "lstm"] = ""
    """Generator applied to the instance vectors; empty: the looked-up rows are the prompt."""
    emb_checkpoints: str = ""
    """Pretrained lookup table (safetensors, or a reference-style .pt read with weights_only) of shape (V, D)."""
    fix_emb: bool = False
    """Freeze the lookup table (the generator and task prompt still train)."""
    num_tokens: int = 16
    """Prompt length N = number of leading input tokens that build the instance prompt."""
    generator_width: int = 128
    """Channels per kernel (cnn), hidden size (mlp) or LSTM size per direction (lstm)."""
    task_prompt: bool = False
    """Prompt path: also prepend N task-level vectors before the instance prompt."""
    instance_scale: float = 0.05
    """Prefix path: scale of the instance term added to the task prefix."""
    instance_layers: list[int] = field(default_factory=lambda: [0])
    """Prefix path: layers whose prefixes receive the instance term."""
    init_range: float = 0.5
    """Random tables and task prompts start U(-init_range, init_range)."""

    def validate(self) -> list[str]:
        problems = [] if self.num_tokens >= 1 else [f"method.num_tokens must be >= 1, got {self.num_tokens}"]
        if self.instance_pretrain and not self.emb_checkpoints:
            problems.append("method.instance_pretrain needs method.emb_checkpoints (the pretrained table file)")
        if not self.instance and (self.encoder or self.instance_pretrain):
            problems.append("method.encoder and method.instance_pretrain need method.instance: true")
        return problems


def load_table(path: str, shape: tuple[int, int]) -> torch.Tensor:
    """Read a pretrained lookup table; a mismatch names both shapes."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"method.emb_checkpoints: '{path}' does not exist; run `ipt-ds pretrain` or fix the path")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
    else:
        loaded = torch.load(file, map_location="cpu", weights_only=True)  # never unpickles code
        tensors = loaded if isinstance(loaded, dict) else {"table": loaded}
    table = tensors.get("embedding", tensors.get("table", next(iter(tensors.values()))))
    if tuple(table.shape) != shape:
        raise ValueError(f"method.emb_checkpoints: '{path}' holds a table of shape {tuple(table.shape)}, but this "
                         f"backbone and path need {shape} (vocabulary x width); was it built for another tokenizer "
                         "or method path?")
    return table.float()


class IPT(nn.Module):
    def __init__(self, cfg: IPTConfig, backbone: Backbone, pad_id: int):
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        num_tokens, hidden = cfg.num_tokens, backbone.hidden_size
        self.prefix_path = cfg.method == "prefix-tuning"
        kv = backbone.num_kv_heads * backbone.head_dim
        self.shape = (backbone.num_layers * 2, backbone.num_kv_heads, backbone.head_dim)
        width = 2 * kv if self.prefix_path else hidden  # one instance vector per prompt position
        self.num_prefix_positions = 0 if self.prefix_path else num_tokens * (1 + (cfg.task_prompt and cfg.instance))
        if self.prefix_path:
            self.task_prefix = nn.Parameter(torch.randn(num_tokens, backbone.num_layers * 2 * kv) * 0.02)
        elif cfg.task_prompt or not cfg.instance:
            self.task_prompt = nn.Parameter(torch.empty(num_tokens, hidden).uniform_(-cfg.init_range, cfg.init_range))
        if cfg.instance and (cfg.instance_pretrain or not cfg.encoder):
            shape = (backbone.vocab_size, width)
            table = load_table(cfg.emb_checkpoints, shape) if cfg.instance_pretrain else \
                torch.empty(shape).uniform_(-cfg.init_range, cfg.init_range)
            self.table = nn.Embedding.from_pretrained(table, freeze=cfg.fix_emb)
        if cfg.instance and cfg.encoder:
            d_in = width if hasattr(self, "table") else hidden
            self.generator = build_generator(cfg.encoder, d_in, width, cfg.generator_width)

    def instance_vectors(self, backbone: Backbone, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N, D) from the first N token ids (padded when the input is shorter)."""
        num_tokens = self.cfg.num_tokens
        ids = nn.functional.pad(input_ids, (0, max(0, num_tokens - input_ids.shape[1])), value=self.pad_id)
        ids = ids[:, :num_tokens]
        x = self.table(ids) if hasattr(self, "table") else backbone.embed(ids).float()
        return self.generator(x) if hasattr(self, "generator") else x

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        input_ids = batch["input_ids"]
        batch_size = input_ids.shape[0]
        if not self.prefix_path:
            parts = [self.task_prompt.expand(batch_size, -1, -1)] if hasattr(self, "task_prompt") else []
            if self.cfg.instance:
                parts.append(self.instance_vectors(backbone, input_ids))
            return run_with_input_prompt(backbone, torch.cat(parts, dim=1), batch)
        num_tokens = self.cfg.num_tokens
        kv = self.task_prefix.view(1, num_tokens, *self.shape).expand(batch_size, -1, -1, -1, -1)  # (B, N, 2L, h, d)
        if self.cfg.instance:
            term = self.instance_vectors(backbone, input_ids).view(batch_size, num_tokens, 2, *self.shape[1:])
            slots = torch.zeros_like(kv)
            for layer in self.cfg.instance_layers:
                slots = slots.index_add(2, torch.tensor([2 * layer, 2 * layer + 1], device=kv.device), term)
            kv = kv + self.cfg.instance_scale * slots
        embeds = backbone.embed(input_ids)
        kv = kv.permute(2, 0, 3, 1, 4).to(embeds.dtype)  # (2L, B, heads, N, d)
        prefix = [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(self.shape[0] // 2)]
        mask = batch["attention_mask"]
        full_mask = torch.cat([mask.new_ones(batch_size, num_tokens), mask], dim=1)
        hidden = backbone.encode(embeds, full_mask, batch.get("token_type_ids"), prefix=prefix)
        return MethodOutput(hidden, mask, 0)


@register("ipt", IPTConfig)
def build(cfg: IPTConfig, backbone: Backbone, tokenizer) -> nn.Module:
    bad = [layer for layer in cfg.instance_layers if not 0 <= layer < backbone.num_layers]
    if bad:
        raise ValueError(f"method.instance_layers {bad} outside the backbone's layers 0..{backbone.num_layers - 1}")
    return IPT(cfg, backbone, tokenizer.pad_token_id)
