"""Classification and regression on a text task (`ipt-ds train`, `evaluate`, `predict`): the default recipe, and the
evaluation helpers that other text recipes (`pretrain/`) and the serving paths (`infer.py`, `mixed.py`) reuse."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch

from ipt_ds import checkpoint, frozen_cache
from ipt_ds.config import Config
from ipt_ds.data.encode import TextEncoder, collate
from ipt_ds.data.pipeline import load_examples, load_task_splits, logits_of, predict_sharded
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import Example, Task, get_task
from ipt_ds.engine import TrainState, ds_dtype
from ipt_ds.metrics import compute_metrics, constant_baseline, log_split, record_split
from ipt_ds.model import PromptModel, build_model
from ipt_ds.recipes.base import TokenBatches, best_results

log = logging.getLogger("ipt_ds")


def predict_examples(engine, encoder: TextEncoder, examples: list[Example], batch_size: int,
                     features: list[dict] | None = None):
    """Run every example once across all ranks; every rank gets all predictions back, in input order. `features`:
    the examples already encoded (with their cached frozen states)."""
    features = features if features is not None else [encoder(e) for e in examples]
    pad_id = encoder.tokenizer.pad_token_id
    return predict_sharded(engine, [len(f["input_ids"]) for f in features], batch_size,
                           lambda indices: collate([features[i] for i in indices], pad_id),
                           lambda batch: logits_of(engine, batch))


def to_prediction(score, task: Task) -> int | float:
    return score if task.is_regression else max(range(len(score)), key=score.__getitem__)


def evaluate(engine, encoder: TextEncoder, task: Task, examples: list[Example], batch_size: int,
             features: list[dict] | None = None) -> dict[str, float]:
    scores = predict_examples(engine, encoder, examples, batch_size, features)
    return compute_metrics(task.metrics, predictions=[to_prediction(s, task) for s in scores],
                           labels=[e.label for e in examples], groups=[e.group for e in examples])


class TextRecipe(TokenBatches):
    """Fine-tuning on the classification or regression task of `cfg.data` (`ipt-ds train`); the export is the
    trained tensors (`best/`)."""

    kind = "text"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.cached: dict[str, list[dict]] = {}
        """With train.frozen_cache: each split's encoded examples with their frozen states ("train", "eval",
        "test"), set by `prepare`."""

    @staticmethod
    def outputs(task: Task) -> str:
        """What the model predicts for `task`, in words (`ipt-ds tasks`)."""
        return "regression" if task.is_regression else "/".join(task.label_names)

    def load_model(self, *, dtype: torch.dtype, ds_config: dict | None) -> PromptModel:
        """The model of `cfg` as before training, with its encoder; reads no training data."""
        self.task = get_task(self.cfg.data.task)
        model, self.encoder = build_model(self.cfg, self.task, dtype=dtype, ds_config=ds_config)
        self.pad_id = self.encoder.tokenizer.pad_token_id
        return model

    def build(self, ds_config: dict) -> tuple[PromptModel, list[dict], dict]:
        cfg = self.cfg
        _, train_examples, self.eval_examples, self.test_examples = load_task_splits(cfg.data, cfg.run.seed)
        model = self.load_model(dtype=ds_dtype(ds_config), ds_config=ds_config)
        features = [self.encoder(e) for e in train_examples]
        if self.encoder.num_truncated:
            log.info("%d of %d training inputs truncated to data.max_length=%d (longest first)",
                     self.encoder.num_truncated, len(features), cfg.data.max_length)
        if cfg.train.frozen_cache:
            frozen_cache.check_method(model.method, cfg.method.name, model.backbone)
            self.cached["train"] = features
        return model, features, {"task": self.task.name, "label_names": list(self.task.label_names)}

    def prepare(self, engine) -> None:
        """With train.frozen_cache: compute (or reuse) every split's frozen states (every rank calls it)."""
        if not self.cached:
            return
        self.cached["eval"] = [self.encoder(e) for e in self.eval_examples]
        self.cached["test"] = [self.encoder(e) for e in self.test_examples]
        every = [f for split in self.cached.values() for f in split]
        frozen_cache.precompute(engine, every, tokenizer=self.encoder.tokenizer,
                                batch_size=self.cfg.train.eval_batch_size, pad_id=self.pad_id,
                                budget_gb=self.cfg.train.frozen_cache_gb,
                                directory=self.cfg.output_path() / "frozen_cache")

    def evaluate(self, engine) -> dict[str, float]:
        return evaluate(engine, self.encoder, self.task, self.eval_examples, self.cfg.train.eval_batch_size,
                        self.cached.get("eval"))

    def export(self, engine, path: Path, meta: dict, rank: int) -> None:
        checkpoint.export_trainable(engine.module, path, meta, rank=rank)

    def finish(self, engine, state: TrainState, out: Path, rank: int) -> dict:
        """Score the best checkpoint on the eval (and test) split and write results.json."""
        cfg, task = self.cfg, self.task
        results = best_results(engine, cfg, state, out, task.name)
        splits = {"eval": self.eval_examples}  # scored with their cached frozen states, if any
        if self.test_examples and all(e.label is not None for e in self.test_examples):
            splits["test"] = self.test_examples
        for split, examples in splits.items():  # each scored split with the number to beat there, in its own metrics
            labels, groups = [e.label for e in examples], [e.group for e in examples]
            scores = evaluate(engine, self.encoder, task, examples, cfg.train.eval_batch_size, self.cached.get(split))
            record_split(results, split, scores,
                         constant_baseline(task.metrics, labels, regression=task.is_regression, groups=groups))
            if not task.is_regression:
                results[f"{split}_majority_acc"] = 100 * max(Counter(labels).values()) / len(labels)
        if rank == 0:
            checkpoint.atomic_write_text(out / "results.json", json.dumps(results, indent=2))
            for split in splits:
                log_split(log, results, split, cfg.data.eval_split if split == "eval" else cfg.data.test_split)
        return results

    def score_split(self, engine, split: str) -> dict[str, float]:
        """Metrics on `split` of `cfg.data` (`ipt-ds evaluate`; every rank calls it)."""
        examples = load_examples(self.cfg.data, self.task, split)
        return evaluate(engine, self.encoder, self.task, examples, self.cfg.train.eval_batch_size)

    def predict_file(self, engine, path: Path) -> list[dict]:
        """One row per example of the file at `path`: guid, predicted label (name or score) and the raw scores
        (`ipt-ds predict`; every rank calls it and gets every row)."""
        task = self.task
        examples = read_split(path, task, fields=self.cfg.data.fields or None)
        scores = predict_examples(engine, self.encoder, examples, self.cfg.train.eval_batch_size)
        rows = []
        for example, score in zip(examples, scores):
            pred = to_prediction(score, task)
            rows.append({"guid": example.guid, "prediction": pred if task.is_regression else task.label_names[pred],
                         "scores": score})
        return rows
