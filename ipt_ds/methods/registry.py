"""The method registry: name -> config class and builder. Method modules register themselves here when imported
(`methods/__init__.py` imports them all)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ipt_ds.methods.base import Method, MethodConfig


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
