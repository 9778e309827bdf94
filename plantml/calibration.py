"""Calibration and abstention: how far a confidence can be trusted. Torch-free.

A classifier trained with cross-entropy on PlantVillage reaches ~99 % on a random split
and says "0.999" about nearly everything, including photos that are not leaves. This
module turns raw logits into confidences that mean what they say, and picks the
confidence below which the model should answer "I don't know":

* :func:`fit_temperature` - temperature scaling (Guo et al., "On Calibration of Modern
  Neural Networks", ICML 2017): one scalar ``T`` dividing the logits, fitted by
  minimising the negative log-likelihood on the **validation** split. It never changes
  the arg-max, so accuracy is untouched.
* :func:`expected_calibration_error` - top-label ECE with equal-width bins.
* :func:`choose_abstain_threshold` - the lowest confidence threshold whose accepted
  predictions reach a target precision on validation (selective classification).
* :func:`calibration_summary` - everything the bundle stores (``calibration`` and
  ``metrics``), with ECE and the threshold's coverage/accuracy measured on **test**.

Serving and edge apply the stored temperature before the softmax and abstain when the
top confidence is below the stored threshold; the threshold is therefore chosen on
*temperature-scaled* validation probabilities.

Plots (:func:`reliability_diagram`, :func:`coverage_accuracy_plot`) use matplotlib's
Agg backend, imported inside the functions, and are written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from plantml.plots import pyplot, save_figure

from plantml.preprocess import softmax

log = logging.getLogger(__name__)

#: Search range for the temperature (log-spaced bounded search). Below 0.05 or above 20
#: the "calibration" would be hiding a broken model rather than fixing confidences.
T_MIN, T_MAX = 0.05, 20.0


# --------------------------------------------------------------------------- validation


def _check_labels(labels: Any, n: int, n_classes: int | None, what: str) -> np.ndarray:
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


def _check_scores(scores: Any, what: str, name: str) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"{what}: {name} must be a 2-D (N, C) array, got shape {scores.shape}")
    if scores.size and not np.all(np.isfinite(scores)):
        raise ValueError(f"{what}: {name} contain NaN or infinite values")
    return scores


def _check_probs(probs: Any, labels: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    probs = _check_scores(probs, what, "probabilities")
    if probs.size and (probs.min() < -1e-6 or probs.max() > 1 + 1e-6):
        raise ValueError(f"{what}: probabilities must lie in [0, 1] (did you pass logits?)")
    labels = _check_labels(labels, probs.shape[0], probs.shape[1], what)
    return probs, labels


def _confidence_correct(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probs.max(axis=1), (probs.argmax(axis=1) == labels)


# --------------------------------------------------------------------------- temperature


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

    logits = _check_scores(logits, "fit_temperature", "logits")
    labels = _check_labels(labels, logits.shape[0], logits.shape[1] if logits.size else None, "fit_temperature")
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


# --------------------------------------------------------------------------- ECE


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
    probs, labels = _check_probs(probs, labels, "reliability_bins")
    conf, correct = _confidence_correct(probs, labels) if len(labels) else (np.zeros(0), np.zeros(0, bool))
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
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
    probs, labels = _check_probs(probs, labels, "expected_calibration_error")
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
    probs, labels = _check_probs(probs, labels, "ece_bootstrap_interval")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("ece_bootstrap_interval: no predictions given")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    conf, correct = _confidence_correct(probs, labels)
    idx_bin = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, n, n)
        gap = np.abs(np.bincount(idx_bin[pick], weights=correct[pick].astype(float), minlength=n_bins)
                     - np.bincount(idx_bin[pick], weights=conf[pick], minlength=n_bins))
        values[b] = gap.sum() / n  # sum_b |n_b acc_b - n_b conf_b| / N = sum_b n_b/N |acc_b - conf_b|
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


# --------------------------------------------------------------------------- abstention


def coverage_accuracy_curve(
    probs: np.ndarray, labels: np.ndarray, max_points: int | None = None
) -> dict[str, list[float]]:
    """Coverage and accuracy of the predictions kept at each confidence threshold.

    For each distinct top confidence ``t`` (ascending), the kept set is
    ``confidence >= t``: ``coverage`` is its share of all inputs, ``accuracy`` its
    accuracy. The first point (lowest ``t``) keeps everything.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N,)`` integer class indices.
        max_points: if set, thin the curve to about this many points (kept ends), for plots.

    Returns:
        ``{"thresholds", "coverage", "accuracy"}`` lists of equal length.
    """
    probs, labels = _check_probs(probs, labels, "coverage_accuracy_curve")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("coverage_accuracy_curve: no predictions given")
    conf, correct = _confidence_correct(probs, labels)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, correct_sorted = conf[order], correct[order].astype(float)
    kept = np.arange(1, n + 1)
    cum_correct = np.cumsum(correct_sorted)
    # The last index of each run of equal confidences is where "confidence >= t" ends.
    last_of_run = np.r_[np.nonzero(np.diff(conf_sorted))[0], n - 1]
    thresholds = conf_sorted[last_of_run][::-1]
    coverage = (kept[last_of_run] / n)[::-1]
    accuracy = (cum_correct[last_of_run] / kept[last_of_run])[::-1]
    if max_points is not None and len(thresholds) > max_points >= 2:
        pick = np.unique(np.linspace(0, len(thresholds) - 1, max_points).round().astype(int))
        thresholds, coverage, accuracy = thresholds[pick], coverage[pick], accuracy[pick]
    return {
        "thresholds": thresholds.astype(float).tolist(),
        "coverage": coverage.astype(float).tolist(),
        "accuracy": accuracy.astype(float).tolist(),
    }


def choose_abstain_threshold(
    probs: np.ndarray, labels: np.ndarray, target_precision: float, min_coverage: float = 0.0
) -> dict[str, Any]:
    """The lowest confidence threshold whose accepted predictions reach ``target_precision``.

    Predictions with ``confidence >= threshold`` are accepted, the rest abstain. Among
    the thresholds whose accepted set has accuracy ``>= target_precision`` the lowest
    (= highest coverage) wins. The threshold returned lies halfway between the lowest
    accepted confidence and the next lower one, so a test-time confidence that falls in
    that gap is not decided by a validation sample's exact value.

    If no threshold reaches the target, the threshold with the best accuracy among
    those keeping at least ``min_coverage`` is returned (ties: highest coverage) and
    ``met`` is ``False``; the caller decides whether that fails a gate.

    Args:
        probs: ``(N, C)`` probabilities on the validation split (temperature-scaled if
            serving applies a temperature).
        labels: ``(N,)`` integer class indices.
        target_precision: required accuracy of the accepted predictions, in ``(0, 1]``.
        min_coverage: coverage floor for the fallback choice, in ``[0, 1]``.

    Returns:
        ``{"threshold", "coverage", "accuracy", "target_precision", "met", "min_coverage",
        "coverage_ok"}`` (``coverage_ok``: the chosen coverage is at least ``min_coverage``).

    Raises:
        ValueError: on empty input or a target/coverage outside its range.
    """
    if not 0.0 < float(target_precision) <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    if not 0.0 <= float(min_coverage) <= 1.0:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}")
    curve = coverage_accuracy_curve(probs, labels)
    t = np.asarray(curve["thresholds"])
    cov = np.asarray(curve["coverage"])
    acc = np.asarray(curve["accuracy"])
    # Tolerance: 0.99 computed as 99/100 must count as meeting 0.99.
    ok = acc >= float(target_precision) - 1e-12
    if ok.any():
        i = int(np.argmax(ok))  # lowest threshold meeting the target = highest coverage
        met = True
    else:
        allowed = cov >= float(min_coverage) - 1e-12
        # The lowest threshold keeps everything, so ``allowed`` is never empty.
        best = acc[allowed].max()
        i = int(np.nonzero(allowed & (acc >= best - 1e-12))[0][0])
        met = False
        log.warning(
            "no threshold reaches precision %.4f on validation; best accuracy %.4f at coverage %.3f",
            target_precision, acc[i], cov[i],
        )
    threshold = float(t[i]) if i == 0 else float((t[i] + t[i - 1]) / 2.0)
    return {
        "threshold": threshold,
        "coverage": float(cov[i]),
        "accuracy": float(acc[i]),
        "target_precision": float(target_precision),
        "met": bool(met),
        "min_coverage": float(min_coverage),
        "coverage_ok": bool(cov[i] >= float(min_coverage) - 1e-12),
    }


def selective_metrics(probs: np.ndarray, labels: np.ndarray, threshold: float,
                      in_distribution: np.ndarray | None = None) -> dict[str, float]:
    """Coverage and accuracy of the predictions with confidence ``>= threshold``.

    Args:
        in_distribution: optional ``(N,)`` bool mask of inputs the OOD score lets through;
            the others count as abstained whatever their confidence.

    Returns:
        ``{"threshold", "coverage", "accuracy", "n", "n_accepted"}``; ``accuracy`` is NaN
        when nothing is accepted.
    """
    probs, labels = _check_probs(probs, labels, "selective_metrics")
    if probs.shape[0] == 0:
        raise ValueError("selective_metrics: no predictions given")
    conf, correct = _confidence_correct(probs, labels)
    accepted = conf >= float(threshold)
    if in_distribution is not None:
        accepted &= _check_mask(in_distribution, len(conf), "selective_metrics")
    n_acc = int(accepted.sum())
    return {
        "threshold": float(threshold),
        "coverage": n_acc / len(conf),
        "accuracy": float(correct[accepted].mean()) if n_acc else float("nan"),
        "n": int(len(conf)),
        "n_accepted": n_acc,
    }


def _check_mask(mask: Any, n: int, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != (n,) or mask.dtype != bool:
        raise ValueError(f"{what}: the in-distribution mask must be a bool array of shape ({n},), "
                         f"got {mask.dtype} {mask.shape}")
    return mask


# --------------------------------------------------------------------------- summary


def calibration_summary(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    target_precision: float,
    min_coverage: float,
    n_bins: int = 15,
    val_in_distribution: np.ndarray | None = None,
    test_in_distribution: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit the temperature and the abstain threshold on validation; measure them on test.

    Args:
        val_logits, val_labels: validation split (fitting).
        test_logits, test_labels: test split (reporting only).
        target_precision: accuracy wanted on accepted predictions (``calibration.target_precision``).
        min_coverage: coverage floor for the threshold fallback (``calibration.min_coverage``).
        n_bins: ECE bins.
        val_in_distribution, test_in_distribution: optional bool masks of the images the
            OOD score lets through (:mod:`plantml.ood`). The confidence threshold is still
            chosen on *every* validation image: choosing it among those the OOD rule passes
            would lower it to wherever the few remaining validation errors sit, which did
            not hold up on the whole real sample (docs/benchmarks.md). Coverage and accuracy (validation and test)
            count an image as answered only if it passes both rules; coverages stay
            relative to the whole split.

    Returns:
        ``{"temperature", "ece_uncalibrated", "ece", "ece_ci95", "abstain_threshold", "test_coverage",
        "test_accuracy_at_threshold", "test_accuracy", "nll_uncalibrated", "nll",
        "target_precision", "min_coverage", "met", "n_bins", "val": {...}}``. ``ece*`` and
        ``nll*`` are on test (``ece_ci95``: bootstrap 95 % interval of the calibrated test
        ECE); ``val`` holds the same quantities on validation plus the
        threshold choice. ``calibration`` in the bundle takes ``temperature`` and
        ``abstain_threshold``; ``metrics`` takes ``ece_uncalibrated`` and ``ece``.
    """
    val_logits = _check_scores(val_logits, "calibration_summary", "validation logits")
    test_logits = _check_scores(test_logits, "calibration_summary", "test logits")
    if val_logits.shape[0] == 0 or test_logits.shape[0] == 0:
        raise ValueError("calibration_summary: the validation and test splits must both be non-empty")
    if val_logits.shape[1] != test_logits.shape[1]:
        raise ValueError(
            f"calibration_summary: validation has {val_logits.shape[1]} classes, test has {test_logits.shape[1]}"
        )
    val_labels = _check_labels(val_labels, val_logits.shape[0], val_logits.shape[1], "calibration_summary (val)")
    test_labels = _check_labels(test_labels, test_logits.shape[0], test_logits.shape[1], "calibration_summary (test)")

    temperature = fit_temperature(val_logits, val_labels)
    val_raw, val_cal = softmax(val_logits), softmax(val_logits, temperature)
    test_raw, test_cal = softmax(test_logits), softmax(test_logits, temperature)
    choice = choose_abstain_threshold(val_cal, val_labels, target_precision, min_coverage)
    if val_in_distribution is not None:
        at_val = selective_metrics(val_cal, val_labels, choice["threshold"],
                                   _check_mask(val_in_distribution, len(val_labels), "calibration_summary (val)"))
        choice.update(coverage=at_val["coverage"], accuracy=at_val["accuracy"])
    at_test = selective_metrics(test_cal, test_labels, choice["threshold"], test_in_distribution)
    return {
        "temperature": float(temperature),
        "ece_uncalibrated": expected_calibration_error(test_raw, test_labels, n_bins),
        "ece": expected_calibration_error(test_cal, test_labels, n_bins),
        "ece_ci95": list(ece_bootstrap_interval(test_cal, test_labels, n_bins)),
        "abstain_threshold": choice["threshold"],
        "test_coverage": at_test["coverage"],
        "test_accuracy_at_threshold": at_test["accuracy"],
        "test_accuracy": float(np.mean(test_cal.argmax(axis=1) == test_labels)),
        "nll_uncalibrated": nll(test_logits, test_labels, 1.0),
        "nll": nll(test_logits, test_labels, temperature),
        "target_precision": float(target_precision),
        "min_coverage": float(min_coverage),
        "met": choice["met"],
        "n_bins": int(n_bins),
        "n_test": int(test_logits.shape[0]),
        "val": {
            "ece_uncalibrated": expected_calibration_error(val_raw, val_labels, n_bins),
            "ece": expected_calibration_error(val_cal, val_labels, n_bins),
            "nll_uncalibrated": nll(val_logits, val_labels, 1.0),
            "nll": nll(val_logits, val_labels, temperature),
            "coverage": choice["coverage"],
            "accuracy_at_threshold": choice["accuracy"],
            "met": choice["met"],
            "coverage_ok": choice["coverage_ok"],
            "n": int(val_logits.shape[0]),
        },
    }


def domain_abstention(val_by_domain: dict[str, dict[str, Any]], test_by_domain: dict[str, dict[str, Any]],
                      min_coverage: float) -> dict[str, Any]:
    """The one abstain rule checked domain by domain: does it silently refuse a whole kind of photo?

    The threshold is chosen once, on all validation images (most of them lab photos); a
    rule tuned that way can refuse nearly every field photo while the overall coverage
    looks fine. A domain whose validation or test coverage falls below ``min_coverage``
    is flagged ``collapsed`` and logged as a warning (the run goes on: whether that fails
    it is a per-domain gate's business, ``evaluate.gates`` with ``metric: coverage``).

    Args:
        val_by_domain, test_by_domain: :func:`plantml.evaluation.domain_metrics` of each split.
        min_coverage: ``calibration.min_coverage``.

    Returns:
        ``{"min_coverage", "domains": {domain: {"val_coverage", "test_coverage",
        "test_accuracy_on_answered", "collapsed"}}, "warnings": [...]}``.
    """
    domains: dict[str, Any] = {}
    warnings: list[str] = []
    for d in sorted(set(val_by_domain) | set(test_by_domain)):
        val_cov = val_by_domain.get(d, {}).get("coverage", float("nan"))
        test_cov = test_by_domain.get(d, {}).get("coverage", float("nan"))
        collapsed = any(c < min_coverage for c in (val_cov, test_cov) if not math.isnan(c))
        domains[d] = {"val_coverage": val_cov, "test_coverage": test_cov,
                      "test_accuracy_on_answered": test_by_domain.get(d, {}).get("accuracy_on_answered"),
                      "collapsed": collapsed}
        if collapsed:
            msg = (f"abstention collapses on {d} photos: coverage validation {val_cov:.3f}, test {test_cov:.3f} "
                   f"< calibration.min_coverage {min_coverage}")
            log.warning(msg)
            warnings.append(msg)
    return {"min_coverage": float(min_coverage), "domains": domains, "warnings": warnings}


# --------------------------------------------------------------------------- plots


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


def calibration_report(
    val_logits: np.ndarray,
    val_labels: np.ndarray,
    test_logits: np.ndarray,
    test_labels: np.ndarray,
    target_precision: float,
    min_coverage: float,
    out_dir: str | os.PathLike[str],
    n_bins: int = 15,
) -> dict[str, Any]:
    """:func:`calibration_summary` plus the two plots for the evaluate card (on test).

    Returns:
        The summary with ``"plots": {"reliability": path, "coverage_accuracy": path}``
        (paths as strings) and ``"test_curve"`` (thinned to 200 points).
    """
    summary = calibration_summary(val_logits, val_labels, test_logits, test_labels, target_precision, min_coverage,
                                  n_bins)
    out_dir = Path(out_dir)
    t = summary["temperature"]
    test_labels = np.asarray(test_labels).astype(np.int64)
    raw, cal = softmax(test_logits), softmax(test_logits, t)
    rel = reliability_diagram(raw, cal, test_labels, out_dir / "reliability.png", n_bins=n_bins, temperature=t)
    # The plot gets the full curve so its marker matches test_coverage exactly; the
    # returned curve is thinned to keep card data and JSON small.
    cov = coverage_accuracy_plot(coverage_accuracy_curve(cal, test_labels), summary["abstain_threshold"],
                                 out_dir / "coverage_accuracy.png", target_precision=target_precision)
    curve = coverage_accuracy_curve(cal, test_labels, max_points=200)
    return {**summary, "test_curve": curve, "plots": {"reliability": str(rel), "coverage_accuracy": str(cov)}}
