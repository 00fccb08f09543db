"""The pretraining configuration: `ipt_ds`'s run, model, train, optim and deepspeed sections, the IPT `method`
section that fine-tuning reads too, and three of its own (`objective`, `corpus`, `sources`). Loaded like the training
config: defaults < YAML < `--section.key=value`, every problem in one error with file:line or the flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ipt_ds.backbone import ModelConfig
from ipt_ds.config import DeepSpeedConfig, OptimConfig, RunConfig, TrainConfig, parse_sections
from ipt_ds.confload import load_yaml_with_lines
from ipt_ds.methods.ipt import IPTConfig


@dataclass(kw_only=True)
class ObjectiveConfig:
    name: Literal["knowledge", "transfer"] = "knowledge"
    """knowledge: classify the texts of `corpus` into their categories from the mean of their instance prompts
    (table, generator, linear classifier; the backbone does not run). transfer: train the IPT method through the
    frozen backbone on the mixture of `sources` (one linear head with a block of labels per source task)."""
    table_init: Literal["backbone", "random"] = "backbone"
    """The table pretraining starts from: the backbone's own word embeddings (prompt path only), or
    U(-method.init_range, method.init_range). Unused with method.instance_pretrain (the table is loaded)."""
    dropout: float = 0.1
    """Dropout before the classifier (training only)."""
    pool: Literal["mean", "cls", "last"] = "mean"
    """transfer: the backbone states the task head reads (mean of the real tokens, first, or last token)."""

    def validate(self) -> list[str]:
        return [] if 0 <= self.dropout < 1 else [f"objective.dropout must be in [0, 1), got {self.dropout}"]


@dataclass(kw_only=True)
class CorpusConfig:
    train_file: str = ""
    """knowledge: labelled jsonl / csv / tsv file, one text and one category per record (`ipt-ds build-corpus`)."""
    eval_file: str = ""
    """Evaluation file in the same layout; empty: hold out num_eval records of train_file (drawn with run.seed)."""
    num_eval: int = 200
    """Records held out of train_file for evaluation when eval_file is empty."""
    text_field: str = "text"
    """Key (jsonl) or header column (csv, tsv) of the text."""
    label_field: str = "label"
    """Key or column of the category: names, or integers 0..C-1."""

    def validate(self) -> list[str]:
        return [] if self.num_eval >= 1 else [f"corpus.num_eval must be >= 1, got {self.num_eval}"]


@dataclass(kw_only=True)
class SourcesConfig:
    tasks: list[str] = field(default_factory=list)
    """transfer: source tasks as layout/task[:split] (layouts as data.format, split default train), e.g.
    glue/sst2, superglue/rte, superglue/boolq:val."""
    root: str = ""
    """Data root, as data.root (empty: $IPT_DS_DATA, else ../shared/data next to the repository)."""
    max_per_task: int = 2000
    """Training examples drawn from each task (with run.seed), so that no task dominates; 0: all of them."""
    num_eval_per_task: int = 100
    """Examples per task held out of its split to evaluate on (and to pick the best step)."""
    max_length: int = 128
    """Token limit per input, as data.max_length."""

    def validate(self) -> list[str]:
        problems = [f"sources.{key} must be >= {low}, got {value}" for key, value, low in
                    (("max_per_task", self.max_per_task, 0), ("num_eval_per_task", self.num_eval_per_task, 1),
                     ("max_length", self.max_length, 8)) if value < low]
        bad = [spec for spec in self.tasks if "/" not in spec]
        if bad:
            problems.append(f"sources.tasks {bad}: write each as layout/task[:split], e.g. glue/sst2")
        return problems


@dataclass(kw_only=True)
class PretrainConfig:
    run: RunConfig
    model: ModelConfig
    method: IPTConfig
    objective: ObjectiveConfig
    corpus: CorpusConfig
    sources: SourcesConfig
    train: TrainConfig
    optim: OptimConfig
    deepspeed: DeepSpeedConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def output_path(self) -> Path:
        generator = self.method.encoder or "table"
        return Path(self.run.output_dir or f"runs/pretrain-{self.objective.name}-{generator}-seed{self.run.seed}")


SECTIONS = {
    "run": RunConfig, "model": ModelConfig, "objective": ObjectiveConfig, "corpus": CorpusConfig,
    "sources": SourcesConfig, "train": TrainConfig, "optim": OptimConfig, "deepspeed": DeepSpeedConfig,
}


def check(sections: dict) -> list[tuple[str, str]]:
    """Problems across sections, as (dotted key, what to do)."""
    method, objective = sections["method"], sections["objective"]
    if method.name != "ipt":
        return [("method.name", f"pretraining trains IPT instance prompts; set method.name: ipt (got {method.name})")]
    problems = []
    if not method.instance:
        problems.append(("method.instance", "pretraining needs instance prompts: set method.instance: true"))
    if method.fix_emb and not method.encoder:
        problems.append(("method.fix_emb", "with the table frozen and no method.encoder nothing of the instance "
                                           "prompts would train; drop fix_emb or set an encoder"))
    if objective.name == "knowledge" and not sections["corpus"].train_file:
        problems.append(("corpus.train_file", "objective knowledge needs a labelled corpus file "
                                              "(`ipt-ds build-corpus` writes one)"))
    names = [spec.partition("/")[2].partition(":")[0].lower() for spec in sections["sources"].tasks]
    if objective.name == "transfer" and not names:
        problems.append(("sources.tasks", "objective transfer needs source tasks, e.g. [glue/sst2, superglue/rte]"))
    if len(set(names)) != len(names):
        problems.append(("sources.tasks", f"a task appears twice in {sections['sources'].tasks}; name each once"))
    if objective.table_init == "backbone" and method.method == "prefix-tuning" and not method.instance_pretrain:
        problems.append(("objective.table_init", "the backbone's embeddings only fit the prompt path; use "
                                                 "table_init: random with method.method: prefix-tuning"))
    return problems


def load_pretrain_config(path: str | Path | None = None, overrides: dict | None = None) -> PretrainConfig:
    """Build the pretraining config; raise one ConfigError listing every problem (with file:line or --flag)."""
    data, lines = load_yaml_with_lines(Path(path)) if path else ({}, {})
    sections = parse_sections(data, overrides, source=str(path or "defaults"), lines=lines, sections=SECTIONS,
                              default_method="ipt", check=check)
    return PretrainConfig(**sections)
