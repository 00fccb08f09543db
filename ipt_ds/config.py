"""The experiment configuration: typed sections, merged as defaults < YAML file < `--section.key=value` flags.

DeepSpeed engine settings (ZeRO stage, precision, offload, buckets) live in the JSON named by `deepspeed.config`;
everything about the experiment lives here. Keys the YAML owns must not appear in the JSON (see `engine.py`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ipt_ds.backbone import ModelConfig
from ipt_ds.confload import ConfigError, at_least, build, convert, load_yaml_with_lines
from ipt_ds.heads import HeadConfig
from ipt_ds.methods import MethodConfig, get_method
from ipt_ds.preemption import DEFAULT_STOP_SIGNALS, signal_problems

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = ""
    """Run directory (checkpoints, exports, logs). Empty: runs/<task>-<method>-seed<seed>."""
    seed: int = 42
    """Seed for initialisation, data order, few-shot sampling and dropout."""
    resume: bool | Literal["auto"] = False
    """Continue the run in output_dir from its `latest` checkpoint. auto: continue it if it has one, else start it
    (again: a run of the same settings stopped before its first checkpoint is replaced); what Slurm's requeued jobs
    pass."""
    overwrite: bool = False
    """Delete an existing output_dir first. Without resume or overwrite an existing run is never touched."""
    log_every: int = 10
    """Optimizer steps between logged training losses."""
    debug: bool = False
    """Show full tracebacks for user errors."""
    collective_timeout_s: float = 1800.0
    """Seconds a collective may wait for the other ranks before this rank fails (bounds a hung or lost peer)."""
    stop_signals: list[str] = field(default_factory=lambda: list(DEFAULT_STOP_SIGNALS))
    """Signals that stop the run cleanly: after the current step every rank saves a checkpoint, `latest` names it,
    and the process exits with status 75, to be resumed (Slurm's warning before a time limit, preemption;
    docs/launching.md). []: none (SIGTERM then ends a rank at once)."""
    checkpoint_every: int = 0
    """Optimizer steps between resume checkpoints (<output_dir>/checkpoints); 0: at every evaluation
    (train.eval_every). The last step is always saved."""
    keep_checkpoints: int = 1
    """Resume checkpoints kept on disk, the newest ones (the one `latest` names among them); `best/` is an export and
    is always kept."""

    def validate(self) -> list[str]:
        problems = (at_least(self, "run", 1, "log_every", "keep_checkpoints")
                    + at_least(self, "run", 0, "seed", "checkpoint_every"))
        if not self.collective_timeout_s > 0:  # `not >` also catches nan
            problems.append(f"run.collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        return problems + signal_problems(self.stop_signals)


@dataclass(kw_only=True)
class DataConfig:
    task: str = "rte"
    """Task name (rte, cb, boolq, sst2, multirc, ...; `ipt-ds tasks` lists them) or 'custom' with `fields`; for
    image formats any name (its labels come from the data)."""
    format: Literal["superglue", "glue", "fewglue", "lmbff", "e2e", "jsonl", "csv", "tsv", "hub", "imagefolder",
                    "npz"] = "superglue"
    """File layout under `root`; jsonl/csv/tsv read the split paths as given; hub loads from the HF hub. e2e reads
    <root>/e2e (splits train / dev: devset.csv with every 10th source held out for dev; test: testset_w_refs.csv).
    Images: imagefolder reads <root>/<split>/<class>/<files>, npz reads <root>/<split>.npz (docs/methods/vpt.md)."""
    root: str = ""
    """Data root. Empty: $IPT_DS_DATA, else ../shared/data next to the repo when it exists, else the HF hub."""
    train_split: str = "train"
    """Training split name in the layout, or a file path."""
    eval_split: str = "val"
    """Split for evaluation during training and model selection."""
    test_split: str = ""
    """Optional split scored once with the best checkpoint at the end (labelled files only)."""
    max_length: int = 256
    """Token limit per input (prompt positions not included); longer inputs are truncated longest-first."""
    num_shots: int = 0
    """Few-shot: sample this many training examples per class (0: use the whole split)."""
    lmbff_seed: int = 13
    """LM-BFF data seed (13, 21, 42, 87, 100) for format: lmbff."""
    fields: dict[str, str] = field(default_factory=dict)
    """Column mapping for custom jsonl/csv files: {text_a: ..., text_b: ..., label: ...}; for generation tasks
    {source: ..., target: ...}."""

    def validate(self) -> list[str]:
        from ipt_ds.data.tasks import get_task

        problems = at_least(self, "data", 1, "max_length") + at_least(self, "data", 0, "num_shots")
        if self.format in ("imagefolder", "npz"):
            return problems
        try:
            get_task(self.task)
        except ValueError as err:
            problems.append(f"data.task: {err}")
        return problems


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 32
    """Global batch size (all ranks, after gradient accumulation)."""
    micro_batch_size: int = 16
    """Per-rank batch of one forward/backward; accumulation = batch_size / (micro_batch_size * world size). A resumed
    run may change it (and the number of ranks) as long as batch_size stays."""
    eval_batch_size: int = 64
    """Per-rank evaluation batch."""
    epochs: int = 10
    """Passes over the training set, unless max_steps is set."""
    max_steps: int = 0
    """Optimizer steps to train for; 0: derived from epochs."""
    eval_every: int = 0
    """Optimizer steps between evaluations (and, unless run.checkpoint_every is set, checkpoints); 0: once per
    epoch."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradients hold NaN/inf: stop the run naming the step, or skip its update (no change to
    weights, optimizer state or schedule). fp16 loss-scaler overflows are always skipped, as DeepSpeed does."""
    frozen_cache: bool = False
    """Never compute the frozen part twice: before training, one pass sharded over the ranks computes the states
    entering the method's first trained layer (LPT's layer k; the last layer's output for linear_probe) for every
    example of the train, eval and test splits; every later step and evaluation starts at that layer, and the
    layers below are neither run nor, under ZeRO-3, gathered. Every rank can read every example's states (T x
    hidden values per example, in the run's dtype): in CPU memory within train.frozen_cache_gb, else from memory-
    mapped files in `<run.output_dir>/frozen_cache/`, which a later run of the same inputs (a resume, say)
    reuses. Text classification with a method that reads the states (lpt, linear_probe); refused with
    model.dropout, head.siamese, generation tasks and images, and for methods whose first trained layer is 0
    (nothing is frozen below it)."""
    frozen_cache_gb: float = 4.0
    """With train.frozen_cache: the GiB of states each rank may hold in memory. States of all examples beyond it go
    to memory-mapped files in `<run.output_dir>/frozen_cache/` (each rank writes the rows it computed; every rank
    reads all files; on a shared filesystem for multi-node runs), with a fingerprint of what they depend on: a later
    run reuses them if it matches and the files are whole, else computes them again. 0: always the files."""

    def validate(self) -> list[str]:
        problems = at_least(self, "train", 1, "batch_size", "micro_batch_size", "eval_batch_size")
        if not problems and self.batch_size % self.micro_batch_size:
            problems.append(f"train.batch_size {self.batch_size} is not a multiple of train.micro_batch_size "
                            f"{self.micro_batch_size}")
        problems += at_least(self, "train", 0, "epochs", "max_steps", "eval_every", "frozen_cache_gb")
        if not problems and self.epochs < 1 and self.max_steps < 1:
            problems.append("set train.epochs or train.max_steps to at least 1")
        return problems


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay; biases and norm weights are excluded."""
    warmup_ratio: float = 0.06
    """Fraction of the steps spent warming up linearly from 0."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warm-up: linear or cosine to 0, or constant."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off). Written into the DeepSpeed config as gradient_clipping; without ZeRO in fp32
    the trainer clips in the optimizer step itself, with the same norm and factor."""

    def validate(self) -> list[str]:
        problems = [] if 0 < self.lr < math.inf else [f"optim.lr must be > 0 and finite, got {self.lr}"]
        problems += at_least(self, "optim", 0, "weight_decay", "grad_clip")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        return problems


@dataclass(kw_only=True)
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"
    """DeepSpeed JSON (engine settings only), relative to the current directory or to the repository."""


@dataclass(kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 64
    """Longest generated continuation, in tokens."""
    num_beams: int = 1
    """1: greedy decoding; more: beam search with this many beams."""
    max_target_length: int = 64
    """Training: reference tokens kept per example (the end-of-sequence token included)."""
    eval_limit: int = 0
    """Evaluations during training decode only the first N sources of the eval split (0: all); the final scores
    always use every source."""
    test_limit: int = 0
    """Score only the first N sources of the test split at the end (0: all), for quick runs."""

    def validate(self) -> list[str]:
        return (at_least(self, "generation", 1, "max_new_tokens", "num_beams", "max_target_length")
                + at_least(self, "generation", 0, "eval_limit", "test_limit"))


@dataclass(kw_only=True)
class Config:
    run: RunConfig
    model: ModelConfig
    method: MethodConfig
    head: HeadConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig
    generation: GenerationConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def output_path(self) -> Path:
        return Path(self.run.output_dir or f"runs/{self.data.task}-{self.method.name}-seed{self.run.seed}")


SECTIONS = {
    "run": RunConfig, "model": ModelConfig, "head": HeadConfig, "data": DataConfig,
    "train": TrainConfig, "optim": OptimConfig, "deepspeed": DeepSpeedConfig, "generation": GenerationConfig,
}
DEFAULT_METHOD = "prompt_tuning"


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """Build the config; raise one ConfigError listing every problem (with file:line or --flag)."""
    data, lines = load_yaml_with_lines(Path(path)) if path else ({}, {})
    return config_from_dict(data, overrides, source=str(path or "defaults"), lines=lines)


def config_from_dict(data: dict, overrides: dict | None = None, *, source: str, lines: dict | None = None) -> Config:
    """Build a Config from nested mappings (a parsed YAML, or the config saved with a run or export) and
    `--section.key=value` overrides; problems name the flag, else `source` and the line where known."""
    return Config(**parse_sections(data, overrides, source=source, lines=lines, sections=SECTIONS,
                                 check=_check_across))


def _check_across(sections: dict) -> list[tuple[str, str]]:
    return _check_head(sections) + _check_frozen_cache(sections)


def _check_frozen_cache(sections: dict) -> list[tuple[str, str]]:
    """Where cached states could differ from what the forward computes, or nothing could read them."""
    from ipt_ds.data.tasks import get_task

    if not sections["train"].frozen_cache:
        return []
    if sections["data"].format in ("imagefolder", "npz"):
        return [("train.frozen_cache", "the frozen-state cache is for text tasks; set it to false for images")]
    if get_task(sections["data"].task).generation:
        return [("train.frozen_cache", f"task '{sections['data'].task}' generates text; the frozen-state cache is "
                                       "for classification tasks: set it to false")]
    if sections["model"].dropout:
        return [("train.frozen_cache", "with model.dropout the frozen layers' output changes at every step, so it "
                                       "cannot be cached: set model.dropout or train.frozen_cache to false")]
    if sections["head"].siamese:
        return [("train.frozen_cache", "head.siamese runs each input pair through the backbone twice; the "
                                       "frozen-state cache does not cover it: set train.frozen_cache to false")]
    return []


def _check_head(sections: dict) -> list[tuple[str, str]]:
    from ipt_ds.data.tasks import get_task

    if sections["data"].format in ("imagefolder", "npz"):
        return []
    task, head = get_task(sections["data"].task), sections["head"].type
    if task.generation and head != "lm":
        return [("head.type", f"task '{task.name}' generates text: set head.type lm (the LM head on the targets)")]
    if not task.generation and head == "lm":
        return [("head.type", f"head.type lm is for generation tasks (e2e, generation); task '{task.name}' is "
                              "classification: use linear or verbalizer")]
    return []


def parse_sections(
    data: dict,
    overrides: dict | None,
    *,
    source: str,
    lines: dict | None,
    sections: dict[str, type],
    default_method: str = DEFAULT_METHOD,
    check: Callable[[dict], list[tuple[str, str]]] | None = None,
) -> dict:
    """The typed sections of a config (`sections` plus `method`, read with the named method's config class), for
    this config and for others built the same way (`pretrain/`). `check(sections)` returns (dotted key, problem)
    pairs across sections; it runs when every section is valid. Raises one ConfigError listing every problem."""
    problems: list[str] = []
    cli_keys = set()
    problems.extend(_remote_code_from_file(data, overrides, source, lines))
    for dotted, value in (overrides or {}).items():
        section, _, key = str(dotted).partition(".")
        if not key:
            problems.append(f"--{dotted}: flags are --section.key=value, e.g. --optim.lr=1e-3")
            continue
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            problems.append(f"--{dotted}: section '{section}' is not a mapping in {source}")
            continue
        target[key] = value
        cli_keys.add(dotted)

    def where(dotted: str) -> str:
        if dotted in cli_keys:
            return f"--{dotted}"
        return f"{source}:{lines[dotted]}" if lines and dotted in lines else source

    for section, values in data.items():
        if section not in sections and section != "method":
            problems.append(f"{where(section)}: unknown section '{section}'; valid: {', '.join([*sections, 'method'])}")
        elif not isinstance(values, dict):
            problems.append(f"{where(section)}: section '{section}' must be a mapping of keys")
    built = {name: build(cls, data.get(name) if isinstance(data.get(name), dict) else {}, section=name,
                         problems=problems, where=where)
             for name, cls in sections.items()}
    method_values = dict(data.get("method") or {}) if isinstance(data.get("method"), dict) else {}
    method_values.setdefault("name", default_method)
    try:
        spec = get_method(str(method_values["name"]))
        built["method"] = build(spec.config_cls, method_values, section="method", problems=problems, where=where)
    except ValueError as err:
        problems.append(f"{where('method.name')}: {err}")
    if check is not None and not problems:
        problems.extend(f"{where(key)}: {problem}" for key, problem in check(built))
    if problems:
        raise ConfigError(problems)
    return built


def _remote_code_from_file(data: dict, overrides: dict | None, source: str, lines: dict | None) -> list[str]:
    """Nothing read from a file (a YAML, an export's config.json) may switch on remote code: an export passed on
    would otherwise run whatever code its hub repository holds. Only the command line's flag can."""
    model = data.get("model")
    if not isinstance(model, dict) or "model.trust_remote_code" in (overrides or {}):
        return []
    try:
        wanted = convert(model.get("trust_remote_code", False), bool)
    except ValueError:
        return []  # reported with the other type errors
    if not wanted:
        return []
    line = (lines or {}).get("model.trust_remote_code")
    return [f"{source}{f':{line}' if line else ''}: model.trust_remote_code is set to true in the file; remote code "
            "runs only when the command line asks for it: pass --model.trust_remote_code=true if you trust the code "
            f"of '{model.get('name_or_path', '')}'"]
