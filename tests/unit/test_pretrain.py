"""The pretraining stage (`pretrain/`) in this process: every part of the instance prompt gets gradients, a bare table
loads with weights_only, the corpus builder, config errors and the shipped pretraining configs. The real runs (the
2-rank artifact, fine-tuning from it, resume) are in tests/distributed/test_pretrain.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from ipt_ds.config import load_config
from ipt_ds.data.tasks import get_task
from ipt_ds.model import build_model
from pretrain.config import load_pretrain_config
from tests.conftest import REPO, WORDS, run_cli, write_config, write_entailment_task

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
        "method": {"name": "ipt", "encoder": "cnn", "num_virtual_tokens": NUM_TOKENS, "generator_width": WIDTH},
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
        "method": {"name": "ipt", "encoder": "cnn", "num_virtual_tokens": NUM_TOKENS, "generator_width": WIDTH,
                   **method},
        "head": {"pool": "mean"},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 64},
        "train": {"batch_size": 16, "micro_batch_size": 8, "max_steps": 3, "eval_every": 3},
        "optim": {"lr": 0.05},
    })


def build_finetune_model(cfg_path: Path, overrides: dict | None = None):
    cfg = load_config(cfg_path, overrides)
    return build_model(cfg, get_task(cfg.data.task), dtype=torch.float32, ds_config=None)[0]


def test_every_part_of_the_instance_prompt_is_on_the_loss_path(tmp_path, tiny_bert):
    """Table, every generator tensor (the prompt-producing layer included) and the classifier get gradients."""
    from pretrain.objectives import recipe_for

    for encoder in ("cnn", "mlp", "lstm", ""):  # "": the table alone ("Pretrained IPT")
        cfg = load_pretrain_config(pretrain_config(tmp_path, tiny_bert), {"method.encoder": encoder})
        recipe = recipe_for(cfg)
        model, features, _ = recipe.build({"zero_optimization": {"stage": 0}})
        model.train()
        _, loss = model(recipe.collate(features[:8]))
        loss.backward()
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        assert "method.ipt.table.weight" in trainable and "head.linear.weight" in trainable
        assert any(name.startswith("method.ipt.generator.") for name in trainable) == bool(encoder)
        without_gradient = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert without_gradient == [], encoder


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
