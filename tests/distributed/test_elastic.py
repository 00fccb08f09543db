"""Elastic resume: a checkpoint written on N ranks resumes on M ranks and with another micro-batch size (real
DeepSpeed runs, 2 ranks and 1, fp32); checkpoint retention (`run.checkpoint_every`, `run.keep_checkpoints`) in the
uninterrupted run. The data order and the split of a batch are checked in-process in tests/unit/test_elastic.py.
"""

from __future__ import annotations

import json

import pytest

from ipt_ds.checkpoint import TRAINABLE_STATE
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
