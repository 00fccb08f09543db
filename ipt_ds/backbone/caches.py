"""transformers `Cache` objects that carry prompts: read-only key/value prefixes, the growing caches kept for
decoding, and the one cache that decoding after late insertion needs."""

from __future__ import annotations

import torch
from torch import nn


def prefix_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], config):
    """A transformers Cache holding per-layer key/value prefixes that attention reads but never grows.

    A normal cache appends each forward's keys, so a layer recomputed under gradient checkpointing would see them
    twice; transformers therefore drops the cache under checkpointing (and PEFT forbids prefixes with it). Reads that
    leave the cache unchanged make the recompute identical, which `enable_prefix_checkpointing` relies on.
    """
    from transformers import DynamicCache

    class PrefixCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            layer = self.layers[layer_idx]
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)

    cache = PrefixCache(config=config)
    for layer, (keys, values) in enumerate(prefix):
        DynamicCache.update(cache, keys, values, layer)
    return cache


def growing_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, config):
    """An ordinary cache, pre-filled with `prefix` (if any), that keeps every forward's keys and values (decoding).
    `config` None: a cache that does not count layers from a config (an encoder-decoder's would count the encoder's)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for layer, (keys, values) in enumerate(prefix or []):
        cache.update(keys, values, layer)
    return cache


def late_cache(lower, upper, config, *, layer: int, num_prompt: int):
    """One cache for decoding after late insertion: layers below `layer` hold `num_prompt` placeholder positions in
    front (so that every layer, and the mask, has the same length) which their attention never reads."""
    from transformers import DynamicCache

    class LateCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
            if layer_idx < layer:
                return keys[..., num_prompt:, :], values[..., num_prompt:, :]
            return keys, values

    cache = LateCache(config=config)
    for index in range(config.num_hidden_layers):
        source = lower if index < layer else upper
        keys, values = source.layers[index].keys, source.layers[index].values
        if index < layer:
            keys, values = (nn.functional.pad(t, (0, 0, num_prompt, 0)) for t in (keys, values))
        DynamicCache.update(cache, keys, values, index)
    cache.late_layer, cache.num_prompt = layer, num_prompt
    return cache


def enable_prefix_checkpointing(model: nn.Module) -> None:
    """Let checkpointed layers keep the (read-only) prefix cache instead of silently dropping it."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
