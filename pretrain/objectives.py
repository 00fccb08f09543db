"""The two pretraining objectives, as recipes (`ipt_ds.recipes.Recipe`) for `ipt_ds.loop.train` (same loop, checkpoints,
resume and logs).

Both train the IPT module that fine-tuning builds (`ipt_ds.methods.ipt`, with a lookup table of its own) and export
its table and generator as the artifact (`artifact.py`) whenever the evaluation improves.
- knowledge: the instance prompts of a text's first N tokens (table -> generator, exactly as fine-tuning makes them)
  are averaged over the real tokens and classified into the corpus categories by a linear layer. Unlike the IPT
  reference's pretraining, the table is in the optimizer and the prompt-producing layer is on the loss path; the
  backbone is loaded for its sizes and embeddings only and never runs.
- transfer: the IPT method runs through the frozen backbone on a mixture of source tasks; one linear head has a
  block of outputs per task, and each example's softmax covers its own task's block only.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch
from torch import nn

from ipt_ds import checkpoint
from ipt_ds.backbone import Backbone, embedding_rows, load_backbone
from ipt_ds.data.encode import TextEncoder
from ipt_ds.engine import TrainState, ds_dtype
from ipt_ds.heads import pool_hidden
from ipt_ds.methods.base import MethodOutput
from ipt_ds.methods.ipt import ARTIFACT_CONFIG, IPT, instance_width
from ipt_ds.methods.ipt import build as build_ipt
from ipt_ds.metrics import compute_metrics
from ipt_ds.model import PromptModel
from ipt_ds.recipes.base import TokenBatches
from ipt_ds.recipes.text import evaluate, predict_examples
from pretrain.artifact import describe, write_artifact
from pretrain.config import PretrainConfig
from pretrain.data import load_sources, read_corpus

log = logging.getLogger("pretrain")


class InstancePrompts(nn.Module):
    """The knowledge objective's method: the IPT module's instance prompts themselves, without the backbone."""

    def __init__(self, ipt: IPT):
        super().__init__()
        self.ipt = ipt

    def forward(self, backbone: Backbone, batch: dict) -> MethodOutput:
        prompts = self.ipt.instance_vectors(backbone, batch["input_ids"], batch["attention_mask"])  # (B, N, D)
        num_tokens, mask = prompts.shape[1], batch["attention_mask"]
        mask = nn.functional.pad(mask, (0, max(0, num_tokens - mask.shape[1])))[:, :num_tokens]  # (B, N) real tokens
        return MethodOutput(prompts, mask, 0)


class PooledClassifier(nn.Module):
    """Mean of the instance prompts over the real tokens -> dropout -> Linear(D, C)."""

    def __init__(self, width: int, num_labels: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(width, num_labels)

    def forward(self, out: MethodOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        mask = out.attention_mask.unsqueeze(-1).to(out.hidden.dtype)  # (B, N, 1)
        pooled = (out.hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        logits = self.linear(self.dropout(pooled)).float()  # (B, C)
        return logits, nn.functional.cross_entropy(logits, batch["labels"]) if "labels" in batch else None


class TaskBlockHead(nn.Module):
    """Linear(H, sum of the tasks' label counts) on pooled backbone states; labels are global (block offset + the
    task's own label), and the softmax of an example runs over its task's block only."""

    def __init__(self, hidden_size: int, num_labels: list[int], *, pool: str, dropout: float):
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, sum(num_labels))
        block = torch.repeat_interleave(torch.arange(len(num_labels)), torch.tensor(num_labels))  # (L,)
        self.register_buffer("same_block", block[:, None] == block[None, :], persistent=False)  # (L, L)

    def forward(self, out: MethodOutput, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = pool_hidden(out, batch["attention_mask"], self.pool)  # (B, H)
        logits = self.linear(self.dropout(features)).float()  # (B, L)
        if "labels" not in batch:
            return logits, None
        own_block = self.same_block[batch["labels"]]  # (B, L)
        return logits, nn.functional.cross_entropy(logits.masked_fill(~own_block, float("-inf")), batch["labels"])


class _Recipe(TokenBatches):
    """What both objectives share: the IPT module with a table of its own, the artifact, the results."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg

    def _build_ipt(self, ds_config: dict) -> tuple[Backbone, object, IPT]:
        cfg = self.cfg
        backbone, tokenizer = load_backbone(cfg.model, dtype=ds_dtype(ds_config), with_lm_head=False,
                                            ds_config=ds_config)
        initial = None
        if not cfg.method.instance_pretrain:  # else the table (and generator) come from method.emb_checkpoints
            if cfg.objective.table_init == "backbone":
                initial = embedding_rows(backbone, torch.arange(backbone.vocab_size))  # (V, H)
            else:
                shape = (backbone.vocab_size, instance_width(cfg.method, backbone))
                initial = torch.empty(shape).uniform_(-cfg.method.init_range, cfg.method.init_range)
        self.ipt = build_ipt(cfg.method, backbone, tokenizer, initial_table=initial)
        self.about = describe(self.ipt, backbone, tokenizer, cfg.model.name_or_path)
        return backbone, tokenizer, self.ipt

    def export(self, engine, path: Path, meta: dict, rank: int) -> None:
        about = {**self.about, "objective": self.cfg.objective.name, "step": meta["step"], "eval": meta["eval"],
                 **{key: meta[key] for key in ("categories", "sources") if key in meta},
                 "pretrain_config": meta["config"]}
        write_artifact(self.ipt, path, about, rank=rank)

    def finish(self, engine, state: TrainState, out: Path, rank: int) -> dict:
        best = json.loads((out / "best" / ARTIFACT_CONFIG).read_text())
        results = {"objective": self.cfg.objective.name, "best_step": state.best_step, "eval": best["eval"],
                   "artifact": str(out / "best"), "parameters": engine.module.parameter_report()}
        if rank == 0:
            checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=2))
            log.info("artifact %s (step %d: %s); fine-tune with method.instance_pretrain=true "
                     "method.emb_checkpoints=%s", out / "best", state.best_step,
                     " ".join(f"{k}={v:.2f}" for k, v in best["eval"].items()), out / "best")
        return results


class KnowledgeRecipe(_Recipe):
    def build(self, ds_config: dict) -> tuple[PromptModel, list[dict], dict]:
        cfg, corpus = self.cfg, self.cfg.corpus
        self.task, train, self.eval_examples = read_corpus(
            corpus.train_file, corpus.eval_file, text_field=corpus.text_field, label_field=corpus.label_field,
            num_eval=corpus.num_eval, seed=cfg.run.seed)
        backbone, tokenizer, ipt = self._build_ipt(ds_config)
        head = PooledClassifier(instance_width(cfg.method, backbone), len(self.task.label_names),
                                cfg.objective.dropout)
        # N + 1 tokens: the first N are what fine-tuning reads ([CLS] and the text's start; the cut drops [SEP]).
        self.encoder = TextEncoder(tokenizer=tokenizer, task=self.task, max_length=cfg.method.num_virtual_tokens + 1)
        features = [self.encoder(e) for e in train]
        log.info("knowledge corpus: %d training and %d evaluation texts in %d categories", len(train),
                 len(self.eval_examples), len(self.task.label_names))
        self.pad_id = tokenizer.pad_token_id
        return PromptModel(backbone, InstancePrompts(ipt), head), features, {
            "objective": "knowledge", "categories": list(self.task.label_names)}

    def evaluate(self, engine) -> dict[str, float]:
        return evaluate(engine, self.encoder, self.task, self.eval_examples, self.cfg.train.eval_batch_size)


class TransferRecipe(_Recipe):
    def build(self, ds_config: dict) -> tuple[PromptModel, list[dict], dict]:
        cfg, sources = self.cfg, self.cfg.sources
        self.sources = load_sources(sources.tasks, root=sources.root, max_per_task=sources.max_per_task,
                                    num_eval_per_task=sources.num_eval_per_task, seed=cfg.run.seed)
        backbone, tokenizer, ipt = self._build_ipt(ds_config)
        sizes = [len(s.task.label_names) for s in self.sources]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        head = TaskBlockHead(backbone.hidden_size, sizes, pool=cfg.objective.pool, dropout=cfg.objective.dropout)
        self.encoders = [TextEncoder(tokenizer=tokenizer, task=s.task, max_length=sources.max_length)
                         for s in self.sources]
        features = [{**encoder(e), "labels": offset + e.label}
                    for s, encoder, offset in zip(self.sources, self.encoders, self.offsets) for e in s.train]
        log.info("transfer mixture: %s", ", ".join(f"{s.task.name} {len(s.train)} (+{len(s.eval)} eval)"
                                                   for s in self.sources))
        self.pad_id = tokenizer.pad_token_id
        return PromptModel(backbone, ipt, head), features, {"objective": "transfer", "sources": list(sources.tasks)}

    def evaluate(self, engine) -> dict[str, float]:
        """Accuracy on each task's held-out examples (argmax within its block) and their mean, which selects."""
        per_task = {}
        for source, encoder, offset in zip(self.sources, self.encoders, self.offsets):
            scores = predict_examples(engine, encoder, source.eval, self.cfg.train.eval_batch_size)
            size = len(source.task.label_names)
            predictions = [max(range(size), key=lambda i, row=row: row[offset + i]) for row in scores]
            labels = [e.label for e in source.eval]
            per_task[f"acc_{source.task.name}"] = compute_metrics(["acc"], predictions=predictions,
                                                                  labels=labels)["acc"]
        return {"mean_acc": statistics.mean(per_task.values()), **per_task}


def recipe_for(cfg: PretrainConfig) -> _Recipe:
    return {"knowledge": KnowledgeRecipe, "transfer": TransferRecipe}[cfg.objective.name](cfg)
