"""Which family a model type belongs to. Each family has one adapter (see `frozen.ADAPTERS`)."""

from __future__ import annotations

from typing import Literal

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "deberta-v2", "deberta", "electra", "distilbert", "albert", "mpnet"}
DECODER_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "smollm3"}
SEQ2SEQ_TYPES = {"t5", "mt5", "bart", "mbart"}
# Vision transformers -> how many tokens precede the patches in their embeddings' output (CLS; DeiT adds its
# distillation token). Visual prompts go right after them.
VISION_TYPES = {"vit": 1, "deit": 2, "dinov2": 1}

Family = Literal["encoder", "decoder", "seq2seq", "vision"]


def family_of(model_type: str, *, is_encoder_decoder: bool = False) -> Family:
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
