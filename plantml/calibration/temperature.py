"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar ``T`` divides the logits, fitted by minimising the negative log-likelihood on
the **validation** split. It never changes the arg-max, so accuracy is untouched.
scipy is imported inside :func:`fit_temperature`.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from plantml.calibration.checks import check_labels, check_scores

log = logging.getLogger(__name__)

#: Search range for the temperature (log-spaced bounded search). Below 0.05 or above 20
#: the "calibration" would be hiding a broken model rather than fixing confidences.
T_MIN, T_MAX = 0.05, 20.0


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fit the temperature ``T`` that minimises validation NLL of ``softmax(logits / T)``.

    The NLL is convex in ``1/T``, so a bounded scalar search over ``log T`` in
    ``[log 0.05, log 20]`` finds the optimum reliably. The result is kept only if it
    beats ``T = 1`` (it always should; the guard protects against a degenerate search).

    Args:
        logits: ``(N, C)`` raw model outputs on the validation split.
        labels: ``(N,)`` integer class indices.

    Returns:
        The temperature (``> 1`` softens an over-confident model). ``1.0`` for degenerate
        input: no rows, fewer than two classes, logits that do not vary, or no
        misclassified validation example (then the NLL decreases all the way to the
        lower bound and the fit would only sharpen every confidence to ~1).

    Raises:
        ValueError: on mismatched shapes, labels out of range, or non-finite logits.
    """
    from scipy.optimize import minimize_scalar

    logits = check_scores(logits, "fit_temperature", "logits")
    labels = check_labels(labels, logits.shape[0], logits.shape[1] if logits.size else None, "fit_temperature")
    if logits.shape[0] == 0 or logits.shape[1] < 2:
        log.warning("fit_temperature: degenerate input (shape %s): using T=1", logits.shape)
        return 1.0
    spread = logits.max(axis=1) - logits.min(axis=1)
    if float(spread.max()) <= 1e-12:
        log.warning("fit_temperature: logits are constant across classes: using T=1")
        return 1.0
    if np.all(logits.argmax(axis=1) == labels):
        # With no validation error the NLL keeps falling as T -> 0: the optimum is the
        # search bound, which would turn every confidence (non-leaves included) into ~1.
        log.warning("fit_temperature: no errors on validation, the temperature is not identifiable: using T=1")
        return 1.0

    result = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    temperature = float(math.exp(result.x))
    before, after = nll(logits, labels, 1.0), nll(logits, labels, temperature)
    if not np.isfinite(after) or after > before:
        log.warning("fit_temperature: search did not improve NLL (%.4f -> %.4f): using T=1", before, after)
        return 1.0
    if temperature <= T_MIN * 1.001 or temperature >= T_MAX * 0.999:
        log.warning("fit_temperature: T=%.3f hit the search bound; the model may be badly mis-specified", temperature)
    log.info("temperature %.4f: validation NLL %.4f -> %.4f", temperature, before, after)
    return temperature
