"""The two artifacts of a run, with two contracts.

Resume state: a DeepSpeed checkpoint written by all ranks (trainable weights, optimizer, schedule, step counters,
`exclude_frozen_parameters=True` so the backbone is never copied) plus each rank's RNG state.
Export: the trained tensors gathered to rank 0 as `model.safetensors`, with `config.json` (the resolved config, the
DeepSpeed config and the label names): small, shareable, enough to evaluate or predict with the same backbone.
Every file is written under a temporary name and renamed, so a killed run leaves the previous version intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ipt_ds.backbone import gathered
from ipt_ds.peft_export import write_peft_adapter

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; the old one is removed only after the new one is complete."""
    old = final.with_name(f".{final.name}.old{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


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
        write_peft_adapter(model.method, model.backbone, model.backbone.model.name_or_path, tmp / "peft")
    (tmp / EXPORT_CONFIG).write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out_dir)


def read_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (meta, tensors) of an export directory; clear errors for a wrong path."""
    if not (path / EXPORT_CONFIG).is_file() or not (path / EXPORT_WEIGHTS).is_file():
        raise ValueError(f"{path}: not an export directory (expected {EXPORT_CONFIG} and {EXPORT_WEIGHTS}); "
                         "exports are written to <run>/best and <run>/final")
    return json.loads((path / EXPORT_CONFIG).read_text()), load_file(path / EXPORT_WEIGHTS)


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
    save_file({"torch": torch.get_rng_state()}, path / f"rng_rank{rank}.safetensors")


def load_rng(path: Path, rank: int) -> None:
    file = path / f"rng_rank{rank}.safetensors"
    if file.exists():
        torch.set_rng_state(load_file(file)["torch"])
