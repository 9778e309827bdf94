"""What the INT8 gate measures: predictions, accuracy and macro-F1, and batch-1 latency."""

from __future__ import annotations

from typing import Callable

import numpy as np

from plantml.metrics import macro_f1  # one definition; the gate averages over the classes present
from plantml.timing import latency_stats

Runner = Callable[[np.ndarray], np.ndarray]


def predict_labels(runner: Runner, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Arg-max class index of each image, run in batches.

    Args:
        runner: ``NCHW float32 batch -> logits``.
        images: preprocessed images.
        batch_size: images per call.
    """
    preds = [np.argmax(runner(images[i:i + batch_size]), axis=-1) for i in range(0, len(images), batch_size)]
    return np.concatenate(preds) if preds else np.zeros((0,), dtype=np.int64)


def evaluate(runner: Runner, images: np.ndarray, labels: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Accuracy and macro-F1 of ``runner`` on a labelled, preprocessed set.

    Args:
        runner: ``NCHW float32 batch -> logits``.
        images: preprocessed images.
        labels: their class indices.
        batch_size: images per call.

    Returns:
        ``{"accuracy", "macro_f1", "n", "accuracy_standard_error"}``.
    """
    pred = predict_labels(runner, images, batch_size)
    labels = np.asarray(labels)
    acc = float(np.mean(pred == labels)) if len(labels) else 0.0
    return {
        "accuracy": acc,
        "macro_f1": macro_f1(labels, pred),
        "n": int(len(labels)),
        # binomial standard error: the gate may run on a capped subset of a large test split
        "accuracy_standard_error": float(np.sqrt(acc * (1 - acc) / len(labels))) if len(labels) else float("nan"),
    }


def median_latency_ms(runner: Runner, sample: np.ndarray, runs: int = 30, warmup: int = 3) -> float:
    """Median wall time (ms) of ``runner`` on one batch-1 input.

    Args:
        runner: ``NCHW float32 batch -> logits``.
        sample: images; the first one is timed.
        runs: timed runs.
        warmup: untimed runs first.
    """
    return latency_stats(runner, np.ascontiguousarray(sample[:1], dtype=np.float32), runs, warmup)["median_ms"]
