"""Under the deepspeed launcher: how much of a frozen, ZeRO-3 partitioned backbone is still gathered at the end of the
forward (used by test_distributed.py).

    deepspeed --num_gpus 2 tests/zero3_release.py DS_CONFIG.json [--prefetch]

A 6-layer LLaMA with random weights is built partitioned, frozen, and fed a trainable input, as prompt tuning does;
the DeepSpeed JSON gets the trainer's ZeRO-3 bucket rule (`fit_zero3_buckets`), and `--prefetch` drops the JSON's
`stage3_prefetch_bucket_size` so that the trainer's default prefetch bucket applies. Rank 0 prints one JSON line:
the elements gathered after the forward of the second step (DeepSpeed's prefetching follows the first step's trace),
and one layer's and the whole stack's partitioned elements.
"""

import json
import os
import sys

import deepspeed
import torch
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from transformers import LlamaConfig, LlamaModel
from transformers.integrations import HfDeepSpeedConfig

from ipt_ds.engine import fit_zero3_buckets, init_distributed

HIDDEN = 256
args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
ds = json.loads(open(args[0]).read())
if "--prefetch" in args:
    ds["zero_optimization"].pop("stage3_prefetch_bucket_size")
ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
ds["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
fit_zero3_buckets(ds, HIDDEN)
init_distributed()
keep_alive = HfDeepSpeedConfig(ds)  # transformers builds the model under zero.Init while this lives
backbone = LlamaModel._from_config(LlamaConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=6,
                                               num_attention_heads=4, num_key_value_heads=4, vocab_size=128))
backbone.requires_grad_(False)


class Prompted(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = backbone
        self.prompt = torch.nn.Parameter(torch.zeros(HIDDEN))

    def forward(self, embeds):
        return self.backbone(inputs_embeds=embeds + self.prompt).last_hidden_state.square().mean()


model = Prompted()
engine, *_ = deepspeed.initialize(model=model, model_parameters=[model.prompt], config=ds)
partitioned = [p for p in backbone.parameters() if not p.ds_persist]
embeds = torch.randn(1, 16, HIDDEN)
for _ in range(2):
    loss = engine(embeds)
    gathered = sum(p.ds_numel for p in partitioned if p.ds_status == ZeroParamStatus.AVAILABLE)
    engine.backward(loss)
    engine.step()
if engine.global_rank == 0:
    layer = sum(p.ds_numel for p in backbone.layers[0].parameters() if not p.ds_persist)
    print(json.dumps({"gathered": gathered, "layer": layer, "stack": sum(p.ds_numel for p in partitioned)}))
torch.distributed.destroy_process_group()  # gloo's threads otherwise may abort the interpreter's exit
# What is measured is printed; the interpreter's teardown still aborted once in a few hundred runs ("terminate called
# without an active exception", a native thread of the communication backend), which says nothing about releasing.
sys.stdout.flush()
os._exit(0)
