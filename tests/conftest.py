"""Shared test fixtures: tiny random backbones saved as real HF model directories, synthetic tasks, run helpers.

The suite is split by cost, one rule per test (its fixtures included):
- tests/unit: runs in the pytest process. Short helper processes that build no DeepSpeed engine are allowed: an
  `ipt-ds` command refused before training (exit status 2), `--help`, `show-config`, `estimate`, shellcheck, a
  snippet that needs a fresh interpreter.
- tests/distributed: starts a process that builds a DeepSpeed engine (`ipt-ds train`, `evaluate`, `predict`,
  `pretrain`; on one rank or more, directly or through the deepspeed launcher) or submits a Slurm job.
Each test is marked `unit` or `distributed` from its folder, and `slurm` when it uses the Slurm cluster
(`pytest -m "not slurm"`). Helpers shared by both folders (this file, ranks.py, slurm_cluster.py, the scripts
frozen_probe.py and zero3_release.py, fixtures/) stay here in tests/.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds its CPU communication op per Python environment; a cache of this venv's own keeps other
# checkouts' builds (and their locks) out of the way.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


TESTS = Path(__file__).resolve().parent
SUITES = ("unit", "distributed")


def pytest_collection_modifyitems(config, items):
    """Mark each test with its folder's name, and `slurm` where it runs jobs on the Slurm cluster."""
    for item in items:
        suite = item.path.resolve().relative_to(TESTS).parts[0]
        if suite not in SUITES:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in tests/unit or tests/distributed (see "
                                    "tests/conftest.py for which)")
        item.add_marker(suite)
        if "slurm" in item.fixturenames:
            item.add_marker("slurm")


def minilm_dir() -> Path:
    from ipt_ds.backbone import ModelConfig, resolve_model_path

    return Path(resolve_model_path(ModelConfig(name_or_path="minilm"))[0])


def save_tiny(kind: str, out: Path) -> Path:
    """A tiny random-weight model of family `kind`, saved with a real tokenizer of the same vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    if kind in ("bert", "roberta", "deberta-v2"):  # encoders borrow MiniLM's real WordPiece tokenizer
        from transformers import DebertaV2Config, DebertaV2ForMaskedLM, RobertaConfig, RobertaForMaskedLM

        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        sizes = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id)
        config_cls, model_cls = {"bert": (BertConfig, BertForMaskedLM), "roberta": (RobertaConfig, RobertaForMaskedLM),
                                 "deberta-v2": (DebertaV2Config, DebertaV2ForMaskedLM)}[kind]
        model = model_cls(config_cls(**sizes))
    else:  # decoders borrow the real SmolLM2 tokenizer (from the converted cache of the packaged GGUF)
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        from ipt_ds.backbone import ModelConfig, load_backbone

        _, tokenizer = load_backbone(ModelConfig(name_or_path="smollm2"), dtype=torch.float32, with_lm_head=False)
        if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
            model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64))
        elif kind == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4))
        elif kind == "t5":  # encoder-decoder with more decoder than encoder layers (prefixes go to the decoder)
            from transformers import T5Config, T5ForConditionalGeneration

            model = T5ForConditionalGeneration(T5Config(
                vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                num_heads=4, initializer_factor=2.0, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id))
        elif kind == "bart":  # ... and fewer decoder than encoder attention heads
            from transformers import BartConfig, BartForConditionalGeneration

            ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.eos_token_id,
                   "eos_token_id": tokenizer.eos_token_id, "decoder_start_token_id": tokenizer.eos_token_id,
                   "forced_eos_token_id": None}
            model = BartForConditionalGeneration(BartConfig(
                vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                init_std=0.1, **ids))
        else:
            raise AssertionError(kind)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return save_tiny("bert", tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_bert) -> dict[str, Path]:
    return {"bert": tiny_bert, **{kind: save_tiny(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
                                  for kind in FAMILIES + SEQ2SEQ_FAMILIES if kind != "bert"}}


FAMILIES = ("bert", "roberta", "deberta-v2", "gpt2", "llama")
SEQ2SEQ_FAMILIES = ("t5", "bart")  # generation tasks only
WORDS = "cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse frog".split()


def write_entailment_task(directory: Path, *, num_train: int = 96, num_eval: int = 32, seed: int = 0) -> dict:
    """RTE-format jsonl files with a learnable rule: entailment iff every hypothesis word occurs in the premise."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("val", num_eval)):
        rows = []
        for i in range(count):
            premise = rng.sample(WORDS, 6)
            entail = i % 2 == 0
            hypothesis = rng.sample(premise, 2) if entail else rng.sample([w for w in WORDS if w not in premise], 2)
            rows.append({"premise": "the " + " and the ".join(premise), "hypothesis": " ".join(hypothesis),
                         "label": "entailment" if entail else "not_entailment", "idx": i})
        paths[split] = directory / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def write_topic_task(directory: Path, *, num_train: int = 16, seed: int = 0) -> Path:
    """RTE-format jsonl whose label is the topic of the premise: two disjoint vocabularies, easy to fit."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    topics = (WORDS[:8], "red green blue yellow purple orange white black".split())
    rows = []
    for i in range(num_train):
        words = topics[i % 2]
        rows.append({"premise": " ".join(rng.choices(words, k=6)), "hypothesis": " ".join(rng.choices(WORDS, k=2)),
                     "label": ("entailment", "not_entailment")[i % 2], "idx": i})
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_losses(model, batch: dict, trainable: list, *, steps: int, lr: float = 1e-2) -> list[float]:
    """Adam steps of `model` (a PromptModel) on one batch, in training mode; the loss of each step."""
    import torch

    optimizer = torch.optim.Adam(trainable, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        _, loss = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def write_config(path: Path, sections: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return path


def deepspeed_command(num_ranks: int, *args: str, port: str | None = None) -> list[str]:
    """The deepspeed launcher starting ARGS (a script and its arguments, or --module NAME ...) on `num_ranks` ranks."""
    port = port or str(random.Random().randint(20000, 40000))
    return [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", port, *args]


def start_cli(*args: str, num_ranks: int = 1, env: dict | None = None) -> subprocess.Popen:
    """Start `ipt-ds ARGS` in real processes: directly for one rank, through the deepspeed launcher for more. Runs
    that do not depend on each other start together and are waited for with `finish_cli`: on 2 cores a run spends
    much of its time importing and starting up on one core."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    if num_ranks == 1:
        cmd = [sys.executable, "-m", "ipt_ds", *args]
    else:
        cmd = deepspeed_command(num_ranks, "--module", "ipt_ds", *args)
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cli(process: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a run from `start_cli`; its exit status and output, as `subprocess.run` gives them."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(*args: str, num_ranks: int = 1, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `ipt-ds ARGS` in real processes and wait for it (see `start_cli`)."""
    return finish_cli(start_cli(*args, num_ranks=num_ranks, env=env), timeout)


def read_log(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


VISION_FAMILIES = ("vit", "deit", "dinov2")


def save_tiny_vision(kind: str, out: Path) -> Path:
    """A tiny random-weight vision transformer (16 x 16 RGB input, 4 x 4 patches, no preprocessor_config.json).
    Weights drawn 10x wider than transformers' default (std 0.2): at 0.02 the frozen CLS state barely depends on the
    image, and a few steps could not tell a working method from a broken one."""
    import torch
    from transformers import DeiTConfig, DeiTModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(0)
    sizes = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, initializer_range=0.2)
    config_cls, model_cls = {"vit": (ViTConfig, ViTModel), "deit": (DeiTConfig, DeiTModel),
                             "dinov2": (Dinov2Config, Dinov2Model)}[kind]
    model_cls(config_cls(**sizes)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_vision_models(tmp_path_factory) -> dict[str, Path]:
    return {kind: save_tiny_vision(kind, tmp_path_factory.mktemp(f"tiny-{kind}")) for kind in VISION_FAMILIES}


def two_class_images(num: int, *, size: int = 8, seed: int = 0):
    """(N, size, size) uint8 images whose class is which half is bright (0: top, 1: bottom), with noise; labels (N,)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.arange(num) % 2
    images = rng.integers(0, 60, (num, size, size))
    for image, label in zip(images, labels):
        image[label * size // 2 : (label + 1) * size // 2] += 180
    return images.astype(np.uint8), labels
