"""Text generation with a trained prompt method: the recipe of generation tasks (`GenerationRecipe`: training on
the references, scored on decoded text), and decoding through the backbone's own `generate` and KV cache.

Decoding starts from a cache that the method fills: its forward runs once on the (left-padded) sources inside
`Backbone.capturing()`, so the cache holds exactly what training computed (prompt vectors, key/value prefixes, a late
prompt at layer k, an instance prompt made from the source). Its last position is dropped and `generate` recomputes
it, so that every decoding strategy of transformers (greedy, beam search) starts as usual; the prompt then stays in
the cache for every later step. `input_ids` carry P placeholder columns in front for the P cached prompt positions;
position ids count real tokens, as in training (`Backbone.positions_from_mask`). Encoder-decoders do the same with
the decoder's cache and the decoder start token (`_generate_seq2seq`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from ipt_ds import checkpoint
from ipt_ds.config import GenerationConfig
from ipt_ds.data.generation import GenerationEncoder, GenExample, load_generation_split, read_generation_file
from ipt_ds.data.pipeline import predict_sharded
from ipt_ds.engine import ds_dtype
from ipt_ds.metrics import generation_metrics
from ipt_ds.recipes.base import best_results
from ipt_ds.recipes.text import TextRecipe

log = logging.getLogger("ipt_ds")


@contextlib.contextmanager
def _late_masks(model, cache):
    """Layers below a late prompt attend past its placeholder positions (their cache returns keys without them)."""
    layer = getattr(cache, "late_layer", None)
    if layer is None:
        yield
        return
    skip = cache.num_prompt

    def drop_prompt_columns(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            kwargs["attention_mask"] = mask[..., skip:]
        return args, kwargs

    handles = []
    for block in model.backbone.layer_stack()[:layer]:
        attention = next(m for m in block.modules() if m is not block and hasattr(m, "layer_idx"))
        handles.append(attention.register_forward_pre_hook(drop_prompt_columns, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generate(model, batch: dict, cfg: GenerationConfig, tokenizer, *, synced: bool = False) -> list[list[int]]:
    """Token ids generated for each source of `batch` (up to, not including, end-of-sequence); decoders take them
    left-padded (`GenerationEncoder.collate_sources`).
    `synced`: every rank must call this (ZeRO-3): ranks that finish early keep joining the others' forwards."""
    backbone = model.backbone
    if backbone.adapter.is_encoder_decoder:
        return _generate_seq2seq(model, batch, cfg, tokenizer, synced=synced)
    with backbone.capturing() as caches:
        model.method(backbone, batch)
    cache = caches[-1]
    source_ids, source_mask = batch["input_ids"], batch["attention_mask"]
    num_prompt = cache.get_seq_length() - source_ids.shape[1]
    cache.crop(-1)  # generate recomputes the last source position, with the prompt still in the cache
    if cfg.num_beams > 1:
        cache.batch_repeat_interleave(cfg.num_beams)
    placeholders = source_ids.new_full((source_ids.shape[0], num_prompt), tokenizer.pad_token_id)
    input_ids = torch.cat([placeholders, source_ids], dim=1)
    attention_mask = torch.cat([source_mask.new_ones(placeholders.shape), source_mask], dim=1)
    with _late_masks(model, cache):
        out = backbone.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, do_sample=False,
            max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    return _until_eos(out[:, input_ids.shape[1] :], tokenizer.eos_token_id)


def _generate_seq2seq(model, batch: dict, cfg: GenerationConfig, tokenizer, *, synced: bool) -> list[list[int]]:
    """Encoder-decoder backbones: the method's forward on the sources and the decoder start token fills the
    decoder's cache (its self-attention prefix, the cross-attention keys of the prompted encoder output); decoding
    continues from there, with the encoder output passed to `generate` as computed."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    backbone = model.backbone
    start = batch["decoder_input_ids"][:, :1]
    with backbone.capturing() as caches, backbone.decoding(
            {"decoder_input_ids": start, "decoder_attention_mask": torch.ones_like(start)}):
        model.method(backbone, batch)
    captured = cache = caches[-1]
    num_prompt = cache.get_seq_length() - 1  # the decoder's prefix positions
    cache.crop(-1)  # generate recomputes the start token; the cross-attention keys stay
    if num_prompt == 0:  # an emptied layer would keep its batch size through the beam widening below
        cache = EncoderDecoderCache(DynamicCache(), cache.cross_attention_cache)
    if cfg.num_beams > 1:
        cache.batch_repeat_interleave(cfg.num_beams)
    decoder_ids = torch.cat([start.new_full((start.shape[0], num_prompt), tokenizer.pad_token_id), start], dim=1)
    out = backbone.model.generate(
        encoder_outputs=BaseModelOutput(last_hidden_state=captured.encoder_states),
        attention_mask=captured.encoder_mask, decoder_input_ids=decoder_ids,
        decoder_attention_mask=torch.ones_like(decoder_ids), past_key_values=cache, do_sample=False,
        max_new_tokens=cfg.max_new_tokens, num_beams=cfg.num_beams, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, synced_gpus=synced)
    return _until_eos(out[:, decoder_ids.shape[1] :], tokenizer.eos_token_id)


def _until_eos(generated: torch.Tensor, eos: int) -> list[list[int]]:
    return [ids[: ids.index(eos)] if eos in ids else ids for ids in generated.tolist()]


def generate_texts(engine, encoder: GenerationEncoder, examples: list[GenExample], cfg: GenerationConfig,
                   batch_size: int) -> list[str]:
    """Generate for every example across all ranks; every rank gets all texts back, in input order."""
    features = [encoder(e) for e in examples]
    tokenizer = encoder.tokenizer
    synced = torch.distributed.get_world_size() > 1 and any(hasattr(p, "ds_id") for p in engine.parameters())

    def make_batch(indices):
        batch = encoder.collate_sources([features[i] for i in indices])
        return {key: value.to(engine.device) for key, value in batch.items()}

    def texts(batch):
        rows = generate(engine.module, batch, cfg, tokenizer, synced=synced)
        return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    return predict_sharded(engine, [len(f["input_ids"]) for f in features], batch_size, make_batch, texts)


def score(names, texts: list[str], examples: list[GenExample]) -> dict[str, float]:
    """The metrics, computed once on rank 0 and sent to every rank."""
    result = [None]
    if torch.distributed.get_rank() == 0:
        result[0] = generation_metrics(names, predictions=texts, references=[e.references for e in examples])
    torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


class GenerationRecipe(TextRecipe):
    """Training on a generation task (`ipt-ds train` with data.task e2e / generation): teacher-forced loss on the
    references, checkpoints selected by the first metric (BLEU) of decoding the eval split."""

    kind = "generation"

    @staticmethod
    def outputs(task) -> str:
        return "generation (source -> text)"

    def build(self, ds_config: dict):
        cfg = self.cfg
        train_examples = load_generation_split(cfg.data, cfg.data.train_split)
        self.eval_examples = load_generation_split(cfg.data, cfg.data.eval_split)
        self.test_examples = load_generation_split(cfg.data, cfg.data.test_split) if cfg.data.test_split else []
        self.test_examples = self.test_examples[: cfg.generation.test_limit or None]
        for name, examples in (("train", train_examples), ("eval", self.eval_examples)):
            if not examples or not all(e.references for e in examples):
                raise ValueError(f"data.{name}_split '{getattr(cfg.data, name + '_split')}' needs a reference text "
                                 "for every source")
        model = self.load_model(dtype=ds_dtype(ds_config), ds_config=ds_config)
        features = [f for e in train_examples for f in self.encoder.training_features(e)]
        if self.encoder.num_truncated:
            log.info("%d sources truncated to data.max_length=%d", self.encoder.num_truncated, cfg.data.max_length)
        log.info("%d training sequences from %d sources", len(features), len(train_examples))
        return model, features, {"task": self.task.name, "label_names": []}

    def loss_terms(self, features: list[dict]) -> list[int]:
        """Target tokens per sequence: the loss is their mean over the global batch, however it is split."""
        return [len(f["target_ids"]) if "target_ids" in f else f["source_mask"].count(0) for f in features]

    def _texts(self, engine, examples):
        return generate_texts(engine, self.encoder, examples, self.cfg.generation, self.cfg.train.eval_batch_size)

    def evaluate(self, engine) -> dict[str, float]:
        limit = self.cfg.generation.eval_limit
        examples = self.eval_examples[:limit] if limit else self.eval_examples
        return score(self.task.metrics, self._texts(engine, examples), examples)

    def finish(self, engine, state, out: Path, rank: int) -> dict:
        """Score the best checkpoint on the whole eval (and test) split; write results.json and the generated texts
        (`generations_<split>.jsonl`: guid, source, prediction, references)."""
        results = best_results(engine, self.cfg, state, out, self.task.name)
        splits = {"eval": (self.cfg.data.eval_split, self.eval_examples)}
        if self.test_examples and all(e.references for e in self.test_examples):
            splits["test"] = (self.cfg.data.test_split, self.test_examples)
        for key, (split, examples) in splits.items():
            texts = self._texts(engine, examples)
            results[key] = score(self.task.metrics, texts, examples)
            if rank == 0:
                write_generations(out / f"generations_{Path(split).stem}.jsonl", examples, texts)
                log.info("%s %s: %s", key, split, " ".join(f"{k}={v:.2f}" for k, v in results[key].items()))
        if rank == 0:
            checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        return results

    def score_split(self, engine, split: str) -> dict[str, float]:
        examples = load_generation_split(self.cfg.data, split)
        return score(self.task.metrics, self._texts(engine, examples), examples)

    def predict_file(self, engine, path: Path) -> list[dict]:
        """One row per source of the file at `path`: guid, source and the generated text."""
        fields = self.cfg.data.fields or {"source": "mr" if self.task.name == "e2e" else "source"}
        examples = read_generation_file(path, source_key=fields["source"], target_key=None)
        return [{"guid": e.guid, "source": e.source, "prediction": t}
                for e, t in zip(examples, self._texts(engine, examples))]


def write_generations(path: Path, examples: list[GenExample], texts: list[str]) -> None:
    lines = [json.dumps({"guid": e.guid, "source": e.source, "prediction": text, "references": list(e.references)})
             for e, text in zip(examples, texts)]
    checkpoint.atomic_write_text(path, "\n".join(lines) + "\n")
