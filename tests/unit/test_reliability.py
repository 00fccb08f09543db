"""Reliability checks that need no ranks: a stop signal held through start-up (in a fresh interpreter), and non-finite
weights or gradients that never reach a checkpoint, an export or the optimizer state."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ipt_ds.engine import guard_optimizer_step
from tests import ranks

START_UP_SIGNAL = """
import os, signal, subprocess, sys
from ipt_ds import preemption

preemption.install(preemption.DEFAULT_STOP_SIGNALS)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1)"])
os.kill(child.pid, signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR1)
assert child.wait(timeout=30) == 0
assert preemption.received() == "received by another rank"  # held: nothing noted yet
preemption.start_training()
assert preemption.received() == "SIGUSR1 received here"
preemption.install([])  # default actions back, nothing blocked
assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL and not signal.pthread_sigmask(signal.SIG_BLOCK, [])
"""


def test_a_stop_signal_in_start_up_is_held_for_training_and_spares_the_processes_a_rank_starts():
    """SIGUSR1 to a child started during start-up (as `ninja` building an op, which Slurm signals too) does not kill
    it, and SIGUSR1 to the process stays pending until training starts, then counts. In a fresh interpreter, as at
    the start of `ipt-ds train`: a signal mask holds for the threads started after it, and this test process has
    others."""
    result = subprocess.run([sys.executable, "-c", START_UP_SIGNAL], cwd=ranks.REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_non_finite_weights_are_never_checkpointed_or_exported(tmp_path):
    """The check before every save, in a 1-rank process group: it stops the run and nothing is written."""
    from ipt_ds.engine import NonFiniteError, TrainState
    from ipt_ds.loop import _evaluate_and_save

    model = torch.nn.Linear(2, 2)
    written = []
    engine = SimpleNamespace(module=model, device=torch.device("cpu"),
                             save_checkpoint=lambda *args, **kwargs: written.append("checkpoint"))
    recipe = SimpleNamespace(evaluate=lambda engine: {"acc": 100.0},
                             export=lambda *args: written.append("export"))
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with torch.no_grad():
            model.weight[0, 1] = float("inf")
        with pytest.raises(NonFiniteError, match="step 7: the trained weights hold NaN/inf; no checkpoint or export"):
            _evaluate_and_save(engine, recipe, TrainState(step=7), tmp_path, {}, None, 0, evaluate=True, save=True,
                               keep=1)
        assert written == [] and not (tmp_path / "checkpoints").exists()
    finally:
        torch.distributed.destroy_process_group()


def test_without_zero_a_nonfinite_gradient_changes_neither_weights_nor_optimizer_state():
    """The check given to the plain torch optimizer, which DeepSpeed steps directly without ZeRO."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    guard_optimizer_step(SimpleNamespace(optimizer=optimizer))
    weight.grad = torch.tensor([1.0, float("inf"), 0.0])
    optimizer.step()
    assert optimizer.overflow and torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state
    weight.grad = torch.ones(3)
    optimizer.step()
    assert not optimizer.overflow and not torch.equal(weight.detach(), torch.ones(3))


@pytest.mark.parametrize("clip", [0.5, 100.0])
def test_without_zero_the_step_clips_as_deepspeed_does(clip):
    """The clipping taken over from DeepSpeed (`take_over_clipping`) scales the gradients to a global L2 norm of at most
    `clip` by clip / (norm + 1e-6) capped at 1, DeepSpeed's factor and torch's: the same update as torch's
    clip_grad_norm_ followed by the plain step (SGD at lr 1, so the update is the clipped gradient)."""
    torch.manual_seed(0)
    shapes = [(4, 3), (3,), (7,)]
    grads = [torch.randn(shape) * 3 for shape in shapes]
    ours, theirs = ([torch.nn.Parameter(torch.zeros(shape)) for shape in shapes] for _ in range(2))
    for params in (ours, theirs):
        for p, g in zip(params, grads):
            p.grad = g.clone()
    optimizer = torch.optim.SGD(ours, lr=1.0)
    guard_optimizer_step(SimpleNamespace(optimizer=optimizer), clip)
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(theirs, clip)
    torch.optim.SGD(theirs, lr=1.0).step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
    update = torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in ours]))
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert norm > 0.5 and norm < 100.0  # one case clips, the other leaves the gradients as they are
    torch.testing.assert_close(update, torch.clamp(norm, max=clip))
