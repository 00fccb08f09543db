"""The frozen-state cache (`train.frozen_cache`): compute the frozen part of the forward once per example.

Below a method's first trained layer k (`Method.first_trained_layer`) the backbone's output for an example never
changes during training: frozen weights, no dropout (the config refuses `model.dropout`). One pass before training,
sharded over the ranks as evaluation is (`predict_sharded`, `predict_share`), computes the states entering layer k for
every example of the train, eval and test splits; every rank can read every example's (T, H) states (in memory or
from files, below) and keeps them with the example's encoded features, so shuffling, rank shares and evaluation
sharding stay as they are. `collate` pads them into
`batch["frozen_states"]`, and a method that reads them (`Method.reads_frozen_states`) starts at layer k: the layers
below are neither run nor, under ZeRO-3, gathered.

The states are those the uncached forward computes (the same `Backbone.lower_states`, the same mask and positions),
up to the padding of the batch they were computed in: a real token's state does not depend on the padding
mathematically, but a matrix kernel chosen for another batch shape may round its last bit differently (measured on
MiniLM in fp32: losses within 2e-7; bitwise on the tiny test models). The uncached forward varies as much between
epochs, whose batches differ.

Every rank can read every example's states. If they fit in `train.frozen_cache_gb` (sum of T x H values in the run's
dtype, known before the pass), every rank gets them all back and holds them in CPU memory, as the results of an
evaluation. Beyond it they go to memory-mapped files in `<run.output_dir>/frozen_cache/`, and no rank holds them all:
each rank writes the rows it computed to `rank<r>.npy` (R_r, H) (bf16 as its int16 bits: numpy has no bf16), rank 0
writes `index.npy` (N, 3) (file, first row, number of rows per example) from the gathered offsets, and last, atomically,
`fingerprint.json`: the hash of what the states depend on (`fingerprint`) and every file's size. Then every rank maps
all files read-only (copy-on-write) and each example's `frozen_states` is a view of its rows. A later run (a resume,
or a new run in the same directory) reuses the files without the pass if the fingerprint matches and every file has
its recorded size; anything else (another backbone, tokenizer, template, max_length, k, dtype or data; a missing
fingerprint.json, i.e. a write cut short; a truncated file) is never read: rank 0 says what it found, deletes it, and
every rank computes it again. Rank 0 decides and broadcasts, so ranks never diverge. Multi-node runs need
`run.output_dir` on a filesystem every node shares for the files. No pickle: .npy files read with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap

from ipt_ds.checkpoint import atomic_write_text
from ipt_ds.data.encode import collate
from ipt_ds.data.pipeline import predict_sharded, predict_share, rank_eval_batches

log = logging.getLogger("ipt_ds")


def check_method(method, name: str, backbone) -> None:
    """Refuse `train.frozen_cache` for a method with nothing frozen below its first trained layer, or that does not
    read cached states, and on a backbone whose stack cannot start from given states."""
    if method.first_trained_layer == 0:
        raise ValueError(f"train.frozen_cache: method '{name}' trains parameters from the first layer on (its first "
                         "trained layer is 0), so nothing is frozen below it to cache; set train.frozen_cache to false")
    if not method.reads_frozen_states:
        raise ValueError(f"train.frozen_cache: method '{name}' cannot start from cached states (lpt and linear_probe "
                         "can); set train.frozen_cache to false")
    try:
        backbone.adapter.check_late()
    except ValueError as err:
        raise ValueError(f"train.frozen_cache: cannot start this backbone from cached states ({err}); set "
                         "train.frozen_cache to false") from None


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


FINGERPRINT, INDEX = "fingerprint.json", "index.npy"
BITS = {torch.bfloat16: torch.int16}
"""Dtypes numpy lacks, stored as integers of the same width."""


def precompute(engine, features: list[dict], *, tokenizer, batch_size: int, pad_id: int, budget_gb: float,
               directory: Path) -> None:
    """Add `frozen_states` (T, H) to every feature dict (every rank calls it with the same features and can read every
    example's states): computed in a pass sharded over the ranks and held in memory if they fit in `budget_gb` GiB,
    else in memory-mapped files in `directory`, reused from there if a whole cache of the same fingerprint is there."""
    model = engine.module
    dtype = next(model.backbone.parameters()).dtype
    lengths = [len(f["input_ids"]) for f in features]
    num_bytes = sum(lengths) * model.backbone.hidden_size * dtype.itemsize
    key = fingerprint(model, tokenizer, features)
    in_memory = num_bytes <= budget_gb * 2**30
    log.info("frozen-state cache: fingerprint %s, %.1f MiB of states, train.frozen_cache_gb=%g per rank: %s", key,
             num_bytes / 2**20, budget_gb, "in memory" if in_memory else f"memory-mapped files in {directory}")
    started = time.perf_counter()

    def states_per_row(batch: dict) -> list[torch.Tensor]:
        states, _ = engine(batch)  # (B, T, H)
        assert states.dtype == dtype, "the states are in the dtype their size was reckoned in"
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # right-padded
        return [states[row, :n] for row, n in enumerate(lengths)]

    def make_batch(indices: list[int]) -> dict:
        return collate([features[i] for i in indices], pad_id)

    if in_memory:
        with model.computing_frozen_states():
            rows = predict_sharded(engine, lengths, batch_size, make_batch,
                                   lambda batch: [s.cpu().clone() for s in states_per_row(batch)])
        computed = True
    else:
        found = [unusable(directory, key) if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(found, src=0)  # one decision for all ranks
        computed = found[0] is not None
        if not computed:
            log.info("frozen-state cache: reusing the states entering layer %d of %d examples in %s (same "
                     "fingerprint, files whole)", model.method.first_trained_layer, len(features), directory)
        else:
            if found[0] != "absent":
                log.warning("frozen-state cache in %s not used: %s; computing it again", directory, found[0])
            with model.computing_frozen_states():
                write(predict_share(engine, lengths, batch_size, make_batch, states_per_row), directory, key, lengths,
                      batch_size=batch_size, dtype=dtype, hidden=model.backbone.hidden_size)
        rows = read(directory, dtype)
    for f, states in zip(features, rows):
        f["frozen_states"] = states
    if computed:
        log.info("frozen-state cache: states entering layer %d of %d examples, %.1f MiB %s, computed in %.1f s",
                 model.method.first_trained_layer, len(rows), num_bytes / 2**20,
                 "per rank" if in_memory else "in files", time.perf_counter() - started)


def unusable(directory: Path, key: str) -> str | None:
    """Why the cache in `directory` must not be read ("absent" if there is none), or None if it can be: its
    fingerprint is `key` and every file has the size recorded with it."""
    if not directory.exists():
        return "absent"
    try:
        about = json.loads((directory / FINGERPRINT).read_text())
    except FileNotFoundError:
        return f"no {FINGERPRINT} (a cache whose writing was cut short)"
    except (OSError, ValueError) as err:
        return f"{FINGERPRINT} unreadable ({err})"
    if not isinstance(about, dict) or about.get("fingerprint") != key:
        found = about.get("fingerprint") if isinstance(about, dict) else None
        return (f"states of other inputs (fingerprint {found}, now {key}: another backbone, tokenizer, template, "
                "max_length, layer, dtype or data)")
    for name, size in about.get("files", {}).items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != size:
            return f"{name} holds {path.stat().st_size if path.is_file() else 'no'} bytes, {size} expected"
    return None


def write(share, directory: Path, key: str, lengths: list[int], *, batch_size: int, dtype: torch.dtype,
          hidden: int) -> None:
    """Write this rank's rows of the pass `share` (pairs of indices and their (T, H) states) to its own file; rank 0
    then writes the index and, last, the fingerprint."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    torch.distributed.barrier()
    mine = [i for batch in rank_eval_batches(lengths, batch_size=batch_size, rank=rank, world_size=world)
            for i in batch]
    numpy_dtype = torch.empty(0, dtype=BITS.get(dtype, dtype)).numpy().dtype
    rows = open_memmap(directory / f"rank{rank}.npy", mode="w+", dtype=numpy_dtype,
                       shape=(sum(lengths[i] for i in mine), hidden))
    offsets, offset = [], 0
    for indices, states in share:
        for i, s in zip(indices, states):
            rows[offset : offset + len(s)] = s.view(BITS.get(dtype, dtype)).cpu().numpy()
            offsets.append((i, rank, offset))
            offset += len(s)
    assert offset == len(rows), "the pass computed the rows rank_eval_batches gave this rank"
    rows.flush()
    del rows
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, offsets)  # the index only, after every rank has flushed its file
    if rank == 0:
        index = np.zeros((len(lengths), 3), dtype=np.int64)
        for i, file, first in (row for part in gathered for row in part):
            index[i] = (file, first, lengths[i])
        np.save(directory / INDEX, index, allow_pickle=False)
        files = [INDEX, *(f"rank{r}.npy" for r in range(world))]
        atomic_write_text(directory / FINGERPRINT, json.dumps(
            {"fingerprint": key, "files": {name: (directory / name).stat().st_size for name in files}}, indent=1))
    torch.distributed.barrier()


def read(directory: Path, dtype: torch.dtype) -> list[torch.Tensor]:
    """Each example's (T, H) states: a view of its rows in the memory-mapped files (copy-on-write: nothing is
    written back)."""
    index = np.load(directory / INDEX, allow_pickle=False)
    files = {file: torch.from_numpy(np.load(directory / f"rank{file}.npy", mmap_mode="c", allow_pickle=False))
             for file in set(index[:, 0].tolist())}
    return [files[file][first : first + n].view(dtype) for file, first, n in index.tolist()]
