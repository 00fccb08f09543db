"""Few-shot sampling and length-bucketed batching, both deterministic for a seed.

Every rank calls these with the same seed and gets the same answer, so ranks agree on the training set and on the
batch order without talking to each other.
"""

from __future__ import annotations

import random
from collections import defaultdict

from ipt_ds.data.tasks import Example


def sample_per_class(examples: list[Example], k: int, seed: int) -> list[Example]:
    """`k` examples of every label, drawn with `seed`, in their original order (the LM-BFF / FewGLUE K-shot setup).

    Raises ValueError for unlabelled or regression examples, for k < 1, and when a class has fewer than k examples.
    """
    if k < 1:
        raise ValueError(f"k={k}: the number of examples per class must be at least 1")
    positions_by_label: dict[int, list[int]] = defaultdict(list)
    for position, example in enumerate(examples):
        if example.label is None or isinstance(example.label, float):
            kind = "an unlabelled" if example.label is None else "a regression (float-labelled)"
            raise ValueError(f"example {example.guid} is {kind} example; per-class sampling needs class labels")
        positions_by_label[example.label].append(position)
    if not positions_by_label:
        raise ValueError("no examples to sample from")
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(positions_by_label):  # sorted so the draw order, hence the sample, depends only on the seed
        positions = positions_by_label[label]
        if len(positions) < k:
            raise ValueError(
                f"label {label} has only {len(positions)} examples, fewer than k={k}; lower k or use a larger split"
            )
        chosen.extend(rng.sample(positions, k))
    return [examples[position] for position in sorted(chosen)]


def bucket_batches(lengths: list[int], batch_size: int, seed: int, bucket_size_multiplier: int = 50) -> list[list[int]]:
    """Batches of indices into `lengths` whose members have similar lengths, so little compute goes to padding.

    Shuffle all indices, cut them into pools of `batch_size * bucket_size_multiplier`, sort each pool by length, cut
    each pool into batches and shuffle the batches: batches stay random in order and content across pools, but each
    is length-homogeneous. Only a pool's last batch can be short. Deterministic for a seed.
    """
    if batch_size < 1 or bucket_size_multiplier < 1:
        raise ValueError(
            f"batch_size={batch_size} and bucket_size_multiplier={bucket_size_multiplier} must both be at least 1"
        )
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool_size = batch_size * bucket_size_multiplier
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        pool = sorted(order[start : start + pool_size], key=lambda index: lengths[index])
        batches.extend(pool[offset : offset + batch_size] for offset in range(0, len(pool), batch_size))
    rng.shuffle(batches)
    return batches
