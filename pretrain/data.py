"""Pretraining data: a labelled corpus for the knowledge objective, a mixture of source tasks for the transfer one.

Both are read with `ipt_ds`'s readers, so file errors name `path:line` as in training, and both draw with a seed so
that every rank (and a resumed run) gets the same examples.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ipt_ds.config import DataConfig
from ipt_ds.data.pipeline import load_examples
from ipt_ds.data.readers import FORMATS, read_split
from ipt_ds.data.tasks import Example, Task, get_task


def parse_source(spec: str) -> tuple[str, Task, str]:
    """'layout/task[:split]' -> (layout, task, split); split defaults to train."""
    layout, _, rest = spec.partition("/")
    name, _, split = rest.partition(":")
    if layout not in FORMATS or not name:
        raise ValueError(f"source '{spec}': write layout/task[:split] with a layout of {', '.join(FORMATS)}, "
                         "e.g. glue/sst2 or superglue/boolq:val")
    return layout, get_task(name), split or "train"


def read_source(spec: str, root: str) -> tuple[Task, list[Example]]:
    layout, task, split = parse_source(spec)
    return task, load_examples(DataConfig(task=task.name, format=layout, root=root), task, split)


def corpus_labels(path: Path, field: str) -> tuple[str, ...]:
    """The category names of a corpus file, sorted; integer categories must be 0..C-1 and keep their numbers."""
    if not path.is_file():
        raise ValueError(f"corpus.train_file '{path}' does not exist; `ipt-ds build-corpus` writes one")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except ValueError:
                raise ValueError(f"{path}:{lineno}: malformed JSON line; each line must be one JSON object") from None
    elif path.suffix.lower() in (".csv", ".tsv"):
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        rows = [(number + 2, row) for number, row in enumerate(csv.DictReader(io.StringIO(text), delimiter=delimiter))]
    else:
        raise ValueError(f"{path}: a corpus is a .jsonl, .csv or .tsv file")
    values = set()
    for lineno, row in rows:
        if not isinstance(row, dict) or row.get(field) is None:
            raise ValueError(f"{path}:{lineno}: no '{field}' field (corpus.label_field names the category)")
        values.add(row[field])
    if all(isinstance(v, int) and not isinstance(v, bool) or str(v).isdigit() for v in values):
        numbers = sorted(int(v) for v in values)
        if numbers != list(range(len(numbers))):
            raise ValueError(f"{path}: integer categories must be 0..C-1, got {numbers[:20]}; or write names")
        return tuple(str(n) for n in numbers)
    return tuple(sorted(str(v) for v in values))


def read_corpus(train_file: str, eval_file: str, *, text_field: str, label_field: str, num_eval: int,
                seed: int) -> tuple[Task, list[Example], list[Example]]:
    """(task whose labels are the corpus categories, training examples, evaluation examples)."""
    names = corpus_labels(Path(train_file), label_field)
    if len(names) < 2:
        raise ValueError(f"corpus.train_file '{train_file}' has {len(names)} category; classification needs two")
    task = Task(name="corpus", label_names=names, label_words=(), template="", metrics=("acc", "macro_f1"))
    fields = {"text_a": text_field, "label": label_field}
    train = read_split(Path(train_file), task, fields=fields)
    if eval_file:
        return task, train, read_split(Path(eval_file), task, fields=fields)
    if num_eval >= len(train):
        raise ValueError(f"corpus.num_eval {num_eval} leaves nothing of the {len(train)} records to train on")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:num_eval])
    return task, [e for i, e in enumerate(train) if i not in held_out], [train[i] for i in sorted(held_out)]


@dataclass
class Source:
    """One task of the transfer mixture."""

    task: Task
    train: list[Example]
    eval: list[Example]


def load_sources(specs: list[str], *, root: str, max_per_task: int, num_eval_per_task: int, seed: int) -> list[Source]:
    """Each task's split, shuffled with the seed: the first num_eval_per_task examples to evaluate on, up to
    max_per_task of the rest to train on."""
    sources = []
    for spec in specs:
        task, examples = read_source(spec, root)
        if task.is_regression or any(e.label is None for e in examples):
            raise ValueError(f"sources.tasks: '{spec}' must be a labelled classification split")
        if num_eval_per_task >= len(examples):
            raise ValueError(f"sources.num_eval_per_task {num_eval_per_task} leaves nothing of the {len(examples)} "
                             f"examples of '{spec}' to train on")
        order = list(range(len(examples)))
        random.Random(f"{seed}-{task.name}").shuffle(order)
        train = order[num_eval_per_task:][: max_per_task or None]
        sources.append(Source(task=task, train=[examples[i] for i in sorted(train)],
                              eval=[examples[i] for i in sorted(order[:num_eval_per_task])]))
    return sources
