"""Classification metrics on integer class predictions.

All functions take two equal-length 1-D sequences of class ids (lists, numpy
arrays or torch tensors): ``preds`` (predicted ids, e.g. ``logits.argmax(-1)``)
and ``labels`` (gold ids). They return a Python float. Pure numpy, so the
numbers do not depend on optional packages such as scikit-learn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "AUXILIARY_KEYS",
    "METRICS",
    "accuracy",
    "compute_metrics",
    "f1_binary",
    "f1_macro",
    "majority_baseline",
    "matthews_corrcoef",
    "metrics_for_classes",
    "top_class_share",
]


def _as_ids(values: Any, what: str) -> np.ndarray:
    """1-D int64 array from a list, numpy array or (any-device) torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D class ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iub":
        # Floats here usually mean logits/probabilities were passed by mistake.
        raise ValueError(f"{what} must be integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _pair(preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_ids(preds, "preds"), _as_ids(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels differ in length: {p.size} vs {y.size}")
    if p.size == 0:
        raise ValueError("preds and labels are empty")
    return p, y


def accuracy(preds: Any, labels: Any) -> float:
    """Fraction of correct predictions: ``mean(preds == labels)``."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_binary(preds: Any, labels: Any) -> float:
    """F1 of the positive class 1: ``2*TP / (2*TP + FP + FN)``.

    Equals the harmonic mean of precision and recall. Returns 0.0 when
    ``TP + FP + FN == 0`` (no positive predicted nor present), where F1 is
    undefined. Ids other than 0 and 1 raise ValueError.
    """
    p, y = _pair(preds, labels)
    if not (np.isin(p, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise ValueError("f1_binary needs ids in {0, 1} (a 2-class task); for more classes use macro_f1")
    tp = int(np.sum((p == 1) & (y == 1)))
    fp = int(np.sum((p == 1) & (y == 0)))
    fn = int(np.sum((p == 0) & (y == 1)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def f1_macro(preds: Any, labels: Any, num_labels: int | None = None) -> float:
    """Macro-averaged F1: the unweighted mean over classes of each class's one-vs-rest F1.

    The classes are ``0..num_labels-1`` when ``num_labels`` is given, else those present in
    ``labels`` or ``preds`` (scikit-learn's default).  A class with no gold and no predicted
    example (``TP + FP + FN == 0``) has F1 0.0, as in :func:`f1_binary`.
    """
    p, y = _pair(preds, labels)
    if p.min() < 0 or y.min() < 0:
        raise ValueError("class ids must be >= 0")
    if num_labels is not None and max(p.max(), y.max()) >= num_labels:
        raise ValueError(f"class ids must be < num_labels={num_labels}")
    classes = range(num_labels) if num_labels is not None else np.union1d(p, y)
    scores = []
    for k in classes:
        tp = int(np.sum((p == k) & (y == k)))
        fp = int(np.sum((p == k) & (y != k)))
        fn = int(np.sum((p != k) & (y == k)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def matthews_corrcoef(preds: Any, labels: Any) -> float:
    """Matthews correlation coefficient for any number of classes K.

    With the KxK confusion matrix C (rows gold, columns predicted),
    ``t_k`` = gold count of class k, ``p_k`` = predicted count of class k,
    ``c = trace(C)`` (correct) and ``s`` = number of samples::

        MCC = (c*s - sum_k p_k*t_k) / sqrt((s^2 - sum_k p_k^2) * (s^2 - sum_k t_k^2))

    For K = 2 this is ``(TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.
    Range -1..1; returns 0.0 when the denominator is 0 (all predictions or
    all labels in one class), where MCC is undefined.
    """
    p, y = _pair(preds, labels)
    if p.min() < 0 or y.min() < 0:
        raise ValueError("class ids must be >= 0")
    k = int(max(p.max(), y.max())) + 1
    # Float counts keep s^2 and products exact enough and overflow-free.
    t = np.bincount(y, minlength=k).astype(np.float64)
    q = np.bincount(p, minlength=k).astype(np.float64)
    c = float(np.sum(p == y))
    s = float(p.size)
    cov_py = c * s - float(q @ t)
    cov_pp = s * s - float(q @ q)
    cov_yy = s * s - float(t @ t)
    denom = cov_pp * cov_yy
    return float(cov_py / np.sqrt(denom)) if denom > 0 else 0.0


METRICS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "macro_f1": f1_macro,
    "mcc": matthews_corrcoef,
}
"""Metric names a task may ask for: accuracy, binary F1 of class 1 (2-class tasks only), macro-F1, MCC."""


AUXILIARY_KEYS = ("step", "loss", "top_class_share")
"""Keys of an evaluation's scores that are not task metrics: the step, the mean terminal cost, and
:func:`top_class_share`."""


def top_class_share(preds: Any) -> float:
    """The share of rows predicted as the most predicted class, ``max_c #{i: ŷ_i = c} / n``: 1.0 when the model
    predicts one class for every row (a run collapsed to a constant prediction scores the majority class's
    level, or below, and says so here)."""
    y = _as_ids(preds, "preds")
    if y.size == 0:
        raise ValueError("preds are empty")
    return float(np.bincount(y).max() / y.size)


def metrics_for_classes(num_labels: int, binary_f1: bool = False) -> tuple[str, ...]:
    """The metrics reported for a task of ``num_labels`` classes when it names none of its own.

    Accuracy always; macro-F1 for more than two classes; binary F1 (of class 1) for a
    2-class task that asks for it (``binary_f1``).

    Raises:
        ValueError: fewer than 2 classes, or ``binary_f1`` for more than two.
    """
    if num_labels < 2:
        raise ValueError(f"a classification task needs at least 2 classes, got {num_labels}")
    if binary_f1 and num_labels != 2:
        raise ValueError(f"binary F1 needs a 2-class task; this one has {num_labels} classes (use macro_f1)")
    if num_labels > 2:
        return ("accuracy", "macro_f1")
    return ("accuracy", "f1") if binary_f1 else ("accuracy",)


def majority_baseline(task_spec_or_metric_names: Any, labels: Any) -> dict[str, float]:
    """Every metric of the task for the constant prediction of the most frequent class of ``labels``.

    Ties go to the smallest class id.  This is the level a classifier that learnt nothing
    but the class balance reaches on these rows.
    """
    y = _as_ids(labels, "labels")
    if y.size == 0:
        raise ValueError("labels are empty")
    majority = int(np.argmax(np.bincount(y)))
    return compute_metrics(task_spec_or_metric_names, np.full_like(y, majority), y)


def compute_metrics(task_spec_or_metric_names: Any, preds: Any, labels: Any) -> dict[str, float]:
    """Every metric of a task, as ``{name: value}`` in the task's order.

    ``task_spec_or_metric_names`` is a :class:`controltune.data.TaskSpec`
    (anything with a ``metrics`` attribute; its ``num_labels``, when present, fixes the
    classes macro-F1 averages over), one metric name, or a sequence of names from
    ``accuracy``, ``f1``, ``macro_f1``, ``mcc``.
    """
    names = _metric_names(task_spec_or_metric_names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    num_labels = getattr(task_spec_or_metric_names, "num_labels", None)
    return {name: f1_macro(preds, labels, num_labels) if name == "macro_f1" else METRICS[name](preds, labels)
            for name in names}


def _metric_names(source: Any) -> tuple[str, ...]:
    if hasattr(source, "metrics"):
        source = source.metrics
    if isinstance(source, str):
        return (source,)
    if isinstance(source, Sequence) and all(isinstance(n, str) for n in source):
        return tuple(source)
    raise TypeError(f"expected a TaskSpec, a metric name or a sequence of names, got {source!r}")
