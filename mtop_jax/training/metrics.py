"""Evaluation metrics per task, computed on the host from gathered predictions.

Classification: accuracy and macro-F1 always; for two-class tasks also the F1
of class 1 and Matthews correlation. Regression: Pearson, Spearman (Pearson of
average ranks, so ties share their mean rank), the mean squared error and R^2
(scikit-learn's ``r2_score``; 0 for a constant target).

Macro-F1 is the mean of the per-class F1 over the classes that occur in the true
labels (``support > 0``), i.e. scikit-learn's
``f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true))``. That is
not sklearn's default label set, the union of the true and the predicted labels:
a class that is predicted but absent from ``y_true`` (F1 0) is left out here and
averaged in by sklearn's default, so ours is never the lower of the two.
A class of the task that occurs in neither is left out by both. A class that
occurs but is never predicted counts with F1 0 in both. Where a value is
undefined (no positive class for F1, a constant input for MCC or a correlation)
it is 0, as sklearn's ``zero_division=0`` and MCC give (scipy's correlations give
NaN there).

Each task has a primary metric (GLUE's conventions by task name: MCC for CoLA,
F1 for MRPC and QQP, Pearson for STS-B; accuracy otherwise) and ``score`` is
the mean of the primaries. Missing labels (-1 or NaN for classification, NaN
for regression) are skipped; a task left with no labelled example (fewer than
two for regression) reports only its count and is not part of ``score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

PRIMARY_BY_NAME = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson"}


def primary_metric(name: str, regression: bool) -> str:
    return PRIMARY_BY_NAME.get(name, "pearson" if regression else "accuracy")


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray,
                           num_classes: int) -> dict[str, float]:
    cm = confusion(y_true, y_pred, num_classes).astype(np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    present = support > 0  # macro-F1 over the classes that occur in the labels
    out = {"accuracy": float(tp.sum() / max(cm.sum(), 1)),
           "macro_f1": float(f1[present].mean()) if present.any() else 0.0}
    if num_classes == 2:
        out["f1"] = float(f1[1])
        (tn, fp), (fn, tp1) = cm
        denom = np.sqrt((tp1 + fp) * (tp1 + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = float((tp1 * tn - fp * fn) / denom) if denom > 0 else 0.0
    return out


def _rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    t, p = y_true.astype(np.float64), y_pred.astype(np.float64)
    sse, sst = float(np.sum((t - p) ** 2)), float(np.sum((t - t.mean()) ** 2))
    return {"pearson": _pearson(y_true, y_pred),
            "spearman": _pearson(_rank(y_true), _rank(y_pred)),
            "mse": sse / len(y_true), "r2": 1.0 - sse / sst if sst > 0 else 0.0}


def task_metrics(tasks: Sequence, predictions: Mapping[str, np.ndarray],
                 labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Flat ``{task/metric: value}`` plus ``score``, over labelled examples only.

    ``tasks``: TaskSpecs; ``predictions[name]``: class ids or values for every
    example; ``labels[name]``: class ids (-1 missing) or values (NaN missing).
    """
    out: dict[str, float] = {}
    primaries = []
    for spec in tasks:
        y, p = np.asarray(labels[spec.name]), np.asarray(predictions[spec.name])
        if spec.is_regression:
            keep = ~np.isnan(y)
            m = regression_metrics(y[keep], p[keep]) if keep.sum() > 1 else {}
        else:
            keep = y >= 0
            m = (classification_metrics(y[keep].astype(int), p[keep].astype(int),
                                        spec.num_classes) if keep.any() else {})
        out[f"{spec.name}/count"] = float(keep.sum())
        for k, v in m.items():
            out[f"{spec.name}/{k}"] = v
        primary = primary_metric(spec.name, spec.is_regression)
        if primary in m:
            primaries.append(m[primary])
    out["score"] = float(np.mean(primaries)) if primaries else 0.0
    return out
