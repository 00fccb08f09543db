"""Every metric against sklearn / scipy on random inputs, plus MultiRC's grouped metrics on a hand-made case."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from ipt_ds.metrics import METRICS, compute_metrics, constant_baseline


@pytest.mark.parametrize("seed", range(20))
def test_classification_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    size, num_classes = int(rng.integers(5, 200)), int(rng.integers(2, 5))
    labels = rng.integers(0, num_classes, size).tolist()
    # Mostly-right predictions with some noise, so the metrics are not all near chance.
    predictions = [label if rng.random() < 0.6 else int(rng.integers(0, num_classes)) for label in labels]
    got = compute_metrics(["acc", "macro_f1", "mcc"], predictions=predictions, labels=labels)
    assert got["acc"] == pytest.approx(100 * accuracy_score(labels, predictions))
    assert got["macro_f1"] == pytest.approx(100 * f1_score(labels, predictions, average="macro"))
    assert got["mcc"] == pytest.approx(100 * matthews_corrcoef(labels, predictions))
    binary_labels, binary_predictions = [int(x == 1) for x in labels], [int(x == 1) for x in predictions]
    binary = compute_metrics(["f1", "f1a"], predictions=binary_predictions, labels=binary_labels)
    expected = 100 * f1_score(binary_labels, binary_predictions, zero_division=0)
    assert binary["f1"] == pytest.approx(expected) and binary["f1a"] == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(20))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, int(rng.integers(3, 200)))
    predictions = labels + rng.normal(0, 1.5, labels.size)
    if seed % 2:  # rounding makes ties, which spearman ranks by their average
        labels, predictions = labels.round(), predictions.round()
    got = compute_metrics(["pearson", "spearman"], predictions=predictions.tolist(), labels=labels.tolist())
    assert got["pearson"] == pytest.approx(100 * pearsonr(predictions, labels)[0])
    assert got["spearman"] == pytest.approx(100 * spearmanr(predictions, labels)[0])


def test_multirc_em_and_f1a_hand_made():
    # Question q1: both answers right. q2: one of three wrong. q3: its single answer right.
    groups = ["p0-q1", "p0-q1", "p0-q2", "p0-q2", "p0-q2", "p1-q3"]
    labels = [1, 0, 1, 0, 1, 1]
    predictions = [1, 0, 1, 1, 1, 1]
    got = compute_metrics(["f1a", "em"], predictions=predictions, labels=labels, groups=groups)
    assert got["em"] == pytest.approx(100 * 2 / 3)
    # 4 true positives, 1 false positive, 0 false negatives: F1 = 2*4 / (2*4 + 1) = 8/9.
    assert got["f1a"] == pytest.approx(100 * 8 / 9)


def test_undefined_metrics_are_zero_not_nan():
    assert compute_metrics(["f1"], predictions=[0, 0], labels=[0, 0]) == {"f1": 0.0}
    assert compute_metrics(["mcc"], predictions=[1, 1, 1], labels=[0, 1, 1]) == {"mcc": 0.0}
    assert compute_metrics(["pearson", "spearman"], predictions=[2.0, 2.0], labels=[1.0, 3.0]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }


def test_bad_calls_raise_value_errors():
    with pytest.raises(ValueError, match="unknown metric.*'bleu'; valid metrics: " + ", ".join(METRICS)):
        compute_metrics(["acc", "bleu"], predictions=[1], labels=[1])
    with pytest.raises(ValueError, match="same length"):
        compute_metrics(["acc"], predictions=[1, 0], labels=[1])
    with pytest.raises(ValueError, match="empty"):
        compute_metrics(["acc"], predictions=[], labels=[])
    with pytest.raises(ValueError, match="'em' needs a group"):
        compute_metrics(["em"], predictions=[1], labels=[1])
    with pytest.raises(ValueError, match="groups has 1 entries for 2"):
        compute_metrics(["em"], predictions=[1, 0], labels=[1, 0], groups=["a"])


def test_the_baseline_is_the_best_single_answer_in_each_metric():
    """The number a model must beat, per metric: the majority class for accuracy, always-positive for F1 even where
    the positive class is the minority, and 0 for the correlations of a regression task."""
    assert constant_baseline(["acc", "f1"], [0, 0, 0, 1], regression=False) == pytest.approx({"acc": 75.0, "f1": 40.0})
    assert constant_baseline(["acc", "f1"], [1, 1, 1, 0, 1, 0, 1, 1], regression=False) == pytest.approx(
        {"acc": 75.0, "f1": 100 * 12 / 14})
    assert constant_baseline(["pearson", "spearman"], [0.5, 2.0, 4.0], regression=True) == {"pearson": 0.0,
                                                                                             "spearman": 0.0}
    em = constant_baseline(["f1a", "em"], [1, 0, 1, 1], regression=False, groups=["q1", "q1", "q2", "q2"])
    assert em == pytest.approx({"f1a": 100 * 6 / 7, "em": 50.0})
