"""The module handed to DeepSpeed: frozen backbone + method + head, built from a Config.

Everything a forward needs happens inside `PromptModel.forward`, so that ZeRO-3's gather/release hooks see one
top-level forward per step, in the same order on every rank.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from ipt_ds.backbone import Backbone, load_backbone, local_bytes, num_elements
from ipt_ds.config import Config
from ipt_ds.data.encode import TextEncoder, label_token_ids
from ipt_ds.data.tasks import Task
from ipt_ds.heads import build_head
from ipt_ds.methods import Method, get_method

log = logging.getLogger("ipt_ds")


class PromptModel(nn.Module):
    def __init__(self, backbone: Backbone, method: Method, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.method = method
        self.head = head
        self.frozen_pass = False
        """Set inside `computing_frozen_states()`."""

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (label logits (B, C) or regression scores (B,); mean loss when the batch has labels)."""
        if self.frozen_pass:
            return self.frozen_states(batch), None
        with self.backbone.decoding(batch):
            out = self.method(self.backbone, batch)
        if "pair_input_ids" not in batch:
            return self.head(out, batch)
        pair = {key.removeprefix("pair_"): value for key, value in batch.items() if key.startswith("pair_")}
        return self.head(out, batch, self.method(self.backbone, pair))

    @contextlib.contextmanager
    def computing_frozen_states(self):
        """Within: a forward returns (`frozen_states(batch)`, None); through the engine, so that ZeRO-3 gathers the
        layers it runs as in any forward."""
        self.frozen_pass = True
        try:
            yield
        finally:
            self.frozen_pass = False

    def frozen_states(self, batch: dict) -> torch.Tensor:
        """(B, T, H) the states entering the method's first trained layer, a function of the input alone, exactly as
        the method's own forward computes them (frozen-state cache)."""
        return self.backbone.lower_states(self.backbone.embed(batch["input_ids"]), batch["attention_mask"],
                                          batch.get("token_type_ids"), layer=self.method.first_trained_layer,
                                          num_prompt=self.method.num_prefix_positions)

    def parameter_report(self) -> dict[str, int]:
        trainable = sum(num_elements(p) for p in self.parameters() if p.requires_grad)
        total = sum(num_elements(p) for p in self.parameters())
        backbone = sum(num_elements(p) for p in self.backbone.parameters())
        return {"trainable": trainable, "total": total, "backbone": backbone}

    def backbone_bytes_total(self) -> int:
        return sum(num_elements(p) * p.element_size() for p in self.backbone.parameters())

    def backbone_bytes_on_rank(self) -> int:
        return sum(local_bytes(p) for p in self.backbone.parameters())


def _check_positions(cfg: Config, backbone: Backbone, method: Method) -> None:
    """Encoders and GPT-2 have a fixed table of position embeddings: refuse inputs that would index past it (they
    would fail in the first step) from what the method says it puts in front of the input (methods/base.py)."""
    if not backbone.learned_positions or not backbone.max_positions:
        return
    embedded, cached = method.num_embedded_prompts, method.num_cached_prompts
    needed = backbone.positions_needed(cfg.data.max_length, embedded=embedded, cached=cached)
    if needed <= backbone.max_positions:
        return
    parts = [f"data.max_length {cfg.data.max_length}"]
    if embedded:
        parts.append(f"{embedded} prompt positions")
    if cached and backbone.positions_follow_cache:
        parts.append(f"{cached} prefix positions (this backbone numbers the input after them)")
    if backbone.position_offset:
        parts.append(f"{backbone.position_offset} unused (this backbone numbers positions from padding_idx + 1)")
    raise ValueError(f"{' + '.join(parts)} = {needed} positions exceed the backbone's {backbone.max_positions}; lower "
                     f"data.max_length to {cfg.data.max_length - (needed - backbone.max_positions)}")


def build_model(
    cfg: Config, task: Task, *, dtype: torch.dtype, ds_config: dict | None, loaded: tuple | None = None
) -> tuple[PromptModel, TextEncoder]:
    """Load the backbone, attach the configured method and head; return the model and its text encoder.

    `loaded` = (backbone, tokenizer) already in memory: the new method and head are attached to that same frozen
    backbone (several exports then share one; see mixed.py)."""
    verbalizer = cfg.head.type == "verbalizer"
    with_lm_head = verbalizer or task.generation
    if cfg.model.trust_remote_code:
        log.warning("model.trust_remote_code is on: Python code from '%s' runs in this process; use it only for "
                    "sources you trust", cfg.model.name_or_path)
    if verbalizer and task.is_regression:
        raise ValueError(f"head.type 'verbalizer' cannot score the regression task '{task.name}'; use head.type linear")
    if "text" not in get_method(cfg.method.name).inputs:
        raise ValueError(f"method.name '{cfg.method.name}' works on images; set data.format to imagefolder or npz")
    backbone, tokenizer = loaded or load_backbone(cfg.model, dtype=dtype, with_lm_head=with_lm_head,
                                                 ds_config=ds_config)
    backbone.adapter.check_text_task(task, cfg.model.name_or_path)
    words = cfg.head.label_words or list(task.label_words)
    token_ids: list[int] = []
    if verbalizer:
        if len(words) != len(task.label_names):
            raise ValueError(f"head.label_words has {len(words)} words but task '{task.name}' has "
                             f"{len(task.label_names)} labels {list(task.label_names)}; give one word per label")
        token_ids = label_token_ids(tokenizer, words)
    method = get_method(cfg.method.name).build(cfg.method, backbone, tokenizer)
    assert isinstance(method, Method), f"method '{cfg.method.name}' does not implement methods.base.Method"
    head = build_head(cfg.head, backbone, num_labels=len(task.label_names), label_token_ids=token_ids)
    model = PromptModel(backbone, method, head)
    _check_positions(cfg, backbone, method)
    template = cfg.head.template or task.template
    if task.generation:
        from ipt_ds.data.generation import GenerationEncoder, Seq2SeqEncoder

        if backbone.adapter.is_encoder_decoder:
            return model, Seq2SeqEncoder(tokenizer=tokenizer, template=template, max_length=cfg.data.max_length,
                                         max_target_length=cfg.generation.max_target_length,
                                         decoder_start=backbone.model.config.decoder_start_token_id)
        backbone.positions_from_mask = True  # sources are left-padded for decoding; training must use the same
        return model, GenerationEncoder(tokenizer=tokenizer, template=template, max_length=cfg.data.max_length,
                                        max_target_length=cfg.generation.max_target_length)
    if backbone.adapter.causal and not cfg.head.template and not template.rstrip().endswith("{mask}"):
        # Task templates are written for masked LMs; a decoder predicts the label word as the continuation.
        template = "{a} {b} Answer: {mask}" if "{b}" in template else "{a} Answer: {mask}"
    encoder = TextEncoder(tokenizer=tokenizer, task=task, max_length=cfg.data.max_length,
                          template=template if verbalizer else "", decoder=backbone.adapter.causal,
                          siamese=cfg.head.siamese)
    return model, encoder
