"""What every method shares: its config base class, its output, the interface the core reads (`Method`, with
`MethodModule` holding its defaults), and the two ways a prompt enters the backbone that several methods use (input
prompts, key/value prefixes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import nn

from ipt_ds.backbone import Backbone


@dataclass(kw_only=True)
class MethodConfig:
    name: str
    """Registered method name (see `ipt-ds methods`)."""

    renamed: ClassVar[dict[str, str]] = {}
    """Old key -> its current name: YAML files, flags and saved configs may still use the old one (confload.build)."""

    def validate(self) -> list[str]:
        return []


class MethodOutput(NamedTuple):
    hidden: torch.Tensor
    """(B, P + T, H) last hidden states; P = `num_prefix` positions the method put before the T input tokens."""
    attention_mask: torch.Tensor
    """(B, P + T) mask matching `hidden`."""
    num_prefix: int


@runtime_checkable
class Method(Protocol):
    """What the core reads from a method module (built by its registered `build`). `MethodModule` gives the defaults."""

    num_prefix_positions: int
    """Hidden-state positions the layers see in front of the input (input and late prompts; a key/value prefix adds
    none): the sequence length of the activations is this plus the input's (memory estimates)."""
    num_embedded_prompts: int
    """Prompt vectors that pass through the backbone's embeddings with the input and so take position ids."""
    num_cached_prompts: int
    """Length of the key/value prefix given to the layers (some families number the input's positions after it).
    With `num_embedded_prompts` it bounds `data.max_length` by the backbone's position table (model.py)."""
    first_trained_layer: int
    """The first layer of `backbone.layer_stack()` whose computation depends on trained parameters: the states that
    enter it are a function of the input alone (frozen weights, no dropout), so they can be computed once. 0 where the
    embeddings or the first layer already depend on them (input prompts, prefixes, BitFit, full fine-tuning); k for a
    late prompt at layer k; `backbone.num_layers` where no layer of that stack does (a linear probe; prefixes of an
    encoder-decoder, which sit in its decoder)."""
    reads_frozen_states: bool
    """`forward` takes the states entering `first_trained_layer` from `batch["frozen_states"]` (B, T, H), right-padded
    as the input, when the batch has them (`train.frozen_cache`), instead of running the layers below."""

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        """Run the batch through the frozen backbone with the method's prompts."""

    def peft_adapter(self) -> tuple[dict, torch.Tensor] | None:
        """(PEFT adapter config fields, the folded (P, D) prompt table) for a method PEFT also has; None otherwise."""


class MethodModule(nn.Module):
    """Base class of the method modules: the `Method` defaults for a method that puts nothing in front of the input,
    depends on trained parameters from the first layer on, and has no PEFT equivalent."""

    num_prefix_positions = 0
    num_embedded_prompts = 0
    num_cached_prompts = 0
    first_trained_layer = 0
    reads_frozen_states = False

    def peft_adapter(self) -> tuple[dict, torch.Tensor] | None:
        return None


class NoPrompt(MethodModule):
    """The backbone unchanged (full fine-tuning, linear probe, BitFit): built after the method has chosen which backbone
    parameters train, it reads the first layer they reach from the backbone."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        position = stack_position(backbone)
        trained = [position(m) for m in backbone.modules() if any(p.requires_grad for p in m.parameters(False))]
        self.first_trained_layer = min(trained, default=backbone.num_layers)

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        return run_with_input_prompt(backbone, None, batch)


def stack_position(backbone: Backbone) -> Callable[[nn.Module], int]:
    """module -> the index of the layer of `backbone.layer_stack()` it belongs to; modules registered before the stack
    (embeddings) count as 0, those after it (final norm, LM head, an encoder-decoder's decoder) as num_layers."""
    layers = backbone.layer_stack()
    modules = list(backbone.modules())
    layer_of = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    first_layer_module = modules.index(layers[0])
    order = {id(m): i for i, m in enumerate(modules)}

    def position(module: nn.Module) -> int:
        if id(module) in layer_of:
            return layer_of[id(module)]
        return 0 if order[id(module)] < first_layer_module else len(layers)

    return position


def first_prefix_layer(backbone: Backbone) -> int:
    """`first_trained_layer` of key/value prefixes: 0, or none of `layer_stack()` (num_layers) for an encoder-decoder,
    whose prefixes sit in the decoder while that stack is its encoder."""
    return backbone.num_layers if backbone.adapter.is_encoder_decoder else 0


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


def prefix_from_table(table: torch.Tensor, backbone: Backbone, *, batch_size: int,
                      dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Key/value prefixes from a (P, L * 2 * kv) table shared by the batch, or (B, P, L * 2 * kv) generated vectors
    (kv = kv_heads * head_dim, L = `backbone.prefix_layers`; per position the layers' keys and values in turn):
    one (keys, values) pair per layer, each (B, kv_heads, P, head_dim), in `dtype`."""
    if table.dim() == 2:
        table = table.expand(batch_size, -1, -1)  # (B, P, L * 2 * kv)
    num_layers = backbone.prefix_layers
    kv = table.view(batch_size, table.shape[1], num_layers * 2, backbone.num_kv_heads, backbone.head_dim)
    kv = kv.permute(2, 0, 3, 1, 4).to(dtype)  # (2L, B, kv_heads, P, head_dim)
    return [(kv[2 * layer], kv[2 * layer + 1]) for layer in range(num_layers)]


def run_with_prefix(backbone: Backbone, table: torch.Tensor, batch: dict) -> MethodOutput:
    """Run the backbone with the key/value prefixes of `table` (see `prefix_from_table`) at every layer; the hidden
    states cover the input's T tokens only."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    batch_size = input_ids.shape[0]
    embeds = backbone.embed(input_ids)  # (B, T, H)
    prefix = prefix_from_table(table, backbone, batch_size=batch_size, dtype=embeds.dtype)
    full_mask = torch.cat([mask.new_ones(batch_size, table.shape[-2]), mask], dim=1)  # (B, P + T)
    hidden = backbone.encode(embeds, full_mask, batch.get("token_type_ids"), prefix=prefix)
    return MethodOutput(hidden, mask, 0)


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
