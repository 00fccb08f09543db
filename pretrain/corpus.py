"""`ipt-ds build-corpus`: a labelled jsonl corpus for the knowledge objective, from benchmark datasets.

Every source dataset is one category (its task name), as the IPT reference's knowledge corpus labels texts by where
they come from. A record's text is the example's text (its two texts joined for pairs); repeated texts are dropped,
each category keeps at most `per_category` texts drawn with `seed`, and the records are shuffled with the same seed.
The output must be a new file: the builder never overwrites one.

    ipt-ds build-corpus --sources=glue/sst2,superglue/rte,superglue/boolq:val --output=runs/corpus/k.jsonl \\
        [--per_category=1000] [--seed=13] [--root=DATA_DIR]
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ipt_ds.checkpoint import atomic_write_text
from pretrain.data import read_source

log = logging.getLogger("pretrain")


@dataclass(kw_only=True)
class CorpusSpec:
    sources: list[str]
    """Datasets as layout/task[:split] (layouts as data.format, split default train); each is a category."""
    output: str
    """The jsonl file to write (records: text, label, idx); it must not exist yet."""
    per_category: int = 1000
    """Texts kept per category at most (drawn with seed); 0: all of them."""
    seed: int = 13
    """Seed of the draw and of the record order."""
    root: str = ""
    """Data root, as data.root (empty: $IPT_DS_DATA, else ../shared/data next to the repository)."""

    def validate(self) -> list[str]:
        return [] if self.per_category >= 0 else [f"per_category must be >= 0, got {self.per_category}"]


def build_corpus(spec: CorpusSpec) -> dict[str, int]:
    """Write the corpus; returns the number of texts per category."""
    out = Path(spec.output)
    if out.exists():
        raise ValueError(f"--output '{out}' exists; build-corpus never overwrites a file, choose a new path")
    texts: dict[str, list[str]] = {}
    for source in spec.sources:
        task, examples = read_source(source, spec.root)
        texts.setdefault(task.name, []).extend(e.text_a if e.text_b is None else f"{e.text_a} {e.text_b}"
                                               for e in examples)
    rng = random.Random(spec.seed)
    records = []
    for category in sorted(texts):
        unique = list(dict.fromkeys(texts[category]))
        chosen = rng.sample(unique, min(spec.per_category, len(unique))) if spec.per_category else unique
        records.extend({"text": text, "label": category} for text in chosen)
    rng.shuffle(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps({**r, "idx": i}) + "\n" for i, r in enumerate(records)))
    counts = {category: sum(r["label"] == category for r in records) for category in sorted(texts)}
    log.info("wrote %d texts in %d categories to %s: %s", len(records), len(counts), out,
             ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts
