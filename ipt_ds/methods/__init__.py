"""Methods: a method is one module that registers its config dataclass and builder (registry.py).

A method module receives the frozen `Backbone` and decides (1) which parameters train, by owning new ones or by
setting `requires_grad` on backbone parameters, and (2) how a batch runs through the backbone, in its `forward`,
which returns the last hidden states and the matching attention mask. Nothing outside a method names a method.

The core reads a method module only through the `Method` protocol of `methods/base.py`: its prefix positions
(`num_prefix_positions`, `num_embedded_prompts`, `num_cached_prompts`), the first layer that depends on trained
parameters (`first_trained_layer`) and its optional PEFT adapter (`peft_adapter()`); subclassing `MethodModule` gives
the defaults. docs/methods.md, "How to add a method", lists the files a new method touches.
"""

from __future__ import annotations

# Importing a method module registers it; this list is the one line a new method adds outside its own file.
from ipt_ds.methods import bitfit, deep_prompt, finetune, ipt, lpt, prompt_tuning, ptuning_v1, vpt  # noqa: F401
from ipt_ds.methods.base import Method, MethodConfig, MethodModule, MethodOutput
from ipt_ds.methods.registry import METHODS, MethodSpec, get_method, register

__all__ = ["METHODS", "Method", "MethodConfig", "MethodModule", "MethodOutput", "MethodSpec", "get_method", "register"]
