"""BitFit (Ben Zaken, Goldberg and Ravfogel, 2022), as used with null prompts (Logan et al., 2022, "Cutting Down on
Prompts and Parameters").

Only the bias vectors of every Linear and LayerNorm in the backbone train, including the MLM head's output-vocabulary
bias; every weight matrix, LayerNorm gain and embedding stays frozen. Paired with a null-prompt template (the inputs
and a mask, no trigger words, e.g. "{a} {mask} {b}") and the verbalizer head, nothing new is added to the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ipt_ds.backbone import Backbone
from ipt_ds.methods.base import MethodConfig, NoPrompt
from ipt_ds.methods.registry import register


@dataclass(kw_only=True)
class BitFitConfig(MethodConfig):
    name: str = "bitfit"


def is_bitfit_bias(module: nn.Module, name: str) -> bool:
    return name == "bias" and isinstance(module, (nn.Linear, nn.LayerNorm))


@register("bitfit", BitFitConfig, inputs=("text", "image"))
def build(cfg: BitFitConfig, backbone: Backbone, tokenizer) -> nn.Module:
    biases = [param for module in backbone.modules() for name, param in module.named_parameters(recurse=False)
              if is_bitfit_bias(module, name)]
    if not biases:
        raise ValueError(f"method.name: bitfit trains bias vectors, and this '{backbone.model.config.model_type}' "
                         "backbone has none in its Linear or LayerNorm layers (LLaMA-class decoders have none); use "
                         "another method")
    for param in biases:
        param.requires_grad_(True)
    return NoPrompt(backbone)
