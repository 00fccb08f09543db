"""Config precedence, type conversion from CLI strings, and one error that lists every problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipt_ds.config import load_config
from ipt_ds.confload import ConfigError
from ipt_ds.engine import fit_zero3_buckets, resolve_ds_config
from tests.conftest import REPO, run_cli, write_config


def test_precedence_defaults_yaml_flags(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"optim": {"lr": 0.01, "weight_decay": 0.1}, "train": {"epochs": 2}})
    cfg = load_config(path, {"optim.lr": "3e-4", "train.max_steps": "7", "head.label_words": "Yes,No"})
    assert cfg.optim.lr == pytest.approx(3e-4)  # flag beats YAML, string converted to float
    assert cfg.optim.weight_decay == 0.1  # YAML beats default
    assert cfg.optim.warmup_ratio == 0.06  # default
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.head.label_words == ["Yes", "No"]


def test_method_section_uses_the_method_config(tmp_path):
    path = write_config(tmp_path / "c.yaml", {"method": {"name": "prompt_tuning", "num_virtual_tokens": "8"}})
    cfg = load_config(path)
    assert cfg.method.num_virtual_tokens == 8
    with pytest.raises(ConfigError, match="unknown key 'method.num_virtual_tokens'"):
        load_config(path, {"method.name": "full"})  # full fine-tuning has no prompt length


def test_every_problem_in_one_error_with_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  seed: abc\noptim:\n  lrr: 1\ntrain:\n  batch_size: 30\n  micro_batch_size: 16\nzzz: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"data.max_length": "long", "head.type": "mlp"})
    problems = info.value.problems
    text = "\n".join(problems)
    assert f"{path}:2: 'run.seed' expected an integer, got 'abc'" in text
    assert f"{path}:4: unknown key 'optim.lrr'; valid keys in 'optim': grad_clip, lr," in text
    assert f"{path}:6: train.batch_size 30 is not a multiple of train.micro_batch_size 16" in text  # at the key
    assert f"{path}:8: unknown section 'zzz'" in text
    assert "--data.max_length: 'data.max_length' expected an integer, got 'long'" in text
    assert "--head.type: 'head.type' must be one of 'linear', 'verbalizer', 'lm', got 'mlp'" in text
    assert len(problems) == 6


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  seed: 1\n optim: [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: broken YAML"):
        load_config(path)


def test_unknown_method_lists_known(tmp_path):
    with pytest.raises(ConfigError, match="known: .*prompt_tuning"):
        load_config(None, {"method.name": "lora"})


def test_ds_config_that_sets_yaml_keys_is_an_error(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 64, "gradient_clipping": 0.5, "zero_optimization": {"stage": 2}}))
    cfg = load_config(None, {"deepspeed.config": str(ds)})
    with pytest.raises(ValueError, match="'train_batch_size' \\(set it with train.batch_size in the YAML\\).*"
                                         "'gradient_clipping' \\(set it with optim.grad_clip"):
        resolve_ds_config(cfg, world_size=1)


def test_ds_config_is_filled_from_the_yaml():
    cfg = load_config(None, {"train.batch_size": 64, "train.micro_batch_size": 8, "deepspeed.config":
                             "ds_configs/zero3.json", "optim.grad_clip": 0.5})
    ds = resolve_ds_config(cfg, world_size=2)
    fit_zero3_buckets(ds, 384)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["reduce_bucket_size"] == 384 * 384
    with pytest.raises(ValueError, match="not a multiple of train.micro_batch_size 8 x 3 ranks"):
        resolve_ds_config(cfg, world_size=3)


# configs/pretrain/ holds `ipt-ds pretrain` configs; tests/test_pretrain.py loads those.
@pytest.mark.parametrize("path", sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "pretrain"),
                         ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_names_its_command(path: Path):
    load_config(path)
    header = path.read_text().splitlines()[:5]
    assert any("ipt-ds train" in line or "ipt_ds train" in line for line in header), f"{path} must name its command"


def test_show_config_cli_and_error_exit(tmp_path):
    ok = run_cli("show-config", "configs/rte/prompt_tuning_minilm.yaml", "--optim.lr=0.5")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.5" in ok.stdout
    bad = run_cli("show-config", "configs/rte/prompt_tuning_minilm.yaml", "--optim.lr=fast")
    assert bad.returncode == 2
    assert "--optim.lr: 'optim.lr' expected a number, got 'fast'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_stop_signals_are_signal_names_that_can_be_caught():
    assert load_config(None, {"run.stop_signals": "SIGUSR2,SIGINT"}).run.stop_signals == ["SIGUSR2", "SIGINT"]
    assert load_config(None, {"run.stop_signals": "[]"}).run.stop_signals == []
    with pytest.raises(ConfigError) as err:
        load_config(None, {"run.stop_signals": "USR1,SIGKILL,SIGNOPE"})
    assert "run.stop_signals: 'USR1' is not a signal name; did you mean 'SIGUSR1'?" in str(err.value)
    assert "run.stop_signals: 'SIGKILL' cannot be caught" in str(err.value)
    assert "run.stop_signals: 'SIGNOPE' is not a signal name; use names such as SIGUSR1" in str(err.value)


def test_config_reference_is_current():
    from ipt_ds.configdoc import render

    assert (REPO / "docs" / "config.md").read_text() == render(), "run: python -m ipt_ds.configdoc > docs/config.md"


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_ds_config_resolves(path: Path):
    cfg = load_config(None, {"deepspeed.config": str(path)})
    ds = resolve_ds_config(cfg, world_size=2)
    assert ds["train_batch_size"] == cfg.train.batch_size
    assert "auto" not in json.dumps(ds)
