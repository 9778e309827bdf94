"""Input checks shared by the calibration functions: clear errors before any arithmetic."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_labels(labels: Any, n: int, n_classes: int | None, what: str) -> np.ndarray:
    """``labels`` as an int64 vector of ``n`` class indices in ``[0, n_classes)``.

    Args:
        labels: class indices (integer-valued floats are accepted).
        n: the number of score rows they must match.
        n_classes: the number of score columns (``None``: not checked).
        what: the calling function, for the message.

    Raises:
        ValueError: wrong shape, non-integer values or an index out of range.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what}: labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.shape[0] != n:
        raise ValueError(f"{what}: {n} rows of scores but {labels.shape[0]} labels")
    if n and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            raise ValueError(f"{what}: labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if n and n_classes is not None and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"{what}: labels must lie in [0, {n_classes - 1}] (the score matrix has {n_classes} columns), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64, copy=False)


def check_scores(scores: Any, what: str, name: str) -> np.ndarray:
    """``scores`` as a finite float64 ``(N, C)`` array, or a ``ValueError`` naming ``what`` and ``name``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"{what}: {name} must be a 2-D (N, C) array, got shape {scores.shape}")
    if scores.size and not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: {name} contain NaN or infinite values")
    return scores


def check_probs(probs: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(probs, labels)`` checked: probabilities in ``[0, 1]`` (not logits) and labels that match them."""
    probs = check_scores(probs, what, "probabilities")
    if probs.size and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
        raise ValueError(f"{what}: probabilities must lie in [0, 1] (did you pass logits?)")
    labels = check_labels(labels, probs.shape[0], probs.shape[1], what)
    return probs, labels


def confidence_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(top confidence, top prediction is right)`` per row."""
    return probs.max(axis=1), (probs.argmax(axis=1) == labels)


def check_mask(mask: Any, n: int, what: str) -> np.ndarray:
    """An in-distribution mask checked to be a bool vector of length ``n``."""
    mask = np.asarray(mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"{what}: the in-distribution mask must be a bool array of shape ({n},), "
                         f"got {mask.dtype} {mask.shape}")
    return mask
