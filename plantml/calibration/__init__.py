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
* :func:`ece_sampling_floor` - the ECE a perfectly calibrated model would show on a sample that size.
* :func:`choose_abstain_threshold` - the lowest confidence threshold whose accepted
  predictions reach a target precision on validation (selective classification).
* :func:`calibration_summary` - everything the bundle stores (``calibration`` and
  ``metrics``), with ECE and the threshold's coverage/accuracy measured on **test**.

Serving and edge apply the stored temperature before the softmax and abstain when the
top confidence is below the stored threshold; the threshold is therefore chosen on
*temperature-scaled* validation probabilities.

Plots (:func:`reliability_diagram`, :func:`coverage_accuracy_plot`) use matplotlib's
Agg backend, imported inside the functions, and are written atomically.

One job per module: :mod:`~plantml.calibration.temperature`, :mod:`~plantml.calibration.ece`,
:mod:`~plantml.calibration.abstention` (threshold, selective metrics, per-domain check),
:mod:`~plantml.calibration.summary` (what the bundle stores, and the evaluate card's report),
:mod:`~plantml.calibration.figures` (the plots) and :mod:`~plantml.calibration.checks`
(input checks). Every public name is re-exported here, so ``from plantml.calibration
import X`` keeps working.
"""

from __future__ import annotations

from plantml.calibration.abstention import (choose_abstain_threshold, coverage_accuracy_curve, domain_abstention,
                                            domain_coverage_cap, selective_metrics)
from plantml.calibration.ece import (ece_bootstrap_interval, ece_sampling_floor, expected_calibration_error,
                                     reliability_bins)
from plantml.calibration.figures import coverage_accuracy_plot, reliability_diagram
from plantml.calibration.summary import calibration_report, calibration_summary
from plantml.calibration.temperature import T_MAX, T_MIN, fit_temperature, nll

__all__ = [
    "T_MAX", "T_MIN", "calibration_report", "calibration_summary", "choose_abstain_threshold",
    "coverage_accuracy_curve", "coverage_accuracy_plot", "domain_abstention", "ece_bootstrap_interval",
    "domain_coverage_cap", "ece_sampling_floor",
    "expected_calibration_error", "fit_temperature", "nll", "reliability_bins", "reliability_diagram",
    "selective_metrics",
]
