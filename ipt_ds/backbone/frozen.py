"""The frozen pretrained backbone: what methods and heads use, the same for every family.

Methods and heads call `Backbone.embed`, `Backbone.encode` and `Backbone.vocab_logits`; they never touch `.weight` of
a backbone module, because under ZeRO-3 every weight is a partitioned placeholder outside its module's forward. What
differs between families is its adapter's (adapter.py); `ADAPTERS` below is the one place that picks by family.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ipt_ds.backbone.adapter import FamilyAdapter
from ipt_ds.backbone.families import family_of
from ipt_ds.backbone.images import ImageSpec
from ipt_ds.backbone.seq2seq import Seq2SeqAdapter
from ipt_ds.backbone.text import DecoderAdapter, EncoderAdapter
from ipt_ds.backbone.vision import VisionAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    "encoder": EncoderAdapter, "decoder": DecoderAdapter, "seq2seq": Seq2SeqAdapter, "vision": VisionAdapter}


def adapter_class(config) -> type[FamilyAdapter]:
    """The adapter of a transformers config's family (ValueError for an unsupported model type)."""
    return ADAPTERS[family_of(config.model_type, is_encoder_decoder=getattr(config, "is_encoder_decoder", False))]


class Backbone(nn.Module):
    """A frozen HF model plus what methods need to know about it (sizes, family facts) in one place."""

    image: ImageSpec | None = None
    """Vision backbones: the input they expect (set by `load_backbone`)."""

    def __init__(self, model: nn.Module, *, keep_dropout: bool):
        super().__init__()
        self.model = model
        config = model.config
        self.adapter: FamilyAdapter = adapter_class(config)(self)
        """What differs by family: ask it (`causal`, `is_encoder_decoder`, ...) rather than test a family's name."""
        self.family = self.adapter.family
        """The family's name, for reports."""
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.prefix_layers, self.num_kv_heads, self.head_dim = self.adapter.prefix_shape()
        """Layers that take key/value prefixes: every layer, or an encoder-decoder's decoder layers (the encoder
        self-attention of T5/BART takes no cache). `num_kv_heads` and `head_dim` are theirs."""
        self.vocab_size = getattr(config, "vocab_size", 0)  # vision backbones have none
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.learned_positions = self.adapter.learned_positions
        self.position_offset = self.adapter.position_offset
        self.positions_follow_cache = self.adapter.positions_follow_cache
        self.keep_dropout = keep_dropout
        self.positions_from_mask = False
        """Decoders: position ids count the real tokens of the mask (generation tasks, whose sources are left-padded
        and whose prompts must sit at the same positions in training and in cached decoding)."""
        self.captured: list | None = None
        """Inside `capturing()`: the caches made so far."""
        self.decoder_inputs: dict | None = None
        """Inside `decoding(batch)`: the batch, whose decoder inputs an encoder-decoder's decoder reads."""
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    def positions_needed(self, num_tokens: int, *, embedded: int, cached: int) -> int:
        """Rows of the position table used by `num_tokens` input tokens behind `embedded` prompt vectors that pass
        through the embeddings, after a key/value prefix of `cached` positions."""
        return self.position_offset + embedded + num_tokens + (cached if self.positions_follow_cache else 0)

    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    def train(self, mode: bool = True) -> Backbone:
        # The engine calls .train() on the whole model; a frozen backbone keeps dropout off unless asked for.
        super().train(mode)
        if not self.keep_dropout:
            self.model.eval()
            if mode and any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
                # transformers only checkpoints layers in training mode; flag the layers, their dropouts stay off.
                from transformers.modeling_layers import GradientCheckpointingLayer

                for module in self.model.modules():
                    if isinstance(module, GradientCheckpointingLayer):
                        module.training = True
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Word embeddings only (B, T) -> (B, T, H); positions and token types are added inside `encode`."""
        return self.model.get_input_embeddings()(input_ids)

    def encode(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        position_offset: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the backbone on (B, S, H) embeddings; returns the last hidden states (B, S, H).

        Methods that prepend P prompt positions pass S = P + T embeddings and a (B, S) mask; token types of the
        T real tokens are left-padded with type 0 for the prompt positions.
        `prefix` gives every layer a (keys, values) pair of shape (B, kv_heads, P, head_dim) that all positions
        attend to; the mask then covers P + S positions. They enter as a pre-filled transformers `Cache`, which every
        supported family concatenates in front of its own keys and values (positions of the input start at P).
        With `positions_from_mask`, decoder positions count the mask's real tokens, shifted by `position_offset`
        (LPT's lower layers: their input sits behind a prompt they do not see). Inside `capturing()` the keys and
        values of this forward are kept in a growing cache, for decoding. `position_ids` (B, S), when given, are used
        as they are. Encoder-decoder backbones return the decoder's last hidden states (B, T', H) for the decoder
        inputs given to `decoding`.
        """
        return self.adapter.encode(inputs_embeds, attention_mask, token_type_ids, prefix, position_offset,
                                   position_ids)

    @contextlib.contextmanager
    def decoding(self, batch: dict):
        """Within: encoder-decoder backbones run their decoder on the batch's `decoder_input_ids` and
        `decoder_attention_mask` (a no-op for batches without them)."""
        self.decoder_inputs = batch if "decoder_input_ids" in batch else None
        try:
            yield
        finally:
            self.decoder_inputs = None

    @contextlib.contextmanager
    def capturing(self):
        """Within: every forward keeps its keys and values; yields the list of the caches made (decoding)."""
        self.captured = []
        try:
            yield self.captured
        finally:
            self.captured = None

    def encode_late(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        *,
        layer: int,
        make_prompt,
        num_prompt: int,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Late insertion: put P prompt vectors in front of the states entering layer `layer` (0-based); return the
        last hidden states (B, P + T, H).

        The embeddings and layers below `layer` run once without autograd, so nothing there keeps activations or
        receives gradients. `make_prompt(states (B, T, H))` builds the (B, P, H) prompt from their output; the
        stack then runs again from `layer` up on P + T positions (a (B, P + T) mask: the prompt is visible to all).
        `num_prompt` = P. Encoder-decoder backbones: the prompt enters the encoder's layer `layer`; the decoder
        reads the result. Inside `capturing()` the two passes leave one cache (see `late_cache`). `states` (B, T, H):
        what `lower_states` returns for this input, computed before (the frozen-state cache); the embeddings and the
        layers below `layer` then do not run (`inputs_embeds` may be None), nor are they gathered under ZeRO-3.
        """
        return self.adapter.encode_late(inputs_embeds, attention_mask, token_type_ids, layer=layer,
                                        make_prompt=make_prompt, num_prompt=num_prompt, states=states)

    def lower_states(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None, *, layer: int, num_prompt: int) -> torch.Tensor:
        """The states entering layer `layer` (B, T, H), as `encode_late` computes them below a prompt of `num_prompt`
        vectors: the embeddings and layers 0..layer-1, run without autograd. A function of the input alone."""
        return self.adapter.lower_states(inputs_embeds, attention_mask, token_type_ids, layer=layer,
                                         num_prompt=num_prompt)

    def layer_stack(self) -> nn.ModuleList:
        """The ModuleList of transformer layers (BERT encoder.layer, GPT-2 h, LLaMA layers, ...)."""
        return getattr(*self._layer_stack_owner())

    def _layer_stack_owner(self) -> tuple[nn.Module, str]:
        for name, module in self.base.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                owner, _, attr = name.rpartition(".")
                return self.base.get_submodule(owner), attr
        raise ValueError(f"cannot find the {self.num_layers} layers of this '{self.model.config.model_type}' model")

    @contextlib.contextmanager
    def only_layers(self, layers: slice):
        """Temporarily run only `layers` of the stack (the same modules: ZeRO-3 hooks and checkpointing still apply)."""
        owner, attr = self._layer_stack_owner()
        full = getattr(owner, attr)
        setattr(owner, attr, full[layers])
        try:
            yield
        finally:
            setattr(owner, attr, full)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pretrained LM / MLM head: (N, H) -> (N, V). Only loaded with `with_lm_head=True`."""
        return self.adapter.vocab_logits(hidden)

    def encode_image(self, pixel_values: torch.Tensor, *, edit_embeddings=None, edit_layer_input=None) -> torch.Tensor:
        """Run a vision backbone on (B, C, H, W) pixels; returns the last hidden states (B, S, H), final norm applied.

        `edit_embeddings(tokens)` gets the embeddings' output (B, K + N, H): K leading tokens (`image.
        num_leading_tokens`), N patches, position embeddings added; what it returns (it may be longer) is what the
        first layer reads. `edit_layer_input(i, states)` gets the states entering layer i and returns what that layer
        reads, of the same shape. Both run as hooks inside the model's own forward, so ZeRO-3 gathering, gradient
        checkpointing and the attention implementation stay as they are.
        """
        return self.adapter.encode_image(pixel_values, edit_embeddings=edit_embeddings,
                                         edit_layer_input=edit_layer_input)
