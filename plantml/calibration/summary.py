"""Everything the bundle stores about calibration: fitted on validation, measured on test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from plantml.calibration.abstention import (choose_abstain_threshold, coverage_accuracy_curve, domain_coverage_cap,
                                            selective_metrics)
from plantml.calibration.checks import check_labels, check_mask, check_scores
from plantml.calibration.ece import ece_bootstrap_interval, expected_calibration_error
from plantml.calibration.figures import coverage_accuracy_plot, reliability_diagram
from plantml.calibration.temperature import fit_temperature, nll
from plantml.preprocess import softmax


def calibration_summary(
    val_logits: np.ndarray, val_labels: np.ndarray,
    test_logits: np.ndarray, test_labels: np.ndarray,
    target_precision: float, min_coverage: float, n_bins: int = 15,
    val_in_distribution: np.ndarray | None = None, test_in_distribution: np.ndarray | None = None,
    val_domains: Any = None, domain_min_coverage: float = 0.0,
) -> dict[str, Any]:
    """Fit the temperature and the abstain threshold on validation; measure them on test.

    Args:
        val_logits, val_labels: validation split (fitting).
        test_logits, test_labels: test split (reporting only).
        target_precision: accuracy wanted on accepted predictions (``calibration.target_precision``).
        min_coverage: coverage floor for the threshold fallback (``calibration.min_coverage``).
        n_bins: ECE bins.
        val_in_distribution, test_in_distribution: optional bool masks of the images the
            OOD score lets through (:mod:`plantml.ood`). The threshold is still chosen on *every*
            validation image (choosing it among those the OOD rule passes did not hold up on the
            real sample, docs/benchmarks.md); coverage and accuracy count an image as answered
            only if it passes both rules, relative to the whole split.
        val_domains, domain_min_coverage: with several domains, the threshold is lowered until
            each answers this share of its validation images
            (:func:`plantml.calibration.domain_coverage_cap`; ``domain_cap`` records it).

    Returns:
        ``{"temperature", "ece_uncalibrated", "ece", "ece_ci95", "abstain_threshold", "test_coverage",
        "test_accuracy_at_threshold", "test_accuracy", "nll_uncalibrated", "nll", "target_precision",
        "min_coverage", "met", "domain_cap", "n_bins", "val": {...}}``: ``ece*``/``nll*`` on test
        (``ece_ci95``: bootstrap 95 % interval), ``val`` the same on validation plus the threshold
        choice. The bundle takes ``temperature`` and ``abstain_threshold``.
    """
    val_logits, val_labels, test_logits, test_labels = _checked_splits(
        val_logits, val_labels, test_logits, test_labels)
    temperature = fit_temperature(val_logits, val_labels)
    val_raw, val_cal = softmax(val_logits), softmax(val_logits, temperature)
    test_raw, test_cal = softmax(test_logits), softmax(test_logits, temperature)
    choice = _threshold_choice(val_cal, val_labels, target_precision, min_coverage, val_in_distribution,
                               val_domains, domain_min_coverage)
    at_test = selective_metrics(test_cal, test_labels, choice["threshold"], test_in_distribution)
    return {
        "temperature": float(temperature),
        **_ece_before_after(test_raw, test_cal, test_labels, n_bins),
        "ece_ci95": list(ece_bootstrap_interval(test_cal, test_labels, n_bins)),
        "abstain_threshold": choice["threshold"],
        "test_coverage": at_test["coverage"],
        "test_accuracy_at_threshold": at_test["accuracy"],
        "test_accuracy": float(np.mean(test_cal.argmax(axis=1) == test_labels)),
        **_nll_before_after(test_logits, test_labels, temperature),
        "target_precision": float(target_precision),
        "min_coverage": float(min_coverage),
        "met": choice["met"],
        "domain_cap": choice.get("domain_cap"),
        "n_bins": int(n_bins),
        "n_test": int(test_logits.shape[0]),
        "val": _validation_block(val_logits, val_raw, val_cal, val_labels, temperature, choice, n_bins),
    }


def _validation_block(logits: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray,
                      temperature: float, choice: dict[str, Any], n_bins: int) -> dict[str, Any]:
    """The summary's ``val`` entry: ECE and NLL before/after scaling, and the threshold choice on validation."""
    return {
        **_ece_before_after(raw, calibrated, labels, n_bins),
        **_nll_before_after(logits, labels, temperature),
        "coverage": choice["coverage"],
        "accuracy_at_threshold": choice["accuracy"],
        "met": choice["met"],
        "coverage_ok": choice["coverage_ok"],
        "n": int(logits.shape[0]),
    }


def _threshold_choice(val_cal: np.ndarray, val_labels: np.ndarray, target_precision: float, min_coverage: float,
                      val_in_distribution: np.ndarray | None, val_domains: Any = None,
                      domain_min_coverage: float = 0.0) -> dict[str, Any]:
    """:func:`choose_abstain_threshold` on every validation image, lowered to each domain's coverage floor.

    With an in-distribution mask, the chosen threshold's coverage and accuracy count
    only the images both rules answer.
    """
    choice = choose_abstain_threshold(val_cal, val_labels, target_precision, min_coverage)
    mask = None if val_in_distribution is None else check_mask(val_in_distribution, len(val_labels),
                                                               "calibration_summary (val)")
    # Only between kinds of photo: with a single domain the precision target (and min_coverage's
    # fallback) decide alone, as before.
    if val_domains is not None and domain_min_coverage > 0 and len(set(val_domains)) > 1:
        cap = domain_coverage_cap(val_cal.max(axis=1), val_domains, domain_min_coverage, mask)
        if cap["threshold"] < choice["threshold"]:
            at_cap = selective_metrics(val_cal, val_labels, cap["threshold"])
            cap["threshold_for_precision"] = choice["threshold"]
            choice.update(threshold=cap["threshold"], coverage=at_cap["coverage"], accuracy=at_cap["accuracy"],
                          met=bool(at_cap["accuracy"] >= target_precision - 1e-12), domain_cap=cap)
    if mask is not None:
        at_val = selective_metrics(val_cal, val_labels, choice["threshold"], mask)
        choice.update(coverage=at_val["coverage"], accuracy=at_val["accuracy"])
    return choice


def _checked_splits(val_logits: Any, val_labels: Any, test_logits: Any,
                    test_labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both splits checked: finite, non-empty, the same classes, labels in range.

    Raises:
        ValueError: naming the split and the problem.
    """
    val_logits = check_scores(val_logits, "calibration_summary", "validation logits")
    test_logits = check_scores(test_logits, "calibration_summary", "test logits")
    if val_logits.shape[0] == 0 or test_logits.shape[0] == 0:
        raise ValueError("calibration_summary: the validation and test splits must both be non-empty")
    if val_logits.shape[1] != test_logits.shape[1]:
        raise ValueError(
            f"calibration_summary: validation has {val_logits.shape[1]} classes, test has {test_logits.shape[1]}"
        )
    val_labels = check_labels(val_labels, val_logits.shape[0], val_logits.shape[1], "calibration_summary (val)")
    test_labels = check_labels(test_labels, test_logits.shape[0], test_logits.shape[1], "calibration_summary (test)")
    return val_logits, val_labels, test_logits, test_labels


def _ece_before_after(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """``{"ece_uncalibrated", "ece"}``: the ECE of the probabilities before and after temperature scaling."""
    return {"ece_uncalibrated": expected_calibration_error(raw, labels, n_bins),
            "ece": expected_calibration_error(calibrated, labels, n_bins)}


def _nll_before_after(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict[str, float]:
    """``{"nll_uncalibrated", "nll"}``: the NLL at ``T = 1`` and at the fitted temperature."""
    return {"nll_uncalibrated": nll(logits, labels, 1.0), "nll": nll(logits, labels, temperature)}


def calibration_report(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                       test_labels: np.ndarray, target_precision: float, min_coverage: float,
                       out_dir: str | os.PathLike[str], n_bins: int = 15) -> dict[str, Any]:
    """:func:`calibration_summary` plus the two plots for the evaluate card (on test).

    Args:
        val_logits, val_labels, test_logits, test_labels, target_precision, min_coverage:
            as for :func:`calibration_summary`.
        out_dir: where ``reliability.png`` and ``coverage_accuracy.png`` are written.
        n_bins: ECE bins (and the reliability diagram's).

    Returns:
        The summary with ``"plots": {"reliability": path, "coverage_accuracy": path}``
        (paths as strings) and ``"test_curve"`` (thinned to 200 points).
    """
    summary = calibration_summary(val_logits, val_labels, test_logits, test_labels, target_precision, min_coverage,
                                  n_bins)
    test_labels = np.asarray(test_labels).astype(np.int64)
    cal = softmax(test_logits, summary["temperature"])
    plots = _report_plots(summary, softmax(test_logits), cal, test_labels, target_precision, Path(out_dir), n_bins)
    curve = coverage_accuracy_curve(cal, test_labels, max_points=200)
    return {**summary, "test_curve": curve, "plots": plots}


def _report_plots(summary: dict[str, Any], raw: np.ndarray, cal: np.ndarray, test_labels: np.ndarray,
                  target_precision: float, out_dir: Path, n_bins: int) -> dict[str, str]:
    """The reliability diagram and the coverage/accuracy plot of the test split (paths as strings).

    Args:
        summary: :func:`calibration_summary`'s result (temperature and threshold).
        raw, cal: test probabilities before and after temperature scaling.
        test_labels: the test labels (int64).
        target_precision: drawn on the coverage plot.
        out_dir: where the PNGs go.
        n_bins: bins of the reliability diagram.
    """
    t = summary["temperature"]
    rel = reliability_diagram(raw, cal, test_labels, out_dir / "reliability.png", n_bins=n_bins, temperature=t)
    # The plot gets the full curve so its marker matches test_coverage exactly; the
    # returned curve is thinned to keep card data and JSON small.
    cov = coverage_accuracy_plot(coverage_accuracy_curve(cal, test_labels), summary["abstain_threshold"],
                                 out_dir / "coverage_accuracy.png", target_precision=target_precision)
    return {"reliability": str(rel), "coverage_accuracy": str(cov)}
