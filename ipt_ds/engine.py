"""DeepSpeed setup for the loop (`loop.py`): distributed init, the DeepSpeed config (engine keys from JSON, experiment
keys from the YAML), the optimizer of the trainable parameters and the guards around non-finite steps.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from ipt_ds.config import REPO_ROOT, Config

# Keys the experiment YAML owns; a DeepSpeed JSON that sets them is an error (one source of truth per setting).
YAML_OWNED = {
    "train_batch_size": "train.batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.batch_size / (train.micro_batch_size x world size)",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.*",
    "scheduler": "optim.schedule and optim.warmup_ratio",
}


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the process group the launcher set up, or make a 1-rank one; returns (rank, world_size).

    `timeout_s` bounds every collective: a rank whose peer hangs or vanishes fails after at most that long."""
    if "WORLD_SIZE" not in os.environ:  # plain `ipt-ds train`: a world of one
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    timeout = timedelta(seconds=timeout_s)
    # Groups made later without a timeout of their own (DeepSpeed's copy of the world group, which ZeRO reduces in)
    # take torch's module default, not the world group's: make that default this timeout too.
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def resolve_ds_config(cfg: Config, *, world_size: int, check_offload: bool = True) -> dict:
    """Read the DeepSpeed JSON and fill in what the YAML owns; a key set in both places is an error. `check_offload`:
    also check that NVMe offload can run here (off for estimates made for another machine)."""
    path = Path(cfg.deepspeed.config)
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    try:
        ds = json.loads(path.read_text())
    except OSError:
        raise ValueError(f"deepspeed.config: cannot read '{cfg.deepspeed.config}'; see ds_configs/ for the shipped "
                         "ones") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: broken JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object ({{\"zero_optimization\": ...}}), this file "
                         f"holds a {type(ds).__name__}; see ds_configs/ for the shipped ones")
    if check_offload:
        _check_nvme_offload(ds, path)
    clashes = [f"'{key}' (set it with {owner} in the YAML)" for key, owner in YAML_OWNED.items() if key in ds]
    if clashes:
        raise ValueError(f"{path}: the DeepSpeed config sets keys that the experiment YAML owns: {', '.join(clashes)}; "
                         "remove them from the JSON")
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.batch_size % per_step:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} is not a multiple of train.micro_batch_size "
                         f"{cfg.train.micro_batch_size} x {world_size} ranks; change one of them")
    ds.update(train_batch_size=cfg.train.batch_size, train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
              gradient_accumulation_steps=cfg.train.batch_size // per_step, gradient_clipping=cfg.optim.grad_clip)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("steps_per_print", 10**9)  # our own logging reports progress
    return ds


def drop_single_rank_zero(ds: dict, world_size: int) -> bool:
    """On one rank, fp32, without offload, ZeRO-1/2 partition nothing: they only add a flat fp32 copy of the trained
    weights, a flat gradient buffer and copies between them and the weights at every step (full fine-tuning of MiniLM:
    peak RSS 1,879 -> 1,781 MiB without them; docs/benchmarks.md, speed study). Run such a config without ZeRO
    (stage 0), where DeepSpeed steps the optimizer on the weights themselves. The choice depends on the
    config and the number of ranks alone, so a resume on as many ranks makes it again, and one on another number
    reads `trainable.safetensors`, which no stage changes (checkpoint.py). Returns whether it dropped ZeRO."""
    zero = ds["zero_optimization"]
    offloaded = any(zero.get(key, {}).get("device", "none") not in ("none", None)
                    for key in ("offload_optimizer", "offload_param"))
    if world_size != 1 or zero.get("stage") not in (1, 2) or ds_dtype(ds) != torch.float32 or offloaded:
        return False
    ds["zero_optimization"] = {"stage": 0}
    return True


def _check_nvme_offload(ds: dict, path: Path) -> None:
    """ZeRO's NVMe offload needs DeepSpeed's async_io op (libaio) and writes under `nvme_path`, creating it; DeepSpeed
    finds that either is missing only after the model is built and partitioned, minutes into the run. Checked here,
    up front: the op is installed or can be built, and the path is a directory or can be made in its nearest existing
    parent."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"{path}: 'zero_optimization' must be a JSON object, got {type(zero).__name__}")
    for key in ("offload_param", "offload_optimizer"):
        offload = zero.get(key) or {}
        if not isinstance(offload, dict) or offload.get("device") != "nvme":
            continue
        target = offload.get("nvme_path")
        if not target:
            raise ValueError(f"{path}: zero_optimization.{key} offloads to nvme but sets no nvme_path; give a "
                             "directory on a local NVMe disk")
        from ipt_ds.checkpoint import unwritable_parent

        blocked = unwritable_parent(Path(target))
        if blocked is not None:
            raise ValueError(f"{path}: zero_optimization.{key}.nvme_path '{target}' cannot be written ('{blocked}' "
                             "is not a writable directory); point nvme_path at a directory on a local NVMe disk")
        if not _async_io_available():
            raise ValueError(f"{path}: zero_optimization.{key} offloads to nvme, which needs DeepSpeed's async_io op; "
                             "it is not installed and cannot be built here (libaio missing: install libaio-dev, or "
                             "offload to \"cpu\" instead)")


def _async_io_available() -> bool:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("async_io"):
        return True
    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    return builder is not None and builder.is_compatible(verbose=False)


def fit_zero3_buckets(ds: dict, hidden_size: int) -> None:
    """ZeRO-3 bucket and persistence sizes scaled to the model (transformers' rule), unless the JSON set them:
    the defaults are sized for models of billions of parameters and waste memory on smaller ones."""
    zero = ds["zero_optimization"]
    if zero.get("stage") == 3:
        zero.setdefault("reduce_bucket_size", hidden_size * hidden_size)
        zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        zero.setdefault("stage3_param_persistence_threshold", 10 * hidden_size)


MMAP_THRESHOLD = 2**20
"""Allocations from this size up get their own mapping under ZeRO-3 on CPU ranks (`unmap_freed_gathers`)."""


def unmap_freed_gathers(ds: dict) -> bool:
    """ZeRO-3 on CPU ranks: have glibc serve every allocation from 1 MiB up from its own mapping, which free() returns
    to the kernel. With glibc's default (a threshold that grows up to 32 MiB), each parameter gather ZeRO-3 frees stays
    in the heap below the activations saved after it, and a rank's memory grows towards the whole gathered backbone
    again (docs/benchmarks.md, "Memory estimator vs measured peak RSS"). A `MALLOC_MMAP_THRESHOLD_` in the environment
    wins. Returns whether the setting was made."""
    from deepspeed.accelerator import get_accelerator

    if (ds["zero_optimization"].get("stage") != 3 or get_accelerator().device_name() != "cpu"
            or "MALLOC_MMAP_THRESHOLD_" in os.environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library the process runs with
    m_mmap_threshold = -3  # glibc's malloc.h; setting it also stops the threshold's growth
    return mallopt is not None and mallopt(m_mmap_threshold, MMAP_THRESHOLD) == 1


def ds_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def lr_lambda(step: int, *, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: Config, total_steps: int):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            is_vector = len(getattr(p, "ds_shape", p.shape)) < 2
            (no_decay if is_vector or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each tensor in one pass: on CPU 5.5x faster than the default per-tensor loop for
    # MiniLM's 22.6M weights (docs/benchmarks.md, speed); HF Trainer's default optimizer is the same one.
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.optim.lr, fused=True)
    warmup = int(cfg.optim.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total=total_steps, warmup=warmup, schedule=cfg.optim.schedule)
    )
    return optimizer, scheduler


def steps_plain_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed will step our torch optimizer itself: without ZeRO, in fp32 (ZeRO and the fp16/bf16 modes
    wrap it in an optimizer of their own, which checks and clips the gradients itself)."""
    return ds["zero_optimization"].get("stage", 0) == 0 and ds_dtype(ds) == torch.float32


def take_over_clipping(ds: dict) -> float:
    """Where DeepSpeed steps our optimizer directly (`steps_plain_optimizer`), clip in that optimizer's step
    (`guard_optimizer_step`) instead of in DeepSpeed, and return the norm to clip to (0: none). DeepSpeed clips there
    one tensor at a time and averages the norm over the ranks with an all-reduce, although without ZeRO every rank
    holds the same averaged gradients: on one CPU rank, about half of a cached linear probe's step (docs/benchmarks.md,
    speed). The norm and the factor are the same as DeepSpeed's; give DeepSpeed the config with `gradient_clipping`
    0 when this returns a norm."""
    return ds["gradient_clipping"] if steps_plain_optimizer(ds) else 0.0


def guard_optimizer_step(engine, clip: float = 0.0) -> None:
    """Without ZeRO (and in fp32) DeepSpeed steps the torch optimizer directly and would apply a NaN/inf gradient;
    give it the check that ZeRO's wrappers make: no update, and `overflow` set, which DeepSpeed reads to count a
    skipped step and hold the schedule. With `clip` > 0 (`take_over_clipping`) the step also scales the gradients to
    a global L2 norm of at most `clip`, as DeepSpeed would have. DeepSpeed's own optimizer wrappers are left alone:
    they check and clip themselves."""
    optimizer = engine.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        if clip:
            raise RuntimeError("gradient clipping was taken from DeepSpeed, which wrapped the optimizer after all")
        return
    update = optimizer.step

    @torch.no_grad()
    def step(closure=None):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            optimizer.overflow = False
            return update(closure)
        # one read pass: the norm is NaN/inf exactly where a gradient holds one (an fp32 sum of squares past 3e38
        # also reads as inf, and clipping it would zero the update: skipped instead)
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        optimizer.overflow = not bool(norm.isfinite())
        if optimizer.overflow:
            return None
        if clip:
            torch._foreach_mul_(grads, torch.clamp(clip / (norm + 1e-6), max=1.0))
        return update(closure)

    optimizer.overflow = False
    optimizer.step = step


class NonFiniteError(ValueError):
    """A NaN/inf loss, gradient or weight that stops the run (a ValueError: one `error:` line, exit status 2)."""


def nonfinite_step(engine, loss: float, *, fp16: bool) -> tuple[bool, bool]:
    """(some rank's loss was NaN/inf, the update was withheld for a non-finite gradient), agreed by all ranks.
    DeepSpeed withholds an update whose gradient norm is not finite; an fp16 loss scaler's withheld steps are its
    normal calibration and do not count."""
    flags = torch.tensor([float(not math.isfinite(loss)), float(not fp16 and not engine.was_step_applied())],
                         device=engine.device)
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])


@dataclass
class TrainState:
    """What a checkpoint must restore besides weights and optimizer: where in the data we are, and the best so far."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    """Global batches (optimizer steps) of this epoch done: the same on every number of ranks."""
    best_metric: float = -math.inf
    best_step: int = -1
    num_skipped: int = 0
    """Steps whose update was skipped for a non-finite loss or gradient (train.nonfinite: skip)."""
