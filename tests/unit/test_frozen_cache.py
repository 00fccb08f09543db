"""The frozen-state cache (`train.frozen_cache`, ipt_ds/frozen_cache.py): states computed once, in other batches than
the training ones, give the same LPT losses and gradients as the uncached forward; configs where they could not be
exact are refused. The multi-rank runs under ZeRO-2/3 are in tests/distributed/test_frozen_cache.py."""

from __future__ import annotations

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


def build(family, models, overrides=None, method=LPT):
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(models[family]), "head.dropout": 0.0, "data.max_length": 32,
                             **method, **(overrides or {})})
    return build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)


def cache_states(model, features, pad_id, batch_size):
    """What the precompute pass does on one rank: batches sorted by length, each row cut to its own length."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            states = model.frozen_states(collate([features[i] for i in indices], pad_id))
            for row, i in enumerate(indices):
                features[i]["frozen_states"] = states[row, : len(features[i]["input_ids"])].clone()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("head", ["linear", "verbalizer"])
def test_cached_states_give_the_same_losses_and_gradients(family, head, tiny_models, data):
    """Bitwise, in fp32: states cached in length-sorted batches of 5, trained on in other mixes and paddings."""
    model, encoder = build(family, tiny_models, {"head.type": head})
    model.train()
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
            results.append((loss.detach(), [p.grad.clone() for p in model.method.parameters()], len(lower)))
        (plain_loss, plain_grads, plain_lower), (cached_loss, cached_grads, cached_lower) = results
        assert (plain_lower, cached_lower) == (1, 0), "with cached states the layers below k do not run"
        assert torch.equal(cached_loss, plain_loss)
        assert all(torch.equal(a, b) for a, b in zip(cached_grads, plain_grads))


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


@pytest.mark.parametrize(("method", "reason"), [
    ({"method.name": "prompt_tuning"}, "first trained layer is 0"),
    ({"method.name": "linear_probe"}, "cannot start from cached states"),
])
def test_methods_with_nothing_to_cache_or_no_use_for_it_are_refused(method, reason, tiny_models):
    from ipt_ds import frozen_cache

    model, _ = build("bert", tiny_models, method=method)
    with pytest.raises(ValueError, match=rf"train.frozen_cache: method '{method['method.name']}' .*{reason}"):
        frozen_cache.check_method(model.method, method["method.name"])


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
