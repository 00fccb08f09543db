"""Method registry: a method is one module that registers its config dataclass and builder here.

A method module receives the frozen `Backbone` and decides (1) which parameters train, by owning new ones or by
setting `requires_grad` on backbone parameters, and (2) how a batch runs through the backbone, in its `forward`,
which returns the last hidden states and the matching attention mask. Nothing outside a method names a method.

What a method module tells the rest through attributes (0 when it does not set them):
* `num_prefix_positions`: P positions that (some of) the layers see in front of the input (memory estimates);
* `num_embedded_prompts`: the prompt vectors that pass through the backbone's embeddings with the input and so take
  position ids (input prompts: P; late prompts enter above the embeddings: 0);
* `num_cached_prompts`: the length of the key/value prefix given to every layer (some families number the input's
  positions after it). The last two bound `data.max_length` by the backbone's position table (model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ipt_ds.methods.base import MethodConfig, MethodOutput


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[MethodConfig]
    build: Callable[..., nn.Module]
    """build(config, backbone, tokenizer) -> the method module (its parameters are the trainable ones)."""
    inputs: tuple[str, ...] = ("text",)
    """What the method can run on: "text" (token ids) and/or "image" (pixel values of a vision backbone)."""


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type[MethodConfig], *, inputs: tuple[str, ...] = ("text",)):
    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        METHODS[name] = MethodSpec(name=name, config_cls=config_cls, build=build, inputs=inputs)
        return build

    return wrap


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method.name '{name}' is not a known method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# Importing a method module registers it; this list is the one line a new method adds outside its own file.
from ipt_ds.methods import bitfit, deep_prompt, finetune, ipt, lpt, prompt_tuning, ptuning_v1, vpt  # noqa: E402, F401

__all__ = ["METHODS", "MethodConfig", "MethodOutput", "MethodSpec", "get_method", "register"]
