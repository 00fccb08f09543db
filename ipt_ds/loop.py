"""The training loop: `train` -> `train_step`, with evaluation, checkpoints, the `best/` export and logs.

`train` runs one loop for any `Recipe` (what is trained on, how it is scored and exported; `ipt_ds/recipes/`):
text tasks, generation and images; `pretrain/` brings its own recipes and reuses the loop, its checkpoints and its
logs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import yaml

from ipt_ds import checkpoint, failures, preemption
from ipt_ds.config import Config
from ipt_ds.data.pipeline import global_train_batches, rank_share
from ipt_ds.engine import (
    NonFiniteError,
    TrainState,
    build_optimizer,
    drop_single_rank_zero,
    fit_zero3_buckets,
    guard_optimizer_step,
    init_distributed,
    nonfinite_step,
    resolve_ds_config,
    take_over_clipping,
    unmap_freed_gathers,
)
from ipt_ds.recipes import Recipe, recipe_for

log = logging.getLogger("ipt_ds")


def check_run_dir(cfg: Config) -> Path:
    """Refuse to touch an existing run unless asked (resume or overwrite), and to resume it differently; changes
    nothing on disk (`prepare_run_dir` does, once the run has got past everything that can fail early)."""
    out = cfg.output_path()
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir '{out}' is a file; choose a directory")
    blocked = checkpoint.unwritable_parent(out)  # found here, not after the model and the engine are built
    if blocked is not None:
        raise ValueError(f"run.output_dir '{out}' cannot be written ('{blocked}' is not a writable directory); choose "
                         "another --run.output_dir")
    exists = out.exists() and any(out.iterdir())
    if cfg.run.resume == "auto":  # decided here, once; everything after sees true or false
        cfg.run.resume = (out / "checkpoints" / "latest").exists()
        if exists and not cfg.run.resume:  # a start that ended before its first checkpoint: begin that run again
            checkpoint.check_resume_config(out, cfg.to_dict())  # never another run's directory
            cfg.run.overwrite = True
        log.info("run.resume=auto: %s", "resuming from the latest checkpoint" if cfg.run.resume
                 else "no checkpoint yet, starting the run" + (" again" if exists else ""))
    if exists and not (cfg.run.resume or cfg.run.overwrite):
        raise ValueError(f"run.output_dir '{out}' already holds a run; pass --run.resume=true to continue it, "
                         "--run.overwrite=true to replace it, or choose another --run.output_dir")
    if cfg.run.resume:
        if not (out / "checkpoints" / "latest").exists():
            raise ValueError(f"--run.resume: no checkpoint in '{out}/checkpoints' to resume from")
        checkpoint.check_resume_config(out, cfg.to_dict())
        checkpoint.latest_checkpoint(out / "checkpoints")  # before any file of the run is rewritten
    elif exists and cfg.run.overwrite:
        if Path.cwd().resolve().is_relative_to(out.resolve()):
            raise ValueError(f"--run.overwrite: run.output_dir '{out}' contains the current directory; refusing "
                             "to delete it")
        if not (out / "config.yaml").is_file():
            raise ValueError(f"--run.overwrite: '{out}' is not a run directory (no config.yaml); refusing to delete "
                             "it, choose another --run.output_dir")
    return out


def prepare_run_dir(cfg: Config, out: Path, rank: int) -> None:
    """Replace the old run (--run.overwrite) and create the run directory, after every rank has checked it."""
    torch.distributed.barrier()
    if rank == 0:
        if cfg.run.overwrite and not cfg.run.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()


def train_step(engine, batches: list[dict], weights: list[float]) -> float:
    """One optimizer step over `accumulation` micro-batches, each mean loss weighted (`rank_share`); returns this
    rank's share of the global batch's mean loss, times the number of ranks."""
    total = 0.0
    for batch, weight in zip(batches, weights):
        _, loss = engine(batch)
        engine.backward(loss if weight == 1.0 else loss * weight)
        engine.step()  # DeepSpeed only updates at the accumulation boundary
        total += weight * loss.item()
    return total / len(batches)


def train(cfg: Config, recipe: Recipe | None = None) -> dict:
    """Train `cfg` (any config with run, train, optim and deepspeed sections) with `recipe`, by default the one that
    `cfg.data` asks for (`recipe_for`)."""
    import deepspeed

    recipe = recipe if recipe is not None else recipe_for(cfg)
    rank, world = init_distributed(cfg.run.collective_timeout_s)
    failures.start(rank, world)
    preemption.install(cfg.run.stop_signals)
    out = check_run_dir(cfg)  # nothing on disk changes before data, model and engine are built
    torch.manual_seed(cfg.run.seed)
    ds_config = resolve_ds_config(cfg, world_size=world)
    if drop_single_rank_zero(ds_config, world):
        log.info("one rank, fp32: ZeRO-1/2 would partition nothing; running without ZeRO (stage 0)")
    if unmap_freed_gathers(ds_config):
        log.info("ZeRO-3 on CPU: allocations from 1 MiB up are returned to the kernel when freed")
    model, features, about = recipe.build(ds_config)
    fit_zero3_buckets(ds_config, model.backbone.hidden_size)
    accumulation = ds_config["gradient_accumulation_steps"]
    lengths, terms = recipe.lengths(features), recipe.loss_terms(features)
    first_epoch = global_train_batches(lengths, batch_size=cfg.train.batch_size, seed=cfg.run.seed)
    rank_share(first_epoch[0], lengths, rank=rank, world_size=world, accumulation=accumulation)  # fails if too small
    if len(first_epoch[0]) < cfg.train.batch_size:
        log.warning("the training split holds %d examples, fewer than train.batch_size %d: every step trains on all "
                    "of them", len(first_epoch[0]), cfg.train.batch_size)
    steps_per_epoch = len(first_epoch)
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    eval_every = cfg.train.eval_every or steps_per_epoch
    checkpoint_every = cfg.run.checkpoint_every or eval_every
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    counts = model.parameter_report()
    clip = take_over_clipping(ds_config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config={**ds_config, "gradient_clipping": 0.0} if clip else ds_config,
                                      model_parameters=[p for p in model.parameters() if p.requires_grad])
    guard_optimizer_step(engine, clip)
    if world == 1 and ds_config["zero_optimization"]["stage"] == 0:
        # Nothing to average: DeepSpeed would still copy every gradient into a flat buffer and back. (ZeRO-2/3 move
        # the gradients into their partitions in that call, so they keep it.)
        engine.enable_backward_allreduce = False
    failures.watch_loss(engine.module)
    prepare_run_dir(cfg, out, rank)
    log.info("run directory: %s", out.resolve())
    log.info("parameters: %s trainable of %s total (%.4f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
             100 * counts["trainable"] / counts["total"])
    log.info("backbone bytes on rank %d: %.1f MiB of %.1f MiB (world size %d)", rank,
             model.backbone_bytes_on_rank() / 2**20, model.backbone_bytes_total() / 2**20, world)
    meta = {"config": cfg.to_dict(), "ds_config": ds_config, **about, "parameters": counts}
    if rank == 0:
        checkpoint.atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        checkpoint.atomic_write_text(out / "ds_config.json", json.dumps(ds_config, indent=2))
        log.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    recipe.prepare(engine)
    state = TrainState()
    if cfg.run.resume:
        client = checkpoint.load_resume_state(engine, out / "checkpoints", rank=rank, world=world, seed=cfg.run.seed)
        state = TrainState(**client["train_state"])
        if rank == 0:  # steps logged after that checkpoint are about to run again
            _truncate_log(out / "log.jsonl", state.step)
        log.info("resumed at step %d (epoch %d)", state.step, state.epoch)
    writer = _tensorboard(out, purge_step=state.step + 1 if cfg.run.resume else None) if rank == 0 else None
    fp16 = ds_config.get("fp16", {}).get("enabled", False)
    progress = _progress(rank, total_steps, state.step)
    window_start, window_samples, window_loss = time.perf_counter(), 0, torch.zeros(2)  # (sum, count)
    preemption.start_training()
    while state.step < total_steps:
        engine.train()
        batches = global_train_batches(lengths, batch_size=cfg.train.batch_size, seed=cfg.run.seed + state.epoch)
        while state.batch_in_epoch < len(batches) and state.step < total_steps:
            chunk, weights = rank_share(batches[state.batch_in_epoch], lengths, rank=rank, world_size=world,
                                        accumulation=accumulation, terms=terms)
            failures.begin_step(state.step + 1)
            loss = train_step(engine, [recipe.collate([features[i] for i in b]) for b in chunk], weights)
            state.batch_in_epoch += 1
            state.step += 1
            window_samples += cfg.train.batch_size
            bad_loss, withheld = nonfinite_step(engine, loss, fp16=fp16)
            if bad_loss or withheld:
                _nonfinite_step(cfg, state, out, withheld=withheld)
            else:
                window_loss += torch.tensor([loss, 1.0])
            if state.step % cfg.run.log_every == 0 or state.step == total_steps:
                torch.distributed.all_reduce(window_loss)  # the loss of the global batch, not of one rank's share
                loss = (window_loss[0] / window_loss[1]).item() if window_loss[1] else float("nan")
                rate = window_samples / (time.perf_counter() - window_start)
                lr = scheduler.get_last_lr()[0]
                _log_scalars(writer, state, {"train/loss": loss, "train/lr": lr, "train/samples_per_s": rate}, out)
                if progress:
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                window_start, window_samples, window_loss = time.perf_counter(), 0, torch.zeros(2)  # (sum, count)
            if progress:
                progress.update(1)
            due_eval, due_save = (state.step % every == 0 or state.step == total_steps
                                  for every in (eval_every, checkpoint_every))
            if due_eval or due_save:
                _evaluate_and_save(engine, recipe, state, out, meta, writer, rank, evaluate=due_eval, save=due_save,
                                   keep=cfg.run.keep_checkpoints)
                engine.train()
            if state.step < total_steps and preemption.agreed(engine.device):  # every rank, after every step
                _stop(engine, state, out, rank, saved=due_save, keep=cfg.run.keep_checkpoints)
        if state.batch_in_epoch >= len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if progress:
        progress.close()
    return recipe.finish(engine, state, out, rank)


def _nonfinite_step(cfg: Config, state: TrainState, out: Path, *, withheld: bool) -> None:
    """A step with a NaN/inf loss or gradient: stop (the default), or go on (DeepSpeed withheld a non-finite update)."""
    if cfg.train.nonfinite == "stop":
        raise NonFiniteError(f"step {state.step}: the loss or the gradients are not finite (NaN/inf); stopped before "
                             f"anything of this step was saved (the checkpoints in '{out}/checkpoints' are from "
                             "earlier steps). Lower optim.lr, check this step's inputs, or set train.nonfinite=skip")
    if not withheld:  # rare: an infinite loss whose gradients are finite; their update has been made
        log.warning("step %d: non-finite loss, but finite gradients: the update was made", state.step)
        return
    state.num_skipped += 1
    log.warning("step %d: non-finite loss or gradients; its update was skipped (%d skipped so far)", state.step,
                state.num_skipped)


def _check_finite_weights(engine, state: TrainState, out: Path) -> None:
    if not checkpoint.trainable_weights_finite(engine.module, engine.device):
        raise NonFiniteError(f"step {state.step}: the trained weights hold NaN/inf; no checkpoint or export is "
                             f"written (those in '{out}' are from earlier steps). Lower optim.lr or check the inputs")


def _evaluate_and_save(engine, recipe: Recipe, state, out, meta, writer, rank, *, evaluate: bool, save: bool,
                       keep: int) -> None:
    """Evaluate (exporting `best/` on a new best) and/or write a resume checkpoint, keeping the newest `keep`."""
    _check_finite_weights(engine, state, out)
    if evaluate:
        metrics = recipe.evaluate(engine)
        selection = next(iter(metrics.values()))
        _log_scalars(writer, state, {f"eval/{k}": v for k, v in metrics.items()}, out)
        log.info("step %d eval %s", state.step, " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        if selection > state.best_metric:
            state.best_metric, state.best_step = selection, state.step
            recipe.export(engine, out / "best", {**meta, "step": state.step, "eval": metrics}, rank)
    if save:
        _save_checkpoint(engine, state, out, rank, keep)


def _save_checkpoint(engine, state: TrainState, out: Path, rank: int, keep: int) -> None:
    checkpoint.save_resume_state(engine, out / "checkpoints", state.step, {"train_state": dataclasses.asdict(state)},
                                 rank=rank, keep=keep)


def _stop(engine, state: TrainState, out: Path, rank: int, *, saved: bool, keep: int) -> None:
    """Every rank agreed to stop (a stop signal reached one of them): checkpoint this step unless it was just saved,
    then raise `Stopped`, which exits with status 75 (preemption.py). No evaluation: a resume goes on as if never
    stopped, evaluating at the same steps."""
    log.warning("rank %d: stopping after step %d on a stop signal (%s)%s", rank, state.step, preemption.received(),
                "" if saved else "; saving a checkpoint")
    if not saved:  # SIGTERM still ends this rank at once if its peers die meanwhile (preemption.py)
        _check_finite_weights(engine, state, out)
        _save_checkpoint(engine, state, out, rank, keep)
    preemption.ignore_further()
    if rank == 0:
        log.warning("checkpoint of step %d saved, `latest` names it; exiting with status %d, to be resumed "
                    "(run.resume=true)", state.step, preemption.STOPPED_EXIT_CODE)
    raise preemption.Stopped(state.step)


def _log_scalars(writer, state: TrainState, scalars: dict, out: Path) -> None:
    if writer is None:
        return
    for key, value in scalars.items():
        writer.add_scalar(key, value, state.step)
    writer.flush()
    with open(out / "log.jsonl", "a") as handle:
        handle.write(json.dumps({"step": state.step, **scalars}) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines up to `step` (a killed run may have logged past its last checkpoint, or half a line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    checkpoint.atomic_write_text(path, "".join(kept))


def _tensorboard(out: Path, purge_step: int | None = None):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)


def _progress(rank: int, total: int, start: int):
    if rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)

