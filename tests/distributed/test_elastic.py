"""Elastic resume: the data order depends on the seed and the global batch only, and a checkpoint written on N ranks
resumes on M ranks and with another micro-batch size (real DeepSpeed runs, 2 ranks and 1, fp32); checkpoint
retention (`run.checkpoint_every`, `run.keep_checkpoints`).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from ipt_ds.checkpoint import TRAINABLE_STATE, remove_checkpoints
from ipt_ds.data.pipeline import global_train_batches, rank_share
from tests import ranks
from tests.conftest import read_log
from tests.distributed.test_reliability import finish, reliability_config, start

NUM_STEPS = 9  # 8 steps per epoch (64 examples, global batch 8): the run crosses an epoch
# Dropout off: random states do not carry over to another number of ranks (docs/reliability.md, "Elastic resume").
COMMON = (f"--train.max_steps={NUM_STEPS}", "--train.eval_every=3", "--model.dropout=false", "--head.dropout=0")
# Summing the same gradients in another order (other ranks, other accumulation) changes the last bits in fp32; over
# 6 Adam steps the losses then differ by about 1e-7 (measured); a different data order or a lost optimizer state
# changes them by more than 1e-3.
TOLERANCE = 1e-5


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


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("elastic")
    return tmp, reliability_config(tmp, tiny_bert)


def resumed_in_four_parts(tmp, cfg, name, *extra) -> dict[int, float]:
    """Steps 1-3 on 2 ranks (micro-batch 2 x 2 accumulation), 4-6 on 1 rank (micro-batch 4 x 2), 7-8 on 2 ranks
    (micro-batch 1 x 4), 9 on 2 ranks again with micro-batch 2 (the same number of ranks: DeepSpeed's own files are
    loaded). Each part but the last ends by an injected failure at the start of the step after its checkpoint."""
    out = tmp / name
    resume = "--run.resume=true"
    parts = ((2, 2, "raise:0:4", ()), (1, 4, "raise:0:7", (resume,)),
             (2, 1, "raise:0:9", (resume, "--run.checkpoint_every=1")), (2, 2, "", (resume,)))
    previous = 2
    for num_ranks, micro, fault, flags in parts:
        run = start(cfg, out, *COMMON, *extra, f"--train.micro_batch_size={micro}", *flags, fault=fault,
                    num_ranks=num_ranks)
        codes = run.wait(300)
        elastic = f"was written on {previous} ranks, this run has {num_ranks}: loading {TRAINABLE_STATE}"
        assert (elastic in run.output()) == (num_ranks != previous), run.output()[-3000:]
        previous = num_ranks
        if fault:
            assert codes[0] != 0
            step = int(fault.rsplit(":", 1)[1]) - 1
            assert (out / "checkpoints" / "latest").read_text() == f"step{step}", run.output()[-3000:]
            meta = json.loads(_metadata(out / "checkpoints" / f"step{step}")["state"])
            assert meta["world_size"] == num_ranks and meta["adam_step"] == step
        else:
            assert codes == [0, 0], run.output()[-3000:]
            assert "resumed at step 8" in run.output()
    return ranks.losses(out)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(path / TRAINABLE_STATE, framework="pt") as handle:
        return handle.metadata()


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_then_one_then_two_repeat_the_uninterrupted_losses(setup, zero):
    """2 -> 1 -> 2 -> 2 ranks, with three micro-batch sizes for one global batch, under ZeRO-2 and ZeRO-3, with warm-up
    and a linear schedule: the losses are those of the uninterrupted 2-rank run, the first three bit for bit (same
    ranks), the others within fp32 tolerance. The uninterrupted run also checks retention: a checkpoint every 2
    steps, 2 kept, evaluation (and `best/`) every 3."""
    tmp, cfg = setup
    ds = f"--deepspeed.config=ds_configs/{zero}.json"
    reference_dir = tmp / f"reference-{zero}"
    run = start(cfg, reference_dir, *COMMON, ds, "--run.checkpoint_every=2", "--run.keep_checkpoints=2")
    finish(run)
    reference = ranks.losses(reference_dir)
    assert sorted(reference) == list(range(1, NUM_STEPS + 1))
    checkpoints = reference_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step8", "step9"]
    assert (checkpoints / "latest").read_text() == "step9" and (reference_dir / "best" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (reference_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/acc" in r] == [3, 6, 9]

    resumed = resumed_in_four_parts(tmp, cfg, f"elastic-{zero}", ds)
    assert sorted(resumed) == sorted(reference)
    assert [resumed[s] for s in (1, 2, 3)] == [reference[s] for s in (1, 2, 3)]
    differences = {s: abs(resumed[s] - reference[s]) for s in reference}
    assert max(differences.values()) < TOLERANCE, differences
    assert read_log(tmp / f"elastic-{zero}", "train/lr") == read_log(reference_dir, "train/lr")  # the schedule, exactly
