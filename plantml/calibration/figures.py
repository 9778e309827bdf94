"""The calibration plots: reliability diagram and coverage vs accuracy.

matplotlib's Agg backend through :mod:`plantml.plots` (imported inside it), written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from plantml.calibration.ece import expected_calibration_error, reliability_bins
from plantml.plots import pyplot, save_figure


def reliability_diagram(
    probs_before: np.ndarray,
    probs_after: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    n_bins: int = 15,
    temperature: float | None = None,
) -> Path:
    """Reliability diagram (accuracy vs confidence per bin) before and after calibration.

    A perfectly calibrated model lies on the diagonal; points below it are
    over-confident. The lower panel shows how many predictions fall in each bin.

    Args:
        probs_before: ``(N, C)`` uncalibrated probabilities (``T = 1``).
        probs_after: ``(N, C)`` temperature-scaled probabilities.
        labels: ``(N,)`` integer class indices.
        path: PNG to write.
        n_bins: number of equal-width bins.
        temperature: shown in the legend when given.

    Returns:
        ``path``.
    """
    before = reliability_bins(probs_before, labels, n_bins)
    after = reliability_bins(probs_after, labels, n_bins)
    ece_b = expected_calibration_error(probs_before, labels, n_bins)
    ece_a = expected_calibration_error(probs_after, labels, n_bins)
    plt = pyplot()
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.5, 6.0), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    after_label = f"temperature-scaled (T={temperature:.3f})" if temperature else "after calibration"
    after_label += f", ECE={ece_a:.4f}"
    for bins, label, colour, marker in (
        (before, f"uncalibrated, ECE={ece_b:.4f}", "tab:red", "o"),
        (after, after_label, "tab:blue", "s"),
    ):
        conf, acc = np.asarray(bins["confidence"]), np.asarray(bins["accuracy"])
        keep = np.asarray(bins["count"]) > 0
        ax.plot(conf[keep], acc[keep], marker=marker, color=colour, label=label)
    ax.set_ylabel("accuracy in bin")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Reliability diagram (n={len(np.asarray(labels))}, {n_bins} bins)")
    ax.legend(loc="upper left", fontsize=8)
    centers = (np.asarray(before["edges"][:-1]) + np.asarray(before["edges"][1:])) / 2
    width = 1.0 / n_bins
    ax_n.bar(centers - width / 4, before["count"], width=width / 2, color="tab:red", alpha=0.7, label="uncalibrated")
    ax_n.bar(centers + width / 4, after["count"], width=width / 2, color="tab:blue", alpha=0.7, label="calibrated")
    ax_n.set_yscale("symlog")
    ax_n.set_xlabel("confidence (top-label probability)")
    ax_n.set_ylabel("count")
    return save_figure(fig, path)


def coverage_accuracy_plot(
    curve: dict[str, Sequence[float]], chosen_threshold: float | None, path: str | os.PathLike[str],
    target_precision: float | None = None,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """Accuracy of accepted predictions vs coverage, with the chosen threshold marked.

    Args:
        curve: output of :func:`coverage_accuracy_curve`.
        chosen_threshold: the abstain threshold to mark (``None``: no marker).
        path: PNG to write.
        target_precision: drawn as a horizontal line when given.
        operating_point: ``(coverage, accuracy)`` of the full rule (confidence threshold
            *and* OOD score), marked separately when given; the curve is confidence only.

    Returns:
        ``path``.
    """
    for key in ("thresholds", "coverage", "accuracy"):
        if key not in curve:
            raise ValueError(f"coverage_accuracy_plot: curve lacks {key!r} (use coverage_accuracy_curve)")
    t = np.asarray(curve["thresholds"], dtype=float)
    cov = np.asarray(curve["coverage"], dtype=float)
    acc = np.asarray(curve["accuracy"], dtype=float)
    if not (len(t) == len(cov) == len(acc)) or len(t) == 0:
        raise ValueError("coverage_accuracy_plot: curve lists must be non-empty and of equal length")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.plot(cov, acc, color="tab:blue", lw=1.5, label="accepted predictions")
    if target_precision is not None:
        ax.axhline(target_precision, color="grey", ls="--", lw=1, label=f"target precision {target_precision:.3f}")
    if chosen_threshold is not None:
        kept = t >= chosen_threshold
        # The point of the curve the threshold selects: the lowest listed threshold above it.
        i = int(np.argmax(kept)) if kept.any() else len(t) - 1
        ax.plot([cov[i]], [acc[i]], "o", color="tab:red", ms=8,
                label=f"threshold {chosen_threshold:.4f}: coverage {cov[i]:.3f}, accuracy {acc[i]:.4f}")
    if operating_point is not None and np.isfinite(operating_point[1]):
        ax.plot([operating_point[0]], [operating_point[1]], "D", color="tab:green", ms=8,
                label=f"with the OOD rule: coverage {operating_point[0]:.3f}, accuracy {operating_point[1]:.4f}")
    ax.set_xlabel("coverage (share of inputs answered)")
    ax.set_ylabel("accuracy of answered inputs")
    ax.set_xlim(0, 1.02)
    lo = float(np.nanmin(acc)) if np.isfinite(acc).any() else 0.0
    ax.set_ylim(max(0.0, min(lo, target_precision or 1.0) - 0.02), 1.005)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("Coverage vs accuracy (abstain below the threshold)")
    return save_figure(fig, path)
