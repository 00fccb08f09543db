"""Under the deepspeed launcher: which layers run, and which are gathered, while a run with `train.frozen_cache` trains
and evaluates (used by tests/distributed/test_frozen_cache.py).

    deepspeed --num_gpus 2 tests/frozen_cache_probe.py CONFIG.yaml OUTPUT_DIR

Runs `ipt_ds.loop.train` in this process, with spies that wrap (do not replace) `build_optimizer`, `train_step`,
`_evaluate_and_save` and `TextRecipe.prepare`. Every rank prints one line `FROZEN_CACHE_PROBE {json}`: per phase
(the precompute pass, training steps, evaluations, and the final scores) how many times each layer of the stack ran,
and, each time the top layer ran, whether any parameter of the layers below the method's first trained layer was
gathered (not NOT_AVAILABLE) at that moment, among their weight matrices (`num_partitioned`), which ZeRO-3
partitions.
"""

import json
import os
import sys

import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

import ipt_ds.loop as loop
from ipt_ds.cli import _shutdown_distributed
from ipt_ds.config import load_config
from ipt_ds.recipes import TextRecipe

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
phase = ["final"]  # what runs outside the phases below: the final scores
runs: dict = {}
lower_gathered: dict = {}
real = {"build_optimizer": loop.build_optimizer, "train_step": loop.train_step,
        "_evaluate_and_save": loop._evaluate_and_save}


def spy_build_optimizer(model, cfg, total_steps):
    layers = model.backbone.layer_stack()
    # The weight matrices: ZeRO-3 keeps parameters below its persistence threshold (the norms) gathered all the time
    lower = [p for layer in layers[: model.method.first_trained_layer] for p in layer.parameters()
             if len(p.ds_shape) == 2]
    lower_gathered["num_partitioned"] = len(lower)

    def count(module, inputs, index):
        key = f"{phase[0]}/{index}"
        runs[key] = runs.get(key, 0) + 1
        if index == len(layers) - 1:
            gathered = any(p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in lower)
            lower_gathered[phase[0]] = lower_gathered.get(phase[0], False) or gathered

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda module, inputs, index=index: count(module, inputs, index))
    return real["build_optimizer"](model, cfg, total_steps)


def in_phase(name, function):
    def wrapped(*a, **kw):
        before, phase[0] = phase[0], name
        try:
            return function(*a, **kw)
        finally:
            phase[0] = before
    return wrapped


loop.build_optimizer = spy_build_optimizer
loop.train_step = in_phase("train", real["train_step"])
loop._evaluate_and_save = in_phase("eval", real["_evaluate_and_save"])
TextRecipe.prepare = in_phase("precompute", TextRecipe.prepare)
loop.train(load_config(args[0], {"run.output_dir": args[1]}))
report = {"rank": torch.distributed.get_rank(), "runs": runs, "lower_gathered": lower_gathered}
print("FROZEN_CACHE_PROBE " + json.dumps(report), flush=True)
_shutdown_distributed()  # as `ipt-ds train` leaves: together, with the process group destroyed
# What is measured is printed; gloo's native threads have aborted the interpreter's teardown now and then
# ("terminate called without an active exception"), which says nothing about the cache.
os._exit(0)
