"""Pretraining IPT instance prompts in real runs: a 2-rank ZeRO-3 artifact that fine-tuning starts from, and an exact
resume of the transfer objective."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ipt_ds.methods.generators import build_generator
from tests.conftest import REPO, finish_cli, read_log, run_cli, start_cli, write_entailment_task
from tests.unit.test_pretrain import (
    COLORS,
    HIDDEN,
    NUM_TOKENS,
    NUMBERS,
    WIDTH,
    build_finetune_model,
    finetune_config,
    pretrain_config,
)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_bert) -> Path:
    """One real 2-rank ZeRO-3 pretraining run (knowledge objective); returns its run directory."""
    tmp = tmp_path_factory.mktemp("pretrain")
    cfg = pretrain_config(tmp, tiny_bert, deepspeed={"config": "ds_configs/zero3.json"},
                          train={"max_steps": 6, "eval_every": 3})
    result = run_cli("pretrain", str(cfg), f"--run.output_dir={tmp / 'run'}", num_ranks=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run"


def test_two_ranks_write_an_artifact_whose_table_and_generator_trained(pretrained, tiny_bert):
    about = json.loads((pretrained / "best" / "generator_config.json").read_text())
    tensors = load_file(pretrained / "best" / "generator.safetensors")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    embeddings = AutoModel.from_pretrained(tiny_bert).get_input_embeddings().weight.detach()
    vocab = embeddings.shape[0]
    assert {k: about[k] for k in ("encoder", "generator_width", "num_tokens", "path", "width", "vocab_size")} == {
        "encoder": "cnn", "generator_width": WIDTH, "num_tokens": NUM_TOKENS, "path": "prompt-tuning",
        "width": HIDDEN, "vocab_size": vocab}
    assert about["tokenizer_vocab_size"] == len(tokenizer) and about["categories"] == ["animals", "colors", "numbers"]
    generator = build_generator("cnn", HIDDEN, HIDDEN, WIDTH)
    assert sorted(tensors) == sorted(["embedding", *(f"generator.{k}" for k in generator.state_dict())])
    assert tensors["embedding"].shape == (vocab, HIDDEN)

    # The table trained (unlike the reference's): rows of the tokens the generator read moved away from the
    # backbone's embeddings it started from; rows of tokens it never read are bit-identical.
    corpus = [json.loads(line)["text"] for line in (pretrained.parent / "corpus.jsonl").read_text().splitlines()]
    read = {i for text in corpus for i in tokenizer(text)["input_ids"][:NUM_TOKENS]}
    changed = set(torch.nonzero((tensors["embedding"] != embeddings).any(dim=1)).flatten().tolist())
    assert changed and changed <= read
    assert len(changed) >= len(read) // 2

    losses = read_log(pretrained, "train/loss")
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    results = json.loads((pretrained / "results.json").read_text())
    assert results["eval"] == about["eval"] and "acc" in about["eval"]
    assert (pretrained / "tensorboard").is_dir() and (pretrained / "checkpoints" / "latest").is_file()


def test_finetuning_starts_from_the_artifact_and_fix_emb_keeps_the_table(pretrained, tmp_path, tiny_bert):
    artifact = load_file(pretrained / "best" / "generator.safetensors")
    cfg = finetune_config(tmp_path, tiny_bert, instance_pretrain=True, emb_checkpoints=str(pretrained / "best"),
                          fix_emb=True)
    model = build_finetune_model(cfg)
    assert torch.equal(model.method.table.weight, artifact["embedding"])
    assert not model.method.table.weight.requires_grad
    for name, p in model.method.generator.named_parameters():
        assert torch.equal(p, artifact[f"generator.{name}"]), name

    # A real training run (tests/frozen_probe.py reports which tensors changed): the generator and the head train,
    # the table does not change by a single bit.
    result = subprocess.run([sys.executable, "tests/frozen_probe.py", str(cfg), str(tmp_path / "run")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert "method.table.weight" not in report["trainable"] + report["changed"]
    assert {f"method.generator.{name}" for name, _ in model.method.generator.named_parameters()} <= \
        set(report["changed"])


def test_mismatches_name_both_sides(pretrained, tmp_path, tiny_bert):
    cfg = finetune_config(tmp_path, tiny_bert, instance_pretrain=True, emb_checkpoints=str(pretrained / "best"))
    with pytest.raises(ValueError, match="holds a 'cnn' generator, but method.encoder is 'mlp'"):
        build_finetune_model(cfg, {"method.encoder": "mlp"})
    with pytest.raises(ValueError, match=f"generator of width {WIDTH}, but method.generator_width is 16"):
        build_finetune_model(cfg, {"method.generator_width": 16})
    with pytest.raises(ValueError, match=f"prompt-tuning instance vectors of width {HIDDEN}, this config needs "
                                         "prefix-tuning vectors of width 64"):
        build_finetune_model(cfg, {"method.method": "prefix-tuning"})

    # Another backbone: same tokenizer, but an embedding matrix of 8 more rows.
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    other = tmp_path / "other-bert"
    BertModel(BertConfig(vocab_size=len(tokenizer) + 8, hidden_size=HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    kind = type(tokenizer).__name__
    with pytest.raises(ValueError, match=rf"vocabulary of '{re.escape(str(tiny_bert))}' \({kind}, {len(tokenizer)} "
                                         rf"rows.*this backbone '{re.escape(str(other))}' has {kind} with "
                                         rf"{len(tokenizer) + 8} rows"):
        build_finetune_model(cfg, {"model.name_or_path": str(other)})

    # Without a generator in the fine-tuning config only the table is used.
    model = build_finetune_model(cfg, {"method.encoder": ""})
    assert not hasattr(model.method, "generator")


def write_sentiment(path: Path, num: int = 48, seed: int = 1) -> Path:
    rng = random.Random(seed)
    rows = [{"sentence": " ".join(rng.choices(COLORS if i % 2 else NUMBERS, k=5)), "label": i % 2} for i in range(num)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_transfer_objective_resumes_from_latest_exactly(tmp_path, tiny_bert):
    data = write_entailment_task(tmp_path / "data", num_train=48)
    cfg = pretrain_config(tmp_path, tiny_bert, objective={"name": "transfer"}, sources={
        "tasks": [f"jsonl/rte:{data['train']}", f"jsonl/sst2:{write_sentiment(tmp_path / 'sst2.jsonl')}"],
        "num_eval_per_task": 8, "max_length": 32})
    common = ["--train.micro_batch_size=8"]
    straight = start_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'a'}", *common)
    first = finish_cli(start_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--train.max_steps=2",
                                 *common))  # while the straight run trains
    straight = finish_cli(straight)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--run.resume=true", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stderr
    losses = {run: read_log(tmp_path / run, "train/loss") for run in ("a", "b")}
    assert len(losses["a"]) == 4 and np.std(losses["a"]) > 1e-4
    assert losses["b"] == losses["a"]  # bitwise: same mixture, order, dropout draws and optimizer state
    about = json.loads((tmp_path / "b" / "best" / "generator_config.json").read_text())
    assert about["objective"] == "transfer" and set(about["eval"]) == {"mean_acc", "acc_rte", "acc_sst2"}
