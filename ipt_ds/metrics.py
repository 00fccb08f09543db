"""Evaluation metrics by name, in percent (0-100) like the GLUE and SuperGLUE leaderboards.

Plain numpy, so evaluation needs no sklearn or scipy at run time; the tests check each metric against them. Where a
metric is undefined (F1 with no positives anywhere, a correlation of a constant) it is 0, not NaN, so that picking the
best checkpoint by it never compares NaNs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predictions == labels))


def _f1_of(predictions: np.ndarray, labels: np.ndarray, positive: object) -> float:
    predicted, actual = predictions == positive, labels == positive
    true_pos = np.sum(predicted & actual)
    denominator = 2 * true_pos + np.sum(predicted & ~actual) + np.sum(~predicted & actual)
    return float(2 * true_pos / denominator) if denominator else 0.0


def _binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    # The positive class is label index 1 (GLUE's MRPC / QQP, MultiRC's "True" answers).
    return _f1_of(predictions, labels, 1)


def _macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    # Averaged over every class that occurs in the labels or the predictions, as sklearn's average="macro".
    classes = np.union1d(np.unique(labels), np.unique(predictions))
    return float(np.mean([_f1_of(predictions, labels, c) for c in classes]))


def _mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004), which equals the binary one for two classes."""
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    gold, pred = encoded[: len(labels)], encoded[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (gold, pred), 1)
    true_sum, pred_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    total, correct = confusion.sum(), np.trace(confusion)
    covariance = correct * total - true_sum @ pred_sum
    scale = np.sqrt((total**2 - true_sum @ true_sum) * (total**2 - pred_sum @ pred_sum))
    return float(covariance / scale) if scale else 0.0


def _pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    x, y = predictions.astype(float), labels.astype(float)
    x, y = x - x.mean(), y - y.mean()
    scale = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / scale) if scale else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (scipy.stats.rankdata's default)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run_starts = np.flatnonzero(starts_run)
    run_ends = np.r_[run_starts[1:], len(values)]
    ranks = np.empty(len(values))
    ranks[order] = ((run_starts + run_ends + 1) / 2)[np.cumsum(starts_run) - 1]
    return ranks


def _spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    return _pearson(_ranks(predictions.astype(float)), _ranks(labels.astype(float)))


def _exact_match(predictions: np.ndarray, labels: np.ndarray, groups: Sequence[str | None] | None) -> float:
    """MultiRC EM: the share of questions (groups) whose answer options are all classified right."""
    if groups is None or any(group is None for group in groups):
        raise ValueError("metric 'em' needs a group (the MultiRC question id) for every example; pass groups=")
    all_right: dict[str, bool] = defaultdict(lambda: True)
    for group, right in zip(groups, predictions == labels, strict=True):
        all_right[group] &= bool(right)
    return float(np.mean(list(all_right.values())))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "acc": _accuracy,
    "f1": _binary_f1,
    "macro_f1": _macro_f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
    "f1a": _binary_f1,  # MultiRC F1a: binary F1 over all answer options
}
METRICS = (*_METRICS, "em")
"""Every metric name `compute_metrics` accepts."""


def compute_metrics(
    names: Sequence[str],
    *,
    predictions: Sequence[int | float],
    labels: Sequence[int | float],
    groups: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """`{name: value in percent}` for each metric in `names` (see METRICS); `groups` is needed by "em" only."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; valid metrics: {', '.join(METRICS)}")
    predicted, gold = np.asarray(predictions), np.asarray(labels)
    if predicted.ndim != 1 or predicted.shape != gold.shape:
        raise ValueError(
            f"predictions {predicted.shape} and labels {gold.shape} must be flat sequences of the same length"
        )
    if gold.size == 0:
        raise ValueError("no predictions to score (empty evaluation set)")
    if groups is not None and len(groups) != gold.size:
        raise ValueError(f"groups has {len(groups)} entries for {gold.size} predictions; give one group per example")
    results = {}
    for name in names:
        value = _exact_match(predicted, gold, groups) if name == "em" else _METRICS[name](predicted, gold)
        results[name] = 100.0 * value
    return results


def constant_baseline(
    names: Sequence[str], labels: Sequence[int | float], *, regression: bool,
    groups: Sequence[str | None] | None = None,
) -> dict[str, float]:
    """The number to beat on a split, in each of its metrics: the best score of one answer given to every example.
    Classification tries every label of the split (the majority class for accuracy, always-positive for F1, ...);
    regression the mean label (whose correlations are 0)."""
    candidates = [float(np.mean(labels))] if regression else sorted(set(labels))
    scores = [compute_metrics(names, predictions=[answer] * len(labels), labels=labels, groups=groups)
              for answer in candidates]
    return {name: max(score[name] for score in scores) for name in names}


def record_split(results: dict, split: str, metrics: dict[str, float], baseline: dict[str, float]) -> None:
    """Put a split's scores into results.json's mapping: `split`, `<split>_baseline` (`constant_baseline`) and
    `<split>_not_above_baseline`, the metrics in which the model does no better than that one answer."""
    results[split] = metrics
    results[f"{split}_baseline"] = baseline
    results[f"{split}_not_above_baseline"] = [name for name in metrics if metrics[name] <= baseline.get(name, -np.inf)]


def log_split(log, results: dict, split: str, split_name: str) -> None:
    """Log a split recorded by `record_split`: its scores, its baseline, and a warning where it is not above it."""
    line = lambda scores: " ".join(f"{k}={v:.2f}" for k, v in scores.items())  # noqa: E731
    log.info("%s %s: %s", split, split_name, line(results[split]))
    log.info("%s %s baseline (one answer for every example, the best per metric): %s", split, split_name,
             line(results[f"{split}_baseline"]))
    if results[f"{split}_not_above_baseline"]:
        log.warning("%s %s: %s at or below the baseline: the model does no better than one constant answer there",
                    split, split_name, ", ".join(results[f"{split}_not_above_baseline"]))


GENERATION_METRICS = ("bleu", "rouge_l")


def generation_metrics(
    names: Sequence[str], *, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, default 13a tokenization) and mean ROUGE-L F1 (rouge-score, best reference per
    prediction), both against every reference of each prediction, in percent."""
    unknown = [name for name in names if name not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"unknown generation metric(s) {unknown}; valid: {', '.join(GENERATION_METRICS)}")
    if not predictions or len(predictions) != len(references) or not all(references):
        raise ValueError("generation metrics need one prediction and at least one reference per example")
    results = {}
    if "bleu" in names:
        import sacrebleu

        width = max(len(refs) for refs in references)  # sacrebleu reads reference streams; None fills short lists
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        results["bleu"] = sacrebleu.corpus_bleu(list(predictions), streams).score
    if "rouge_l" in names:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"])
        scores = [scorer.score_multi(list(refs), pred)["rougeL"].fmeasure
                  for pred, refs in zip(predictions, references, strict=True)]
        results["rouge_l"] = 100.0 * float(np.mean(scores))
    return {name: results[name] for name in names}
