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
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
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
    """A run directory as `ipt-ds train` leaves it, without training: its config, DeepSpeed config, `latest` and the
    checkpoint it names (its trainable-state record and the ranks' random-state files, which are written last)."""
    from safetensors.torch import save_file

    (out / "checkpoints" / "step2").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step2")
    save_file({"x": torch.zeros(1)}, out / "checkpoints" / "step2" / checkpoint.TRAINABLE_STATE,
              metadata={"state": json.dumps({"world_size": world})})
    for rank in range(world):
        (out / "checkpoints" / "step2" / f"rng_rank{rank}.safetensors").write_text("")
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

@dataclass
class CasePaths:
    """Where one CLI case lives: its folder (everything in it is compared before and after), its config, its run
    directory, its copy of the tiny export, and the sections its config was written from."""

    dir: Path
    cfg: Path
    out: Path
    export: Path
    sections: dict
    model: Path

    def rewrite(self, **sections) -> None:
        for name, values in sections.items():
            self.sections[name] = {**self.sections.get(name, {}), **values}
        write_config(self.cfg, self.sections)


@dataclass(frozen=True)
class Case:
    expected: str
    """Text that the one `error:` line must hold."""
    change: dict | None = None
    """Sections to change in the tiny config."""
    flags: tuple = ()
    """Extra flags of `ipt-ds train CONFIG --run.output_dir=RUN`."""
    command: Callable[[CasePaths], list[str]] | None = None
    """Another command line (without `python -m ipt_ds`)."""
    prepare: Callable[[CasePaths], None] | None = None
    """Writes what the case needs, before the folder is snapshotted."""


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])  # a copy cut short


def copy_model(p: CasePaths, keep_weights: bool) -> None:
    shutil.copytree(p.model, p.dir / "model", ignore=None if keep_weights else shutil.ignore_patterns("*.safetensors"))
    if keep_weights:
        truncate(p.dir / "model" / "model.safetensors")
    p.rewrite(model={"name_or_path": str(p.dir / "model")})


def remote_code_export(p: CasePaths) -> None:
    meta = json.loads((p.export / "config.json").read_text())
    meta["config"]["model"]["trust_remote_code"] = True  # what a downloaded export could carry
    (p.export / "config.json").write_text(json.dumps(meta))


def mixed_input(p: CasePaths) -> None:
    """The remote-code export, and an input whose rows name it."""
    remote_code_export(p)
    rows = [{**json.loads(line), "export": "rte"} for line in Path(val(p)).read_text().splitlines()]
    (p.dir / "mixed.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_ds(p: CasePaths, ds) -> None:
    (p.dir / "ds.json").write_text(json.dumps(ds))
    p.rewrite(deepspeed={"config": str(p.dir / "ds.json")})


def resume_with_latest(text: str):
    def prepare(p: CasePaths) -> None:
        fake_run(p.out, p.sections, world=1)
        (p.out / "checkpoints" / "latest").write_text(text)
    return prepare


def val(p: CasePaths) -> str:
    return p.sections["data"]["eval_split"]


CLI_CASES = {
    "malformed data row": Case(":2: malformed JSON line", prepare=lambda p: Path(p.sections["data"]["train_split"])
                               .write_text('{"premise": "a", "hypothesis": "b", "label": 0}\n{"pre\n')),
    "unknown task": Case("data.task: unknown task 'nope'; known tasks:", {"data": {"task": "nope"}}),
    "missing backbone": Case("model.name_or_path: directory '/nonexistent/backbone' does not exist",
                             {"model": {"name_or_path": "/nonexistent/backbone"}}),
    "resume with another method": Case("method.name (was 'prompt_tuning', now 'ptuning_v1')",
                                       flags=("--run.resume=true", "--method.name=ptuning_v1"),
                                       prepare=lambda p: fake_run(p.out, p.sections, world=1)),
    # a refused resume names the file and what to do, and rewrites nothing (config.yaml included)
    "resume with an empty latest": Case("latest' should hold the name of a checkpoint directory, it holds ''; resume "
                                        "from a copy of the run, or start it again with --run.overwrite=true",
                                        flags=("--run.resume=true",), prepare=resume_with_latest("")),
    "resume with a latest naming nothing": Case("latest' names checkpoint 'step9', but", flags=("--run.resume=true",),
                                                prepare=resume_with_latest("step9\n")),
    "train without a config": Case("ipt-ds train: missing CONFIG; usage: ipt-ds train CONFIG.yaml",
                                   command=lambda p: ["train"]),
    "unknown command": Case("unknown command 'trian'; commands:", command=lambda p: ["trian", str(p.cfg)]),
    "a second config": Case("ipt-ds train: unexpected argument 'extra.yaml' (settings are --section.key=value)",
                            command=lambda p: ["train", str(p.cfg), "extra.yaml", f"--run.output_dir={p.out}"]),
    "an argument to a command that takes none": Case("ipt-ds methods: unexpected argument 'ipt'",
                                                     command=lambda p: ["methods", "ipt"]),
    "run directory under a file": Case("cfg.yaml/run' cannot be written ('", command=lambda p: [
        "train", str(p.cfg), f"--run.output_dir={p.cfg / 'run'}"]),
    "negative max_steps": Case("--train.max_steps: train.max_steps must be >= 0, got -5",
                               flags=("--train.max_steps=-5",)),
    "a flag's value is reported at the flag": Case("--optim.lr: optim.lr must be > 0", flags=("--optim.lr=-1",)),
    "training split smaller than one example per micro-batch": Case(
        "the training split (16 examples per optimizer step) is too small to give each of 1 ranks x 32 accumulation",
        {"train": {"batch_size": 32, "micro_batch_size": 1}}),
    "duplicate YAML key": Case("duplicate key 'optim' (also set at line", prepare=lambda p: p.cfg.write_text(
        p.cfg.read_text() + "optim:\n  lr: 0.1\noptim:\n  lr: 0.2\n")),
    "old and new name of a key both set": Case(
        "'method.num_tokens' and 'method.num_virtual_tokens' are both set; 'num_tokens' is the old name",
        {"method": {"name": "lpt", "layer": 1, "num_tokens": 4}}),
    "empty YAML": Case("cfg.yaml:1: the config file holds no settings", prepare=lambda p: p.cfg.write_text("")),
    "DeepSpeed JSON that is a list": Case("ds.json: a DeepSpeed config is a JSON object",
                                          prepare=lambda p: write_ds(p, [1, 2])),
    "NVMe offload to a path that cannot be made": Case("cfg.yaml/swap' cannot be written", prepare=lambda p: write_ds(
        p, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(p.cfg / "swap")}}})),
    "truncated model.safetensors in a model directory": Case("cannot read the weights in",
                                                             prepare=lambda p: copy_model(p, keep_weights=True)),
    "model directory without weights": Case("cannot read the weights in",
                                            prepare=lambda p: copy_model(p, keep_weights=False)),
    "truncated model.safetensors in an export": Case(
        "model.safetensors: not a readable safetensors file", command=lambda p: ["evaluate", str(p.export)],
        prepare=lambda p: truncate(p.export / "model.safetensors")),
    "evaluate an export on another task": Case("was trained on task 'rte'; it cannot score 'boolq'", command=lambda p: [
        "evaluate", str(p.export), "--data.task=boolq"]),
    "predict without --output": Case("ipt-ds predict: missing --output", command=lambda p: [
        "predict", str(p.export), f"--input={val(p)}"]),
    "predict into a missing directory": Case("does not exist; create it or choose another path", command=lambda p: [
        "predict", str(p.export), f"--input={val(p)}", f"--output={p.dir / 'nodir' / 'p.jsonl'}"]),
    "remote code switched on by the YAML": Case(
        "model.trust_remote_code is set to true in the file; remote code runs only when the command line asks for it: "
        "pass --model.trust_remote_code=true", {"model": {"trust_remote_code": True}}),
    "remote code switched on by an export (evaluate)": Case(
        "config.json: model.trust_remote_code is set to true in the file", prepare=remote_code_export,
        command=lambda p: ["evaluate", str(p.export)]),
    "remote code switched on by an export (predict)": Case(
        "config.json: model.trust_remote_code is set to true in the file", prepare=remote_code_export,
        command=lambda p: ["predict", str(p.export), f"--input={val(p)}", f"--output={p.dir / 'p.jsonl'}"]),
    "remote code switched on by an export (predict-mixed)": Case(
        "config.json: model.trust_remote_code is set to true in the file", prepare=mixed_input,
        command=lambda p: ["predict-mixed", f"--exports=rte={p.export}", f"--input={p.dir / 'mixed.jsonl'}",
                           f"--output={p.dir / 'p.jsonl'}"]),
}


def make_export(directory: Path, model_dir: Path) -> Path:
    """An export as a run writes it (`best/`), built in this process without training."""
    from ipt_ds.model import build_model

    cfg = config_from_dict(tiny_cfg(directory, model_dir), source="test")
    model, _ = build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)
    meta = {"config": cfg.to_dict(), "ds_config": {"train_micro_batch_size_per_gpu": 8, "zero_optimization":
                                                   {"stage": 0}},
            "task": "rte", "label_names": list(get_task("rte").label_names), "parameters": model.parameter_report()}
    checkpoint.export_trainable(model, directory / "best", meta, rank=0)
    return directory / "best"


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, tiny_bert):
    """Start every CLI case at once (each one `ipt-ds` process), then collect (status, stderr, paths, files before)."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    export = make_export(tmp / "export", tiny_bert)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = {}
    debug = Case("", {"data": {"task": "nope"}}, flags=("--run.debug=true",))
    for number, (case, spec) in enumerate([*CLI_CASES.items(), ("debug", debug)]):
        case_dir = tmp / f"case{number}"
        paths = CasePaths(case_dir, case_dir / "cfg.yaml", case_dir / "run", case_dir / "best",
                          tiny_cfg(case_dir, tiny_bert, **(spec.change or {})), tiny_bert)
        write_config(paths.cfg, paths.sections)
        shutil.copytree(export, paths.export)
        if spec.prepare:
            spec.prepare(paths)
        argv = spec.command(paths) if spec.command else ["train", str(paths.cfg), f"--run.output_dir={paths.out}",
                                                         *spec.flags]
        before = snapshot(case_dir), paths.out.exists()
        process = subprocess.Popen([sys.executable, "-m", "ipt_ds", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        started[case] = (process, paths, before)
    results = {}
    try:
        for case, (process, paths, before) in started.items():
            _, stderr = process.communicate(timeout=600)
            results[case] = (process.returncode, stderr, paths, before)
    finally:
        for process, _, _ in started.values():
            process.kill()
    return results


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_user_error_is_one_line_and_leaves_the_disk_alone(cli_errors, case):
    code, stderr, paths, (files_before, run_existed) = cli_errors[case]
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert CLI_CASES[case].expected in stderr, stderr[-3000:]
    assert paths.out.exists() == run_existed, "a failed start must not create the run directory"
    assert snapshot(paths.dir) == files_before, "a refused command must not change any file"


def test_help_works_for_every_command():
    from ipt_ds.cli import commands

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    started = {name: subprocess.Popen([sys.executable, "-m", "ipt_ds", name, "--help"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in commands()}
    assert {"train", "evaluate", "predict", "predict-mixed", "show-config"} <= set(started)
    for name, process in started.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, (name, stderr[-2000:])
        assert f"NAME\n    ipt-ds {name}" in stdout + stderr and "Traceback" not in stderr, (name, stdout, stderr)


def test_run_debug_shows_the_traceback(cli_errors):
    code, stderr, _, _ = cli_errors["debug"]
    assert code != 0 and "Traceback" in stderr and "unknown task 'nope'" in stderr


# --- in-process: configuration --------------------------------------------------------------------------------------

OUT_OF_RANGE = {  # flag -> a value its docstring rules out
    "train.max_steps": "-5", "train.epochs": "-1", "train.eval_every": "-1", "data.max_length": "0",
    "data.num_shots": "-2", "run.seed": "-1", "optim.lr": "inf", "optim.weight_decay": "-0.1", "optim.grad_clip": "-1",
    "generation.eval_limit": "-1", "generation.test_limit": "-1", "method.init_range": "-0.5",
}


@pytest.mark.parametrize("flag", sorted(OUT_OF_RANGE))
def test_numeric_settings_out_of_range_are_refused_at_their_flag(flag):
    with pytest.raises(ConfigError, match=rf"^invalid configuration:\n  - --{flag}: {flag} must be "):
        load_config(None, {flag: OUT_OF_RANGE[flag]})


@pytest.mark.parametrize(("method", "flag", "value"), [
    ("ptuning_v2", "method.projection_hidden", "0"), ("ipt", "method.generator_width", "0"),
    ("lpt", "method.layer", "-2"), ("ptuning_v1", "method.encoder_hidden", "-1")])
def test_method_settings_out_of_range_are_refused_at_their_flag(method, flag, value):
    with pytest.raises(ConfigError, match=rf"--{flag}: {flag} must be >= "):
        load_config(None, {"method.name": method, flag: value})


def test_a_setting_refused_in_the_yaml_names_its_own_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 0.1\n  lr: -1\n")
    with pytest.raises(ConfigError, match=rf"{path}:3: optim.lr must be > 0"):
        load_config(path)


def test_show_config_prints_the_run_directory_and_data_root_resolved(tmp_path, monkeypatch, capsys):
    from ipt_ds import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IPT_DS_DATA", "data-here")
    cli.show_config(None, **{"data.task": "cb", "method.name": "lpt"})
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["run"]["output_dir"] == str(tmp_path / "runs" / "cb-lpt-seed42")
    assert shown["data"]["root"] == str(tmp_path / "data-here")


def test_methods_lists_defaults_and_marks_required_options(monkeypatch, capsys):
    from ipt_ds import cli
    from ipt_ds.methods import METHODS, MethodConfig, MethodSpec

    @dataclass(kw_only=True)
    class NeedsWidth(MethodConfig):
        name: str = "needs_width"
        width: int

    monkeypatch.setitem(METHODS, "needs_width", MethodSpec("needs_width", NeedsWidth, build=lambda *args: None))
    cli.methods()
    listed = capsys.readouterr().out
    assert "MISSING" not in listed and "instance_layers=[0]" in listed and "needs_width: width=required" in listed


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
    with pytest.raises(ConfigError, match=rf"{path}:4: data.task: unknown task 'glue-rte'; known tasks: .*rte"):
        load_config(path)


# --- in-process: model and backbone ----------------------------------------------------------------------------------

def test_inputs_longer_than_the_backbone_are_refused_before_training(tmp_path, tiny_bert):
    from ipt_ds.model import build_model

    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_bert, data={"max_length": 300}), source="test")
    with pytest.raises(ValueError, match=r"data.max_length 300 \+ 4 prompt positions = 304 positions exceed the "
                                         r"backbone's 256; lower data.max_length to 252"):
        build_model(cfg, get_task("rte"), dtype=torch.float32, ds_config=None)


@pytest.fixture(scope="module")
def roberta_positions(tmp_path_factory) -> Path:
    """A tiny RoBERTa numbered as the real one: padding_idx 1, so positions start at 2 and 34 rows hold 32 tokens."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    out = tmp_path_factory.mktemp("roberta-positions")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    RobertaForMaskedLM(RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=34,
                                     pad_token_id=1)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize(("method", "longest"), [
    ({"name": "prompt_tuning", "num_virtual_tokens": 4}, 28),  # 2 unused + 4 prompt + 28 = 34
    ({"name": "ptuning_v1", "num_virtual_tokens": 4}, 28),
    ({"name": "lpt", "layer": 1, "num_virtual_tokens": 4}, 32),  # late prompts take no positions: the input's 32 only
    ({"name": "ptuning_v2", "num_virtual_tokens": 4}, 32),  # RoBERTa numbers the input from 2 whatever the cache
])
def test_the_position_limit_counts_what_each_method_uses_and_robertas_offset(tmp_path, roberta_positions, method,
                                                                            longest):
    """The longest accepted data.max_length runs a forward of that many tokens; one more is refused before training."""
    from ipt_ds.data.encode import collate
    from ipt_ds.data.tasks import Example
    from ipt_ds.model import build_model

    def build(max_length: int):
        sections = {**tiny_cfg(tmp_path, roberta_positions, data={"max_length": max_length}), "method": method}
        return build_model(config_from_dict(sections, source="test"), get_task("rte"), dtype=torch.float32,
                           ds_config=None)

    with pytest.raises(ValueError, match=rf"= 35 positions exceed the backbone's "
                                         rf"34; lower data.max_length to {longest}"):
        build(longest + 1)
    model, encoder = build(longest)
    batch = collate([encoder(Example(guid="0", text_a="cat " * 60, text_b="dog", label=0))],
                    encoder.tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == longest
    logits, _ = model(batch)  # before: input prompts passed the check and indexed past the table here
    assert torch.isfinite(logits).all()


def test_a_bert_prefix_counts_its_cached_positions(tmp_path, tiny_bert):
    from ipt_ds.model import build_model

    sections = tiny_cfg(tmp_path, tiny_bert, method={"name": "ptuning_v2", "num_virtual_tokens": 4},
                        data={"max_length": 253})
    with pytest.raises(ValueError, match=r"4 prefix positions \(this backbone numbers the input after them\) = 257"):
        build_model(config_from_dict(sections, source="test"), get_task("rte"), dtype=torch.float32, ds_config=None)


def test_the_shipped_lpt_roberta_large_config_passes_the_position_check():
    """configs/rte/lpt_roberta-large.yaml (max_length 512) was always refused; RoBERTa-large's shape, no weights."""
    from transformers import RobertaConfig

    from ipt_ds.backbone import Backbone
    from ipt_ds.methods import get_method
    from ipt_ds.model import _check_positions

    cfg = load_config(REPO / "configs/rte/lpt_roberta-large.yaml")
    large = RobertaConfig(vocab_size=50265, hidden_size=64, num_hidden_layers=24, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=514, pad_token_id=1)  # roberta-large's table
    from transformers import RobertaModel

    with torch.device("meta"):
        backbone = Backbone(RobertaModel(large), keep_dropout=False)
    method = get_method("lpt").build(cfg.method, backbone, None)
    _check_positions(cfg, backbone, method)  # 512 input positions of 512 usable
    cfg.method = get_method("prompt_tuning").config_cls(name="prompt_tuning", num_virtual_tokens=5, init="random")
    with pytest.raises(ValueError, match="lower data.max_length to 507"):
        _check_positions(cfg, backbone, get_method("prompt_tuning").build(cfg.method, backbone, None))


def test_gpt2s_position_table_is_checked_and_rotary_positions_are_not():
    """GPT-2 numbers the input after a key/value prefix in its learned table of n_positions rows; LLaMA's rotary
    positions have no table to run past. Shapes only (meta tensors), as the RoBERTa-large case above."""
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    from ipt_ds.backbone import Backbone
    from ipt_ds.methods import get_method
    from ipt_ds.model import _check_positions

    def check(model, max_length: int, name: str, **method) -> None:
        cfg = load_config(None, {"data.max_length": str(max_length)})
        cfg.method = get_method(name).config_cls(name=name, **method)
        with torch.device("meta"):
            backbone = Backbone(model(), keep_dropout=False)
        _check_positions(cfg, backbone, get_method(name).build(cfg.method, backbone, None))

    gpt2 = lambda: GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64))  # noqa: E731
    check(gpt2, 59, "prompt_tuning", num_virtual_tokens=5, init="random")
    with pytest.raises(ValueError, match="5 prompt positions = 65 positions exceed the backbone's 64; lower "
                                         "data.max_length to 59"):
        check(gpt2, 60, "prompt_tuning", num_virtual_tokens=5, init="random")
    check(gpt2, 60, "ptuning_v2", num_virtual_tokens=4)
    with pytest.raises(ValueError, match=r"4 prefix positions \(this backbone numbers the input after them\) = 65"):
        check(gpt2, 61, "ptuning_v2", num_virtual_tokens=4)
    llama = lambda: LlamaModel(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,  # noqa: E731
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64))
    check(llama, 200, "prompt_tuning", num_virtual_tokens=5, init="random")


def test_a_hub_id_without_network_fails_in_seconds(monkeypatch):
    """Without a reachable hub (here: an endpoint where nothing listens), a hub id that is not cached fails at once;
    asking the hub directly retried for 26 s before its error."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="model.name_or_path 'no-org/no-such-model': not a local directory, not in "
                                         "the local HF cache, and the hub cannot be reached"):
        load_backbone(ModelConfig(name_or_path="no-org/no-such-model"), dtype=torch.float32, with_lm_head=False)
    assert time.perf_counter() - start < 10


def test_nvme_offload_without_deepspeeds_async_io_is_refused_up_front(tmp_path, monkeypatch):
    """Whether libaio is installed is this machine's business: the probe is replaced by one that says no."""
    from ipt_ds import engine

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(tmp_path / "swap")}}}))
    cfg = load_config(None, {"deepspeed.config": str(ds)})
    monkeypatch.setattr(engine, "_async_io_available", lambda: False)
    with pytest.raises(ValueError, match=r"offload_optimizer offloads to nvme, which needs DeepSpeed's async_io op"):
        engine.resolve_ds_config(cfg, world_size=1)
    assert engine.resolve_ds_config(cfg, world_size=1, check_offload=False)["zero_optimization"]["stage"] == 3
    assert not (tmp_path / "swap").exists()


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
    cfg = config_from_dict(tiny_cfg(tmp_path, tiny_bert), {"model.trust_remote_code": "true"}, source="test")
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

    check_run_dir(resume())  # another number of ranks (tests/test_elastic.py runs it)
    check_run_dir(resume(**{"train.micro_batch_size": "1"}))
    check_run_dir(resume(**{"train.frozen_cache": "true", "train.frozen_cache_gb": "0"}))  # the same states, once
    check_run_dir(resume(**{"train.max_steps": "9", "run.log_every": "1", "run.keep_checkpoints": "3"}))
    with pytest.raises(ValueError, match=r"optim.lr \(was 0.001, now 0.5\)"):
        check_run_dir(resume(**{"optim.lr": "0.5"}))
    with pytest.raises(ValueError, match=r"train.batch_size \(was 8, now 16\)"):
        check_run_dir(resume(**{"train.batch_size": "16"}))


def test_resume_auto_resumes_a_checkpoint_else_starts_the_same_run_again_and_never_replaces_another(tmp_path):
    sections = tiny_cfg(tmp_path, "minilm")

    def auto(out, **flags):
        return config_from_dict(json.loads(json.dumps(sections)), {"run.output_dir": str(out), "run.resume": "auto",
                                                                    **flags}, source="test")

    fresh = auto(tmp_path / "new")  # a first start: nothing there yet
    check_run_dir(fresh)
    assert (fresh.run.resume, fresh.run.overwrite) == (False, False)
    out = tmp_path / "run"
    fake_run(out, sections, world=2)
    cfg = auto(out)
    check_run_dir(cfg)
    assert (cfg.run.resume, cfg.run.overwrite) == (True, False)
    shutil.rmtree(out / "checkpoints")  # requeued before its first checkpoint: config.yaml and the log, no `latest`
    cfg = auto(out)
    check_run_dir(cfg)
    assert (cfg.run.resume, cfg.run.overwrite) == (False, True)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"optim.lr \(was 0.001, now 0.5\)"):
        check_run_dir(auto(out, **{"optim.lr": "0.5"}))
    assert snapshot(out) == before


def test_resume_needs_a_checkpoint_and_a_complete_one(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text("")
    cfg = config_from_dict({}, {"run.output_dir": str(out), "run.resume": "true"}, source="test")
    with pytest.raises(ValueError, match=r"--run.resume: no checkpoint in .* to resume from"):
        check_run_dir(cfg)
    (out / "checkpoints" / "step4").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step4")
    (out / "checkpoints" / "step4" / "rng_rank0.safetensors").write_text("")
    with pytest.raises(ValueError, match=r"step4' is incomplete \(missing a readable trainable.safetensors\); "
                                         r"resume from a copy of the run"):
        checkpoint.load_resume_state(None, out / "checkpoints", rank=0, world=2, seed=0)
    (out / "checkpoints" / "step4" / "mp_rank_00_model_states.pt").write_text("")  # DeepSpeed's files, and no more
    with pytest.raises(ValueError, match=r"step4' was written by an earlier ipt-ds, before checkpoints held a "
                                         r"rank-independent state .* start the run again with --run.overwrite=true"):
        checkpoint.load_resume_state(None, out / "checkpoints", rank=0, world=2, seed=0)
    (out / "checkpoints" / "step4" / "mp_rank_00_model_states.pt").unlink()
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, out / "checkpoints" / "step4" / checkpoint.TRAINABLE_STATE,
              metadata={"state": json.dumps({"world_size": 2})})
    with pytest.raises(ValueError, match=r"step4' is incomplete \(missing rng_rank1.safetensors; every rank writes "
                                         r"its own\); resume from a copy of the run"):
        checkpoint.load_resume_state(None, out / "checkpoints", rank=0, world=1, seed=0)


def test_overwrite_deletes_only_a_run_directory(tmp_path, monkeypatch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    cfg = config_from_dict({}, {"run.output_dir": str(notes), "run.overwrite": "true"}, source="test")
    with pytest.raises(ValueError, match=r"is not a run directory \(no config.yaml\); refusing to delete it"):
        check_run_dir(cfg)
    (notes / "config.yaml").write_text("{}")
    monkeypatch.chdir(notes)
    with pytest.raises(ValueError, match="contains the current directory; refusing to delete it"):
        check_run_dir(cfg)
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file; choose a directory"):
        check_run_dir(config_from_dict({}, {"run.output_dir": str(file)}, source="test"))
    assert (notes / "thesis.tex").read_text() == "precious"


def test_an_export_replaced_halfway_is_recovered(tmp_path):
    """A kill between `replace_dir`'s two renames leaves only the previous export, under a hidden name."""
    from safetensors.torch import save_file

    previous = tmp_path / ".best.old123"
    previous.mkdir()
    save_file({"w": torch.ones(2)}, previous / checkpoint.EXPORT_WEIGHTS)
    (previous / checkpoint.EXPORT_CONFIG).write_text('{"config": {}, "step": 4}')
    (tmp_path / ".best.tmp123").mkdir()  # the half-written new one
    meta, tensors = checkpoint.read_export(tmp_path / "best")
    assert meta == {"config": {}, "step": 4} and list(tensors) == ["w"]
    with pytest.raises(ValueError, match=r"not an export directory .*; a run writes its export to <run>/best$"):
        checkpoint.read_export(tmp_path / "elsewhere")


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
@example(data={}, overrides={"head.label_words": "[no, \x07]"})  # a character YAML cannot read, in an inline list
@example(data={"data": {"fields": "{a: [1"}}, overrides={})  # an inline mapping cut short
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
