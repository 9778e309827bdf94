"""The model as the checks see it: a list of PIL images in, ``(N, C)`` probabilities out.

``predict_proba`` arguments take a list of PIL images and return ``(N, C)``
probabilities, so the same code runs over torch (in the flow) or ONNX Runtime /
OpenVINO (on an exported bundle).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

PredictProba = Callable[[list[Image.Image]], np.ndarray]


def predict_in_batches(predict_proba: PredictProba, images: Sequence[Image.Image], n_classes: int | None,
                       batch_size: int) -> np.ndarray:
    """Probabilities of every image, ``batch_size`` at a time, each answer checked for shape.

    Args:
        predict_proba: the model.
        images: the inputs.
        n_classes: the number of columns expected (``None``: whatever the first batch gives).
        batch_size: images per call.

    Raises:
        ValueError: an answer that is not ``(len(batch), C)``, or whose ``C`` changes.
    """
    out = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        probs = np.asarray(predict_proba(chunk))
        if probs.ndim != 2 or probs.shape[0] != len(chunk):
            raise ValueError(
                f"predict_proba returned shape {probs.shape} for {len(chunk)} images; expected (N, C) probabilities"
            )
        if n_classes is not None and probs.shape[1] != n_classes:
            raise ValueError(f"predict_proba returned {probs.shape[1]} classes, earlier calls returned {n_classes}")
        n_classes = probs.shape[1]
        out.append(probs)
    return np.concatenate(out)
