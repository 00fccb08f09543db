"""What differs between backbone families, behind one interface.

`Backbone` (frozen.py) holds the model and the state of a forward (caches being kept, decoder inputs); it delegates
the family-specific parts to its adapter: the forward on embeddings (`encode`), late insertion (`encode_late`), the
vocabulary logits, and the facts the rest of the trainer asks instead of testing a family's name (`causal`,
`is_encoder_decoder`, `takes_images`, `default_pool`, `check_text_task`). One subclass per family: text.py
(encoders, decoders), seq2seq.py, vision.py; `frozen.ADAPTERS` is the choice among them.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ipt_ds.backbone.frozen import Backbone
    from ipt_ds.backbone.loading import ModelConfig


class FamilyAdapter:
    family: ClassVar[str]
    """The family's name ("encoder", "decoder", "seq2seq", "vision")."""
    layer_input: ClassVar[dict[str, str | None]] = {}
    """Model type -> the module whose output is the first layer's input, which late insertion (LPT) replaces when it
    restarts the layer stack from given hidden states; None: `inputs_embeds` enter the first layer unchanged. Model
    types left out do not support late insertion."""
    causal: ClassVar[bool] = False
    """A causal LM: it reads left to right, so the last real token has seen the whole input and a label word is
    predicted as the continuation of the template."""
    is_encoder_decoder: ClassVar[bool] = False
    """The decoder reads its own inputs (`Backbone.decoding`) and the encoder's output: separate decoding code,
    encoder-side sources and target-side decoder inputs, prefixes in the decoder only."""
    takes_images: ClassVar[bool] = False
    """Runs on pixels (`Backbone.encode_image`) rather than token embeddings; loads without a tokenizer."""
    default_pool: ClassVar[str] = "cls"
    """What `head.pool: auto` reads: the first position (CLS) or the last real token."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.config = backbone.model.config
        self.learned_positions = hasattr(backbone.base, "wpe")
        """A learned table of absolute positions (GPT-2's `wpe`) fails on an input past its end; rotary positions
        (LLaMA-class) and relative ones (T5) have no end to pass."""
        self.position_offset = 0
        """Rows of the position table before the first position that inputs use."""
        self.positions_follow_cache = True
        """The input's positions are numbered after a key/value prefix's (cached positions)."""

    @classmethod
    def model_class(cls, *, with_lm_head: bool) -> str:
        """Name of the transformers Auto class that loads the model."""
        return "AutoModelForCausalLM" if with_lm_head else "AutoModel"

    @classmethod
    def check_loading(cls, cfg: ModelConfig, *, with_lm_head: bool) -> None:
        """Raise ValueError for a model config this family cannot run (before any weights are read)."""

    def finish_loading(self, path: str, hf_config, common: dict) -> None:
        """Family-specific set-up after `load_backbone` built the Backbone."""

    def check_text_task(self, task, model_name: str) -> None:
        """Raise ValueError if this backbone cannot run the text task `task` (a `data.tasks.Task`); by default it runs
        every one: classification (a linear head, or label words) and generation."""

    def prefix_shape(self) -> tuple[int, int, int]:
        """(layers that take key/value prefixes, their key/value heads, head_dim)."""
        config, hidden = self.config, self.config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        return config.num_hidden_layers, num_kv_heads, getattr(config, "head_dim", None) or hidden // num_heads

    def encode(self, inputs_embeds, attention_mask, token_type_ids=None, prefix=None, position_offset: int = 0,
               position_ids=None) -> torch.Tensor:
        """`Backbone.encode`, for the families that read token embeddings."""
        raise NotImplementedError(f"{self.family} backbones read no token embeddings")

    def encode_image(self, pixel_values: torch.Tensor, *, edit_embeddings=None, edit_layer_input=None) -> torch.Tensor:
        """`Backbone.encode_image`, for the families that read pixels."""
        raise NotImplementedError(f"{self.family} backbones read no images")

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        model = self.backbone.model
        heads = [module for module in model.children() if module is not model.base_model]
        assert len(heads) == 1, "backbone was loaded without its LM head"
        return heads[0](hidden)

    def check_late(self) -> None:
        """Raise ValueError if late insertion cannot run on this model."""
        if self.config.model_type not in self.layer_input:
            self.refuse_late()

    def refuse_late(self, limits: str = ""):
        raise ValueError(f"late prompt insertion does not support '{self.config.model_type}' backbones; supported "
                         f"{self.family} backbones: {sorted(self.layer_input) or 'none'}{limits}")

    def lower_states(self, inputs_embeds, attention_mask, token_type_ids, *, layer: int, num_prompt: int):
        """`Backbone.lower_states`: run the layers below `layer` once without autograd (`run_lower`) and return the
        output of layer `layer - 1` (B, T, H), before any final norm."""
        self.check_late()
        backbone = self.backbone
        captured = []
        hook = backbone.layer_stack()[layer - 1].register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad(), backbone.only_layers(slice(0, layer)):
                self.run_lower(inputs_embeds, attention_mask, token_type_ids, num_prompt=num_prompt)
        finally:
            hook.remove()
        return captured[0]

    def encode_late(self, inputs_embeds, attention_mask, token_type_ids, *, layer: int, make_prompt, num_prompt: int,
                    states=None):
        """`Backbone.encode_late`: the lower layers run once without autograd (`lower_states`), unless their output
        `states` is given, then the stack runs again from `layer` up on the prompted states."""
        self.check_late()
        backbone = self.backbone
        if states is None:
            states = self.lower_states(inputs_embeds, attention_mask, token_type_ids, layer=layer,
                                       num_prompt=num_prompt)  # (B, T, H)
        prompt = make_prompt(states).to(states.dtype)  # (B, P, H)
        entering = torch.cat([prompt, states], dim=1)  # (B, P + T, H)
        mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
        input_module = self.layer_input[self.config.model_type]
        with backbone.only_layers(slice(layer, None)), contextlib.ExitStack() as scope:
            if input_module is not None:
                handle = backbone.base.get_submodule(input_module).register_forward_hook(
                    lambda module, args, out: entering)
                scope.callback(handle.remove)
            # Where the embeddings' output is replaced, what they make of the input is unused: keep autograd out, and
            # number every position 0, so that P + T positions never index past the position table (the prompt
            # takes no position: only the T input tokens need rows, and they got theirs below layer k).
            unused_positions = None if input_module is None else mask.new_zeros(mask.shape)
            hidden = self.encode(entering if input_module is None else entering.detach(), mask, token_type_ids,
                                 position_ids=unused_positions)
        if backbone.captured is not None:
            self.join_late_caches(layer=layer, num_prompt=prompt.shape[1])
        return hidden

    def run_lower(self, inputs_embeds, attention_mask, token_type_ids, *, num_prompt: int) -> None:
        """Run the layers below the insertion (only they are in the stack), for their output. Families without it
        have no `layer_input` entries, so `check_late` refuses them first."""
        raise NotImplementedError(f"{self.family} backbones do not support late insertion")

    def join_late_caches(self, *, layer: int, num_prompt: int) -> None:
        """Inside `capturing()`: turn the caches of `encode_late`'s two passes into what decoding continues from."""
