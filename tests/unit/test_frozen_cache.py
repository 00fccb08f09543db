"""The frozen-state cache (`train.frozen_cache`, ipt_ds/frozen_cache.py): states computed once, in other batches than
the training ones, give the same LPT losses and gradients as the uncached forward; configs where they could not be
exact are refused; beyond `train.frozen_cache_gb` the states read from the files equal those held in memory, and the
files are reused only for the same inputs and whole. The multi-rank runs under ZeRO-2/3 are in
tests/distributed/test_frozen_cache.py."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ipt_ds.config import load_config
from ipt_ds.data.encode import collate
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import get_task
from ipt_ds.model import build_model
from tests.conftest import write_entailment_task

LPT = {"method.name": "lpt", "method.num_virtual_tokens": 3, "method.dropout": 0.0, "method.generator_width": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_entailment_task(tmp_path_factory.mktemp("cache-data"), num_train=12, num_eval=4)


def build(family, models, overrides=None, method=LPT, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "head.dropout": 0.0, "data.max_length": 32,
                             **method, **(overrides or {})})
    return build_model(cfg, get_task("rte"), dtype=dtype, ds_config=None)


def cache_states(model, features, pad_id, batch_size):
    """What the precompute pass does on one rank: batches sorted by length, each row cut to its own length."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            states = model.frozen_states(collate([features[i] for i in indices], pad_id))
            for row, i in enumerate(indices):
                features[i]["frozen_states"] = states[row, : len(features[i]["input_ids"])].clone()


PROBE = {"method.name": "linear_probe"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize(("method", "head"), [(LPT, "linear"), (LPT, "verbalizer"), (PROBE, "linear")],
                         ids=["lpt-linear", "lpt-verbalizer", "linear_probe"])
def test_cached_states_give_the_same_losses_and_gradients(family, method, head, tiny_models, data):
    """In fp32, to the last bit or two: states cached in length-sorted batches of 5, trained on in other mixes and
    paddings. LPT caches the states entering layer k = 1; the linear probe, the last layer's output (its final norm and
    head run)."""
    model, encoder = build(family, tiny_models, {"head.type": head}, method=method)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    pad_id = encoder.tokenizer.pad_token_id
    features = [encoder(e) for e in read_split(data["train"], get_task("rte"))]
    cached = [dict(f) for f in features]
    cache_states(model, cached, pad_id, batch_size=5)
    lower = []
    model.backbone.layer_stack()[0].register_forward_hook(lambda *_: lower.append(1))
    for rows in ([0, 3, 7, 8], [1, 2, 4, 5, 6, 9, 10, 11]):  # other mixes and paddings than the precompute's
        results = []
        for source in (features, cached):
            model.zero_grad()
            lower.clear()
            _, loss = model(collate([source[i] for i in rows], pad_id))
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in trained], len(lower)))
        (plain_loss, plain_grads, plain_lower), (cached_loss, cached_grads, cached_lower) = results
        assert (plain_lower, cached_lower) == (1, 0), "with cached states the layers below k do not run"
        assert trained and all(g.abs().sum() > 0 for g in plain_grads)
        # The states were computed in batches of other shapes; on some CPUs the GEMM rounds the last bit by shape.
        torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-6, atol=0)
        for a, b in zip(cached_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"model.dropout": True}, "model.dropout"),
    ({"head.siamese": True}, "head.siamese"),
    ({"data.task": "e2e", "head.type": "lm"}, "generates text"),
    ({"data.format": "npz"}, "for text tasks"),
])
def test_configs_where_the_cache_cannot_be_exact_are_refused(overrides, reason):
    from ipt_ds.confload import ConfigError

    with pytest.raises(ConfigError, match=rf"--train.frozen_cache: .*{reason}"):
        load_config(None, {"method.name": "linear_probe", "train.frozen_cache": True, **overrides})


def test_methods_with_nothing_to_cache_or_no_use_for_it_are_refused(tiny_models, monkeypatch):
    from ipt_ds import frozen_cache
    from ipt_ds.methods.base import NoPrompt

    model, _ = build("bert", tiny_models, method={"method.name": "prompt_tuning"})
    with pytest.raises(ValueError, match="train.frozen_cache: method 'prompt_tuning' .*first trained layer is 0"):
        frozen_cache.check_method(model.method, "prompt_tuning", model.backbone)
    # A method whose first trained layer is above the stack but whose forward reads no cached states.
    with pytest.raises(ValueError, match="train.frozen_cache: method 'bitfit' cannot start from cached states"):
        frozen_cache.check_method(NoPrompt(model.backbone), "bitfit", model.backbone)
    model, _ = build("bert", tiny_models, method=PROBE)
    frozen_cache.check_method(model.method, "linear_probe", model.backbone)
    # Every packaged test family can start from given states; an unsupported one is imitated by emptying the table
    # of families whose stack can.
    monkeypatch.setattr(model.backbone.adapter, "layer_input", {})
    with pytest.raises(ValueError, match="train.frozen_cache: cannot start this backbone from cached states"):
        frozen_cache.check_method(model.method, "linear_probe", model.backbone)


def test_the_fingerprint_follows_what_the_states_depend_on(tiny_models, data):
    from ipt_ds import frozen_cache

    def fingerprint(family, overrides):
        model, encoder = build(family, tiny_models, overrides)
        features = [encoder(e) for e in read_split(data["train"], get_task("rte"))]
        return frozen_cache.fingerprint(model, encoder.tokenizer, features)

    base = fingerprint("bert", {})
    assert fingerprint("bert", {}) == base
    changed = [fingerprint("bert", {"data.max_length": 12}), fingerprint("bert", {"method.num_virtual_tokens": 4}),
               fingerprint("bert", {"head.type": "verbalizer"}), fingerprint("roberta", {})]
    assert len({base, *changed}) == 5


class Engine:
    """What `frozen_cache.precompute` uses of a DeepSpeed engine (real engines on 2 ranks, whose files both ranks
    read: tests/distributed/test_frozen_cache.py)."""

    def __init__(self, model):
        self.module = model

    def eval(self):
        self.module.eval()

    def __call__(self, batch):
        return self.module(batch)


@pytest.fixture
def one_rank():
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def precompute(model, encoder, data, *, budget_gb, directory):
    """Every train and eval example with its frozen states, and how often layer 0 (below k = 1) ran."""
    from ipt_ds import frozen_cache

    features = [encoder(e) for split in ("train", "val") for e in read_split(data[split], get_task("rte"))]
    runs = []
    hook = model.backbone.layer_stack()[0].register_forward_hook(lambda *_: runs.append(1))
    frozen_cache.precompute(Engine(model), features, tokenizer=encoder.tokenizer, batch_size=5,
                            pad_id=encoder.tokenizer.pad_token_id, budget_gb=budget_gb, directory=directory)
    hook.remove()
    return features, len(runs)


def same_states(features, others) -> bool:
    return all(torch.equal(f["frozen_states"], o["frozen_states"]) for f, o in zip(features, others, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_read_from_the_files_equal_those_held_in_memory(dtype, tiny_models, data, one_rank, tmp_path):
    """Bitwise, with the same losses: train.frozen_cache_gb=0 sends every state to the files."""
    model, encoder = build("bert", tiny_models, dtype=dtype)
    in_memory, _ = precompute(model, encoder, data, budget_gb=4.0, directory=tmp_path / "frozen_cache")
    assert not (tmp_path / "frozen_cache").exists()
    on_disk, _ = precompute(model, encoder, data, budget_gb=0.0, directory=tmp_path / "frozen_cache")
    assert sorted(p.name for p in (tmp_path / "frozen_cache").iterdir()) == ["fingerprint.json", "index.npy",
                                                                               "rank0.npy"]
    assert on_disk[0]["frozen_states"].dtype == dtype and same_states(on_disk, in_memory)
    batch = [0, 3, 7, 8, 12]
    pad_id = encoder.tokenizer.pad_token_id
    with torch.no_grad():
        (memory_logits, memory_loss), (disk_logits, disk_loss) = (
            model(collate([features[i] for i in batch], pad_id)) for features in (in_memory, on_disk))
    assert torch.equal(disk_logits, memory_logits) and torch.equal(disk_loss, memory_loss)


def test_the_files_are_reused_for_the_same_inputs_and_never_read_otherwise(tiny_models, data, one_rank, tmp_path,
                                                                           caplog):
    directory = tmp_path / "frozen_cache"
    model, encoder = build("bert", tiny_models)
    first, num_runs = precompute(model, encoder, data, budget_gb=0.0, directory=directory)
    assert num_runs > 0
    first = [{**f, "frozen_states": f["frozen_states"].clone()} for f in first]  # not views of files changed below
    again, num_runs = precompute(model, encoder, data, budget_gb=0.0, directory=directory)
    assert num_runs == 0 and same_states(again, first), "same inputs: the files are read, the pass does not run"

    rows = directory / "rank0.npy"
    os.truncate(rows, rows.stat().st_size - 4)
    with caplog.at_level(logging.WARNING, logger="ipt_ds"):
        again, num_runs = precompute(model, encoder, data, budget_gb=0.0, directory=directory)
    assert num_runs > 0 and same_states(again, first)
    assert "rank0.npy holds" in caplog.text and "computing it again" in caplog.text

    (directory / "fingerprint.json").unlink()  # as a write cut short leaves it
    again, num_runs = precompute(model, encoder, data, budget_gb=0.0, directory=directory)
    assert num_runs > 0 and same_states(again, first)

    caplog.clear()
    shorter, shorter_encoder = build("bert", tiny_models, {"data.max_length": 12})
    with caplog.at_level(logging.WARNING, logger="ipt_ds"):
        cut, num_runs = precompute(shorter, shorter_encoder, data, budget_gb=0.0, directory=directory)
    assert num_runs > 0 and "states of other inputs" in caplog.text
    fresh, _ = precompute(shorter, shorter_encoder, data, budget_gb=4.0, directory=tmp_path / "unused")
    assert same_states(cut, fresh) and any(len(f["input_ids"]) != len(c["input_ids"]) for f, c in zip(first, cut))
