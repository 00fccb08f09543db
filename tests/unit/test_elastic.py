"""Elastic resume, in this process: the data order depends on the seed and the global batch only, and uneven splits
still average over the whole batch; checkpoint retention."""

from __future__ import annotations

import random

import pytest
import torch

from ipt_ds.checkpoint import remove_checkpoints
from ipt_ds.data.pipeline import global_train_batches, rank_share


def test_global_batches_do_not_depend_on_how_they_are_split():
    """Every split of a global batch over ranks x accumulation steps holds the same examples, shorter ones first;
    equal parts get weight 1.0 exactly."""
    rng = random.Random(0)
    lengths = [rng.randint(3, 40) for _ in range(70)]
    epoch = global_train_batches(lengths, batch_size=8, seed=5)
    assert len(epoch) == 70 // 8 and all(len(b) == 8 for b in epoch)  # the short tail is dropped
    assert epoch != global_train_batches(lengths, batch_size=8, seed=6)
    for batch in epoch:
        for world, accumulation in ((1, 1), (1, 4), (2, 2), (2, 4), (4, 2), (8, 1)):
            shares = [rank_share(batch, lengths, rank=r, world_size=world, accumulation=accumulation)
                      for r in range(world)]
            parts = [shares[r][0][a] for a in range(accumulation) for r in range(world)]  # in step, then rank order
            assert [i for part in parts for i in part] == sorted(batch, key=lambda i: lengths[i])
            assert all(weight == 1.0 for _, weights in shares for weight in weights)


def test_a_short_batch_split_unevenly_still_averages_over_the_whole_batch():
    """The only batch of a set smaller than the global batch: parts of 3 and 2 examples, weighted so that DeepSpeed's
    mean over ranks and accumulation steps is the mean over the 5 examples (or over their tokens, for a loss averaged
    over target tokens)."""
    lengths = [5, 9, 2, 7, 4]
    (batch,) = global_train_batches(lengths, batch_size=8, seed=0)
    losses = torch.tensor([0.3, 1.7, 0.2, 2.9, 0.8])  # one loss per example
    for world, accumulation in ((2, 1), (1, 2), (1, 5)):
        terms = [weight * losses[part].mean() for r in range(world)
                 for part, weight in zip(*rank_share(batch, lengths, rank=r, world_size=world,
                                                     accumulation=accumulation))]
        assert torch.allclose(torch.stack(terms).sum() / (world * accumulation), losses.mean())
    tokens = [3, 1, 4, 2, 6]  # a loss averaged over target tokens: each part's mean is over its tokens
    token_losses = [torch.rand(n) for n in tokens]
    for world, accumulation in ((2, 1), (1, 2)):
        terms = [weight * torch.cat([token_losses[i] for i in part]).mean() for r in range(world)
                 for part, weight in zip(*rank_share(batch, lengths, rank=r, world_size=world,
                                                     accumulation=accumulation, terms=tokens))]
        assert torch.allclose(torch.stack(terms).sum() / (world * accumulation), torch.cat(token_losses).mean())
    with pytest.raises(ValueError, match="too small to give each of 2 ranks x 3 accumulation steps one example"):
        rank_share(batch, lengths, rank=0, world_size=2, accumulation=3)


def test_retention_keeps_the_newest_and_removes_leftovers_of_a_cut_save(tmp_path):
    for step in (1, 2, 3, 4, 5, 7):
        (tmp_path / f"step{step}").mkdir()
    remove_checkpoints(tmp_path, keep=2, newest=5)  # step7: a save cut short after step 5's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step4", "step5"]
