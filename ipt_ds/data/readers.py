"""Readers for the benchmark layouts (GLUE tsv, SuperGLUE / FewGLUE jsonl, LM-BFF k-shot tsv / csv) and user files.

`resolve_split` turns (task, format, root, split) into one file, `read_split` turns one file into `Example`s through
the task's record conversion in `tasks.py`, and `load_hub_split` does the same from the HF hub when no local copy
exists. Every problem in a file is a ValueError that names `path:line`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ipt_ds.data.tasks import Example, Task, examples_from_record, get_task

FORMATS = ("superglue", "glue", "fewglue", "lmbff", "jsonl", "csv", "tsv")

# Each dataset's directory name in the benchmark layouts (the same casing in all of them).
_DIR_NAMES = (
    "CoLA SST-2 MRPC QQP STS-B MNLI QNLI RTE WNLI BoolQ CB COPA MultiRC WiC WSC AX-b AX-g SNLI sst-5 mr cr mpqa"
)
_DIRS = {get_task(directory).name: directory for directory in f"{_DIR_NAMES} subj trec".split()}
_SUFFIXES = (".jsonl", ".tsv", ".csv")
_FIELD_KEYS = ("text_a", "text_b", "label")
_Rows = Iterator[tuple[int, Mapping[str, Any], Mapping[str, str] | None]]  # (line number, record, fields)


def resolve_split(*, task: Task, format: str, root: Path, split: str, lmbff_seed: int = 13, lmbff_k: int = 16) -> Path:
    """The file holding `split` of `task` under `root` in the layout `format` (one of FORMATS).

    superglue: root/superglue/<DIR>/<split>.jsonl (the AX-b / AX-g diagnostics are one file, <DIR>.jsonl);
    glue: root/glue/<DIR>/<split>.tsv; fewglue: "train" and other names -> root/fewglue/FewGLUE/<DIR>/<split>.jsonl,
    "dev32" -> root/fewglue/FewGLUE_32dev/<DIR>/dev32.jsonl, "val" / "test" -> the superglue files;
    lmbff: root/lmbff/k-shot/<DIR>/<k>-<seed>/<split>.tsv or .csv; jsonl / csv / tsv: root/<split>.<format>.
    "dev" and "val" name the same split in every layout, and MNLI's dev / test mean the matched sets.
    A `split` ending in .jsonl / .tsv / .csv is a file path and is returned as is.
    """
    if split.endswith(_SUFFIXES):
        path = Path(split).expanduser()
        if not path.is_file():
            raise ValueError(f"split {split!r} looks like a file path, but there is no such file")
        return path
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; valid formats: {', '.join(FORMATS)}")
    root, name = Path(root).expanduser(), _DIRS[task.name]
    if format == "fewglue" and split in ("val", "dev", "test"):
        return resolve_split(task=task, format="superglue", root=root, split=split)
    jsonl_split = "val" if split == "dev" else split
    tsv_split = "dev" if split == "val" else split
    if task.name == "mnli" and tsv_split in ("dev", "test"):
        tsv_split += "_matched"
    if format == "superglue":
        directory = root / "superglue" / name
        candidates = [directory / f"{jsonl_split}.jsonl", directory / f"{name}.jsonl"]
        candidates = candidates if task.name in ("axb", "axg") else candidates[:1]
    elif format == "glue":
        directory = root / "glue" / name
        candidates = [directory / f"{tsv_split}.tsv"]
    elif format == "fewglue":
        directory = root / "fewglue" / ("FewGLUE_32dev" if split == "dev32" else "FewGLUE") / name
        candidates = [directory / f"{split}.jsonl"]
    elif format == "lmbff":
        directory = root / "lmbff" / "k-shot" / name / f"{lmbff_k}-{lmbff_seed}"
        candidates = [directory / f"{tsv_split}.tsv", directory / f"{tsv_split}.csv"]
    else:
        directory = root
        candidates = [root / f"{split}.{format}"]
    for path in candidates:
        if path.is_file():
            return path
    raise _missing_split(candidates[0], directory)


def _missing_split(path: Path, directory: Path) -> ValueError:
    if directory.is_dir():
        splits = sorted(p.name for p in directory.iterdir() if p.name.endswith(_SUFFIXES))
        return ValueError(f"{path}: no such file; the splits in {directory} are: {', '.join(splits) or 'none'}")
    parent = directory.parent
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    found = f"; {parent} holds: {', '.join(siblings)}" if siblings else ""
    return ValueError(f"{path}: no such file; directory {directory} does not exist{found}. Check root, format and task")


def read_split(path: Path, task: Task, *, fields: dict[str, str] | None = None) -> list[Example]:
    """All Examples in one file, dispatched on its extension (.jsonl, .tsv, .csv) and on the task.

    `fields` maps "text_a" (required), "text_b" and "label" to the columns / keys of a user file; tsv and csv files
    then need a header row. Without it, csv files are in the LM-BFF layout: no header, `label,text_a[,text_b]`.
    A split is labelled throughout or not at all (test splits): mixing raises, as does an empty split.
    """
    path = Path(path)
    if fields is not None:
        _check_fields(fields)
    rows_of = {".jsonl": _jsonl_rows, ".tsv": _tsv_rows, ".csv": _csv_rows}.get(path.suffix.lower())
    if rows_of is None:
        raise ValueError(f"{path}: unknown file type {path.suffix!r}; expected one of {', '.join(_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err}); re-encode the file as UTF-8") from None
    examples: list[Example] = []
    labelled: bool | None = None
    guids: set[str] = set()
    for number, (lineno, record, row_fields) in enumerate(rows_of(path, text, task, fields)):
        where = f"{path}:{lineno}"
        idx = record.get("idx")
        guid = f"{path.stem}-{idx if isinstance(idx, (int, str)) and not isinstance(idx, bool) else number}"
        if guid in guids:  # a repeated idx (FewGLUE WiC unlabeled has one): the line keeps guids unique
            guid = f"{path.stem}-line{lineno}"
        guids.add(guid)
        for example in examples_from_record(task, record, guid=guid, where=where, fields=row_fields):
            if labelled is None:
                labelled = example.label is not None
            elif labelled != (example.label is not None):
                state = "has no label, but earlier records have one" if labelled else "has a label, but earlier do not"
                raise ValueError(f"{where}: this record {state}; label every record of a split or none (test sets)")
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples in this split (empty file or header only); check the file or split")
    return examples


def _check_fields(fields: Mapping[str, str]) -> None:
    unknown = sorted(set(fields) - set(_FIELD_KEYS))
    if unknown or "text_a" not in fields:
        problem = f"unknown key(s) {', '.join(map(repr, unknown))}" if unknown else "no 'text_a' key"
        raise ValueError(f"fields: {problem}; valid keys: text_a (required), text_b, label")
    bad = [key for key, column in fields.items() if not isinstance(column, str) or not column]
    if bad:
        raise ValueError(f"fields: the column name for {', '.join(bad)} must be a non-empty string")


def _jsonl_rows(path: Path, text: str, task: Task, fields: Mapping[str, str] | None) -> _Rows:
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested junk
            raise ValueError(
                f"{path}:{lineno}: malformed JSON line ({err}); each line must be one JSON object"
            ) from None
        if isinstance(record, dict):
            yield lineno, record, fields
        else:
            # ValueError, not TypeError: a JSON array on a line is bad data like any other malformed line.
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")  # noqa: TRY004


def _tsv_rows(path: Path, text: str, task: Task, fields: Mapping[str, str] | None) -> _Rows:
    # GLUE tsv files are plain tab-split lines: quotes are text, not quoting (as csv.reader(quotechar=None) in GLUE).
    rows = [(lineno, line.rstrip("\r").split("\t")) for lineno, line in enumerate(text.split("\n"), start=1)]
    rows = [(lineno, cells) for lineno, cells in rows if cells != [""]]
    if not rows:
        return
    if fields is None and task.name == "cola" and "sentence" not in rows[0][1]:
        # Official GLUE CoLA train / dev have no header: source, label, original annotation, sentence.
        header, body = ["source", "label", "annotation", "sentence"], rows
    else:
        header, body = [cell.strip() for cell in rows[0][1]], rows[1:]
    for lineno, cells in body:
        yield lineno, dict(zip(header, cells, strict=False)), fields


def _csv_rows(path: Path, text: str, task: Task, fields: Mapping[str, str] | None) -> _Rows:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    next_lineno = 1
    try:
        for cells in reader:
            lineno, next_lineno = next_lineno, reader.line_num + 1  # a quoted field may span lines
            if not cells:
                continue
            if fields is None:  # LM-BFF: label first, then the text(s); no header
                layout = {"text_a": "text_a", "label": "label"} | ({"text_b": "text_b"} if len(cells) > 2 else {})
                yield lineno, dict(zip(("label", "text_a", "text_b"), cells, strict=False)), layout
            elif header is None:
                header = [cell.strip() for cell in cells]
            else:
                yield lineno, dict(zip(header, cells, strict=False)), fields
    except csv.Error as err:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None


def default_data_root() -> Path | None:
    """$IPT_DS_DATA if set, else `<repo>/../shared/data` if it exists, else None (then use `load_hub_split`)."""
    if os.environ.get("IPT_DS_DATA"):
        return Path(os.environ["IPT_DS_DATA"]).expanduser()
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"  # readers.py -> data -> ipt_ds -> repo -> ..
    return shared if shared.is_dir() else None


# Hub datasets (parquet, no loading script) whose field names and ClassLabel orders `tasks.py` already follows.
_HUB = {
    **{name: ("nyu-mll/glue", name) for name in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "wnli")},
    **{name: ("aps/super_glue", name) for name in ("rte", "boolq", "cb", "copa", "multirc", "wic", "axb", "axg")},
    "wsc": ("aps/super_glue", "wsc.fixed"),
}


def load_hub_split(task: Task, split: str) -> list[Example]:
    """`split` ("train", "val"/"dev", "test") of a GLUE / SuperGLUE task from the HF hub, as the same Examples."""
    if task.name not in _HUB:
        raise ValueError(f"task {task.name} has no hub source here (only {', '.join(sorted(_HUB))}); use local files")
    import datasets  # only the online path needs it
    from huggingface_hub import constants

    from ipt_ds.backbone import hub_reachable

    if not constants.HF_HUB_OFFLINE and not hub_reachable():  # datasets would retry for half a minute first
        raise ValueError(f"task {task.name} split '{split}': there is no local data root and the HF hub cannot be "
                         "reached; set $IPT_DS_DATA or data.root to the folder of the task files (or HF_HUB_OFFLINE=1 "
                         "to read splits cached earlier)")
    repo, config = _HUB[task.name]
    hub_split = "validation" if split in ("val", "dev") else split
    if task.name == "mnli" and hub_split in ("validation", "test"):
        hub_split += "_matched"
    examples = []
    for number, row in enumerate(datasets.load_dataset(repo, config, split=hub_split)):
        if row.get("label") == -1:  # the hub marks unlabelled test rows with -1
            row = {**row, "label": None}
        idx = row.get("idx", number)
        idx = "-".join(map(str, idx.values())) if isinstance(idx, dict) else idx  # MultiRC: paragraph-question-answer
        where = f"{repo}/{config}[{hub_split}] row {number}"
        examples.extend(examples_from_record(task, row, guid=f"{split}-{idx}", where=where))
    if not examples:
        raise ValueError(f"{repo}/{config}[{hub_split}]: no examples in this split")
    return examples
