"""ZeRO-3 helpers: under ZeRO-3 every parameter, frozen or not, is a partitioned placeholder outside its module's
forward (`.numel()` 0, `.shape` [0]); these read its full size, or its full values inside a gather."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ipt_ds.backbone.frozen import Backbone


def num_elements(p: torch.Tensor) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (whose local .numel() is 0)."""
    return getattr(p, "ds_numel", None) or p.numel()


def local_bytes(p: torch.Tensor) -> int:
    """Bytes of this parameter held by this rank (its ZeRO-3 partition, or the whole tensor)."""
    part = getattr(p, "ds_tensor", None)
    tensor = part if part is not None else p
    return tensor.numel() * tensor.element_size()


def gathered(params: list[torch.Tensor], *, modify: bool = False):
    """Context in which ZeRO-3 partitioned `params` hold their full values (a no-op for ordinary tensors).

    Every rank must enter it. With `modify`, rank 0's values are broadcast to all ranks on exit.
    """
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def embedding_rows(backbone: Backbone, token_ids: torch.Tensor) -> torch.Tensor:
    """Copy of the word-embedding rows of `token_ids` (N,) -> (N, H), gathered first under ZeRO-3."""
    weight = backbone.model.get_input_embeddings().weight
    with gathered([weight]):
        return weight[token_ids].detach().clone().float()
