"""Outlier Exposure: leafless images in every training batch, trained towards "no class".

A softmax classifier trained only on leaves has to put every input somewhere among the
leaf classes, and after background replacement (``train.background_replace``) it learned
that a thin green shape on a cluttered background is *Corn healthy*: flat colours,
gradients and stripes came out as that class at 0.99 confidence, and past the OOD score.
Outlier Exposure (Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier
Exposure", ICLR 2019) adds images of *no* class to training with the uniform distribution
as their target, so the model learns to be unsure when there is no leaf.

The outliers are the augmentation's own random backgrounds
(:func:`plantml.backdrop.random_background`) without a leaf pasted on: no extra data, and
none of the generated non-leaf kinds the evaluation checks abstention on
(:data:`plantml.robustness.non_leaf.NON_LEAF_KINDS`). Their label is :data:`NO_CLASS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from plantml.backdrop import random_background

#: Label of an outlier row in a training batch (its target is the uniform distribution).
NO_CLASS = -1


def outliers_per_batch(share: float, batch: int) -> int:
    """How many outliers join a batch of ``batch`` labelled images (0 when ``share`` is 0)."""
    if share <= 0 or batch <= 0:
        return 0
    return max(1, int(round(share * batch)))


def outlier_source(share: float, size: int, seed: int) -> Callable[[int], Any] | None:
    """A function ``batch size -> uint8 [K, size, size, 3] tensor`` of leafless backgrounds, or ``None``.

    Args:
        share: outliers per labelled image (``train.outlier_exposure``); 0 turns it off.
        size: image side (the shards' side).
        seed: seeds the backgrounds (callers mix in the epoch and the rank).
    """
    if share <= 0:
        return None
    rng = np.random.default_rng(seed)

    def make(batch: int) -> Any:
        import torch

        k = outliers_per_batch(share, batch)
        return torch.from_numpy(np.stack([random_background(size, rng) for _ in range(k)]))

    return make


def with_outliers(images: Any, labels: Any, source: Callable[[int], Any] | None, seed: int) -> tuple[Any, Any]:
    """``images``/``labels`` with the source's outliers (label :data:`NO_CLASS`) mixed in at random rows.

    Shuffled in, not appended, so that every micro-batch (and so every BatchNorm
    statistic) sees a few of them rather than the last chunk all of them.
    """
    if source is None:
        return images, labels
    import torch

    extra = source(len(labels)).to(images.dtype)
    if extra.shape[1:] != images.shape[1:]:
        raise ValueError(f"outlier images {tuple(extra.shape[1:])} do not match the batch's {tuple(images.shape[1:])}")
    x = torch.cat([images, extra])
    y = torch.cat([labels, torch.full((len(extra),), NO_CLASS, dtype=labels.dtype)])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


def classification_loss(logits: Any, labels: Any, label_smoothing: float) -> Any:
    """Mean over the rows of: cross-entropy for labelled rows, cross-entropy to uniform for :data:`NO_CLASS` rows.

    With no outlier row this is exactly ``F.cross_entropy(logits, labels, label_smoothing)``.
    """
    import torch.nn.functional as F

    known = labels != NO_CLASS
    if bool(known.all()):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    total = -F.log_softmax(logits[~known], dim=1).mean(dim=1).sum()
    if bool(known.any()):
        total = total + F.cross_entropy(logits[known], labels[known], label_smoothing=label_smoothing,
                                        reduction="sum")
    return total / len(labels)
