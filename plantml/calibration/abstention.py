"""Abstention: which confidence threshold to answer above, and what it keeps (selective classification)."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from plantml.calibration.checks import check_mask, check_probs, confidence_correct

log = logging.getLogger(__name__)


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
    probs, labels = check_probs(probs, labels, "coverage_accuracy_curve")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("coverage_accuracy_curve: no predictions given")
    conf, correct = confidence_correct(probs, labels)
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
    _check_operating_targets(target_precision, min_coverage)
    curve = coverage_accuracy_curve(probs, labels)
    t = np.asarray(curve["thresholds"])
    cov = np.asarray(curve["coverage"])
    acc = np.asarray(curve["accuracy"])
    i, met = _threshold_index(cov, acc, float(target_precision), float(min_coverage))
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


def _check_operating_targets(target_precision: float, min_coverage: float) -> None:
    """Raise ``ValueError`` for a target precision outside ``(0, 1]`` or a coverage floor outside ``[0, 1]``."""
    if not 0.0 < float(target_precision) <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    if not 0.0 <= float(min_coverage) <= 1.0:
        raise ValueError(f"min_coverage must be in [0, 1], got {min_coverage}")


def _threshold_index(cov: np.ndarray, acc: np.ndarray, target_precision: float,
                     min_coverage: float) -> tuple[int, bool]:
    """``(index into the curve, target met)``: the lowest threshold meeting the target, else the fallback.

    The fallback is the best accuracy among the points keeping at least ``min_coverage``
    (ties: the highest coverage), logged as a warning.
    """
    # Tolerance: 0.99 computed as 99/100 must count as meeting 0.99.
    ok = acc >= target_precision - 1e-12
    if ok.any():
        return int(np.argmax(ok)), True  # lowest threshold meeting the target = highest coverage
    allowed = cov >= min_coverage - 1e-12
    # The lowest threshold keeps everything, so ``allowed`` is never empty.
    best = acc[allowed].max()
    i = int(np.nonzero(allowed & (acc >= best - 1e-12))[0][0])
    log.warning(
        "no threshold reaches precision %.4f on validation; best accuracy %.4f at coverage %.3f",
        target_precision, acc[i], cov[i],
    )
    return i, False


def domain_coverage_cap(confidences: np.ndarray, domains: Any, min_coverage: float,
                        in_distribution: np.ndarray | None = None) -> dict[str, Any]:
    """The highest confidence threshold that answers at least ``min_coverage`` of every domain's images.

    One threshold tuned for 99 % precision on mostly-lab validation answered 35-46 % of
    field photos (docs/benchmarks.md section 8): each domain's floor caps it from above.
    For a domain of ``n`` images the cap is the ``ceil(min_coverage * n)``-th highest
    confidence among the images the OOD rule lets through (``in_distribution``; all when
    ``None``); when fewer than that many pass the OOD rule, its cap is 0 (answer all of them).

    Args:
        confidences: ``(N,)`` calibrated top probabilities on validation.
        domains: ``(N,)`` each image's domain.
        min_coverage: the share of each domain to answer, in ``(0, 1]``.
        in_distribution: optional ``(N,)`` bool mask of the OOD rule.

    Returns:
        ``{"threshold", "domain" (the one that set it), "min_coverage", "per_domain": {domain: cap}}``.
    """
    conf = np.asarray(confidences, dtype=np.float64)
    dom = np.asarray(list(domains), dtype=object)
    if conf.ndim != 1 or len(conf) != len(dom) or len(conf) == 0:
        raise ValueError(f"domain_coverage_cap: {conf.shape} confidences for {len(dom)} domains")
    if not 0.0 < float(min_coverage) <= 1.0:
        raise ValueError(f"min_coverage must be in (0, 1], got {min_coverage}")
    passed = np.ones(len(conf), bool) if in_distribution is None else np.asarray(in_distribution, dtype=bool)
    caps: dict[str, float] = {}
    for d in sorted(set(dom.tolist())):
        m = dom == d
        need = int(math.ceil(float(min_coverage) * int(m.sum()) - 1e-9))
        ranked = np.sort(conf[m & passed])[::-1]
        caps[d] = float(ranked[need - 1]) if 0 < need <= len(ranked) else 0.0
    domain = min(caps, key=caps.__getitem__)
    return {"threshold": caps[domain], "domain": domain, "min_coverage": float(min_coverage), "per_domain": caps}


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
    probs, labels = check_probs(probs, labels, "selective_metrics")
    if probs.shape[0] == 0:
        raise ValueError("selective_metrics: no predictions given")
    conf, correct = confidence_correct(probs, labels)
    accepted = conf >= float(threshold)
    if in_distribution is not None:
        accepted &= check_mask(in_distribution, len(conf), "selective_metrics")
    n_acc = int(accepted.sum())
    return {
        "threshold": float(threshold),
        "coverage": n_acc / len(conf),
        "accuracy": float(correct[accepted].mean()) if n_acc else float("nan"),
        "n": int(len(conf)),
        "n_accepted": n_acc,
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
