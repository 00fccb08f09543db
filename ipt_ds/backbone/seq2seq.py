"""Adapter of encoder-decoder backbones (T5, BART): the encoder reads the (prompted) source, the decoder its own
inputs (`Backbone.decoding`) with key/value prefixes in its self-attention; they run generation tasks only."""

from __future__ import annotations

from typing import ClassVar

import torch

from ipt_ds.backbone.adapter import FamilyAdapter
from ipt_ds.backbone.caches import growing_cache, prefix_cache


class Seq2SeqAdapter(FamilyAdapter):
    family = "seq2seq"
    # The prompt enters the encoder's layer k; BART's first encoder layer reads its embedding layer norm's output.
    # (T5 is left out: only its first layer holds the relative position bias that every later layer reuses.)
    layer_input: ClassVar[dict[str, str | None]] = {"bart": "encoder.layernorm_embedding",
                                                     "mbart": "encoder.layernorm_embedding"}
    is_encoder_decoder = True

    @classmethod
    def model_class(cls, *, with_lm_head: bool) -> str:
        return "AutoModelForSeq2SeqLM"

    @classmethod
    def check_loading(cls, cfg, *, with_lm_head: bool) -> None:
        if not with_lm_head:
            raise ValueError(f"model.name_or_path '{cfg.name_or_path}' is an encoder-decoder model, which this "
                             "trainer runs on generation tasks (data.task e2e or generation, head.type lm)")
        if cfg.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing is not supported on encoder-decoder backbones (their "
                             "cross-attention cache would be filled twice); turn it off")

    def check_text_task(self, task, model_name: str) -> None:
        if not task.generation:
            raise ValueError(f"model.name_or_path '{model_name}' is an encoder-decoder model, which this trainer "
                             f"runs on generation tasks only (data.task e2e or generation); task '{task.name}' "
                             "classifies: use an encoder or decoder backbone")

    def prefix_shape(self) -> tuple[int, int, int]:
        """Prefixes enter the decoder layers only (the encoder self-attention of T5/BART takes no cache)."""
        config = self.config
        num_layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
        num_kv_heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
        return num_layers, num_kv_heads, getattr(config, "d_kv", None) or config.hidden_size // num_kv_heads

    def encode(self, inputs_embeds, attention_mask, token_type_ids=None, prefix=None, position_offset: int = 0,
               position_ids=None) -> torch.Tensor:
        """The encoder reads the source embeddings, the decoder the decoder inputs given to `decoding`, with `prefix`
        in its self-attention; returns the decoder's last hidden states (B, T', H). `attention_mask` may carry the
        prefix's P columns in front of the source's, as for the other families."""
        from transformers import DynamicCache, EncoderDecoderCache

        backbone, model = self.backbone, self.backbone.model
        if backbone.decoder_inputs is None:
            raise ValueError("an encoder-decoder backbone needs decoder inputs: a generation task (data.task e2e or "
                             "generation) provides them")
        source_mask = attention_mask[:, -inputs_embeds.shape[1] :]
        encoded = model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=source_mask).last_hidden_state
        decoder_mask = backbone.decoder_inputs["decoder_attention_mask"]
        num_prefix = prefix[0][0].shape[2] if prefix else 0
        decoder_mask = torch.cat([decoder_mask.new_ones(decoder_mask.shape[0], num_prefix), decoder_mask], dim=1)
        cache = None  # caches without a config: it would count the encoder's layers
        if backbone.captured is not None:
            cache = EncoderDecoderCache(growing_cache(prefix, None), DynamicCache())
            cache.encoder_states, cache.encoder_mask = encoded, source_mask  # decoding starts from these
            backbone.captured.append(cache)
        elif prefix is not None:
            cache = EncoderDecoderCache(prefix_cache(prefix, None), DynamicCache())
        out = model.get_decoder()(input_ids=backbone.decoder_inputs["decoder_input_ids"], attention_mask=decoder_mask,
                                  encoder_hidden_states=encoded, encoder_attention_mask=source_mask,
                                  past_key_values=cache, use_cache=backbone.captured is not None)
        return out.last_hidden_state

    def run_lower(self, inputs_embeds, attention_mask, token_type_ids, *, num_prompt: int) -> None:
        self.backbone.model.get_encoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # As their own forward does: T5 rescales tied outputs, BART adds a bias.
        model = self.backbone.model
        if getattr(self.config, "scale_decoder_outputs", False):
            hidden = hidden * self.config.d_model**-0.5
        logits = model.get_output_embeddings()(hidden)
        bias = getattr(model, "final_logits_bias", None)
        return logits if bias is None else logits + bias.to(logits.dtype)
