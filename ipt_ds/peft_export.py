"""PEFT's adapter layout for the prompt methods PEFT also has: `adapter_config.json` + `adapter_model.safetensors`.

A method opts in when its `peft_adapter()` returns (fields, table) rather than None: its PEFT type and options, and
the folded prompt table (reparameterizations already applied), which PEFT loads in inference mode as
`prompt_embeddings`. Written next to the export (`<export>/peft/`), so that
`PeftModel.from_pretrained(base_model, "<export>/peft")` reproduces the prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ipt_ds.backbone import Backbone
from ipt_ds.methods.base import Method


def base_model_reference(name_or_path: str) -> str:
    """What the adapter names as its base model (`base_model_name_or_path`): a hub id as given; for a local directory
    only its name, since a full path would name a folder of the training machine (load the base model yourself and
    pass it to `PeftModel.from_pretrained`)."""
    path = Path(name_or_path)
    return path.resolve().name if path.is_dir() else name_or_path


def write_peft_adapter(method: Method, backbone: Backbone, base_model: str, out_dir: Path) -> bool:
    """Write the adapter if the method has a PEFT equivalent; returns whether it did. Call with gathered weights."""
    # PEFT lays encoder-decoder prompts out differently (two transformer submodules); only the export is written
    exported = method.peft_adapter() if not backbone.adapter.is_encoder_decoder else None
    if exported is None:
        return False
    fields, table = exported
    config = {
        "task_type": "FEATURE_EXTRACTION",
        "base_model_name_or_path": base_model_reference(base_model),
        "num_virtual_tokens": table.shape[0],
        "token_dim": backbone.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": backbone.num_heads,
        "num_layers": backbone.num_layers,
        "inference_mode": True,
        **fields,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({"prompt_embeddings": table.detach().float().cpu().contiguous()}, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return True
