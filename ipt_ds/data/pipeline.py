"""From the data config to the batches each rank runs: read splits, sample few-shot sets, shard evenly.

Every rank builds the same global batches from the same seed and takes its own share of each, so no rank ever runs
a different number of forwards than another (ZeRO-3 and gradient all-reduce would hang).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ipt_ds.data.readers import default_data_root, load_hub_split, read_split, resolve_split
from ipt_ds.data.sampling import bucket_batches, sample_per_class
from ipt_ds.data.tasks import Example, Task, get_task

log = logging.getLogger(__name__)


def load_examples(cfg, task: Task, split: str) -> list[Example]:
    """Examples of one split, from the local layout or (format hub / no local data) the HF hub."""
    root = Path(cfg.root) if cfg.root else default_data_root()
    file_path = cfg.format in ("jsonl", "csv", "tsv") or split.endswith((".jsonl", ".csv", ".tsv"))
    if cfg.format == "hub" or (root is None and not file_path):  # a file of the user's needs no data root
        log.info("reading %s/%s from the HF hub (no local data root; set $IPT_DS_DATA or data.root)", task.name, split)
        return load_hub_split(task, split)
    if cfg.root and not root.is_dir():
        raise ValueError(f"data.root '{cfg.root}' is not a directory")
    layout = cfg.format if cfg.format not in ("jsonl", "csv", "tsv") else "superglue"
    path = (
        Path(split)
        if cfg.format in ("jsonl", "csv", "tsv")
        else resolve_split(task=task, format=layout, root=root, split=split, lmbff_seed=cfg.lmbff_seed)
    )
    if not path.is_file():
        raise ValueError(f"data: split file '{path}' does not exist")
    return read_split(path, task, fields=cfg.fields or None)


def load_task_splits(cfg, seed: int) -> tuple[Task, list[Example], list[Example], list[Example]]:
    """(task, train, eval, test) examples; test is empty when no test split is configured."""
    task = get_task(cfg.task)
    train = load_examples(cfg, task, cfg.train_split)
    if cfg.num_shots:
        train = sample_per_class(train, cfg.num_shots, seed)
    evaluation = load_examples(cfg, task, cfg.eval_split)
    test = load_examples(cfg, task, cfg.test_split) if cfg.test_split else []
    for name, examples in (("train", train), ("eval", evaluation), ("test", test)):
        if name != "test" and any(e.label is None for e in examples):
            raise ValueError(
                f"data.{name}_split '{getattr(cfg, name + '_split')}' has unlabelled examples; "
                "use a labelled split (test files of GLUE/SuperGLUE have no labels)"
            )
    labels = {e.label for e in train}
    if task.label_names and len(labels) == 1:  # e.g. FewGLUE's WSC train set, all positive
        log.warning("data.train_split '%s' holds one label only (%s): a classifier trained on it can only predict "
                    "that label", cfg.train_split, task.label_names[next(iter(labels))])
    return task, train, evaluation, test


def global_train_batches(lengths: list[int], *, batch_size: int, seed: int) -> list[list[int]]:
    """One epoch's global batches, one optimizer step each over all ranks: length-bucketed, in an order that the seed
    changes per epoch. A function of the lengths, the global batch size and the seed only (not of the number of ranks
    or the micro-batch size), so that a run resumed on another number of ranks continues the same sequence. The
    short tail is dropped, unless it is the whole epoch (a training set smaller than one batch)."""
    batches = bucket_batches(lengths, batch_size, seed)
    return [b for b in batches if len(b) == batch_size] or batches


def rank_share(batch: list[int], lengths: list[int], *, rank: int, world_size: int, accumulation: int,
               terms: list[int] | None = None) -> tuple[list[list[int]], list[float]]:
    """This rank's micro-batches of one global batch (one per accumulation step) and the weight of each one's mean loss.

    The batch is sorted by length and cut into world_size x accumulation consecutive parts of equal size (differing by
    one at most in a short batch); part a x world_size + r is rank r's micro-batch at accumulation step a, so ranks
    run parts of similar length side by side. DeepSpeed averages the loss over accumulation steps and ranks: weighting
    each part's mean loss by its share of the batch times the number of parts makes that average the mean over the
    global batch, however it is split (the weight is exactly 1.0 for equal parts). `terms`: how many terms each
    example adds to a mean loss (target tokens, for a loss averaged over tokens); one each if not given."""
    num_parts = world_size * accumulation
    if len(batch) < num_parts:
        raise ValueError(f"the training split ({len(batch)} examples per optimizer step) is too small to give each of "
                         f"{world_size} ranks x {accumulation} accumulation steps one example; lower train.batch_size "
                         "or raise train.micro_batch_size")
    ordered = sorted(batch, key=lambda index: lengths[index])
    size, extra = divmod(len(ordered), num_parts)
    bounds = [part * size + min(part, extra) for part in range(num_parts + 1)]
    mine = [ordered[bounds[part] : bounds[part + 1]] for part in range(rank, num_parts, world_size)]
    count = (lambda indices: sum(terms[i] for i in indices)) if terms else len
    return mine, [count(part) * num_parts / count(batch) for part in mine]


def rank_eval_batches(lengths: list[int], *, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's evaluation batches, sorted by length; ranks with one batch fewer get an empty list as a
    stand-in, which the caller runs on a dummy input so that every rank makes the same number of forwards."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rounds = math.ceil(len(batches) / world_size)
    mine = batches[rank::world_size]
    return mine + [[]] * (rounds - len(mine))


def predict_sharded(engine, lengths: list[int], batch_size: int, make_batch, run) -> list:
    """Each rank runs `run(make_batch(indices))` -> one result per row on its share of the examples (batched by
    `lengths`); every rank gets all results back, in input order."""
    import torch

    mine = [pair for indices, results in predict_share(engine, lengths, batch_size, make_batch, run)
            for pair in zip(indices, results)]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    by_index = dict(pair for part in gathered for pair in part)
    return [by_index[i] for i in range(len(lengths))]


def predict_share(engine, lengths: list[int], batch_size: int, make_batch, run):
    """Yield (indices, `run(make_batch(indices))`) for each of this rank's batches (`rank_eval_batches`), results
    gathered nowhere. A rank with one batch fewer runs a stand-in batch whose results are dropped, so that every rank
    makes the same forwards (ZeRO-3 gathers in lockstep)."""
    import torch

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    engine.eval()
    for indices in rank_eval_batches(lengths, batch_size=batch_size, rank=rank, world_size=world):
        with torch.no_grad():
            results = run(make_batch(indices or [0]))
        if indices:
            yield indices, results


def logits_of(engine, batch: dict) -> list:
    """The model's scores for each row of `batch` (its labels dropped, so no loss is computed)."""
    batch.pop("labels", None)
    logits, _ = engine(batch)
    return logits.float().cpu().tolist()
