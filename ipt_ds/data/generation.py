"""Text generation data: source -> reference texts, read from E2E NLG or from any jsonl/csv/tsv, and its encoding.

A generation example is one source with every reference written for it: rows that repeat a source (E2E writes one
row per reference) are grouped, in file order. Training uses each (source, reference) pair once; evaluation
generates once per source and scores against all of its references.

Encoding (decoders): `template` before `{mask}` with `{a}` = the source, then the reference and the end-of-sequence
token. The loss covers the reference tokens only (`source_mask` marks the rest); prompt generators read only the
source, so that what they see in training is what they see when decoding.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ipt_ds.data.encode import PLACEHOLDER, collate

E2E_FILES = {"train": "devset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
E2E_HOLDOUT = 10
"""E2E's training file is not distributed with the data here: `train` is devset.csv without every 10th meaning
representation (in file order), `dev` is those held-out ones, `test` is testset_w_refs.csv."""


@dataclass(frozen=True, kw_only=True)
class GenExample:
    guid: str
    source: str
    references: tuple[str, ...]
    """Every reference text of this source; empty for unlabelled inputs."""


def read_generation_file(path: Path, *, source_key: str, target_key: str | None) -> list[GenExample]:
    """Group the rows of a jsonl / csv / tsv file by source (first appearance order)."""
    grouped: dict[str, list[str]] = {}
    for where, record in _records(path):
        if not isinstance(record, dict) or not isinstance(record.get(source_key), str):
            raise ValueError(f"{where}: missing text field '{source_key}' (the source); set data.fields "
                             "{source: <column>, target: <column>} for this file")
        references = grouped.setdefault(record[source_key], [])
        if target_key is not None and record.get(target_key) is not None:
            if not isinstance(record[target_key], str):
                raise ValueError(f"{where}: field '{target_key}' (the target) should be text")
            references.append(record[target_key])
    return [GenExample(guid=f"{path.stem}-{i}", source=source, references=tuple(refs))
            for i, (source, refs) in enumerate(grouped.items())]


def _records(path: Path):
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ",")
        for number, row in enumerate(reader, 2):
            yield f"{path}:{number}", row


def load_generation_split(cfg, split: str) -> list[GenExample]:
    """One split of a generation task: the E2E layout under the data root, or a file path (format jsonl/csv/tsv)."""
    from ipt_ds.data.readers import default_data_root

    if cfg.format == "e2e":
        if split not in E2E_FILES:
            raise ValueError(f"data: E2E splits are {', '.join(E2E_FILES)} (train/dev: devset.csv, every "
                             f"{E2E_HOLDOUT}th meaning representation held out for dev); got '{split}'")
        root = Path(cfg.root) if cfg.root else default_data_root()
        path = (root or Path(".")) / "e2e" / E2E_FILES[split]
        if not path.is_file():
            raise ValueError(f"data: E2E file '{path}' does not exist; set data.root to the directory holding e2e/")
        examples = read_generation_file(path, source_key="mr", target_key="ref")
        if split != "test":
            keep = (lambda i: i % E2E_HOLDOUT == E2E_HOLDOUT - 1) if split == "dev" else (
                lambda i: i % E2E_HOLDOUT != E2E_HOLDOUT - 1)
            examples = [e for i, e in enumerate(examples) if keep(i)]
        return examples
    if cfg.format not in ("jsonl", "csv", "tsv"):
        raise ValueError(f"data.format '{cfg.format}' cannot hold a generation task; use e2e, jsonl, csv or tsv")
    path = Path(split)
    if not path.is_file():
        raise ValueError(f"data: split file '{path}' does not exist")
    fields = cfg.fields or {"source": "source", "target": "target"}
    if "source" not in fields:
        raise ValueError(f"data.fields {dict(fields)} needs a 'source' entry for a generation task")
    return read_generation_file(path, source_key=fields["source"], target_key=fields.get("target"))


@dataclass
class GenerationEncoder:
    tokenizer: object
    template: str
    """Text around the source with `{a}` and a final `{mask}` where the target goes."""
    max_length: int
    """Token limit of the source part (template included); sources are cut to fit."""
    max_target_length: int
    num_truncated: int = 0

    def __post_init__(self):
        pieces = PLACEHOLDER.split(self.template)
        if "{a}" not in pieces or not self.template.rstrip().endswith("{mask}"):
            raise ValueError(f"head.template '{self.template}' must contain {{a}} and end with {{mask}} for a "
                             "generation task (the target is the continuation)")
        self.before, self.after = self.template.rstrip().removesuffix("{mask}").split("{a}", 1)
        self.eos = self.tokenizer.eos_token_id
        full = self.tokenizer("x")["input_ids"]
        (content,) = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        self.special = full[: full.index(content)]  # what the tokenizer puts first (a BOS token, or nothing)

    def source_ids(self, source: str) -> list[int]:
        tok, bos = self.tokenizer, self.special
        before = tok(self.before, add_special_tokens=False)["input_ids"] if self.before.strip() else []
        after = tok(self.after.rstrip(), add_special_tokens=False)["input_ids"] if self.after.strip() else []
        text = tok((" " if self.before.strip() else "") + source, add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(bos) - len(before) - len(after)
        if len(text) > budget:
            self.num_truncated += 1
            text = text[: max(budget, 0)]
        return bos + before + text + after

    def __call__(self, example: GenExample) -> dict:
        """The source alone (what decoding starts from)."""
        ids = self.source_ids(example.source)
        return {"input_ids": ids, "source_mask": [1] * len(ids), "label_position": len(ids) - 1}

    def training_features(self, example: GenExample) -> list[dict]:
        """One (source, reference) sequence per reference."""
        source = self.source_ids(example.source)
        features = []
        for reference in example.references:
            target = self.tokenizer(" " + reference.strip(), add_special_tokens=False)["input_ids"]
            target = target[: self.max_target_length - 1] + [self.eos]
            features.append({"input_ids": source + target, "source_mask": [1] * len(source) + [0] * len(target),
                             "label_position": len(source) - 1})
        return features

    def collate_sources(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Sources for decoding: left-padded, so that every row continues at the same column."""
        return collate_left(features, self.tokenizer.pad_token_id)


@dataclass
class Seq2SeqEncoder(GenerationEncoder):
    """Encoder-decoder backbones (T5, BART): the encoder reads the template with the source (everything before
    `{mask}`, with the tokenizer's special tokens), the decoder produces the reference: `target_ids` is the
    tokenized reference (ending with end-of-sequence), `decoder_input_ids` the decoder start token and the target
    shifted right."""

    decoder_start: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_start is None:
            raise ValueError("this encoder-decoder model's config has no decoder_start_token_id")
        full = self.tokenizer("x")["input_ids"]
        self.suffix = full[len(self.special) + 1 :]  # what the tokenizer puts last (end-of-sequence)

    def source_ids(self, source: str) -> list[int]:
        text = self.tokenizer(self.before + source + self.after.rstrip(), add_special_tokens=False)["input_ids"]
        budget = self.max_length - len(self.special) - len(self.suffix)
        if len(text) > budget:
            self.num_truncated += 1
            text = text[: max(budget, 0)]
        return self.special + text + self.suffix

    def __call__(self, example: GenExample) -> dict:
        ids = self.source_ids(example.source)
        return {"input_ids": ids, "decoder_input_ids": [self.decoder_start], "target_ids": [self.eos]}

    def training_features(self, example: GenExample) -> list[dict]:
        source, features = self.source_ids(example.source), []
        for reference in example.references:
            # with the tokenizer's special tokens, as the model was pretrained (BART: <s> text </s>; T5: text </s>)
            target = self.tokenizer(reference.strip())["input_ids"]
            target = target[: len(target) - len(self.suffix)][: self.max_target_length - 1] + [self.eos]
            features.append({"input_ids": source, "decoder_input_ids": [self.decoder_start] + target[:-1],
                             "target_ids": target})
        return features

    def collate_sources(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Sources for decoding: right-padded (the encoder reads them whole), with the decoder start column."""
        return collate(features, self.tokenizer.pad_token_id)


def collate_left(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad sources for decoding (every row then continues at the same column)."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(features), length, dtype=torch.long)}
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][row, length - n :] = torch.tensor(f["input_ids"])
        batch["attention_mask"][row, length - n :] = 1
    batch["source_mask"] = batch["attention_mask"].clone()
    batch["label_position"] = torch.full((len(features),), length - 1)
    return batch
