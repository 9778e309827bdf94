"""Classification metrics in plain numpy: one definition each, shared by training, evaluation and the INT8 gate.

Why not scikit-learn everywhere: the INT8 gate and the other torch-free modules must stay
light to import (no scikit-learn/scipy), and two hand-written copies had drifted apart in
*which* classes a macro average runs over. Here the class set is always an explicit
argument, and the tests check the numbers against scikit-learn's.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """F1 of each class in ``labels`` (0 where the class has no true and no predicted sample).

    Args:
        y_true: integer labels ``[N]``.
        y_pred: predicted integer labels ``[N]``.
        labels: the classes to score, in order.

    Returns:
        ``float64 [len(labels)]``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in labels:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return np.asarray(scores, dtype=np.float64)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, labels: Iterable[int] | None = None) -> float:
    """Unweighted mean F1 over ``labels``; by default over the classes present in ``y_true`` or ``y_pred``.

    Equal to ``sklearn.metrics.f1_score(y_true, y_pred, labels=labels, average="macro",
    zero_division=0)``. Pass ``labels=range(n_classes)`` for the score over every class of
    the model (a class absent from a small split then counts as 0).

    Args:
        y_true: integer labels ``[N]``.
        y_pred: predicted integer labels ``[N]``.
        labels: the classes to average over.
    """
    if labels is None:
        labels = np.union1d(np.asarray(y_true), np.asarray(y_pred)).tolist()
    scores = per_class_f1(y_true, y_pred, labels)
    return float(scores.mean()) if scores.size else 0.0
