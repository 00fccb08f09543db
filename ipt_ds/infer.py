"""Evaluation and prediction from an export directory (`<run>/best`), on one or many ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ipt_ds import checkpoint
from ipt_ds.config import config_from_dict
from ipt_ds.engine import ds_dtype, init_distributed
from ipt_ds.recipes import TextRecipe, recipe_for

log = logging.getLogger("ipt_ds")


def load_for_inference(export_dir: str, overrides: dict) -> tuple[TextRecipe, object, int]:
    """Rebuild the exported model in a DeepSpeed engine (no optimizer) with its trained tensors loaded; returns
    (the recipe that scores and predicts with it, the engine, this rank)."""
    import deepspeed

    meta, tensors = checkpoint.read_export(Path(export_dir))
    trained_on = meta["config"].get("data", {}).get("task")
    asked = overrides.get("data.task")
    if asked is not None and trained_on is not None and str(asked) != trained_on:
        raise ValueError(f"--data.task: '{export_dir}' was trained on task '{trained_on}'; it cannot score '{asked}' "
                         f"(its head and labels are {trained_on}'s). Leave --data.task out, or use an export of a "
                         f"{asked} run")
    cfg = config_from_dict(meta["config"], overrides, source=f"{export_dir}/{checkpoint.EXPORT_CONFIG}")
    recipe = recipe_for(cfg)
    if recipe.kind == "image":
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
    model = recipe.load_model(dtype=ds_dtype(ds_config), ds_config=ds_config)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    checkpoint.load_trainable(engine.module, tensors, source=export_dir)
    return recipe, engine, rank


def evaluate_export(export_dir: str, overrides: dict) -> dict:
    recipe, engine, rank = load_for_inference(export_dir, overrides)
    split = recipe.cfg.data.eval_split
    metrics = recipe.score_split(engine, split)
    if rank == 0:
        print(json.dumps({"task": recipe.task.name, "split": split, **metrics}))
    return metrics


def predict_export(export_dir: str, input_path: str, output_path: str, overrides: dict) -> None:
    """Write one jsonl line per input example: guid, predicted label (name or score) and the raw scores; for a
    generation task guid, source and the generated text."""
    out = checkpoint.new_output_file(output_path)
    if not Path(input_path).is_file():
        raise ValueError(f"--input '{input_path}': no such file")
    recipe, engine, rank = load_for_inference(export_dir, overrides)
    rows = recipe.predict_file(engine, Path(input_path))
    if rank == 0:
        checkpoint.atomic_write_text(out, "\n".join(json.dumps(row) for row in rows) + "\n")
        log.info("wrote %d %s to %s", len(rows), "generations" if recipe.kind == "generation" else "predictions", out)
    torch.distributed.barrier()
