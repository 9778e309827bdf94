"""Validation of the preprocessed images INT8 calibration and evaluation run on."""

from __future__ import annotations

import numpy as np


class QuantizationError(RuntimeError):
    """Quantization could not be run (bad calibration data, a runtime refused the model)."""


def check_calibration_images(images: np.ndarray, what: str = "calibration_images") -> np.ndarray:
    """Validate an ``NCHW`` float batch of preprocessed images; returns it as float32.

    Args:
        images: the batch.
        what: its name in error messages.

    Raises:
        ValueError: naming the problem (wrong rank, no images, not 3 channels, NaN/inf).
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{what} must be an NCHW batch with 3 channels, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what} is empty: INT8 calibration needs preprocessed images")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be preprocessed float images (plantml.preprocess), got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)
