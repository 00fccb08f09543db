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


def test_yes_and_no_stay_words_in_a_file_and_in_a_flag(tmp_path):
    """YAML 1.1 reads yes, no, on and off as booleans; that turned the label words [Yes, No] into "True" and "False"."""
    path = tmp_path / "c.yaml"
    path.write_text("head: {type: verbalizer, label_words: [Yes, No, Maybe]}\nrun: {overwrite: yes, debug: False}\n")
    cfg = load_config(path)
    assert cfg.head.label_words == ["Yes", "No", "Maybe"]
    assert cfg.run.overwrite is True and cfg.run.debug is False  # a boolean key still takes yes
    assert load_config(path, {"head.label_words": "[on, Off]"}).head.label_words == ["on", "Off"]


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
def test_every_shipped_yaml_loads_and_names_its_command(path: Path, caplog):
    with caplog.at_level("WARNING", logger="ipt_ds"):
        load_config(path)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], "shipped YAMLs use the current names"
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


RENAMED = {"num_tokens": "num_virtual_tokens", "bottleneck": "generator_width"}


def test_a_renamed_key_still_loads_with_one_warning_naming_its_line_and_new_name(tmp_path, caplog):
    old = write_config(tmp_path / "old.yaml", {"method": {"name": "lpt", "num_tokens": 3, "bottleneck": 8}})
    new = write_config(tmp_path / "new.yaml",
                       {"method": {"name": "lpt", "num_virtual_tokens": 3, "generator_width": 8}})
    with caplog.at_level("WARNING", logger="ipt_ds"):
        cfg = load_config(old)
    assert cfg == load_config(new)
    warnings = sorted(r.getMessage() for r in caplog.records if "deprecated" in r.getMessage())
    lines = {key: n for n, line in enumerate(old.read_text().splitlines(), 1) for key in RENAMED if f"{key}:" in line}
    assert warnings == sorted(f"{old}:{lines[key]}: 'method.{key}' is deprecated; rename it to 'method.{name}'"
                              for key, name in RENAMED.items())


def test_a_renamed_key_as_a_flag_and_the_flag_over_the_file(tmp_path, caplog):
    old = write_config(tmp_path / "old.yaml", {"method": {"name": "ipt", "num_tokens": 3}})
    with caplog.at_level("WARNING", logger="ipt_ds"):
        assert load_config(old, {"method.num_virtual_tokens": "5"}).method.num_virtual_tokens == 5
        new = write_config(tmp_path / "new.yaml", {"method": {"name": "ipt", "num_virtual_tokens": 3}})
        assert load_config(new, {"method.num_tokens": "6"}).method.num_virtual_tokens == 6
    assert "--method.num_tokens: 'method.num_tokens' is deprecated; rename it to 'method.num_virtual_tokens'" in [
        r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("where", ["file", "flags"])
def test_old_and_new_name_together_are_an_error(tmp_path, where):
    both = {"num_tokens": 3, "num_virtual_tokens": 4}
    if where == "file":
        path = write_config(tmp_path / "both.yaml", {"method": {"name": "vpt", **both}})
        args, expected = (path,), rf"{path}:\d+: 'method.num_tokens' and 'method.num_virtual_tokens' are both set"
    else:
        args = (None, {"method.name": "vpt", **{f"method.{k}": str(v) for k, v in both.items()}})
        expected = "--method.num_tokens: 'method.num_tokens' and 'method.num_virtual_tokens' are both set"
    with pytest.raises(ConfigError, match=expected + "; 'num_tokens' is the old name of 'num_virtual_tokens'"):
        load_config(*args)


def test_an_export_saved_with_the_old_names_loads_and_resumes(tmp_path, tiny_bert):
    """An export's config.json and a run's config.yaml written before the rename: the export rebuilds with its trained
    tensors, and resuming the run still checks the renamed keys."""
    import torch
    import yaml

    from ipt_ds import checkpoint
    from ipt_ds.config import config_from_dict
    from ipt_ds.data.tasks import get_task
    from ipt_ds.model import build_model

    sections = {"model": {"name_or_path": str(tiny_bert)}, "data": {"max_length": 16},
                "method": {"name": "lpt", "layer": 1, "num_virtual_tokens": 3, "generator_width": 8}}
    cfg = config_from_dict(sections, source="test")
    model, _ = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    saved = cfg.to_dict()
    saved["method"] = {old: saved["method"].pop(new) for old, new in RENAMED.items()} | saved["method"]
    checkpoint.export_trainable(model, tmp_path / "best", {"config": saved}, rank=0)
    meta, tensors = checkpoint.read_export(tmp_path / "best")
    assert "num_tokens" in meta["config"]["method"]
    again = config_from_dict(meta["config"], source="best/config.json")
    assert again == cfg
    rebuilt, _ = build_model(again, get_task("rte"), dtype=torch.float32, ds_config=None)
    checkpoint.load_trainable(rebuilt, tensors, source="best")
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in rebuilt.named_parameters())

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    checkpoint.check_resume_config(tmp_path, cfg.to_dict())
    changed = config_from_dict(sections, {"method.num_virtual_tokens": "4"}, source="test").to_dict()
    with pytest.raises(ValueError, match=r"method.num_virtual_tokens \(was 3, now 4\)"):
        checkpoint.check_resume_config(tmp_path, changed)


@pytest.mark.parametrize(("zero", "bf16", "ranks", "dropped"), [
    ({"stage": 2, "contiguous_gradients": True}, False, 1, True), ({"stage": 1}, False, 1, True),
    ({"stage": 2}, False, 2, False), ({"stage": 2}, True, 1, False), ({"stage": 3}, False, 1, False),
    ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, False, 1, False)])
def test_one_fp32_rank_runs_without_zero_1_and_2(zero, bf16, ranks, dropped):
    """ZeRO-1/2 partition nothing on one rank: without offload or 16-bit weights, the run drops them (stage 0)."""
    from ipt_ds.engine import drop_single_rank_zero

    ds = {"zero_optimization": dict(zero), "bf16": {"enabled": bf16}}
    assert drop_single_rank_zero(ds, ranks) == dropped
    assert ds["zero_optimization"] == ({"stage": 0} if dropped else zero)
