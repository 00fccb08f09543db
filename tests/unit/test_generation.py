"""Text generation on decoders and encoder-decoders: cached decoding equals re-running the method at every step, the
loss covers targets only, the metrics, the E2E reader on the real files (`ipt-ds train` on 2 ranks with ZeRO-3:
tests/distributed/test_generation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ipt_ds.config import GenerationConfig, load_config
from ipt_ds.confload import ConfigError
from ipt_ds.data.generation import GenExample, collate_left, load_generation_split
from ipt_ds.data.readers import default_data_root
from ipt_ds.data.tasks import get_task
from ipt_ds.metrics import generation_metrics
from ipt_ds.model import build_model
from ipt_ds.recipes.generation import generate

SOURCES = ["name[Blue] food[fish]", "name[Red Lion] food[Italian] area[riverside] price[high]", "x"]
METHODS = {
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
    "ptuning_v1": {"name": "ptuning_v1", "num_virtual_tokens": 4},
    "prefix": {"name": "prefix", "num_virtual_tokens": 4},
    "ptuning_v2": {"name": "ptuning_v2", "num_virtual_tokens": 4},
    "ipt_prompt": {"name": "ipt", "encoder": "cnn", "num_virtual_tokens": 4, "generator_width": 8},
    "ipt_prefix": {"name": "ipt", "method": "prefix-tuning", "encoder": "lstm", "num_virtual_tokens": 4,
                   "generator_width": 8, "instance_scale": 1.0},
    "lpt_npg": {"name": "lpt", "layer": 1, "num_virtual_tokens": 3, "generator_width": 8},
    "lpt_appg": {"name": "lpt", "layer": 1, "generator": "appg", "num_virtual_tokens": 3, "generator_width": 8},
}


def generation_model(model_dir: Path, method: dict, *, seed: int = 0):
    overrides = {"model.name_or_path": str(model_dir), "data.task": "generation", "data.format": "jsonl",
                 "head.type": "lm", **{f"method.{key}": value for key, value in method.items()}}
    cfg = load_config(None, overrides)
    torch.manual_seed(seed)
    model, encoder = build_model(cfg, get_task("generation"), dtype=torch.float32, ds_config=None)
    with torch.no_grad():  # trained-looking prompts: large enough to change what the model generates
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval(), encoder


def greedy_uncached(model, forward, eos: int, steps: int) -> list[int]:
    """Greedy decoding without a cache: `forward(new tokens)` runs the whole method again at every step."""
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model.backbone.vocab_logits(forward(new).hidden[:, -1]).argmax(-1))
            if token == eos:
                break
            new.append(token)
    return new


def step_by_step(model, features: dict, eos: int, steps: int) -> list[int]:
    """Decoders: the method runs on source + generated tokens, laid out as in training (the generated tokens are the
    target part)."""
    source = list(features["input_ids"])

    def forward(new):
        ids = source + new
        return model.method(model.backbone, {
            "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "source_mask": torch.tensor([[1] * len(source) + [0] * len(new)]),
            "label_position": torch.tensor([len(source) - 1])})

    return greedy_uncached(model, forward, eos, steps)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_cached_generation_equals_the_method_reapplied_at_each_step(tiny_models, family, method):
    """Batched, left-padded decoding from the method's cache through the backbone's own `generate` gives the tokens
    that re-running the whole method on the growing sequence gives."""
    model, encoder = generation_model(tiny_models[family], METHODS[method])
    features = [encoder(GenExample(guid=str(i), source=s, references=())) for i, s in enumerate(SOURCES)]
    tokenizer = encoder.tokenizer
    cached = generate(model, collate_left(features, tokenizer.pad_token_id), GenerationConfig(max_new_tokens=6),
                      tokenizer)
    expected = [step_by_step(model, f, tokenizer.eos_token_id, 6) for f in features]
    assert cached == expected
    plain, _ = generation_model(tiny_models[family], {"name": "linear_probe"})
    without = generate(plain, collate_left(features, tokenizer.pad_token_id), GenerationConfig(max_new_tokens=6),
                       tokenizer)
    assert without != cached, "the prompt must change the output for the comparison to mean anything"


def step_by_step_seq2seq(model, features: dict, eos: int, steps: int) -> list[int]:
    """Encoder-decoders: the method runs on the source and the decoder inputs so far."""
    source = {"input_ids": torch.tensor([features["input_ids"]]),
              "attention_mask": torch.ones(1, len(features["input_ids"]), dtype=torch.long)}

    def forward(new):
        decoder = list(features["decoder_input_ids"]) + new
        with model.backbone.decoding({"decoder_input_ids": torch.tensor([decoder]),
                                      "decoder_attention_mask": torch.ones(1, len(decoder), dtype=torch.long)}):
            return model.method(model.backbone, source)

    return greedy_uncached(model, forward, eos, steps)


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("method", list(METHODS))
def test_seq2seq_cached_generation_equals_the_method_reapplied_at_each_step(tiny_models, family, method):
    """Encoder-decoders: input prompts enter the encoder, key/value prefixes the decoder's self-attention, a late
    prompt the encoder's layer k; decoding from the method's cache gives the tokens of re-running it every step."""
    if family == "t5" and method.startswith("lpt"):
        with pytest.raises(ValueError, match="late prompt insertion does not support 't5'"):
            model, encoder = generation_model(tiny_models[family], METHODS[method])
            features = [encoder(GenExample(guid="0", source=SOURCES[0], references=()))]
            generate(model, encoder.collate_sources(features), GenerationConfig(max_new_tokens=2), encoder.tokenizer)
        return
    model, encoder = generation_model(tiny_models[family], METHODS[method])
    features = [encoder(GenExample(guid=str(i), source=s, references=())) for i, s in enumerate(SOURCES)]
    tokenizer = encoder.tokenizer
    cached = generate(model, encoder.collate_sources(features), GenerationConfig(max_new_tokens=6), tokenizer)
    assert cached == [step_by_step_seq2seq(model, f, tokenizer.eos_token_id, 6) for f in features]
    plain, _ = generation_model(tiny_models[family], {"name": "linear_probe"})
    without = generate(plain, encoder.collate_sources(features), GenerationConfig(max_new_tokens=6), tokenizer)
    assert without != cached, "the prompt must change the output for the comparison to mean anything"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq2seq_decoding_matches_transformers_fed_the_prompt_embeddings(tiny_models, num_beams):
    """Prompt tuning on T5: greedy and beam search equal transformers' `generate` handed [prompt; source] as the
    encoder's input embeddings."""
    model, encoder = generation_model(tiny_models["t5"], METHODS["prompt_tuning"])
    tokenizer = encoder.tokenizer
    batch = encoder.collate_sources([encoder(GenExample(guid=str(i), source=s, references=()))
                                     for i, s in enumerate(SOURCES)])
    ours = generate(model, batch, GenerationConfig(max_new_tokens=5, num_beams=num_beams), tokenizer)
    prompt = model.method.prompt.expand(len(SOURCES), -1, -1)
    embeds = torch.cat([prompt, model.backbone.embed(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(len(SOURCES), prompt.shape[1], dtype=torch.long), batch["attention_mask"]], dim=1)
    from transformers import DynamicCache, EncoderDecoderCache

    with torch.no_grad():  # a cache without a config: transformers would size its own by the encoder's 2 layers
        theirs = model.backbone.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5,
                                               num_beams=num_beams, do_sample=False,
                                               past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                                               pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    theirs = [row[1:][: row[1:].index(eos)] if eos in row[1:] else row[1:] for row in theirs.tolist()]
    assert ours == theirs


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_loss_equals_the_models_own(tiny_models, family):
    """The LM head on the decoder's states reproduces the model's own loss (T5's rescaled tied output, BART's
    logits bias), with the decoder inputs the reference shifted right."""
    model, encoder = generation_model(tiny_models[family], {"name": "linear_probe"})
    example = GenExample(guid="0", source=SOURCES[1], references=("The Red Lion serves pricey Italian food.",
                                                                  "Italian place."))
    from ipt_ds.data.encode import collate

    batch = collate(encoder.training_features(example), encoder.tokenizer.pad_token_id)
    _, loss = model(batch)
    labels = batch["target_ids"].masked_fill(~batch["decoder_attention_mask"].bool(), -100)
    with torch.no_grad():
        reference = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=labels).loss  # the model shifts the labels right itself
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_matches_transformers_fed_the_prompt_embeddings(tiny_models, num_beams):
    """Prompt tuning: greedy and beam search from the method's cache give what transformers' `generate` gives when
    handed [prompt; source] as input embeddings from the start."""
    model, encoder = generation_model(tiny_models["llama"], METHODS["prompt_tuning"])
    tokenizer = encoder.tokenizer
    batch = collate_left([encoder(GenExample(guid=str(i), source=s, references=())) for i, s in enumerate(SOURCES)],
                         tokenizer.pad_token_id)
    ours = generate(model, batch, GenerationConfig(max_new_tokens=5, num_beams=num_beams), tokenizer)
    prompt = model.method.prompt.expand(len(SOURCES), -1, -1)
    embeds = torch.cat([prompt, model.backbone.embed(batch["input_ids"])], dim=1)
    mask = torch.cat([torch.ones(len(SOURCES), prompt.shape[1], dtype=torch.long), batch["attention_mask"]], dim=1)
    with torch.no_grad():
        theirs = model.backbone.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5,
                                               num_beams=num_beams, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    theirs = [row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
              for row in theirs.tolist()]
    assert ours == theirs


def test_lm_loss_covers_target_tokens_only(tiny_models):
    """The LM head's loss equals transformers' own causal-LM loss with the source positions ignored (-100)."""
    model, encoder = generation_model(tiny_models["llama"], {"name": "linear_probe"})
    example = GenExample(guid="0", source=SOURCES[1], references=("The Red Lion serves pricey Italian food.",
                                                                  "Italian place."))
    from ipt_ds.data.encode import collate

    batch = collate(encoder.training_features(example), encoder.tokenizer.pad_token_id)
    _, loss = model(batch)
    labels = batch["input_ids"].masked_fill(batch["source_mask"].bool() | ~batch["attention_mask"].bool(), -100)
    with torch.no_grad():
        reference = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                         labels=labels).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    assert batch["source_mask"].sum() < batch["attention_mask"].sum()


def test_generation_metrics_against_sacrebleu_and_rouge():
    import sacrebleu
    from rouge_score import rouge_scorer

    predictions = ["the cat sat on the mat today", "a dog ran in the park"]
    references = [("the cat sat on the mat", "a cat was sitting on the mat today"), ("a dog ran in a park",)]
    scores = generation_metrics(["bleu", "rouge_l"], predictions=predictions, references=references)
    streams = [[references[0][0], references[1][0]], [references[0][1], None]]
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, streams).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    best = [max(scorer.score(r, p)["rougeL"].fmeasure for r in refs) for p, refs in zip(predictions, references)]
    assert scores["rouge_l"] == pytest.approx(100 * np.mean(best))
    # a second reference can only help; copying a reference scores 100
    single = generation_metrics(["bleu"], predictions=predictions, references=[refs[:1] for refs in references])
    assert scores["bleu"] > single["bleu"]
    perfect = generation_metrics(["bleu", "rouge_l"], predictions=[r[0] for r in references], references=references)
    assert perfect == {"bleu": pytest.approx(100), "rouge_l": pytest.approx(100)}


def test_e2e_splits_from_the_real_files():
    root = default_data_root()
    assert root is not None and (root / "e2e").is_dir(), "the real data (../shared/data or $IPT_DS_DATA) is needed"
    cfg = load_config(None, {"data.task": "e2e", "data.format": "e2e", "head.type": "lm", "data.root": str(root)}).data
    train, dev, test = (load_generation_split(cfg, split) for split in ("train", "dev", "test"))
    assert not {e.source for e in train} & {e.source for e in dev}, "dev sources are held out of training"
    assert len(dev) == (len(train) + len(dev)) // 10
    for split in (train, dev, test):
        assert all(e.references and e.source.startswith("name[") for e in split)
    assert np.mean([len(e.references) for e in test]) > 2, "E2E test sources have several references each"
    with pytest.raises(ValueError, match="E2E splits are train, dev, test"):
        load_generation_split(cfg, "val")


def test_generation_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="head.type lm"):
        load_config(None, {"data.task": "e2e"})
    with pytest.raises(ConfigError, match="head.type lm is for generation tasks"):
        load_config(None, {"data.task": "rte", "head.type": "lm"})
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"text": "c"}\n')
    cfg = load_config(None, {"data.task": "generation", "data.format": "jsonl", "head.type": "lm"}).data
    with pytest.raises(ValueError, match=r"rows.jsonl:2: missing text field 'source'"):
        load_generation_split(cfg, str(bad))
