"""The two artifacts of a run, with two contracts.

Resume state: a DeepSpeed checkpoint written by all ranks (trainable weights, optimizer, schedule, step counters,
`exclude_frozen_parameters=True` so the backbone is never copied) plus each rank's RNG state, and the same trainable
state in a form that does not depend on the number of ranks (`trainable.safetensors`), from which a run resumes on
another number of ranks.
Export: the trained tensors gathered to rank 0 as `model.safetensors`, with `config.json` (the resolved config, the
DeepSpeed config and the label names): small, shareable, enough to evaluate or predict with the same backbone.
Every file is written under a temporary name and renamed, so a killed run leaves the previous version intact; `latest`
names a checkpoint only once every rank has written all of its files (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ipt_ds import failures
from ipt_ds.backbone import gathered
from ipt_ds.confload import current_names, read_yaml
from ipt_ds.methods import METHODS
from ipt_ds.peft_export import write_peft_adapter

log = logging.getLogger("ipt_ds")

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
TRAINABLE_STATE = "trainable.safetensors"
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")  # torch AdamW's per-parameter state besides its step count


# The plain records besides tensors that DeepSpeed's checkpoints hold; resume unpickles nothing else.
_DEEPSPEED_RECORDS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def new_output_file(output: str | None, flag: str = "--output") -> Path:
    """Check, before any work, that a result file can be written at `output`: given, new, in an existing directory."""
    if not output or output is True:  # fire turns a bare `--output` into True
        raise ValueError(f"{flag}: give the file to write, e.g. {flag}=predictions.jsonl")
    out = Path(output)
    if out.exists():
        raise ValueError(f"{flag} '{out}' exists; choose another path (predictions never overwrite a file)")
    if not out.absolute().parent.is_dir():
        raise ValueError(f"{flag} '{out}': the directory '{out.parent}' does not exist; create it or choose another "
                         "path")
    return out


def unwritable_parent(path: Path) -> Path | None:
    """Where making `path` (a directory, with its parents) would fail: its nearest existing ancestor when that is not
    a writable directory; None when it can be made (or is a writable directory already)."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    return None if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK) else existing


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; the old one is removed only after the new one is complete. Between
    the two renames `final` is briefly absent; `recover_dir` puts the old one back if a kill lands there."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a `replace_dir` cut short between its renames: bring the previous version back."""
    if final.exists():
        return
    previous = sorted(final.parent.glob(f".{final.name}.old*"), key=lambda p: p.stat().st_mtime)
    if previous:
        previous[-1].rename(final)


def export_trainable(model: torch.nn.Module, out_dir: Path, meta: dict, *, rank: int) -> None:
    """Gather the trained tensors (every rank must call this) and write the export on rank 0: the trained tensors,
    the config, and, for methods PEFT also has, a PEFT adapter under `peft/` for the same backbone."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    with gathered(list(named.values())), torch.no_grad():
        if rank != 0:
            return
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {name: p.detach().to("cpu", torch.float32).clone() for name, p in named.items()}
        save_file(tensors, tmp / EXPORT_WEIGHTS)
        given = meta.get("config", {}).get("model", {}).get("name_or_path")  # as the user named it
        write_peft_adapter(model.method, model.backbone, given or model.backbone.model.name_or_path, tmp / "peft")
    (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out_dir)


def read_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (meta, tensors) of an export directory; clear errors for a wrong path."""
    recover_dir(path)
    if not (path / EXPORT_CONFIG).is_file() or not (path / EXPORT_WEIGHTS).is_file():
        raise ValueError(f"{path}: not an export directory (expected {EXPORT_CONFIG} and {EXPORT_WEIGHTS}); "
                         "a run writes its export to <run>/best")
    try:
        meta = json.loads((path / EXPORT_CONFIG).read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{path / EXPORT_CONFIG}: not a readable export config ({err}); the export is damaged: "
                         "copy it again from its run") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path / EXPORT_CONFIG}: not an ipt-ds export config (no 'config' mapping); give the "
                         "<run>/best directory of an ipt-ds run")
    return meta, read_safetensors(path / EXPORT_WEIGHTS)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """`load_file` with a user error for a damaged file (cut short by a copy, or not safetensors at all)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err}); it is truncated or damaged: copy it "
                         "again") from None


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy exported tensors into the model's trainable parameters (broadcast from rank 0 under ZeRO-3)."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(named) - set(tensors)), sorted(set(tensors) - set(named))
    if missing or unexpected:
        raise ValueError(f"{source}: exported tensors do not match this model (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); was it exported with the same method and head?")
    with gathered(list(named.values()), modify=True), torch.no_grad():
        for name, p in named.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise ValueError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(tensors[name].to(p.dtype))


def save_rng(path: Path, rank: int) -> None:
    """This rank's random state (dropout draws): the CPU generator and, where there is one, the accelerator's."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    save_file(states, path / f"rng_rank{rank}.safetensors")


def load_rng(path: Path, rank: int) -> None:
    states = read_safetensors(path / f"rng_rank{rank}.safetensors")
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def trainable_weights_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every trainable weight is finite, agreed by all ranks (each checks what it holds: its ZeRO-3
    partition, or the whole tensor). `device`: where the collective runs (the engine's)."""
    held = [getattr(p, "ds_tensor", None) if hasattr(p, "ds_tensor") else p
            for p in model.parameters() if p.requires_grad]
    bad = any(not bool(t.isfinite().all()) for t in held if t is not None)
    flag = torch.tensor([float(bad)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0


def _adam(engine) -> torch.optim.Optimizer:
    """The torch AdamW that holds the fp32 state (inside DeepSpeed's ZeRO / bf16 wrapper, or the engine's own), with
    its per-parameter state created as its first step would create it (torch makes it lazily)."""
    adam = getattr(engine.optimizer, "optimizer", engine.optimizer)
    held = [p for group in adam.param_groups for p in group["params"]]
    held += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3 lends them only for its step
    for p in held:
        if not adam.state[p]:
            adam.state[p].update(step=torch.tensor(0.0), **{key: torch.zeros_like(p) for key in ADAM_MOMENTS})
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO 1/2, bf16 without ZeRO
        # Point each parameter's fragment at that state. DeepSpeed does it once, right after the first parameter
        # group's first step, when the other groups have no state yet: their fragments would stay empty.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    return adam


def _full_value(p: torch.Tensor, key: str | None, adam) -> torch.Tensor:
    """The whole fp32 value of trainable parameter `p` (key None) or of its optimizer state `key`, on its device; a
    collective under ZeRO (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if value is None:  # no ZeRO, fp32: the parameter is the optimizer's own
        value = p if key is None else adam.state[p][key]
    return value


def _set_full_value(p: torch.Tensor, key: str | None, value: torch.Tensor, adam) -> None:
    """Set this rank's part of the fp32 master of `p` (key None) or of its optimizer state `key` from the whole."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):  # None where no part of `p` is on this rank
        safe_set_full_fp32_param(p, value) if key is None else safe_set_full_optimizer_state(p, value, key)
    elif key is not None:  # no ZeRO, fp32: the parameter itself was set with the module
        adam.state[p][key].copy_(value)


def save_trainable_state(engine, path: Path, record: dict, *, rank: int) -> None:
    """Write `trainable.safetensors` (rank 0, every rank gathering): each trainable parameter's fp32 value and Adam
    moments by name, and in its metadata `record` plus the Adam step count, the schedule and DeepSpeed's counters.
    Nothing in it depends on the number of ranks."""
    adam = _adam(engine)
    tensors = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            for key in (None, *ADAM_MOMENTS):
                value = _full_value(p, key, adam)
                if rank == 0:  # only the writer copies it to the CPU
                    tensors[f"{key or 'param'}/{name}"] = value.detach().to("cpu", torch.float32)
    if rank != 0:
        return
    steps = {float(state["step"]) for state in adam.state.values()}
    assert len(steps) == 1, f"the optimizer's parameters were stepped unequally: {steps}"
    record = {**record, "adam_step": steps.pop(), "scheduler": engine.lr_scheduler.state_dict(),
              "global_steps": engine.global_steps, "global_samples": engine.global_samples,
              "skipped_steps": engine.skipped_steps}
    tmp = path / f".{TRAINABLE_STATE}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"state": json.dumps(record)})
    tmp.replace(path / TRAINABLE_STATE)


def load_trainable_state(engine, path: Path) -> dict:
    """Set the engine's trainable weights, optimizer state, schedule and counters from `trainable.safetensors` (on
    every rank, whatever the number of ranks that wrote it); return its record."""
    if engine.fp16_enabled():
        raise ValueError(f"--run.resume: '{path}' was written on another number of ranks, and fp16's loss scale does "
                         "not carry over; resume on the same number of ranks, or use bf16")
    record = _record(path)
    tensors = read_safetensors(path / TRAINABLE_STATE)
    named = {name: p for name, p in engine.module.named_parameters() if p.requires_grad}
    load_trainable(engine.module, {name[len("param/"):]: t for name, t in tensors.items() if name.startswith("param/")},
                   source=str(path / TRAINABLE_STATE))  # the weights the forward uses (and checks names, shapes)
    adam = _adam(engine)
    for name, p in named.items():
        for key in (None, *ADAM_MOMENTS):
            _set_full_value(p, key, tensors[f"{key or 'param'}/{name}"], adam)
    for state in adam.state.values():
        state["step"].fill_(record["adam_step"])
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(record["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the rate of the next step, which the optimizer's state dict would otherwise bring back
    engine.global_steps, engine.global_samples = record["global_steps"], record["global_samples"]
    engine.skipped_steps = record["skipped_steps"]
    return record


def save_resume_state(engine, directory: Path, step: int, client_state: dict, *, rank: int, keep: int = 1) -> None:
    """Write checkpoint `step<step>` on every rank, then, once all ranks' files are complete, point `latest` at it
    (atomically) and remove all but the newest `keep` checkpoints. A run killed at any moment leaves `latest` on a
    complete checkpoint."""
    tag = f"step{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, exclude_frozen_parameters=True,
                           save_latest=False)
    save_rng(directory / tag, rank)
    save_trainable_state(engine, directory / tag, {**client_state, "world_size": torch.distributed.get_world_size()},
                         rank=rank)
    failures.checkpoint_written(step)
    torch.distributed.barrier()
    if rank == 0:
        atomic_write_text(directory / "latest", tag)
        remove_checkpoints(directory, keep=keep, newest=step)


def remove_checkpoints(directory: Path, *, keep: int, newest: int) -> None:
    """Remove every checkpoint but the `keep` newest up to step `newest` (the one `latest` names); later ones are
    leftovers of a save that was cut short."""
    found = list(directory.glob("step*"))
    kept = sorted((path for path in found if _step_of(path) <= newest), key=_step_of)[-keep:]
    for path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step")) if path.name.removeprefix("step").isdigit() else -1


def safe_torch_load(path, map_location=None):
    """`torch.load(weights_only=True)` that also admits DeepSpeed's plain records; anything else is a ValueError."""
    import importlib

    allowed = [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_RECORDS]
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"--run.resume: '{path}' holds objects other than tensors and DeepSpeed records "
                             f"({str(err).strip().splitlines()[-1][:200]}); resume does not unpickle them") from None


def latest_checkpoint(directory: Path) -> tuple[str, int]:
    """The checkpoint tag that `latest` names and the number of ranks that wrote it, checked before anything is
    loaded or written: `latest` holds a name, and that checkpoint holds its rank-independent trainable state and
    every writing rank's random state (saved last, so its files are complete)."""
    latest = directory / "latest"
    fix = ("resume from a copy of the run, or start it again with --run.overwrite=true (this deletes the run "
           "directory)")
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--run.resume: cannot read '{latest}' ({err}); {fix}") from None
    if not tag or "/" in tag or tag in (".", ".."):
        raise ValueError(f"--run.resume: '{latest}' should hold the name of a checkpoint directory, it holds "
                         f"{tag[:40]!r}; {fix}")
    if not (directory / tag).is_dir():
        raise ValueError(f"--run.resume: '{latest}' names checkpoint '{tag}', but '{directory / tag}' does not exist; "
                         f"{fix}")
    written = _written_by(directory / tag)
    if written is None and not (directory / tag / TRAINABLE_STATE).exists() and any((directory / tag).glob("*.pt")):
        raise ValueError(f"--run.resume: checkpoint '{directory / tag}' was written by an earlier ipt-ds, before "
                         f"checkpoints held a rank-independent state (it has no {TRAINABLE_STATE}, and its data order "
                         "differs); "
                         "start the run again with --run.overwrite=true, or resume it with the ipt-ds that wrote it")
    if written is None:
        raise ValueError(f"--run.resume: checkpoint '{directory / tag}' is incomplete (missing a readable "
                         f"{TRAINABLE_STATE}); {fix}")
    missing = [f"rng_rank{r}.safetensors" for r in range(written)
               if not (directory / tag / f"rng_rank{r}.safetensors").is_file()]
    if missing:
        raise ValueError(f"--run.resume: checkpoint '{directory / tag}' is incomplete (missing {', '.join(missing)}; "
                         f"every rank writes its own); {fix}")
    return tag, written


def load_resume_state(engine, directory: Path, *, rank: int, world: int, seed: int) -> dict:
    """Load the checkpoint `latest` names into `engine` and this rank's random state; return the client state.

    On the number of ranks that wrote it: DeepSpeed's files, read with `torch.load(weights_only=True)` (tensors and
    DeepSpeed's plain records only), and each rank's random state, for a bitwise continuation. On another number of
    ranks: `trainable.safetensors`, and each rank's generator seeded from (seed, step, rank), since random states do
    not carry over to other ranks. Leftovers of a save that was cut short (checkpoints newer than `latest`) are
    removed afterwards."""
    tag, written = latest_checkpoint(directory)
    if written != world:
        log.info("checkpoint %s was written on %d ranks, this run has %d: loading %s (dropout draws restart from "
                 "run.seed and the step)", tag, written, world, TRAINABLE_STATE)
        client = load_trainable_state(engine, directory / tag)
        torch.manual_seed(seed + 1_000_003 * client["train_state"]["step"] + rank)
        return _remove_newer(directory, tag, rank, client)
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = safe_torch_load
    try:
        path, client = engine.load_checkpoint(str(directory), tag=tag, load_module_strict=False)
    finally:
        del checkpoint_engine.load  # back to the class's method
    if path is None:
        raise ValueError(f"--run.resume: DeepSpeed could not load '{directory / tag}'")
    load_rng(directory / tag, rank)
    return _remove_newer(directory, tag, rank, client)


def _record(path: Path) -> dict:
    """What `trainable.safetensors` of the checkpoint at `path` records beside its tensors (its metadata)."""
    from safetensors import safe_open

    with safe_open(path / TRAINABLE_STATE, framework="pt") as handle:
        return json.loads(handle.metadata()["state"])


def _written_by(path: Path) -> int | None:
    """The number of ranks that wrote the checkpoint at `path` (None when its record cannot be read)."""
    try:
        return _record(path)["world_size"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return None


def _remove_newer(directory: Path, tag: str, rank: int, client: dict) -> dict:
    torch.distributed.barrier()
    if rank == 0:
        for stale in directory.glob("step*"):
            if _step_of(stale) > _step_of(directory / tag):
                shutil.rmtree(stale, ignore_errors=True)
    return client


# What a resumed run may change: where it logs and how long it goes on, and how the global batch is split (the number
# of ranks, which is not a setting, and the micro-batch size), and whether the frozen layers' output is cached (the
# same states, computed once); everything else shapes the model, the data order or the optimizer, and a different
# value would not continue the same run.
RESUME_MAY_CHANGE = ("run.", "train.max_steps", "train.epochs", "train.eval_every", "train.eval_batch_size",
                     "train.nonfinite", "train.micro_batch_size", "train.frozen_cache")


def check_resume_config(out: Path, config: dict) -> None:
    """Refuse to resume `out` with settings that change the run (method, model, data, global batch, optimizer, ...);
    reads the config.yaml the run wrote at its start."""
    try:
        saved = read_yaml((out / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"--run.resume: cannot read config.yaml of the run in '{out}' ({err})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"--run.resume: '{out}/config.yaml' holds no settings; restore it from a copy of the run")
    method = saved.get("method")
    if isinstance(method, dict) and method.get("name") in METHODS:  # a run saved before a key was renamed
        saved["method"] = current_names(METHODS[method["name"]].config_cls, method, section="method")
    was, now = _flatten(saved), _flatten(config)
    changed = [f"{key} (was {was[key]!r}, now {now[key]!r})" for key in sorted(set(was) & set(now))
               if was[key] != now[key] and not key.startswith(RESUME_MAY_CHANGE)]
    if changed:
        raise ValueError(f"--run.resume: these settings differ from the run in '{out}': {'; '.join(changed)}. "
                         "Resume with the run's own settings (only run.*, train.max_steps, train.epochs, "
                         "train.eval_every, train.eval_batch_size, train.nonfinite, train.micro_batch_size and "
                         "train.frozen_cache* may change) or start a new run")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
