"""The pretraining artifact: what `method.instance_pretrain` + `method.emb_checkpoints` load in `ipt-ds train`.

A directory (written by rank 0, complete or not at all) with
- `generator.safetensors`: `embedding` (V, D), the lookup table, and `generator.<name>` for each generator tensor;
- `generator_config.json`: what they fit (generator type and width, N, path and D, backbone, tokenizer class,
  vocabulary size and fingerprint), plus the objective, the step and its evaluation, and the pretraining config.
The names and the reader live with the method (`ipt_ds/methods/ipt.py`), which checks both sides on load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ipt_ds.backbone import Backbone, gathered
from ipt_ds.checkpoint import replace_dir
from ipt_ds.methods.ipt import (
    ARTIFACT_CONFIG,
    ARTIFACT_FORMAT,
    ARTIFACT_WEIGHTS,
    GENERATOR_PREFIX,
    IPT,
    TABLE_KEY,
    instance_width,
    vocabulary_fingerprint,
)


def describe(ipt: IPT, backbone: Backbone, tokenizer, backbone_name: str) -> dict:
    """What the artifact of `ipt` fits; `ipt_ds.methods.ipt.check_pretrained` compares it with a fine-tuning run."""
    cfg = ipt.cfg
    return {
        "format": ARTIFACT_FORMAT,
        "encoder": cfg.encoder,
        "generator_width": cfg.generator_width if cfg.encoder else 0,
        "num_tokens": cfg.num_virtual_tokens,  # the artifact format keeps its key
        "path": cfg.method,
        "width": instance_width(cfg, backbone),
        "vocab_size": backbone.vocab_size,
        "backbone": backbone_name,
        "tokenizer": type(tokenizer).__name__,
        "tokenizer_vocab_size": len(tokenizer),
        "tokenizer_sha256": vocabulary_fingerprint(tokenizer),
    }


def write_artifact(ipt: IPT, out_dir: Path, about: dict, *, rank: int) -> None:
    """Gather the table and the generator (every rank must call this) and write the artifact on rank 0."""
    named = {TABLE_KEY: ipt.table.weight}
    if hasattr(ipt, "generator"):
        named.update({GENERATOR_PREFIX + name: p for name, p in ipt.generator.named_parameters()})
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    with gathered(list(named.values())), torch.no_grad():
        if rank != 0:
            return
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({name: p.detach().to("cpu", torch.float32).clone() for name, p in named.items()},
                  tmp / ARTIFACT_WEIGHTS)
    (tmp / ARTIFACT_CONFIG).write_text(json.dumps(about, indent=2))
    replace_dir(tmp, out_dir)
