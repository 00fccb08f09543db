"""The bad-input catalogue: each mistake a user can make gets one clear line (what, where, what to do), no traceback
unless --run.debug, and leaves the disk as it was. Cases already covered elsewhere are listed in docs/reliability.md;
the ones here are the rest, plus property-based fuzzing of the config parser.

Most checks call the function that raises in-process; a few go through `ipt-ds train` (started together, in parallel)
to show the whole path: exit status 2, one `error:` line, no run directory created or changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipt_ds import checkpoint
from ipt_ds.backbone import ModelConfig, load_backbone
from ipt_ds.config import SECTIONS, config_from_dict, load_config
from ipt_ds.confload import ConfigError
from ipt_ds.data import get_task, read_split
from ipt_ds.loop import check_run_dir
from tests.conftest import REPO, minilm_dir, write_config, write_entailment_task


def tiny_cfg(tmp_path: Path, model_dir: Path, **sections) -> dict:
    data = write_entailment_task(tmp_path / "data", num_train=16, num_eval=8)
    base = {
        "model": {"name_or_path": str(model_dir)},
        "method": {"name": "prompt_tuning", "num_virtual_tokens": 4},
        "data": {"task": "rte", "format": "jsonl", "train_split": str(data["train"]), "eval_split": str(data["val"]),
                 "max_length": 32},
        "train": {"batch_size": 8, "micro_batch_size": 8, "max_steps": 2},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


def fake_run(out: Path, sections: dict, *, world: int) -> None:
    """A run directory as `ipt-ds train` leaves it, without training: its config, DeepSpeed config and `latest`."""
    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step2")
    cfg = config_from_dict(json.loads(json.dumps(sections)), {"run.output_dir": str(out)}, source="test")
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    per_rank = cfg.train.micro_batch_size
    (out / "ds_config.json").write_text(json.dumps({"train_batch_size": per_rank * world,
                                                    "train_micro_batch_size_per_gpu": per_rank,
                                                    "gradient_accumulation_steps": 1}))


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# --- through the command line ---------------------------------------------------------------------------------------

CLI_CASES = {
    # case: (expected text on stderr, the sections to change or None, extra flags)
    "malformed data row": (":2: malformed JSON line", None, []),
    "unknown task": ("data.task: unknown task 'nope'; known tasks:", {"data": {"task": "nope"}}, []),
    "missing backbone": ("model.name_or_path: directory '/nonexistent/backbone' does not exist",
                         {"model": {"name_or_path": "/nonexistent/backbone"}}, []),
    "resume with another method": ("method.name (was 'prompt_tuning', now 'ptuning_v1')", None,
                                   ["--run.resume=true", "--method.name=ptuning_v1"]),
}


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, tiny_bert):
    """Start every CLI case at once (each a 1-rank `ipt-ds train`), then collect (result, run dir, files before)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = {}
    for number, (case, (_, change, flags)) in enumerate([*CLI_CASES.items(), ("debug", (None, None, []))]):
        case_dir = tmp / f"case{number}"
        sections = tiny_cfg(case_dir, tiny_bert, **(change or {}))
        if case == "malformed data row":
            Path(sections["data"]["train_split"]).write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"pre\n')
        out = case_dir / "run"
        if case == "resume with another method":
            fake_run(out, sections, world=1)
        if case == "debug":
            sections["data"]["task"] = "nope"
            flags = ["--run.debug=true"]
        cfg = write_config(case_dir / "cfg.yaml", sections)
        before = snapshot(out) if out.exists() else None
        process = subprocess.Popen([sys.executable, "-m", "ipt_ds", "train", str(cfg), f"--run.output_dir={out}",
                                    *flags], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        started[case] = (process, out, before)
    results = {}
    try:
        for case, (process, out, before) in started.items():
            stdout, stderr = process.communicate(timeout=300)
            results[case] = (process.returncode, stderr, out, before)
    finally:
        for process, _, _ in started.values():
            process.kill()
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_user_error_is_one_line_and_leaves_the_disk_alone(cli_errors, case):
    code, stderr, out, before = cli_errors[case]
    expected = CLI_CASES[case][0]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert expected in stderr, stderr[-3000:]
    if before is None:
        assert not out.exists(), "a failed start must not create the run directory"
    else:
        assert snapshot(out) == before, "a refused resume must not change the run directory"


def test_run_debug_shows_the_traceback(cli_errors):
    code, stderr, _, _ = cli_errors["debug"]
    assert code != 0 and "Traceback" in stderr and "unknown task 'nope'" in stderr


# --- in-process: data ------------------------------------------------------------------------------------------------

def test_tsv_row_with_missing_cells_names_file_line_and_fields(tmp_path):
    path = tmp_path / "short.tsv"
    path.write_text("sentence1\tsentence2\tlabel\na\tb\tentailment\nonly one cell\n")
    with pytest.raises(ValueError, match=r"short.tsv:3: missing field 'hypothesis' for task rte; expected fields: "
                                         r"premise \(or sentence1\), hypothesis \(or sentence2\)"):
        read_split(path, get_task("rte"))


def test_unknown_task_is_a_config_error_with_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  seed: 1\ndata:\n  task: glue-rte\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: data.task: unknown task 'glue-rte'; known tasks: .*rte"):
        load_config(path)


# --- in-process: model and backbone ----------------------------------------------------------------------------------

def test_inputs_longer_than_the_backbone_are_refused_before_training(tmp_path, tiny_bert):
    from ipt_ds.model import build_model

    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_bert, data={"max_length": 300}), source="test")
    with pytest.raises(ValueError, match=r"data.max_length 300 \+ 4 prompt positions exceeds the backbone's 256 "
                                         r"positions; lower data.max_length"):
        build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)


def test_missing_backbone_directory(tmp_path):
    with pytest.raises(ValueError, match=f"model.name_or_path: directory '{tmp_path}/gone' does not exist"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path / "gone")), dtype=torch.float32, with_lm_head=False)


def test_tokenizer_that_does_not_belong_to_the_backbone(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path)  # 30,522 tokens for a 100-word model
    with pytest.raises(ValueError, match=r"tokenizer of .* has 30522 tokens but the model's vocabulary is 100: "
                                         "the tokenizer does not belong to this backbone"):
        load_backbone(ModelConfig(name_or_path=str(tmp_path)), dtype=torch.float32, with_lm_head=False)


def test_trust_remote_code_is_off_by_default_and_warned_about_when_on(tmp_path, tiny_bert, caplog):
    from ipt_ds.model import build_model

    assert ModelConfig().trust_remote_code is False
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_bert, model={"trust_remote_code": True}), source="test")
    with caplog.at_level(logging.WARNING, logger="ipt_ds"):
        build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    assert "model.trust_remote_code is on: Python code from" in caplog.text


# --- in-process: the run directory and resuming ----------------------------------------------------------------------

def run_config(tmp_path, model_dir, out, **flags):
    return config_from_dict(tiny_cfg(tmp_path, model_dir), {"run.output_dir": str(out), **flags}, source="test")


def test_resume_may_change_the_ranks_and_micro_batch_but_not_the_global_batch(tmp_path):
    out = tmp_path / "run"
    sections = tiny_cfg(tmp_path, "minilm")
    fake_run(out, sections, world=2)

    def resume(**flags):
        return config_from_dict(json.loads(json.dumps(sections)), {"run.output_dir": str(out), "run.resume": "true",
                                                                    **flags}, source="test")

    check_run_dir(resume(), world=1)  # another number of ranks (tests/test_elastic.py runs it)
    check_run_dir(resume(**{"train.micro_batch_size": "1"}), world=2)
    check_run_dir(resume(**{"train.max_steps": "9", "run.log_every": "1", "run.keep_checkpoints": "3"}), world=2)
    with pytest.raises(ValueError, match=r"optim.lr \(was 0.001, now 0.5\)"):
        check_run_dir(resume(**{"optim.lr": "0.5"}), world=2)
    with pytest.raises(ValueError, match=r"train.batch_size \(was 8, now 16\)"):
        check_run_dir(resume(**{"train.batch_size": "16"}), world=2)


def test_resume_needs_a_checkpoint_and_a_complete_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    cfg = config_from_dict({}, {"run.output_dir": str(out), "run.resume": "true"}, source="test")
    with pytest.raises(ValueError, match=r"--run.resume: no checkpoint in .* to resume from"):
        check_run_dir(cfg, world=1)
    (out / "checkpoints" / "step4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step4")
    (out / "checkpoints" / "step4" / "rng_rank0.safetensors").write_text("")
    with pytest.raises(ValueError, match=r"incomplete \(missing rng_rank1.safetensors, trainable.safetensors\)"):
        checkpoint.load_resume_state(None, out / "checkpoints", rank=0, world=2, seed=0)


def test_overwrite_deletes_only_a_run_directory(tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    cfg = config_from_dict({}, {"run.output_dir": str(notes), "run.overwrite": "true"}, source="test")
    with pytest.raises(ValueError, match=r"is not a run directory \(no config.yaml\); refusing to delete it"):
        check_run_dir(cfg, world=1)
    (notes / "config.yaml").write_text("{}")
    monkeypatch.chdir(notes)
    with pytest.raises(ValueError, match="contains the current directory; refusing to delete it"):
        check_run_dir(cfg, world=1)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file; choose a directory"):
        check_run_dir(config_from_dict({}, {"run.output_dir": str(file)}, source="test"), world=1)
    assert (notes / "thesis.tex").read_text() == "precious"


def test_an_export_replaced_halfway_is_recovered(tmp_path):
    """A kill between `replace_dir`'s two renames leaves only the previous export, under a hidden name."""
    from safetensors.torch import save_file

    previous = tmp_path / ".best.old123"
    previous.mkdir()
    save_file({"w": torch.ones(2)}, previous / checkpoint.EXPORT_WEIGHTS)
    (previous / checkpoint.EXPORT_CONFIG).write_text('{"step": 4}')
    (tmp_path / ".best.tmp123").mkdir()  # the half-written new one
    meta, tensors = checkpoint.read_export(tmp_path / "best")
    assert meta == {"step": 4} and list(tensors) == ["w"]


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def crash(*args):
        raise KeyboardInterrupt  # the process dies between writing the temporary file and renaming it

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write_text(path, "new")
    assert path.read_text() == "old"


# --- fuzzing: the config parser never fails with anything but a ConfigError ------------------------------------------

KEYS = st.sampled_from([*SECTIONS, "method", "name", "lr", "seed", "task", "max_length", "fields", "label_words",
                        "num_virtual_tokens", "schedule", "batch_size", "nonfinite", "zzz", "1", ""])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=10)
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def build_or_config_error(build) -> None:
    try:
        build()
    except ConfigError as err:
        assert err.problems and all(isinstance(p, str) and p for p in err.problems)


@FUZZ
@given(data=st.dictionaries(KEYS, VALUES, max_size=5),
       overrides=st.dictionaries(st.text(alphabet="abcdefghilmnoprstuvwxyz._", max_size=20), SCALARS, max_size=3))
def test_random_config_trees_and_flags_give_a_config_or_a_config_error(data, overrides):
    build_or_config_error(lambda: config_from_dict(data, overrides, source="fuzz"))


YAML_TEXT = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="run:model:data:train: \n-[]{}'\"#&*!|>%@`0123456789.,?", max_size=80),
    st.dictionaries(KEYS, VALUES, max_size=4).map(lambda tree: yaml.safe_dump(tree, allow_unicode=True)),
)


@FUZZ
@given(text=YAML_TEXT, raw=st.binary(max_size=12))
def test_random_yaml_files_give_a_config_or_a_config_error(text, raw):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cfg.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass") + (raw if len(raw) % 3 == 0 else b""))
        build_or_config_error(lambda: load_config(path))
