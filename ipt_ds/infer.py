"""Evaluation and prediction from an export directory (`<run>/best`), on one or many ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ipt_ds import checkpoint
from ipt_ds.config import config_from_dict
from ipt_ds.data.generation import load_generation_split, read_generation_file
from ipt_ds.data.pipeline import load_examples
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import get_task
from ipt_ds.engine import ds_dtype, init_distributed
from ipt_ds.generation import generate_texts, score
from ipt_ds.loop import evaluate, predict_examples, to_prediction
from ipt_ds.model import build_model

log = logging.getLogger("ipt_ds")


def load_for_inference(export_dir: str, overrides: dict):
    """Rebuild the exported model in a DeepSpeed engine (no optimizer) with its trained tensors loaded."""
    import deepspeed

    meta, tensors = checkpoint.read_export(Path(export_dir))
    trained_on = meta["config"].get("data", {}).get("task")
    asked = overrides.get("data.task")
    if asked is not None and trained_on is not None and str(asked) != trained_on:
        raise ValueError(f"--data.task: '{export_dir}' was trained on task '{trained_on}'; it cannot score '{asked}' "
                         f"(its head and labels are {trained_on}'s). Leave --data.task out, or use an export of a "
                         f"{asked} run")
    cfg = config_from_dict(meta["config"], overrides, source=f"{export_dir}/{checkpoint.EXPORT_CONFIG}")
    if cfg.data.format in ("imagefolder", "npz"):
        raise ValueError(f"'{export_dir}' is an image classification export; evaluate and predict take text exports "
                         "(the run's results.json holds its eval and test scores)")
    saved_ds = meta.get("ds_config")
    if not isinstance(saved_ds, dict) or "train_micro_batch_size_per_gpu" not in saved_ds:
        raise ValueError(f"{export_dir}/{checkpoint.EXPORT_CONFIG}: no DeepSpeed settings ('ds_config'); evaluate and "
                         "predict take the <run>/best export of an `ipt-ds train` run")
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    ds_config = {k: v for k, v in saved_ds.items() if k not in ("gradient_accumulation_steps",)}
    ds_config["train_batch_size"] = ds_config["train_micro_batch_size_per_gpu"] * world
    if ds_config.get("zero_optimization", {}).get("stage", 0) < 3:
        ds_config["zero_optimization"] = {"stage": 0}  # stages 1-2 only shard optimizer state, and need an optimizer
    task = get_task(cfg.data.task)
    model, encoder = build_model(cfg, task, dtype=ds_dtype(ds_config), ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    checkpoint.load_trainable(engine.module, tensors, source=export_dir)
    return cfg, task, engine, encoder, rank


def evaluate_export(export_dir: str, overrides: dict) -> dict:
    cfg, task, engine, encoder, rank = load_for_inference(export_dir, overrides)
    if task.generation:
        examples = load_generation_split(cfg.data, cfg.data.eval_split)
        texts = generate_texts(engine, encoder, examples, cfg.generation, cfg.train.eval_batch_size)
        metrics = score(task.metrics, texts, examples)
    else:
        examples = load_examples(cfg.data, task, cfg.data.eval_split)
        metrics = evaluate(engine, encoder, task, examples, cfg.train.eval_batch_size)
    if rank == 0:
        print(json.dumps({"task": task.name, "split": cfg.data.eval_split, **metrics}))
    return metrics


def predict_export(export_dir: str, input_path: str, output_path: str, overrides: dict) -> None:
    """Write one jsonl line per input example: guid, predicted label (name or score) and the raw scores; for a
    generation task guid, source and the generated text."""
    out = checkpoint.new_output_file(output_path)
    if not Path(input_path).is_file():
        raise ValueError(f"--input '{input_path}': no such file")
    cfg, task, engine, encoder, rank = load_for_inference(export_dir, overrides)
    if task.generation:  # one line per source: guid, source, generated text
        fields = cfg.data.fields or {"source": "mr" if task.name == "e2e" else "source"}
        examples = read_generation_file(Path(input_path), source_key=fields["source"], target_key=None)
        texts = generate_texts(engine, encoder, examples, cfg.generation, cfg.train.eval_batch_size)
        if rank == 0:
            lines = [json.dumps({"guid": e.guid, "source": e.source, "prediction": t}) for e, t in zip(examples, texts)]
            checkpoint.atomic_write_text(out, "\n".join(lines) + "\n")
            log.info("wrote %d generations to %s", len(lines), out)
        torch.distributed.barrier()
        return
    examples = read_split(Path(input_path), task, fields=cfg.data.fields or None)
    scores = predict_examples(engine, encoder, examples, cfg.train.eval_batch_size)
    if rank == 0:
        lines = []
        for example, score in zip(examples, scores):
            pred = to_prediction(score, task)
            label = pred if task.is_regression else task.label_names[pred]
            lines.append(json.dumps({"guid": example.guid, "prediction": label, "scores": score}))
        checkpoint.atomic_write_text(out, "\n".join(lines) + "\n")
        log.info("wrote %d predictions to %s", len(lines), out)
    torch.distributed.barrier()
