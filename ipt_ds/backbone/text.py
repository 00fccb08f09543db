"""Adapters of the text families that run one transformer stack: encoders (BERT, RoBERTa, DeBERTa, ...) and decoders
(GPT-2, LLaMA-class). They share the forward and differ in token types, positions, pooling and the LM head."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ipt_ds.backbone.adapter import FamilyAdapter
from ipt_ds.backbone.caches import growing_cache, late_cache, prefix_cache


class TextAdapter(FamilyAdapter):
    def encode(self, inputs_embeds, attention_mask, token_type_ids=None, prefix=None, position_offset: int = 0,
               position_ids=None) -> torch.Tensor:
        """`Backbone.encode`: the base model's forward, prefixes entering as a pre-filled cache."""
        backbone, config = self.backbone, self.config
        kwargs = self.input_kwargs(inputs_embeds, attention_mask, token_type_ids, prefix, position_offset)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if backbone.captured is not None:
            kwargs["past_key_values"] = growing_cache(prefix, config)
            backbone.captured.append(kwargs["past_key_values"])
        elif prefix is not None:
            kwargs["past_key_values"] = prefix_cache(prefix, config)
        out = backbone.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            use_cache=backbone.captured is not None, **kwargs)
        return out.last_hidden_state

    def input_kwargs(self, inputs_embeds, attention_mask, token_type_ids, prefix, position_offset: int) -> dict:
        """The family's extra arguments of the base model's forward (token types, position ids)."""
        return {}

    def run_lower(self, inputs_embeds, attention_mask, token_type_ids, *, num_prompt: int) -> None:
        # with positions from the mask, the input keeps the positions it has above k, behind the prompt
        self.encode(inputs_embeds, attention_mask, token_type_ids, position_offset=num_prompt)

    def join_late_caches(self, *, layer: int, num_prompt: int) -> None:
        captured = self.backbone.captured  # the two passes make one cache
        upper = captured.pop()
        captured.append(late_cache(captured.pop(), upper, self.config, layer=layer, num_prompt=num_prompt))


class EncoderAdapter(TextAdapter):
    family = "encoder"
    # The embeddings' output is the first layer's input. DeBERTa also needs no convolution after its first layer.
    layer_input: ClassVar[dict[str, str | None]] = {
        "bert": "embeddings", "roberta": "embeddings", "xlm-roberta": "embeddings", "deberta-v2": "embeddings",
        "deberta": "embeddings"}

    def __init__(self, backbone):
        super().__init__(backbone)
        self.learned_positions = True
        # RoBERTa-style embeddings number the positions of given embeddings from padding_idx + 1 (2 of RoBERTa's 514
        # rows are never used) and ignore a key/value cache; BERT-style ones start at 0, after the cached positions.
        embeddings = getattr(backbone.base, "embeddings", None)
        numbered_from_padding = hasattr(type(embeddings), "create_position_ids_from_inputs_embeds")
        self.position_offset = embeddings.padding_idx + 1 if numbered_from_padding else 0
        self.positions_follow_cache = not numbered_from_padding

    @classmethod
    def model_class(cls, *, with_lm_head: bool) -> str:
        return "AutoModelForMaskedLM" if with_lm_head else "AutoModel"

    def check_text_task(self, task, model_name: str) -> None:
        if task.generation:
            raise ValueError(f"task '{task.name}' generates text, which needs a decoder (causal LM) or "
                             f"encoder-decoder backbone; '{model_name}' is an encoder")

    def check_late(self) -> None:
        if getattr(getattr(self.backbone.base, "encoder", None), "conv", None) is not None:
            self.refuse_late(" (DeBERTa without conv layers)")
        super().check_late()

    def input_kwargs(self, inputs_embeds, attention_mask, token_type_ids, prefix, position_offset: int) -> dict:
        kwargs = {}
        if token_type_ids is not None and self.config.type_vocab_size > 1:
            num_prompt = inputs_embeds.shape[1] - token_type_ids.shape[1]
            kwargs["token_type_ids"] = nn.functional.pad(token_type_ids, (num_prompt, 0))
        if prefix is not None and self.config.model_type in ("deberta", "deberta-v2"):
            raise ValueError("key/value prefixes are not supported on DeBERTa backbones (their attention takes "
                             "no cache); use an input-level method such as prompt_tuning")
        return kwargs


class DecoderAdapter(TextAdapter):
    family = "decoder"
    # GPT-2's first layer reads its embedding dropout's output; LLaMA-class models feed `inputs_embeds` to the first
    # layer unchanged.
    layer_input: ClassVar[dict[str, str | None]] = {
        "gpt2": "drop", "llama": None, "mistral": None, "qwen2": None, "qwen3": None, "smollm3": None}
    causal = True
    default_pool = "last"

    def input_kwargs(self, inputs_embeds, attention_mask, token_type_ids, prefix, position_offset: int) -> dict:
        if not self.backbone.positions_from_mask:
            return {}
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]
        return {"position_ids": positions + position_offset}
