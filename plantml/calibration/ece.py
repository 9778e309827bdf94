"""Expected calibration error: top-label ECE with equal-width bins, its bins and a bootstrap interval."""

from __future__ import annotations

import numpy as np

from plantml.calibration.checks import check_probs, check_scores, confidence_correct


def bin_index(confidences: np.ndarray, n_bins: int) -> np.ndarray:
    """Each confidence's equal-width bin ``(i/n_bins, (i+1)/n_bins]`` (exactly 0 falls in the first)."""
    return np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin count, mean confidence and accuracy of the top-label prediction.

    Bins are equal-width on ``(0, 1]``: bin ``i`` holds confidences in
    ``(i/n_bins, (i+1)/n_bins]`` (a confidence of exactly 0 falls in the first bin).

    Returns:
        ``{"edges", "count", "confidence", "accuracy"}``; empty bins have ``count`` 0 and
        ``confidence``/``accuracy`` NaN.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = check_probs(probs, labels, "reliability_bins")
    conf, correct = confidence_correct(probs, labels) if len(labels) else (np.zeros(0), np.zeros(0, bool))
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(float)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(float), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, acc_sum / count, np.nan)
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": mean_acc.tolist(),
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width bins.

    ``ECE = sum_b |B_b|/N * |accuracy(B_b) - mean confidence(B_b)|`` (Naeini et al. 2015;
    Guo et al. 2017). 0 is perfect; 0.05 means confidences are off by 5 points on average.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices.
        n_bins: number of equal-width confidence bins on ``(0, 1]``.

    Raises:
        ValueError: on empty or malformed input.
    """
    probs, labels = check_probs(probs, labels, "expected_calibration_error")
    if probs.shape[0] == 0:
        raise ValueError("expected_calibration_error: no predictions given")
    bins = reliability_bins(probs, labels, n_bins)
    count = np.asarray(bins["count"])
    gap = np.abs(np.nan_to_num(np.asarray(bins["accuracy"])) - np.nan_to_num(np.asarray(bins["confidence"])))
    return float(np.sum(count / count.sum() * gap))


def ece_bootstrap_interval(
    probs: np.ndarray, labels: np.ndarray, n_bins: int = 15, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the ECE (resampling predictions with replacement).

    ECE from a few hundred predictions is noisy (and biased upward: even a perfectly
    calibrated model shows a gap per bin from sampling alone); this interval says how
    much a reported ECE could move on another sample of the same size.

    Returns:
        ``(low, high)`` at the given ``level``.
    """
    probs, labels = check_probs(probs, labels, "ece_bootstrap_interval")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("ece_bootstrap_interval: no predictions given")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    conf, correct = confidence_correct(probs, labels)
    idx_bin = bin_index(conf, n_bins)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        gap = np.abs(np.bincount(idx_bin[pick], weights=correct[pick].astype(float), minlength=n_bins)
                     - np.bincount(idx_bin[pick], weights=conf[pick], minlength=n_bins))
        values[b] = gap.sum() / n  # sum_b |n_b acc_b - n_b conf_b| / N = sum_b n_b/N |acc_b - conf_b|
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def ece_sampling_floor(probs: np.ndarray, n_bins: int = 15, draws: int = 500, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float, float]:
    """The ECE a *perfectly calibrated* model with these confidences would show on a sample this size.

    Each draw makes every prediction correct with probability equal to its confidence
    (calibration by construction) and measures the ECE; the spread is sampling noise alone.
    On 72 field photos a perfect model shows an ECE around 0.08: a measured ECE inside this
    range is no evidence of miscalibration, and a bar below it cannot be verified on that
    sample (docs/benchmarks.md section 8).

    Args:
        probs: ``(N, C)`` calibrated probabilities.
        n_bins: ECE bins (as :func:`expected_calibration_error`).
        draws: simulated samples.
        level: central interval level.
        seed: random seed.

    Returns:
        ``(median, low, high)`` of the simulated ECEs.
    """
    probs = check_scores(probs, "ece_sampling_floor", "probabilities")
    if probs.shape[0] == 0:
        raise ValueError("ece_sampling_floor: no predictions given")
    conf = probs.max(axis=1)
    idx_bin = bin_index(conf, n_bins)
    rng = np.random.default_rng(seed)
    conf_sum = np.bincount(idx_bin, weights=conf, minlength=n_bins)
    values = np.empty(draws)
    for d in range(draws):
        correct = (rng.random(len(conf)) < conf).astype(float)
        values[d] = np.abs(np.bincount(idx_bin, weights=correct, minlength=n_bins) - conf_sum).sum() / len(conf)
    alpha = (1.0 - level) / 2.0
    return float(np.median(values)), float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))
