"""Method registry: a method is one module that registers its config dataclass and builder here.

A method module receives the frozen `Backbone` and decides (1) which parameters train, by owning new ones or by
setting `requires_grad` on backbone parameters, and (2) how a batch runs through the backbone, in its `forward`,
which returns the last hidden states and the matching attention mask. Nothing outside a method names a method.

The core reads a method module only through the `Method` protocol of `methods/base.py`: its prefix positions
(`num_prefix_positions`, `num_embedded_prompts`, `num_cached_prompts`), the first layer that depends on trained
parameters (`first_trained_layer`) and its optional PEFT adapter (`peft_adapter()`); subclassing `MethodModule` gives
the defaults. docs/methods.md, "How to add a method", lists the files a new method touches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ipt_ds.methods.base import Method, MethodConfig, MethodModule, MethodOutput


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    build: Callable[..., Method]
    """build(config, backbone, tokenizer) -> the method module (its parameters are the trainable ones)."""
    inputs: tuple[str, ...] = ("text",)
    """What the method can run on: "text" (token ids) and/or "image" (pixel values of a vision backbone)."""


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type[MethodConfig], *, inputs: tuple[str, ...] = ("text",)):
    def wrap(build: Callable[..., Method]) -> Callable[..., Method]:
        METHODS[name] = MethodSpec(name=name, config_cls=config_cls, build=build, inputs=inputs)
        return build

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method.name '{name}' is not a known method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Importing a method module registers it; this list is the one line a new method adds outside its own file.
from ipt_ds.methods import bitfit, deep_prompt, finetune, ipt, lpt, prompt_tuning, ptuning_v1, vpt  # noqa: E402, F401

__all__ = ["METHODS", "Method", "MethodConfig", "MethodModule", "MethodOutput", "MethodSpec", "get_method", "register"]
