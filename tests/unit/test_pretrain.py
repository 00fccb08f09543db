"""The pretraining stage (`pretrain/`): both objectives train the table and the generator, the artifact carries them
into fine-tuning (checked on both sides), resume, the corpus builder and the shipped pretraining configs."""

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

from ipt_ds.config import load_config
from ipt_ds.data.tasks import get_task
from ipt_ds.methods.generators import build_generator
from ipt_ds.model import build_model
from pretrain.config import load_pretrain_config
from tests.conftest import REPO, WORDS, read_log, run_cli, write_config, write_entailment_task

NUM_TOKENS, WIDTH, HIDDEN = 4, 8, 32  # prompt length, generator width, tiny backbone width
COLORS = "red green blue yellow purple orange white black grey pink brown violet".split()
NUMBERS = "one two three four five six seven eight nine ten eleven twelve".split()


def write_corpus(path: Path, *, per_category: int = 24, seed: int = 0) -> Path:
    """Three categories with disjoint vocabularies: learnable from the first few tokens."""
    rng = random.Random(seed)
    rows = [{"text": " ".join(rng.choices(words, k=6)), "label": name}
            for _ in range(per_category) for name, words in (("animals", WORDS), ("colors", COLORS),
                                                               ("numbers", NUMBERS))]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pretrain_config(tmp: Path, model_dir: Path, **sections) -> Path:
    base = {
        "run": {"log_every": 1, "seed": 3},
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "ipt", "encoder": "cnn", "num_tokens": NUM_TOKENS, "generator_width": WIDTH},
        "objective": {"name": "knowledge", "table_init": "backbone", "dropout": 0.0},
        "corpus": {"train_file": str(write_corpus(tmp / "corpus.jsonl")), "num_eval": 12},
        "train": {"batch_size": 8, "micro_batch_size": 4, "max_steps": 4, "eval_every": 2},
        "optim": {"lr": 0.05, "warmup_ratio": 0.0, "schedule": "constant"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return write_config(tmp / "pretrain.yaml", base)


def finetune_config(tmp: Path, model_dir: Path, **method) -> Path:
    data = write_entailment_task(tmp / "data")
    return write_config(tmp / "train.yaml", {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "ipt", "encoder": "cnn", "num_tokens": NUM_TOKENS, "generator_width": WIDTH, **method},
        "head": {"pool": "mean"},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 3, "eval_every": 3},
        "optim": {"lr": 0.05},
    })


def build_finetune_model(cfg_path: Path, overrides: dict | None = None):
    cfg = load_config(cfg_path, overrides)
    return build_model(cfg, get_task(cfg.data.task), dtype=torch.float32, ds_config=None)[0]


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


def test_every_part_of_the_instance_prompt_is_on_the_loss_path(tmp_path, tiny_bert):
    """Table, every generator tensor (the prompt-producing layer included) and the classifier get gradients."""
    from ipt_ds.data.encode import collate
    from pretrain.objectives import recipe_for

    for encoder in ("cnn", "mlp", "lstm", ""):  # "": the table alone ("Pretrained IPT")
        cfg = load_pretrain_config(pretrain_config(tmp_path, tiny_bert), {"method.encoder": encoder})
        model, features, pad_id, _ = recipe_for(cfg).build({"zero_optimization": {"stage": 0}})
        model.train()
        _, loss = model(collate(features[:8], pad_id))
        loss.backward()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert "method.ipt.table.weight" in trainable and "head.linear.weight" in trainable
        assert any(name.startswith("method.ipt.generator.") for name in trainable) == bool(encoder)
        without_gradient = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert without_gradient == [], encoder


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


class RunsCode:
    """Unpickling this writes `marker`: the check that a table file never runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_reference_style_pt_table_loads_with_weights_only(tmp_path, tiny_bert):
    from transformers import AutoTokenizer

    table = torch.randn(len(AutoTokenizer.from_pretrained(tiny_bert)), HIDDEN)
    torch.save(table, tmp_path / "textcnn.pt")
    cfg = finetune_config(tmp_path, tiny_bert, instance_pretrain=True, emb_checkpoints=str(tmp_path / "textcnn.pt"),
                          encoder="")
    assert torch.equal(build_finetune_model(cfg).method.table.weight, table)
    # A generator in the config starts random from a bare table (there is none to load).
    assert hasattr(build_finetune_model(cfg, {"method.encoder": "lstm"}).method, "generator")

    torch.save({"table": table, "payload": RunsCode(tmp_path / "pwned")}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="pickled objects other than tensors"):
        build_finetune_model(cfg, {"method.emb_checkpoints": str(tmp_path / "unsafe.pt")})
    assert not (tmp_path / "pwned").exists()
    torch.save(table[:-1], tmp_path / "short.pt")
    with pytest.raises(ValueError, match=rf"shape \({len(table) - 1}, {HIDDEN}\), but this backbone and path need "
                                         rf"\({len(table)}, {HIDDEN}\)"):
        build_finetune_model(cfg, {"method.emb_checkpoints": str(tmp_path / "short.pt")})


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
    straight = run_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'a'}", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--train.max_steps=2", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli("pretrain", str(cfg), f"--run.output_dir={tmp_path / 'b'}", "--run.resume=true", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stderr
    losses = {run: read_log(tmp_path / run, "train/loss") for run in ("a", "b")}
    assert len(losses["a"]) == 4 and np.std(losses["a"]) > 1e-4
    assert losses["b"] == losses["a"]  # bitwise: same mixture, order, dropout draws and optimizer state
    about = json.loads((tmp_path / "b" / "best" / "generator_config.json").read_text())
    assert about["objective"] == "transfer" and set(about["eval"]) == {"mean_acc", "acc_rte", "acc_sst2"}


def write_benchmark_root(root: Path) -> None:
    """A data root in the benchmark layouts: superglue/RTE (jsonl) and glue/SST-2 (tsv)."""
    write_entailment_task(root / "superglue" / "RTE", num_train=30)
    sst = root / "glue" / "SST-2"
    sst.mkdir(parents=True)
    rng = random.Random(2)
    rows = [f"{' '.join(rng.choices(COLORS, k=4))}\t{i % 2}" for i in range(20)] + ["red red red\t1"] * 3
    (sst / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")


def test_build_corpus_one_category_per_dataset_seeded_never_overwrites(tmp_path):
    from pretrain.corpus import CorpusSpec, build_corpus

    write_benchmark_root(tmp_path / "data")
    spec = {"sources": ["superglue/rte", "glue/sst2"], "per_category": 12, "root": str(tmp_path / "data")}
    counts = build_corpus(CorpusSpec(**spec, seed=1, output=str(tmp_path / "a.jsonl")))
    assert counts == {"rte": 12, "sst2": 12}
    rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    texts = {r["label"]: {x["text"] for x in rows if x["label"] == r["label"]} for r in rows}
    assert all(" and the " in t for t in texts["rte"]) and all(set(t.split()) <= set(COLORS) for t in texts["sst2"])
    assert sum(t == "red red red" for t in texts["sst2"]) <= 1  # repeated texts are kept once
    build_corpus(CorpusSpec(**spec, seed=1, output=str(tmp_path / "b.jsonl")))
    build_corpus(CorpusSpec(**spec, seed=2, output=str(tmp_path / "c.jsonl")))
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    assert (tmp_path / "c.jsonl").read_text() != (tmp_path / "a.jsonl").read_text()
    assert len(build_corpus(CorpusSpec(**{**spec, "per_category": 0}, output=str(tmp_path / "all.jsonl")))) == 2

    before = (tmp_path / "a.jsonl").read_text()
    again = run_cli("build-corpus", "--sources=superglue/rte", f"--root={tmp_path / 'data'}",
                    f"--output={tmp_path / 'a.jsonl'}")
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert (tmp_path / "a.jsonl").read_text() == before


def test_config_problems_are_reported_together_with_their_lines(tmp_path, tiny_bert):
    from ipt_ds.confload import ConfigError, load_yaml_with_lines

    path = pretrain_config(tmp_path, tiny_bert, corpus={"train_file": ""}, objective={"table_init": "backbone"},
                           method={"method": "prefix-tuning"})
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(path, {"train.epochs": "many"})
    lines = load_yaml_with_lines(path)[1]
    assert info.value.problems == [  # the type error first; the checks across sections wait for valid sections
        "--train.epochs: 'train.epochs' expected an integer, got 'many' (declared type: int)"]
    with pytest.raises(ConfigError) as info:
        load_pretrain_config(path)
    assert info.value.problems == [
        f"{path}:{lines['corpus.train_file']}: objective knowledge needs a labelled corpus file (`ipt-ds build-corpus` "
        "writes one)",
        f"{path}:{lines['objective.table_init']}: the backbone's embeddings only fit the prompt path; use table_init: "
        "random with method.method: prefix-tuning"]
    with pytest.raises(ConfigError, match="--method.name: pretraining trains IPT instance prompts"):
        load_pretrain_config(None, {"method.name": "prompt_tuning", "corpus.train_file": "corpus.jsonl"})


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pretraining_yaml_loads_and_names_its_command(path: Path):
    load_pretrain_config(path)
    header = path.read_text().splitlines()[:5]
    assert any("ipt-ds pretrain" in line or "ipt_ds pretrain" in line for line in header), path


def test_pretraining_config_reference_is_current():
    from pretrain.configdoc import render

    assert render() in (REPO / "docs" / "pretrain.md").read_text(), "paste `python -m pretrain.configdoc` there"
