"""The task registry: every supported benchmark task with its labels, default verbalizer, template and metrics.

Every task is cast as single-sentence or sentence-pair classification (regression for STS-B), so one head and one
prompt format serve them all. The tasks whose native form differs (COPA, WSC, WiC, MultiRC) are rewritten into a
pair once, in `examples_from_record` below, and nothing else in the package special-cases them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class Example:
    """One classification (or regression) input, already cast to a text pair."""

    guid: str
    """Unique in its split: `<file stem>-<idx>`, the file's own idx or else the record number (MultiRC adds q/a ids)."""
    text_a: str
    """First text: the premise, sentence, passage, question1, ..."""
    text_b: str | None
    """Second text (hypothesis, question, ...); None for single-sentence tasks."""
    label: int | float | None
    """Index into `Task.label_names`; a float for regression; None when the split is unlabelled (test sets)."""
    group: str | None = None
    """Grouping key for grouped metrics (MultiRC: `<passage idx>-<question idx>`); None elsewhere."""


@dataclass(frozen=True, kw_only=True)
class Task:
    """What a task is: its labels, default verbalizer and template, and how it is scored."""

    name: str
    """Canonical lower-case name, e.g. "rte", "sst2", "multirc"."""
    label_names: tuple[str, ...]
    """Label names in index order. Files write these names, or their 0-based indices (SST-2 tsv, LM-BFF csv, COPA,
    MultiRC, the hub), or booleans for False/True tasks. Empty for regression."""
    label_words: tuple[str, ...]
    """Default verbalizer: one word per label, as in LM-BFF / PET. Empty for regression."""
    template: str
    """Default MLM / LM-continuation template with the slots {a}, {b} and {mask}."""
    metrics: tuple[str, ...]
    """Metric names for `compute_metrics`; the first one selects the best checkpoint."""
    generation: bool = False
    """A text generation task (source -> references; see data/generation.py), scored on generated text."""

    @property
    def is_regression(self) -> bool:
        """True for tasks scored on a float (STS-B)."""
        return not self.label_names and not self.generation


_NLI3 = ("entailment", "neutral", "contradiction")  # the hub's order for MNLI / SNLI, so hub indices map as is
_RTE = ("entailment", "not_entailment")
_BOOL = ("False", "True")
_PAIR = "{a} ? {mask} , {b}"  # LM-BFF's NLI template
_SENTIMENT = "{a} It was {mask} ."
_ANSWER = "{a} {b} {mask} ."  # text_b already ends in a yes/no question (WSC, WiC, MultiRC)


def _task(name: str, labels: tuple[str, ...], words: tuple[str, ...], template: str, *metrics: str) -> Task:
    return Task(name=name, label_names=labels, label_words=words, template=template, metrics=metrics or ("acc",))


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        # GLUE. Label orders follow the hub's ClassLabel so that hub indices and tsv 0/1 both map unchanged.
        _task("cola", ("unacceptable", "acceptable"), ("incorrect", "correct"), "{a} This is {mask} .", "mcc", "acc"),
        _task("sst2", ("negative", "positive"), ("terrible", "great"), _SENTIMENT),
        _task("mrpc", ("not_equivalent", "equivalent"), ("No", "Yes"), "{a} {mask} , {b}", "f1", "acc"),
        _task("qqp", ("not_duplicate", "duplicate"), ("No", "Yes"), "{a} {mask} , {b}", "f1", "acc"),
        _task("stsb", (), (), "{a} {mask} , {b}", "pearson", "spearman"),
        _task("mnli", _NLI3, ("Yes", "Maybe", "No"), _PAIR),
        _task("qnli", _RTE, ("Yes", "No"), _PAIR),
        _task("rte", _RTE, ("Yes", "No"), _PAIR),  # shared by GLUE and SuperGLUE: same data, same labels
        _task("wnli", ("not_entailment", "entailment"), ("No", "Yes"), _PAIR),
        # SuperGLUE.
        _task("boolq", _BOOL, ("No", "Yes"), "{a} Question: {b} ? Answer: {mask} ."),
        _task("cb", ("entailment", "contradiction", "neutral"), ("Yes", "No", "Maybe"), _PAIR, "acc", "macro_f1"),
        # COPA: text_a = "<premise> What was the cause?", text_b = "1) <choice1> 2) <choice2>"; the mask picks 1 or 2.
        _task("copa", ("choice1", "choice2"), ("1", "2"), "{a} {b} Answer: {mask} ."),
        _task("multirc", _BOOL, ("No", "Yes"), "{a} Question: {b} Is that answer right? {mask} .", "f1a", "em"),
        _task("wic", _BOOL, ("No", "Yes"), _ANSWER),
        _task("wsc", _BOOL, ("No", "Yes"), _ANSWER),
        # The diagnostics are scored on RTE-style labels; AX-b's official metric is the Matthews correlation.
        _task("axb", _RTE, ("Yes", "No"), _PAIR, "mcc", "acc"),
        _task("axg", _RTE, ("Yes", "No"), _PAIR),
        # LM-BFF extras, with LM-BFF's label words and templates; their csv files write label indices.
        _task("snli", _NLI3, ("Yes", "Maybe", "No"), _PAIR),
        _task(
            "sst5",
            ("very_negative", "negative", "neutral", "positive", "very_positive"),
            ("terrible", "bad", "okay", "good", "great"),
            _SENTIMENT,
        ),
        _task("mr", ("negative", "positive"), ("terrible", "great"), _SENTIMENT),
        _task("cr", ("negative", "positive"), ("terrible", "great"), _SENTIMENT),
        _task("mpqa", ("negative", "positive"), ("terrible", "great"), _SENTIMENT),
        _task("subj", ("subjective", "objective"), ("subjective", "objective"), "{a} This is {mask} ."),
        # TREC coarse classes in LM-BFF's index order (index 2, "Expression", is the ABBR class).
        _task(
            "trec",
            ("description", "entity", "abbreviation", "human", "location", "number"),
            ("Description", "Entity", "Expression", "Human", "Location", "Number"),
            "{mask} : {a}",
        ),
    )
}
# Generation: E2E NLG (table-to-text, the prefix-tuning benchmark) and any source -> target file (data.fields).
for _name in ("e2e", "generation"):
    TASKS[_name] = Task(name=_name, label_names=(), label_words=(), metrics=("bleu", "rouge_l"), generation=True,
                        template="Table: {a}\nText: {mask}" if _name == "e2e" else "{a} {mask}")


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str) -> Task:
    """The registered task called `name`, ignoring case, dashes and underscores ("SST-2" -> sst2, "AX-b" -> axb)."""
    task = TASKS.get(_normalize(name))
    if task is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return task


def parse_label(task: Task, raw: object, *, where: str) -> int | float | None:
    """Map a label as written in a file (name, index, bool or number) to an `Example.label`; None stays None."""
    if raw is None:
        return None
    if task.is_regression:
        if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
            try:
                return float(raw)
            except (ValueError, OverflowError):  # OverflowError: an int beyond float range
                pass
        raise ValueError(f"{where}: label {raw!r:.60} is not a number; task {task.name} is a regression (float scores)")
    names = task.label_names
    if isinstance(raw, bool):
        raw_text = str(raw)  # JSON true/false -> "True"/"False", the names of the boolean tasks
    elif isinstance(raw, int):
        if 0 <= raw < len(names):
            return raw
        raw_text = str(raw)
    elif isinstance(raw, str):
        raw_text = raw.strip()
    else:
        raw_text = None
    if raw_text is not None:
        if raw_text in names:
            return names.index(raw_text)
        # Files that write class indices: SST-2 / CoLA / MRPC tsv, LM-BFF csv, COPA and MultiRC jsonl.
        if raw_text.isascii() and raw_text.isdigit() and int(raw_text) < len(names):
            return int(raw_text)
        lowered = [name.lower() for name in names]
        if raw_text.lower() in lowered:
            return lowered.index(raw_text.lower())
    raise ValueError(
        f"{where}: unknown label {raw!r:.60} for task {task.name}; valid labels: {', '.join(names)} "
        f"(or their indices 0-{len(names) - 1})"
    )


# Candidate keys for (text_a, text_b, label), the first one present wins: SuperGLUE jsonl, GLUE tsv headers and the
# hub name the same field differently (premise / sentence1, gold_label / label, Quality / label).
_Columns = tuple[tuple[str, ...], tuple[str, ...] | None, tuple[str, ...]]
_SENTENCE: _Columns = (("sentence",), None, ("label",))
_NLI: _Columns = (("premise", "sentence1"), ("hypothesis", "sentence2"), ("label", "gold_label"))
_COLUMNS: dict[str, _Columns] = {
    **dict.fromkeys(("cola", "sst2", "sst5", "mr", "cr", "mpqa", "subj", "trec"), _SENTENCE),
    **dict.fromkeys(("mnli", "snli", "rte", "wnli", "cb", "axb", "axg"), _NLI),
    "mrpc": (("sentence1", "#1 String"), ("sentence2", "#2 String"), ("label", "Quality")),
    "qqp": (("question1",), ("question2",), ("label", "is_duplicate")),
    "stsb": (("sentence1",), ("sentence2",), ("label", "score")),
    "qnli": (("question",), ("sentence",), ("label",)),
    "boolq": (("passage",), ("question",), ("label",)),
}


@dataclass(frozen=True)
class _Context:
    """Where a record came from and what it should hold, for error messages."""

    task: Task
    where: str
    expected: str

    def get(self, obj: object, key: str, kind: type, path: str = "") -> Any:
        if not isinstance(obj, Mapping) or obj.get(key) is None:
            raise ValueError(
                f"{self.where}: missing field {path + key!r} for task {self.task.name}; "
                f"expected fields: {self.expected}"
            )
        value = obj[key]
        if isinstance(value, kind):
            return value
        raise ValueError(
            f"{self.where}: field {path + key!r} for task {self.task.name} should be a {kind.__name__}, "
            f"got {type(value).__name__} {value!r:.60}"
        )

    def label(self, obj: Mapping) -> int | float | None:
        return parse_label(self.task, obj.get("label"), where=self.where)


def _pair(record: Mapping, columns: _Columns, guid: str, ctx: _Context) -> list[Example]:
    def first(keys: tuple[str, ...]) -> str:
        present = next((key for key in keys if record.get(key) is not None), keys[0])
        return ctx.get(record, present, str)

    keys_a, keys_b, label_keys = columns
    raw_label = next((record[key] for key in label_keys if record.get(key) is not None), None)
    text_b = None if keys_b is None else first(keys_b)
    label = parse_label(ctx.task, raw_label, where=ctx.where)
    return [Example(guid=guid, text_a=first(keys_a), text_b=text_b, label=label)]


def _copa(record: Mapping, guid: str, ctx: _Context) -> list[Example]:
    premise, question = ctx.get(record, "premise", str), ctx.get(record, "question", str)
    choice1, choice2 = ctx.get(record, "choice1", str), ctx.get(record, "choice2", str)
    text_a = f"{premise} What was the {question}?"
    return [Example(guid=guid, text_a=text_a, text_b=f"1) {choice1} 2) {choice2}", label=ctx.label(record))]


def _wsc(record: Mapping, guid: str, ctx: _Context) -> list[Example]:
    # The jsonl nests the spans under "target"; the hub's rows hold them at the top level.
    nested = "target" in record
    spans, path = (ctx.get(record, "target", Mapping), "target.") if nested else (record, "")
    noun, pronoun = ctx.get(spans, "span1_text", str, path), ctx.get(spans, "span2_text", str, path)
    text_b = f'Does the pronoun "{pronoun}" refer to "{noun}"?'
    return [Example(guid=guid, text_a=ctx.get(record, "text", str), text_b=text_b, label=ctx.label(record))]


def _wic(record: Mapping, guid: str, ctx: _Context) -> list[Example]:
    word, sentence2 = ctx.get(record, "word", str), ctx.get(record, "sentence2", str)
    text_b = f'{sentence2} Does "{word}" mean the same in both?'
    return [Example(guid=guid, text_a=ctx.get(record, "sentence1", str), text_b=text_b, label=ctx.label(record))]


def _multirc(record: Mapping, guid: str, ctx: _Context) -> list[Example]:
    """One Example per answer option, grouped by question for the exact-match metric."""
    if "paragraph" in record:  # a flat hub row: one answer with its paragraph and question
        ids, paragraph = ctx.get(record, "idx", Mapping), ctx.get(record, "paragraph", str)
        question, answer = ctx.get(record, "question", str), ctx.get(record, "answer", str)
        group = f"{ids.get('paragraph')}-{ids.get('question')}"
        return [
            Example(guid=guid, text_a=paragraph, text_b=f"{question} {answer}", label=ctx.label(record), group=group)
        ]
    passage = ctx.get(record, "passage", Mapping)
    text = ctx.get(passage, "text", str, "passage.")
    examples = []
    for q_num, question in enumerate(ctx.get(passage, "questions", list, "passage.")):
        q_path = f"passage.questions[{q_num}]."
        question_text = ctx.get(question, "question", str, q_path)
        q_idx = question.get("idx", q_num)
        group = f"{record.get('idx', guid)}-{q_idx}"
        for a_num, answer in enumerate(ctx.get(question, "answers", list, q_path)):
            text_b = f"{question_text} {ctx.get(answer, 'text', str, f'{q_path}answers[{a_num}].')}"
            answer_guid = f"{guid}-{q_idx}-{answer.get('idx', a_num)}"
            examples.append(Example(guid=answer_guid, text_a=text, text_b=text_b, label=ctx.label(answer), group=group))
    return examples


_SPECIAL: dict[str, tuple[Callable[[Mapping, str, _Context], list[Example]], str]] = {
    "copa": (_copa, "premise, choice1, choice2, question (cause/effect), label"),
    "wsc": (_wsc, "text, target.span1_text, target.span2_text, label"),
    "wic": (_wic, "word, sentence1, sentence2, label"),
    "multirc": (_multirc, "passage.text, passage.questions[].question, passage.questions[].answers[].text/.label"),
}


def _describe(columns: _Columns) -> str:
    keys_a, keys_b, label_keys = columns
    groups = [keys_a, *([keys_b] if keys_b else []), *([label_keys] if label_keys else [])]
    return ", ".join(keys[0] + "".join(f" (or {key})" for key in keys[1:]) for keys in groups)


def examples_from_record(
    task: Task, record: Mapping[str, Any], *, guid: str, where: str, fields: Mapping[str, str] | None = None
) -> list[Example]:
    """The Examples in one raw record (a JSON object, a tsv/csv row keyed by its header, or a hub row).

    `fields` maps "text_a" / "text_b" / "label" to the record's own keys, for user files; a missing "label" key there
    or in the record means the record is unlabelled. `where` ("path:line") and `guid` go into errors and Examples.
    """
    if fields is not None:
        columns: _Columns = (
            (fields["text_a"],),
            (fields["text_b"],) if "text_b" in fields else None,
            (fields["label"],) if "label" in fields else (),
        )
        return _pair(record, columns, guid, _Context(task, where, _describe(columns)))
    if task.name in _SPECIAL:
        convert, expected = _SPECIAL[task.name]
        return convert(record, guid, _Context(task, where, expected))
    columns = _COLUMNS[task.name]
    return _pair(record, columns, guid, _Context(task, where, _describe(columns)))
