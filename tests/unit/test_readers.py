"""Task registry, readers and sampling: invented fixtures for every layout and error, then the real benchmark files.

The fixtures under tests/fixtures/data mirror the shared data layout with a few invented lines each. The real-data
tests read every GLUE / SuperGLUE / FewGLUE / LM-BFF file listed in the data root's SOURCES.tsv and check its record
count (test_real_data.py fails loudly when no data root is found).
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipt_ds.data import (
    FORMATS,
    TASKS,
    Example,
    bucket_batches,
    default_data_root,
    get_task,
    load_hub_split,
    read_split,
    resolve_split,
    sample_per_class,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "data"


def load(task: str, format: str, split: str, **kwargs) -> list[Example]:
    return read_split(
        resolve_split(task=get_task(task), format=format, root=FIXTURES, split=split, **kwargs), get_task(task)
    )


def test_registry_is_consistent():
    for name, task in TASKS.items():
        assert task.name == name and get_task(name.upper()) is task
        assert len(task.label_words) == len(task.label_names) and task.metrics
        assert "{a}" in task.template and "{mask}" in task.template
        assert task.is_regression == (name == "stsb")
    assert get_task("SST-2").name == "sst2" and get_task("AX-b").name == "axb" and get_task("sst_5").name == "sst5"
    assert TASKS["cola"].metrics[0] == "mcc" and TASKS["multirc"].metrics == ("f1a", "em")
    with pytest.raises(ValueError, match="unknown task 'nope'; known tasks: .*rte"):
        get_task("nope")


def test_superglue_pairs_and_unlabelled_test():
    train = load("rte", "superglue", "train")  # has a blank line, which is skipped
    assert [e.label for e in train] == [0, 1, 0, 1]
    assert train[0] == Example(
        guid="train-0",
        text_a="The orange kettle whistled twice before the baker noticed it.",
        text_b="A kettle made a sound.",
        label=0,
    )
    assert [e.label for e in load("rte", "superglue", "dev")] == [0, 1]  # "dev" means "val" in jsonl layouts
    assert all(e.label is None for e in load("rte", "superglue", "test"))
    assert [e.label for e in load("cb", "superglue", "val")] == [2, 0, 1]
    boolq = load("boolq", "superglue", "val")
    assert [e.label for e in boolq] == [1, 0] and boolq[0].text_b == "is the blue heron a migratory bird"
    assert [e.label for e in load("axb", "superglue", "test")] == [0, 1]  # the diagnostic's single file


def test_multirc_one_example_per_answer_grouped_by_question():
    examples = load("multirc", "superglue", "val")
    assert len(examples) == 7
    assert [e.group for e in examples] == ["0-0", "0-0", "0-1", "0-1", "0-1", "1-2", "1-2"]
    assert [e.label for e in examples] == [1, 0, 1, 0, 1, 0, 1]
    assert examples[0].text_a.startswith("Greta kept three goats")
    assert examples[0].text_b == "How many goats did Greta keep? Three"
    assert len({e.guid for e in examples}) == 7


def test_wsc_copa_wic_become_pairs():
    wsc = load("wsc", "superglue", "train")
    assert wsc[0].text_b == 'Does the pronoun "it" refer to "the suitcase"?' and [e.label for e in wsc] == [1, 0]
    copa = load("copa", "fewglue", "train")
    assert copa[0].text_a == "The soup tasted bland. What was the effect?"
    assert copa[1].text_b == "1) The sun was out. 2) It had rained all night."
    assert [e.label for e in copa] == [0, 1] and copa[0].guid == "train-7"
    assert [e.label for e in load("copa", "fewglue", "dev32")] == [0, 1]
    wic = load("wic", "fewglue", "train")
    assert wic[0].text_a == "We sat on the river bank."
    assert wic[0].text_b == 'She opened an account at the bank. Does "bank" mean the same in both?'
    assert [e.label for e in wic] == [0, 1]


def test_glue_tsv_tasks():
    rte = load("rte", "glue", "train")
    assert rte[0].text_a == 'The baker sold "twelve" loaves before noon.'  # quotes are text in GLUE tsv
    assert [e.label for e in rte] == [0, 1]
    sst2 = load("sst2", "glue", "train")
    assert [e.label for e in sst2] == [1, 0, 1] and sst2[0].text_b is None
    assert [e.text_a for e in load("sst2", "glue", "test")] == [
        "an odd , quiet story about lighthouses",
        "loud and pointless",
    ]
    cola = load("cola", "glue", "train")  # no header line
    assert [(e.text_a, e.label) for e in cola][:2] == [
        ("The cat slept on the warm rug.", 1),
        ("The cat slept the rug warm on.", 0),
    ]
    assert load("cola", "glue", "test")[0].label is None  # the test file has a header and no label
    stsb = load("stsb", "glue", "dev")
    assert [e.label for e in stsb] == [4.8, 0.25] and stsb[0].text_b == "A girl rides a horse."
    mnli = load("mnli", "glue", "dev")  # dev -> dev_matched; the label is gold_label
    assert [e.label for e in mnli] == [0, 2, 1] and mnli[0].text_a == "The owl hooted all night."
    mrpc = load("mrpc", "glue", "train")
    assert [e.label for e in mrpc] == [1, 0] and mrpc[0].text_b == "The new park was approved by the council."
    assert [e.label for e in load("qqp", "glue", "val")] == [1, 0]
    assert [e.label for e in load("qnli", "glue", "dev")] == [0, 1]


def test_lmbff_layouts():
    sst5 = load("sst5", "lmbff", "train")  # csv: no header, label first, quoted commas
    assert [e.label for e in sst5] == [4, 0, 2, 3, 1] and sst5[0].text_a == "a warm , funny and wise little film ."
    sst2 = load("sst2", "lmbff", "dev", lmbff_seed=42)
    assert [e.label for e in sst2] == [1, 0]


def test_user_files_with_fields():
    task = get_task("sst2")
    jsonl = read_split(FIXTURES / "user" / "reviews.jsonl", task, fields={"text_a": "review", "label": "stars"})
    assert [(e.text_a, e.label) for e in jsonl] == [
        ("The blender is loud but strong.", 1),
        ("It broke on the second day.", 0),
    ]
    path = resolve_split(task=task, format="csv", root=FIXTURES / "user", split="reviews")
    rows = read_split(path, task, fields={"text_a": "review", "label": "stars"})
    assert [(e.text_a, e.label) for e in rows] == [("Lovely colours, easy to set up.", 1), ("Arrived scratched.", 0)]
    unlabelled = read_split(path, task, fields={"text_a": "review"})
    assert all(e.label is None for e in unlabelled)
    as_path = resolve_split(task=task, format="glue", root=FIXTURES, split=str(path))
    assert as_path == path  # a split that is a file path is used as is
    with pytest.raises(ValueError, match="unknown key.*'txt'.*valid keys: text_a"):
        read_split(path, task, fields={"txt": "review"})


RTE_LINE = json.dumps({"premise": "A cat sat.", "hypothesis": "A cat exists.", "label": "entailment"})


@pytest.mark.parametrize(
    ("name", "text", "task", "message"),
    [
        ("bad.jsonl", RTE_LINE + '\n{"premise": "x",\n', "rte", r"bad.jsonl:2: malformed JSON line"),
        ("list.jsonl", "[1, 2]\n", "rte", r"list.jsonl:1: expected a JSON object, got list"),
        (
            "miss.jsonl",
            RTE_LINE + "\n" + json.dumps({"premise": "A dog ran.", "label": "entailment"}),
            "rte",
            r"miss.jsonl:2: missing field 'hypothesis' for task rte; "
            r"expected fields: premise \(or sentence1\), hypothesis \(or sentence2\), label \(or gold_label\)$",
        ),
        (
            "lab.jsonl",
            RTE_LINE.replace('"entailment"', '"maybe"'),
            "rte",
            r"lab.jsonl:1: unknown label 'maybe' for task rte; valid labels: entailment, not_entailment",
        ),
        ("idx.csv", "7,too high a class index\n", "sst2", r"idx.csv:1: unknown label '7' for task sst2"),
        ("float.tsv", "sentence1\tsentence2\tscore\na\tb\thi\n", "stsb", r"float.tsv:2: label 'hi' is not a number"),
        ("empty.jsonl", "\n\n", "rte", r"empty.jsonl: no examples in this split"),
        ("header.tsv", "sentence\tlabel\n", "sst2", r"header.tsv: no examples in this split"),
        ("mixed.jsonl", RTE_LINE + '\n{"premise": "a", "hypothesis": "b"}\n', "rte", r"mixed.jsonl:2: .*has no label"),
        ("span.jsonl", '{"text": "t", "target": {"span1_text": "a"}}', "wsc", r"span.jsonl:1: .*'target.span2_text'"),
        ("type.jsonl", '{"premise": 3, "hypothesis": "b"}', "rte", r"type.jsonl:1: field 'premise' .* should be a str"),
        ("mrc.jsonl", '{"passage": {"text": "t", "questions": [{"question": "q"}]}}', "multirc", r"answers"),
        ("data.txt", "x", "rte", r"data.txt: unknown file type '.txt'"),
        ("latin1.csv", "0,caf\udce9\n", "sst2", r"latin1.csv: not UTF-8 text"),
    ],
)
def test_errors_name_file_line_and_fix(tmp_path, name, text, task, message):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # \udce9: a lone latin-1 byte
    with pytest.raises(ValueError, match=message):
        read_split(path, get_task(task))


def test_missing_split_lists_the_available_ones():
    with pytest.raises(
        ValueError, match=r"RTE/nope.jsonl: no such file; the splits in .*RTE are: test.jsonl, train.jsonl, val.jsonl"
    ):
        resolve_split(task=get_task("rte"), format="superglue", root=FIXTURES, split="nope")
    with pytest.raises(ValueError, match=r"directory .*16-99 does not exist; .* holds: 16-13"):
        resolve_split(task=get_task("sst5"), format="lmbff", root=FIXTURES, split="train", lmbff_seed=99)
    with pytest.raises(ValueError, match="unknown data format 'hub'; valid formats: " + ", ".join(FORMATS)):
        resolve_split(task=get_task("rte"), format="hub", root=FIXTURES, split="train")
    with pytest.raises(ValueError, match="no such file"):
        resolve_split(task=get_task("rte"), format="glue", root=FIXTURES, split="missing/train.tsv")


def test_sample_per_class_is_deterministic_and_checks_counts():
    examples = [Example(guid=str(i), text_a=str(i), text_b=None, label=i % 3) for i in range(30)]
    sample = sample_per_class(examples, 4, seed=1)
    assert sample == sample_per_class(examples, 4, seed=1) != sample_per_class(examples, 4, seed=2)
    assert sorted(e.label for e in sample) == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(ValueError, match="label 0 has only 10 examples, fewer than k=11"):
        sample_per_class(examples, 11, seed=1)


def test_bucket_batches_cover_every_index_once_and_group_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(500)]
    batches = bucket_batches(lengths, batch_size=8, seed=3, bucket_size_multiplier=4)
    assert batches == bucket_batches(lengths, batch_size=8, seed=3, bucket_size_multiplier=4)
    assert batches != bucket_batches(lengths, batch_size=8, seed=4, bucket_size_multiplier=4)
    assert sorted(i for batch in batches for i in batch) == list(range(500))
    assert sum(len(batch) < 8 for batch in batches) == 1  # 500 = 15 pools of 32 + one of 20: one short batch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    unsorted = bucket_batches(lengths, batch_size=8, seed=3, bucket_size_multiplier=1)  # pool = batch: no sorting
    assert spread < 0.5 * sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in unsorted)
    # One pool holding everything: each batch is a run of consecutive lengths in sorted order.
    distinct = list(range(64))
    one_pool = bucket_batches(distinct, batch_size=8, seed=0, bucket_size_multiplier=8)
    assert sorted(sorted(batch) for batch in one_pool) == [list(range(i, i + 8)) for i in range(0, 64, 8)]


def test_hub_rows_map_to_the_same_examples(monkeypatch):
    multirc_ids = {"paragraph": 0, "question": 1, "answer": 2}
    wsc_spans = {"span1_text": "Ann", "span2_text": "she", "span1_index": 0, "span2_index": 3}
    rows = {
        "multirc": [{"paragraph": "P.", "question": "Q?", "answer": "A", "idx": multirc_ids, "label": 1}],
        "wsc": [{"text": "T.", **wsc_spans, "idx": 0, "label": -1}],
        "mnli": [{"premise": "P.", "hypothesis": "H.", "idx": 4, "label": 2}],
    }
    calls = []

    def load_dataset(repo, config, split):
        calls.append((repo, config, split))
        return rows[config.split(".")[0]]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("ipt_ds.backbone.hub_reachable", lambda: True)  # the hub is faked by the datasets stand-in
    multirc = load_hub_split(get_task("multirc"), "val")
    assert multirc == [Example(guid="val-0-1-2", text_a="P.", text_b="Q? A", label=1, group="0-1")]
    wsc = load_hub_split(get_task("wsc"), "test")
    assert wsc[0].label is None and wsc[0].text_b == 'Does the pronoun "she" refer to "Ann"?'  # -1: unlabelled
    assert load_hub_split(get_task("mnli"), "dev")[0].label == 2
    assert calls == [
        ("aps/super_glue", "multirc", "validation"),
        ("aps/super_glue", "wsc.fixed", "test"),
        ("nyu-mll/glue", "mnli", "validation_matched"),
    ]
    with pytest.raises(ValueError, match="task trec has no hub source"):
        load_hub_split(get_task("trec"), "train")


def test_a_hub_split_without_network_fails_at_once(monkeypatch):
    """datasets retried for half a minute before its error; an unreachable hub is now named before it is asked."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("ipt_ds.backbone.hub_reachable", lambda: False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *args, **kwargs: 1 / 0))
    with pytest.raises(ValueError, match=r"task rte split 'train': there is no local data root and the HF hub cannot "
                                         r"be reached; set \$IPT_DS_DATA or data.root"):
        load_hub_split(get_task("rte"), "train")


def test_default_data_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IPT_DS_DATA", str(tmp_path))
    assert default_data_root() == tmp_path


# --- the real benchmark files --------------------------------------------------------------------------------------

DATA_ROOT = default_data_root()


def real_files() -> list[tuple[str, int]]:
    """(path under the data root, records) for every task file in SOURCES.tsv."""
    if DATA_ROOT is None or not (DATA_ROOT / "SOURCES.tsv").is_file():
        return []
    with open(DATA_ROOT / "SOURCES.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    files = []
    for row in rows:
        parts = row["file"].split("/")
        # ReCoRD (FewGLUE) is a cloze task with entity answers, outside the classification task registry.
        if parts[0] in ("superglue", "glue", "fewglue", "lmbff") and row["file"].endswith((".jsonl", ".tsv", ".csv")) \
                and "ReCoRD" not in parts:
            files.append((row["file"], int(row["records"])))
    return files


def locate(relative: str) -> tuple[str, str, str, int]:
    """(task, format, split, seed) that `resolve_split` should map to `relative`."""
    parts = relative.split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    if parts[0] == "lmbff":
        return parts[2], "lmbff", stem, int(parts[3].split("-")[1])
    split = "test" if parts[1].startswith("AX-") else stem
    return parts[-2], parts[0], split, 13


@pytest.mark.parametrize(("relative", "records"), real_files())
def test_real_file_record_counts(relative, records):
    name, format, split, seed = locate(relative)
    task = get_task(name)
    path = resolve_split(task=task, format=format, root=DATA_ROOT, split=split, lmbff_seed=seed)
    assert path == DATA_ROOT / relative
    examples = read_split(path, task)
    if task.name == "multirc":  # one example per answer; the records are paragraphs
        assert len({e.guid.rsplit("-", 2)[0] for e in examples}) == records
    else:
        assert len(examples) == records
    assert len({e.guid for e in examples}) == len(examples)
    for e in examples:
        assert e.label is None or (task.is_regression or 0 <= e.label < len(task.label_names))
    labelled = not (split in ("test", "unlabeled") and not relative.startswith(("lmbff", "superglue/AX")))
    assert (examples[0].label is not None) == labelled


def test_real_multirc_answer_counts():
    assert DATA_ROOT is not None, "set IPT_DS_DATA to the benchmark data directory"
    task = get_task("multirc")
    for split, answers in (("train", 27243), ("val", 4848)):
        assert (
            len(read_split(resolve_split(task=task, format="superglue", root=DATA_ROOT, split=split), task)) == answers
        )


# --- junk never raises anything but ValueError ---------------------------------------------------------------------

KEYS = st.sampled_from(
    "premise hypothesis label idx passage questions answers text question target span1_text span2_text choice1 "
    "choice2 word sentence sentence1 sentence2 paragraph answer review".split()
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=5),
    max_leaves=12,
)
LINE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
    st.text(alphabet='{}[]":,\t\n01 labeltx', max_size=40),
    st.dictionaries(KEYS, JSON, max_size=6).map(json.dumps),
)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lines=st.lists(LINE, max_size=6),
    raw=st.binary(max_size=20),
    suffix=st.sampled_from([".jsonl", ".tsv", ".csv"]),
    task=st.sampled_from(["rte", "multirc", "wsc", "copa", "wic", "stsb", "cola", "sst5", "boolq", "mnli"]),
    fields=st.sampled_from([None, {"text_a": "review", "label": "label"}]),
)
def test_junk_raises_only_value_error(lines, raw, suffix, task, fields):
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"junk{suffix}"
        path.write_bytes("\n".join(lines).encode() + (raw if len(raw) % 2 else b""))
        try:
            examples = read_split(path, get_task(task), fields=fields)
        except ValueError:
            return
        assert examples and all(isinstance(e, Example) for e in examples)
