"""The frozen-state cache (`train.frozen_cache`): compute the frozen part of the forward once per example.

Below a method's first trained layer k (`Method.first_trained_layer`) the backbone's output for an example never
changes during training: frozen weights, no dropout (the config refuses `model.dropout`). One pass before training,
sharded over the ranks as evaluation is (`predict_sharded`), computes the states entering layer k for every example of
the train, eval and test splits; every rank gets every example's (T, H) states back and keeps them with the example's
encoded features, so shuffling, rank shares and evaluation sharding stay as they are. `collate` pads them into
`batch["frozen_states"]`, and a method that reads them (`Method.reads_frozen_states`) starts at layer k: the layers
below are neither run nor, under ZeRO-3, gathered.

The states are those the uncached forward computes (the same `Backbone.lower_states`, the same mask and positions),
up to the padding of the batch they were computed in: a real token's state does not depend on the padding
mathematically, but a matrix kernel chosen for another batch shape may round its last bit differently (measured on
MiniLM in fp32: losses within 2e-7; bitwise on the tiny test models). The uncached forward varies as much between
epochs, whose batches differ.

In memory only for now: every rank holds every example's states on the CPU, sum of T x H values in the run's dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch

from ipt_ds.data.encode import collate
from ipt_ds.data.pipeline import predict_sharded

log = logging.getLogger("ipt_ds")


def check_method(method, name: str) -> None:
    """Refuse `train.frozen_cache` for a method with nothing frozen below its first trained layer, or that does not
    read cached states."""
    if method.first_trained_layer == 0:
        raise ValueError(f"train.frozen_cache: method '{name}' trains parameters from the first layer on (its first "
                         "trained layer is 0), so nothing is frozen below it to cache; set train.frozen_cache to false")
    if not method.reads_frozen_states:
        raise ValueError(f"train.frozen_cache: method '{name}' cannot start from cached states yet (lpt can); set "
                         "train.frozen_cache to false")


def fingerprint(model, tokenizer, features: list[dict]) -> str:
    """What the cached states depend on: the backbone (its name and config), the tokenizer, k and the prompt length
    the positions account for, the dtype, and the encoded inputs, which hold the data files, the template, the label
    words and data.max_length as they were applied."""
    backbone, method = model.backbone, model.method
    digest = hashlib.sha256(json.dumps({
        "backbone": backbone.model.config.name_or_path, "config": backbone.model.config.to_json_string(),
        "tokenizer": [type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer)],
        "layer": method.first_trained_layer, "num_prompt": method.num_prefix_positions,
        "dtype": str(next(backbone.parameters()).dtype),
    }, sort_keys=True).encode())
    for f in features:
        digest.update(json.dumps([f["input_ids"], f.get("token_type_ids")]).encode())
    return digest.hexdigest()


def precompute(engine, features: list[dict], *, batch_size: int, pad_id: int) -> None:
    """Add `frozen_states` (T, H) to every feature dict, computed in a pass sharded over the ranks (every rank calls
    it with the same features and gets every example's states)."""
    model = engine.module
    started = time.perf_counter()

    def states_per_row(batch: dict) -> list[torch.Tensor]:
        states, _ = engine(batch)  # (B, T, H)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # right-padded
        return [states[row, :n].cpu().clone() for row, n in enumerate(lengths)]

    with model.computing_frozen_states():
        rows = predict_sharded(engine, [len(f["input_ids"]) for f in features], batch_size,
                               lambda indices: collate([features[i] for i in indices], pad_id), states_per_row)
    for f, states in zip(features, rows):
        f["frozen_states"] = states
    num_bytes = sum(s.numel() * s.element_size() for s in rows)
    log.info("frozen-state cache: states entering layer %d of %d examples, %.1f MiB per rank, computed in %.1f s",
             model.method.first_trained_layer, len(rows), num_bytes / 2**20, time.perf_counter() - started)
