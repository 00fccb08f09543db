"""Run `ipt_ds.loop.train` in this process and report what changed (used by test_training.py in a subprocess).

Wraps (does not replace) `build_optimizer` to see which tensors the optimizer was given.
"""

import json
import sys

import torch

import ipt_ds.loop as loop
from ipt_ds.config import load_config

seen = {}
real_build_optimizer = loop.build_optimizer


def spy_build_optimizer(model, cfg, total_steps):
    seen["model"] = model
    seen["before"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer, scheduler = real_build_optimizer(model, cfg, total_steps)
    seen["optimized"] = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return optimizer, scheduler


loop.build_optimizer = spy_build_optimizer
loop.train(load_config(sys.argv[1], {"run.output_dir": sys.argv[2]}))
model = seen["model"]
names = {id(p): name for name, p in model.named_parameters()}
report = {
    "optimized": sorted(names[i] for i in seen["optimized"]),
    "changed": sorted(name for name, p in model.named_parameters() if not torch.equal(p, seen["before"][name])),
    "trainable": sorted(name for name, p in model.named_parameters() if p.requires_grad),
}
print("REPORT " + json.dumps(report))
