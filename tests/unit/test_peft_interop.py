"""The PEFT adapter written next to an export loads in PEFT on the same backbone and gives the same hidden states."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from ipt_ds.checkpoint import export_trainable
from ipt_ds.config import load_config
from ipt_ds.data.encode import collate
from ipt_ds.data.readers import read_split
from ipt_ds.data.tasks import get_task
from ipt_ds.model import build_model
from tests.conftest import write_entailment_task

CASES = {  # method overrides -> PEFT type
    "prompt_tuning": ({"method.name": "prompt_tuning", "method.init": "random"}, "PROMPT_TUNING"),
    "ptuning_v1_lstm": ({"method.name": "ptuning_v1", "method.encoder": "lstm"}, "P_TUNING"),
    "ptuning_v1_mlp": ({"method.name": "ptuning_v1", "method.encoder": "mlp"}, "P_TUNING"),
    "prefix": ({"method.name": "prefix"}, "PREFIX_TUNING"),
    "ptuning_v2": ({"method.name": "ptuning_v2"}, "PREFIX_TUNING"),
}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_reproduces_our_prompts(tmp_path, tiny_models, case, family):
    overrides, peft_type = CASES[case]
    torch.manual_seed(0)
    cfg = load_config(None, {"model.name_or_path": str(tiny_models[family]), "data.max_length": 32, **overrides})
    task = get_task("rte")
    model, encoder = build_model(cfg, task, dtype=torch.float32, ds_config=None)
    with torch.no_grad():  # move every trained tensor away from its initialisation
        for p in model.method.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    export_trainable(model, tmp_path / "best", {"config": cfg.to_dict()}, rank=0)
    adapter = tmp_path / "best" / "peft"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_type
    # a local backbone is named by its directory only: a full path would name a folder of this machine
    assert adapter_config["base_model_name_or_path"] == tiny_models[family].name

    data = write_entailment_task(tmp_path / "data", num_train=4, num_eval=4)
    batch = collate([encoder(e) for e in read_split(data["val"], task)], encoder.tokenizer.pad_token_id)
    batch.pop("token_type_ids", None)  # PEFT drops token types under prompt learning; compare without them
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_models[family]), adapter).eval()
    with torch.no_grad():
        ours = model.method(model.backbone, batch)
        theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    theirs = theirs.last_hidden_state[:, -batch["input_ids"].shape[1]:]  # drop virtual-token positions
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours.hidden[:, ours.num_prefix:][real], theirs[real], rtol=1e-5, atol=1e-5)


def test_a_hub_backbone_is_named_as_given():
    from ipt_ds.peft_export import base_model_reference

    assert base_model_reference("FacebookAI/roberta-large") == "FacebookAI/roberta-large"
    assert base_model_reference("roberta-large") == "roberta-large"
