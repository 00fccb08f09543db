"""Instance-wise Prompt Tuning (Jiang et al., 2022, "Instance-wise Prompt Tuning for Pretrained Language Models").

Every input gets its own prompt, built from its first N tokens, while the backbone stays frozen. The config keys are
the reference's: `method` picks the path, `instance` turns the instance prompt on, `instance_pretrain` loads the
lookup table from `emb_checkpoints`, `fix_emb` freezes it, and `encoder` adds a generator (cnn, mlp, lstm).
- Prompt path (`method: prompt-tuning`): the N instance vectors are prepended to the input embeddings (with
  `task_prompt`, after N task-level vectors); with `instance: false` this is plain prompt tuning.
- Prefix path (`method: prefix-tuning`): a task-level key/value prefix of N positions at every layer; the instance
  term (N vectors of 2 x kv) is scaled by `instance_scale` (0.05) and added to the prefixes of `instance_layers` ([0]).
- Residual (`residual: true`, not in the reference): the instance term is added to a task-level prompt (prompt path)
  or task prefix (prefix path) through a per-dimension gate that starts at 0, so step 0 is exactly prompt tuning
  (or the task prefix alone) and training decides how much instance information to use.
Instance vectors: rows of a (V, D) lookup table indexed by the first N token ids (random or pretrained), optionally
passed through a generator; a generator without a pretrained table reads the backbone's own embeddings of those
tokens (activations, so nothing partitioned is read under ZeRO-3). docs/methods/ipt.md lists the deliberate
differences from the reference code.
Pretrained instance prompts (`ipt-ds pretrain`, docs/pretrain.md) are a directory of `generator.safetensors` (the
table and the generator's tensors) and `generator_config.json` (what they were built for); `instance_pretrain` loads
the table and, when `encoder` names the same generator, the generator too, after checking that both sides match.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.confload import at_least
from ipt_ds.methods.base import (
    MethodConfig,
    MethodModule,
    MethodOutput,
    first_prefix_layer,
    leading,
    run_with_input_prompt,
    run_with_prefix,
    source_mask,
)
from ipt_ds.methods.generators import build_generator
from ipt_ds.methods.prompt_tuning import initial_prompt
from ipt_ds.methods.registry import register

log = logging.getLogger(__name__)
ARTIFACT_FORMAT = "ipt-ds instance prompts v1"
ARTIFACT_WEIGHTS = "generator.safetensors"
ARTIFACT_CONFIG = "generator_config.json"
TABLE_KEY = "embedding"
GENERATOR_PREFIX = "generator."

@dataclass(kw_only=True)
class IPTConfig(MethodConfig):
    name: str = "ipt"
    renamed: ClassVar[dict[str, str]] = {"num_tokens": "num_virtual_tokens"}
    method: Literal["prompt-tuning", "prefix-tuning"] = "prompt-tuning"
    """Where the prompt enters: the input embeddings, or the per-layer key/value prefixes."""
    instance: bool = True
    """Instance-wise prompts; false gives the task-level baseline of the chosen path."""
    instance_pretrain: bool = False
    """Load the instance lookup table from emb_checkpoints instead of initialising it randomly, and the generator's
    weights when emb_checkpoints has a generator of the type named by encoder."""
    encoder: Literal["", "cnn", "mlp", "lstm"] = ""
    """Generator applied to the instance vectors; empty: the looked-up rows are the prompt."""
    emb_checkpoints: str = ""
    """Pretrained instance prompts: an `ipt-ds pretrain` artifact (directory), or a bare (V, D) table (safetensors,
    or a reference-style .pt read with weights_only)."""
    fix_emb: bool = False
    """Freeze the lookup table (the generator and task prompt still train)."""
    num_virtual_tokens: int = 16
    """Prompt length N = number of leading input tokens that build the instance prompt."""
    generator_width: int = 128
    """Channels per kernel (cnn), hidden size (mlp) or LSTM size per direction (lstm)."""
    task_prompt: bool = False
    """Prompt path: also prepend N task-level vectors before the instance prompt."""
    instance_scale: float = 0.05
    """Prefix path: scale of the instance term added to the task prefix."""
    instance_layers: list[int] = field(default_factory=lambda: [0])
    """Prefix path: layers whose prefixes receive the instance term."""
    residual: bool = False
    """The instance term is a residual on a task-level prompt (prompt path) or task prefix (prefix path), through a
    learned per-dimension gate that starts at 0: step 0 is plain prompt tuning (prefix: the task prefix alone). On
    the prefix path the gate replaces instance_scale. False: the reference's behaviour."""
    generator_dropout: float = 0.0
    """Dropout on the instance term during training (few-shot data: a generator overfits quickly)."""
    init: Literal["random", "vocab", "text"] = "random"
    """Prompt path: how the task-level prompt starts, as prompt tuning's `init` (random: U(-init_range, init_range);
    vocab: embeddings of random frequent tokens; text: of init_text)."""
    init_text: str = ""
    """Text whose token embeddings start the task-level prompt when init is 'text'."""
    init_range: float = 0.5
    """Random tables and task prompts start U(-init_range, init_range)."""

    def validate(self) -> list[str]:
        problems = at_least(self, "method", 1, "num_virtual_tokens", "generator_width")
        problems += at_least(self, "method", 0, "init_range")
        if self.residual and not self.instance:
            problems.append("method.residual adds an instance term to the task prompt; it needs method.instance: true")
        if self.residual and self.task_prompt:
            problems.append("method.residual already starts from a task-level prompt; drop method.task_prompt")
        if not 0 <= self.generator_dropout < 1:
            problems.append(f"method.generator_dropout must be in [0, 1), got {self.generator_dropout}")
        if self.init == "text" and not self.init_text:
            problems.append("method.init is 'text' but method.init_text is empty; give the text or use init: vocab")
        if self.instance_pretrain and not self.emb_checkpoints:
            problems.append("method.instance_pretrain needs method.emb_checkpoints (the pretrained table file)")
        if not self.instance and (self.encoder or self.instance_pretrain):
            problems.append("method.encoder and method.instance_pretrain need method.instance: true")
        return problems

    @property
    def has_task_prompt(self) -> bool:
        """Prompt path: whether N task-level vectors are trained (before the instance prompt, or under it)."""
        return self.method == "prompt-tuning" and (self.task_prompt or self.residual or not self.instance)


def instance_width(cfg: IPTConfig, backbone: Backbone) -> int:
    """D: the width of one instance vector (H on the prompt path, 2 x kv on the prefix path)."""
    return 2 * backbone.num_kv_heads * backbone.head_dim if cfg.method == "prefix-tuning" else backbone.hidden_size


def vocabulary_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's (token, id) pairs: tables indexed by token id only carry to the same vocabulary."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


@dataclass
class Pretrained:
    """What `emb_checkpoints` holds."""

    table: torch.Tensor
    """(V, D) lookup table."""
    generator: dict[str, torch.Tensor]
    """The generator's tensors by name; empty for a table-only file."""
    about: dict
    """The artifact's `generator_config.json`; empty for a bare table file."""


def read_pretrained(path: str) -> Pretrained:
    """Read an `ipt-ds pretrain` artifact (its directory or its safetensors file) or a bare table file."""
    file = Path(path)
    file = file / ARTIFACT_WEIGHTS if file.is_dir() else file
    if not file.is_file():
        raise ValueError(f"method.emb_checkpoints: '{path}' does not exist; run `ipt-ds pretrain` or fix the path")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
    else:
        import pickle

        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)  # never unpickles code
        except pickle.UnpicklingError:
            raise ValueError(f"method.emb_checkpoints: '{path}' holds pickled objects other than tensors; only "
                             "tensors (or a dict of them) load, with weights_only, so that no code runs") from None
        tensors = loaded if isinstance(loaded, dict) else {"table": loaded}
    generator = {k.removeprefix(GENERATOR_PREFIX): v for k, v in tensors.items() if k.startswith(GENERATOR_PREFIX)}
    others = [key for key in tensors if not key.startswith(GENERATOR_PREFIX)]
    key = next((k for k in (TABLE_KEY, "table") if k in tensors), others[0] if len(others) == 1 else None)
    if key is None or not isinstance(tensors[key], torch.Tensor) or tensors[key].dim() != 2:
        raise ValueError(f"method.emb_checkpoints: '{path}' holds no (vocabulary x width) table under "
                         f"'{TABLE_KEY}' or 'table' (keys: {sorted(tensors)[:5]})")
    about_file = file.with_name(ARTIFACT_CONFIG)
    about = json.loads(about_file.read_text()) if file.name == ARTIFACT_WEIGHTS and about_file.is_file() else {}
    if about and about.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"method.emb_checkpoints: {about_file} is not an `ipt-ds pretrain` artifact description "
                         f"(format {about.get('format')!r}, expected {ARTIFACT_FORMAT!r})")
    return Pretrained(table=tensors[key].float(), generator=generator, about=about)


def check_pretrained(pre: Pretrained, cfg: IPTConfig, backbone: Backbone, tokenizer) -> None:
    """Raise one ValueError naming both sides of every mismatch between the artifact and this config / backbone."""
    width, about, source = instance_width(cfg, backbone), pre.about, f"'{cfg.emb_checkpoints}'"
    name = backbone.model.config.name_or_path
    problems = []
    fingerprint = vocabulary_fingerprint(tokenizer)
    if about and (about["vocab_size"] != backbone.vocab_size or about["tokenizer_sha256"] != fingerprint):
        problems.append(f"{source} was pretrained for the vocabulary of '{about['backbone']}' "
                        f"({about['tokenizer']}, {about['vocab_size']} rows, sha256 {about['tokenizer_sha256'][:12]}), "
                        f"this backbone '{name}' has {type(tokenizer).__name__} with {backbone.vocab_size} rows "
                        f"(sha256 {fingerprint[:12]})" + ("; token ids do not mean the same tokens"
                                                          if about["tokenizer_sha256"] != fingerprint else ""))
    if about and (about["path"] != cfg.method or about["width"] != width):
        problems.append(f"{source} holds {about['path']} instance vectors of width {about['width']}, this config "
                        f"needs {cfg.method} vectors of width {width} (method.method)")
    if about.get("encoder") and cfg.encoder and about["encoder"] != cfg.encoder:
        problems.append(f"{source} holds a '{about['encoder']}' generator, but method.encoder is '{cfg.encoder}'; "
                        f"set method.encoder: {about['encoder']} or pretrain a '{cfg.encoder}' generator")
    elif about.get("encoder") and cfg.encoder and about["generator_width"] != cfg.generator_width:
        problems.append(f"{source} holds a generator of width {about['generator_width']}, but "
                        f"method.generator_width is {cfg.generator_width}")
    if not problems and tuple(pre.table.shape) != (backbone.vocab_size, width):
        problems.append(f"{source} holds a table of shape {tuple(pre.table.shape)}, but this backbone and path need "
                        f"{(backbone.vocab_size, width)} (vocabulary x width); was it built for another tokenizer or "
                        "method path?")
    if problems:
        raise ValueError("method.emb_checkpoints does not fit this run: " + "; ".join(problems))
    if about and about["num_tokens"] != cfg.num_virtual_tokens:
        log.info("%s was pretrained on %d leading tokens, this run uses %d (the generators work at any length)",
                 source, about["num_tokens"], cfg.num_virtual_tokens)


def load_generator(generator: nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    own = generator.state_dict()
    bad = sorted(set(own) ^ set(tensors)) or [k for k in own if tuple(own[k].shape) != tuple(tensors[k].shape)]
    if bad:
        raise ValueError(f"method.emb_checkpoints: the generator in '{source}' does not fit this method.encoder / "
                         f"generator_width (tensors that differ: {bad[:4]})")
    generator.load_state_dict(tensors)


class IPT(MethodModule):
    def __init__(self, cfg: IPTConfig, backbone: Backbone, pad_id: int, *, pretrained: Pretrained | None = None,
                 initial_table: torch.Tensor | None = None, task_prompt: torch.Tensor | None = None):
        """`pretrained`: what `emb_checkpoints` holds (with `instance_pretrain`); `initial_table`: a (V, D) table to
        start from (pretraining gives one, so that a generator reads a table of its own); `task_prompt`: the (N, H)
        task-level prompt to start from (prompt path)."""
        super().__init__()
        self.cfg, self.pad_id = cfg, pad_id
        num_tokens = cfg.num_virtual_tokens
        self.prefix_path = cfg.method == "prefix-tuning"
        kv = backbone.num_kv_heads * backbone.head_dim
        self.shape = (backbone.prefix_layers * 2, backbone.num_kv_heads, backbone.head_dim)
        width = instance_width(cfg, backbone)  # one instance vector per prompt position
        concatenated = cfg.task_prompt and cfg.instance  # (validate refuses task_prompt with residual)
        self.num_prefix_positions = 0 if self.prefix_path else num_tokens * (1 + concatenated)
        self.num_embedded_prompts = self.num_prefix_positions
        self.num_cached_prompts = num_tokens if self.prefix_path else 0
        self.first_trained_layer = first_prefix_layer(backbone) if self.prefix_path else 0
        if self.prefix_path:
            self.task_prefix = nn.Parameter(torch.randn(num_tokens, backbone.prefix_layers * 2 * kv) * 0.02)
        elif cfg.has_task_prompt:
            self.task_prompt = nn.Parameter(task_prompt)  # (N, H)
        if cfg.residual:
            self.gate = nn.Parameter(torch.zeros(width))  # (D,): at 0 the instance term contributes nothing
        self.instance_dropout = nn.Dropout(cfg.generator_dropout)
        table = pretrained.table if pretrained is not None else initial_table
        if cfg.instance and (table is not None or not cfg.encoder):
            if table is None:
                table = torch.empty(backbone.vocab_size, width).uniform_(-cfg.init_range, cfg.init_range)
            self.table = nn.Embedding.from_pretrained(table.float(), freeze=cfg.fix_emb)
        if cfg.instance and cfg.encoder:
            d_in = width if hasattr(self, "table") else backbone.hidden_size
            self.generator = build_generator(cfg.encoder, d_in, width, cfg.generator_width)
            if pretrained is not None and pretrained.generator:
                load_generator(self.generator, pretrained.generator, source=cfg.emb_checkpoints)
            elif pretrained is not None:
                log.info("method.emb_checkpoints holds a table only: the %s generator starts from random weights",
                         cfg.encoder)
        if not any(p.requires_grad for p in self.parameters()):  # a frozen table alone: no layer depends on training
            self.first_trained_layer = backbone.num_layers

    @property
    def generator_dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    def instance_vectors(self, backbone: Backbone, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N, D) from the first N token ids where `mask` is set (padded when the input is shorter)."""
        ids = leading(input_ids, mask, self.cfg.num_virtual_tokens, self.pad_id)
        # the generator runs in its own dtype (bf16 / fp16 under DeepSpeed's mixed precision)
        x = self.table(ids) if hasattr(self, "table") else backbone.embed(ids).to(self.generator_dtype)
        return self.generator(x) if hasattr(self, "generator") else x

    def instance_term(self, backbone: Backbone, batch: dict) -> torch.Tensor:
        """(B, N, D) what the instance adds: gated when residual, with dropout in training."""
        term = self.instance_dropout(self.instance_vectors(backbone, batch["input_ids"], source_mask(batch)))
        return self.gate * term if self.cfg.residual else term

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        batch_size = batch["input_ids"].shape[0]
        if not self.prefix_path:
            parts = [self.task_prompt.expand(batch_size, -1, -1)] if hasattr(self, "task_prompt") else []
            if self.cfg.residual:
                parts = [parts[0] + self.instance_term(backbone, batch)]  # (B, N, H)
            elif self.cfg.instance:
                parts.append(self.instance_term(backbone, batch))
            return run_with_input_prompt(backbone, torch.cat(parts, dim=1), batch)
        table = self.task_prefix  # (N, 2L * kv)
        if self.cfg.instance:
            num_tokens = self.cfg.num_virtual_tokens
            kv = table.view(1, num_tokens, *self.shape).expand(batch_size, -1, -1, -1, -1)  # (B, N, 2L, h, d)
            term = self.instance_term(backbone, batch).view(batch_size, num_tokens, 2, *self.shape[1:])
            slots = torch.zeros_like(kv)
            for layer in self.cfg.instance_layers:
                slots = slots.index_add(2, torch.tensor([2 * layer, 2 * layer + 1], device=kv.device), term)
            table = (kv + (1.0 if self.cfg.residual else self.cfg.instance_scale) * slots).flatten(2)  # (B, N, 2L * kv)
        return run_with_prefix(backbone, table, batch)


@register("ipt", IPTConfig)
def build(cfg: IPTConfig, backbone: Backbone, tokenizer, *, initial_table: torch.Tensor | None = None) -> IPT:
    bad = [layer for layer in cfg.instance_layers if not 0 <= layer < backbone.prefix_layers]
    if bad:
        raise ValueError(f"method.instance_layers {bad} outside the backbone's layers 0..{backbone.prefix_layers - 1} "
                         "(an encoder-decoder's prefixes sit in its decoder layers)")
    pretrained = None
    if cfg.instance and cfg.instance_pretrain:
        pretrained = read_pretrained(cfg.emb_checkpoints)
        check_pretrained(pretrained, cfg, backbone, tokenizer)
        if pretrained.generator and not cfg.encoder:
            log.info("method.emb_checkpoints also holds a %s generator; without method.encoder only its table is used",
                     pretrained.about.get("encoder", "pretrained"))
    task_prompt = initial_prompt(backbone, tokenizer, num_tokens=cfg.num_virtual_tokens, init=cfg.init,
                                 init_text=cfg.init_text, init_range=cfg.init_range) if cfg.has_task_prompt else None
    return IPT(cfg, backbone, tokenizer.pad_token_id, pretrained=pretrained, initial_table=initial_table,
               task_prompt=task_prompt)
