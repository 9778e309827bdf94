"""Calibration and abstention (plantml.calibration) on synthetic logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plantml.calibration import (
    calibration_report,
    calibration_summary,
    choose_abstain_threshold,
    coverage_accuracy_curve,
    coverage_accuracy_plot,
    ece_bootstrap_interval,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    reliability_diagram,
    selective_metrics,
)
from plantml.preprocess import softmax

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def calibrated_logits(n: int, n_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution (labels are sampled from it)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, size=(n, n_classes))
    logits[np.arange(n), rng.integers(0, n_classes, n)] += 2.5
    probs = softmax(logits).astype(np.float64)
    labels = np.array([rng.choice(n_classes, p=p / p.sum()) for p in probs])
    return logits, labels


def reference_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> float:
    """Straightforward loop implementation to check the vectorised one."""
    conf, pred = probs.max(1), probs.argmax(1)
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if b else (conf >= lo) & (conf <= hi)
        if in_bin.any():
            total += in_bin.mean() * abs((pred[in_bin] == labels[in_bin]).mean() - conf[in_bin].mean())
    return total


# --------------------------------------------------------------------------- ECE


def test_ece_hand_computed():
    # 10 predictions at confidence 0.9, all correct: ECE = |1.0 - 0.9| = 0.1.
    probs = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(probs, np.zeros(10, int)) == pytest.approx(0.1)
    # Half right at 0.9 confidence: |0.5 - 0.9| = 0.4.
    labels = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)


def test_ece_matches_reference_loop():
    logits, labels = calibrated_logits(3000, seed=1)
    probs = softmax(logits * 2.0)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(reference_ece(probs, labels, n_bins))


def test_ece_small_for_calibrated_model():
    logits, labels = calibrated_logits(20000, seed=2)
    assert expected_calibration_error(softmax(logits), labels) < 0.02


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="no predictions"):
        expected_calibration_error(np.zeros((0, 3)), np.zeros(0, int))
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error(np.array([[3.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(np.array([[0.6, 0.4]]), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(np.array([[0.6, 0.4]]), np.array([2]))


def test_ece_bootstrap_interval_contains_estimate_and_narrows_with_n():
    logits, labels = calibrated_logits(4000, seed=8)
    probs = softmax(logits * 2.0)
    small = ece_bootstrap_interval(probs[:200], labels[:200], n_boot=300)
    large = ece_bootstrap_interval(probs, labels, n_boot=300)
    assert small[0] <= expected_calibration_error(probs[:200], labels[:200]) <= small[1]
    assert large[0] <= expected_calibration_error(probs, labels) <= large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert ece_bootstrap_interval(probs, labels, n_boot=50, seed=1) == ece_bootstrap_interval(probs, labels, n_boot=50,
                                                                                              seed=1)


def test_reliability_bins_counts_and_edges():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.55, 0.45]])
    bins = reliability_bins(probs, np.array([0, 1, 0]), n_bins=2)
    assert bins["count"] == [1.0, 2.0]  # 0.5 is in (0, 0.5]; 0.55 and 1.0 in (0.5, 1]
    assert bins["accuracy"][1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("scale", [3.0, 0.4])
def test_temperature_recovers_scale_and_reduces_ece(scale):
    """Logits multiplied by ``scale`` from a calibrated model are fixed by T = scale."""
    logits, labels = calibrated_logits(6000, seed=3)
    distorted = logits * scale
    t = fit_temperature(distorted, labels)
    assert t == pytest.approx(scale, rel=0.1)
    before = expected_calibration_error(softmax(distorted), labels)
    after = expected_calibration_error(softmax(distorted, t), labels)
    assert before > 0.05
    assert after < 0.02
    assert nll(distorted, labels, t) < nll(distorted, labels, 1.0)


def test_temperature_keeps_predictions():
    logits, labels = calibrated_logits(500, seed=4)
    t = fit_temperature(logits * 4, labels)
    assert np.array_equal(softmax(logits * 4).argmax(1), softmax(logits * 4, t).argmax(1))


def test_temperature_without_validation_errors_is_one():
    # Every prediction right: NLL keeps falling as T -> 0, the optimum would be the bound.
    logits = np.eye(3)[np.arange(30) % 3] * 5.0
    assert fit_temperature(logits, np.arange(30) % 3) == 1.0


def test_temperature_with_one_error_is_finite_and_sharpens():
    # An under-confident model (label smoothing) with a single low-margin error: T < 1 but off the bound.
    labels = np.arange(60) % 3
    logits = np.eye(3)[labels] * 1.0
    logits[0] = [0.0, 0.2, 0.0]  # wrong, barely
    t = fit_temperature(logits, labels)
    assert 0.06 < t < 1.0


@pytest.mark.parametrize(
    "logits,labels",
    [
        (np.zeros((0, 4)), np.zeros(0, int)),         # no rows
        (np.ones((10, 1)), np.zeros(10, int)),        # one class
        (np.full((10, 3), 2.0), np.arange(10) % 3),   # logits do not vary
    ],
)
def test_temperature_degenerate_is_one(logits, labels):
    assert fit_temperature(logits, labels) == 1.0


def test_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        fit_temperature(np.zeros(5), np.zeros(5, int))
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_temperature(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((4, 3)), np.zeros(3, int))
    with pytest.raises(ValueError, match="integer"):
        fit_temperature(np.zeros((2, 3)), np.array([0.5, 1.0]))


# --------------------------------------------------------------------------- abstention


def constructed_selective_data() -> tuple[np.ndarray, np.ndarray]:
    """200 predictions, 2 classes: confidence i/200-ish; errors only among the lowest-confidence half.

    Ranked by confidence (highest first): ranks 0-99 are correct; among ranks 100-199 the
    even ones (100, 102, ...) are wrong. Accepting the top k has accuracy 1.0 for k <= 100.
    """
    n = 200
    conf = np.linspace(0.999, 0.55, n)  # strictly decreasing, distinct
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.zeros(n, int)
    labels[100::2] = 1  # predicted class is always 0; these are wrong
    return probs, labels


def test_threshold_meets_target_and_is_lowest():
    probs, labels = constructed_selective_data()
    res = choose_abstain_threshold(probs, labels, target_precision=0.99)
    assert res["met"] is True
    assert res["accuracy"] >= 0.99
    # Top 102 gives 101/102 = 0.9902 >= 0.99; top 103 gives 101/103 and top 104 102/104, both < 0.99.
    assert res["coverage"] == pytest.approx(102 / 200)
    kept = selective_metrics(probs, labels, res["threshold"])
    assert kept["coverage"] == pytest.approx(res["coverage"])
    assert kept["accuracy"] == pytest.approx(res["accuracy"])
    # Lowest: one more accepted prediction (the next lower confidence) breaks the target.
    conf = np.sort(probs.max(1))[::-1]
    lower = selective_metrics(probs, labels, conf[102])
    assert lower["accuracy"] < 0.99
    # The threshold sits strictly between the last accepted and the first rejected confidence.
    assert conf[102] < res["threshold"] <= conf[101]


def test_threshold_target_one_keeps_only_perfect_region():
    probs, labels = constructed_selective_data()
    res = choose_abstain_threshold(probs, labels, target_precision=1.0)
    assert res["met"] and res["accuracy"] == 1.0
    assert res["coverage"] == pytest.approx(100 / 200)  # rank 100 is the first error


def test_threshold_unreachable_target_falls_back():
    probs, labels = constructed_selective_data()
    labels = labels.copy()
    labels[0] = 1  # the most confident prediction is wrong: no threshold reaches 1.0
    res = choose_abstain_threshold(probs, labels, target_precision=1.0, min_coverage=0.3)
    assert res["met"] is False
    assert res["coverage"] >= 0.3
    assert res["coverage_ok"] is True
    curve = coverage_accuracy_curve(probs, labels)
    best = max(a for a, c in zip(curve["accuracy"], curve["coverage"]) if c >= 0.3)
    assert res["accuracy"] == pytest.approx(best)


def test_threshold_all_correct_keeps_everything():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4]])
    res = choose_abstain_threshold(probs, np.zeros(3, int), 0.99)
    assert res["coverage"] == 1.0 and res["threshold"] == pytest.approx(0.6)


@pytest.mark.parametrize("target,cov", [(0.0, 0.0), (1.5, 0.0), (0.9, -0.1), (0.9, 1.2)])
def test_threshold_rejects_bad_targets(target, cov):
    probs, labels = constructed_selective_data()
    with pytest.raises(ValueError, match="target_precision|min_coverage"):
        choose_abstain_threshold(probs, labels, target, cov)


def test_curve_shape_and_ties():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    curve = coverage_accuracy_curve(probs, labels)
    assert curve["thresholds"] == pytest.approx([0.6, 0.8, 0.9])
    assert curve["coverage"] == pytest.approx([1.0, 0.75, 0.5])
    assert curve["accuracy"] == pytest.approx([0.75, 2 / 3, 0.5])


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.integers(min_value=2, max_value=6), st.integers(0, 10_000))
def test_curve_properties(n, n_classes, seed):
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0, 2, (n, n_classes)))
    labels = rng.integers(0, n_classes, n)
    curve = coverage_accuracy_curve(probs, labels)
    assert curve["coverage"][0] == pytest.approx(1.0)
    assert curve["accuracy"][0] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert np.all(np.diff(curve["coverage"]) < 0)
    assert np.all(np.diff(curve["thresholds"]) > 0)
    assert 0.0 <= expected_calibration_error(probs, labels) <= 1.0
    res = choose_abstain_threshold(probs, labels, 0.9)
    kept = selective_metrics(probs, labels, res["threshold"])
    assert kept["coverage"] == pytest.approx(res["coverage"])
    if res["met"]:
        assert kept["accuracy"] >= 0.9 - 1e-9


def test_curve_thinning_keeps_ends():
    logits, labels = calibrated_logits(1000, seed=5)
    full = coverage_accuracy_curve(softmax(logits), labels)
    thin = coverage_accuracy_curve(softmax(logits), labels, max_points=50)
    assert len(thin["thresholds"]) <= 50
    assert thin["thresholds"][0] == full["thresholds"][0] and thin["thresholds"][-1] == full["thresholds"][-1]


# --------------------------------------------------------------------------- summary and plots


def test_calibration_summary_over_confident_model():
    logits, labels = calibrated_logits(4000, seed=6)
    logits = logits * 3.0  # over-confident
    s = calibration_summary(logits[:2000], labels[:2000], logits[2000:], labels[2000:], 0.95, 0.2)
    assert s["temperature"] == pytest.approx(3.0, rel=0.15)
    assert s["ece"] < s["ece_uncalibrated"] / 3
    assert s["val"]["ece"] < s["val"]["ece_uncalibrated"]
    assert s["nll"] < s["nll_uncalibrated"]
    assert s["ece_ci95"][0] <= s["ece"] <= s["ece_ci95"][1]
    assert s["val"]["met"] and s["val"]["accuracy_at_threshold"] >= 0.95
    # Test numbers are measured, not copied from validation.
    probs = softmax(logits[2000:], s["temperature"])
    kept = selective_metrics(probs, labels[2000:], s["abstain_threshold"])
    assert s["test_coverage"] == pytest.approx(kept["coverage"])
    assert s["test_accuracy_at_threshold"] == pytest.approx(kept["accuracy"])
    assert s["test_accuracy_at_threshold"] > s["test_accuracy"]
    assert 0 < s["test_coverage"] < 1


def test_calibration_summary_rejects_mismatched_splits():
    logits, labels = calibrated_logits(100)
    with pytest.raises(ValueError, match="classes"):
        calibration_summary(logits, labels, logits[:, :3], labels % 3, 0.9, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        calibration_summary(logits, labels, logits[:0], labels[:0], 0.9, 0.0)


def test_plots_written(tmp_path):
    logits, labels = calibrated_logits(800, seed=7)
    report = calibration_report(logits[:400] * 3, labels[:400], logits[400:] * 3, labels[400:], 0.95, 0.2,
                                tmp_path / "card")
    for key in ("reliability", "coverage_accuracy"):
        data = open(report["plots"][key], "rb").read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert len(report["test_curve"]["thresholds"]) <= 200
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["coverage_accuracy.png", "reliability.png"]


def test_plots_bad_input_leaves_no_file(tmp_path):
    probs = softmax(np.random.default_rng(0).normal(size=(20, 3)))
    with pytest.raises(ValueError):
        reliability_diagram(probs, probs, np.zeros(19, int), tmp_path / "r.png")
    with pytest.raises(ValueError, match="thresholds"):
        coverage_accuracy_plot({"coverage": [1.0], "accuracy": [1.0]}, 0.5, tmp_path / "c.png")
    assert list(tmp_path.iterdir()) == []


def test_summary_with_an_ood_mask_counts_only_what_both_rules_answer():
    rng = np.random.default_rng(0)
    n, c = 200, 3
    labels = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), labels] += 4.0
    wrong = rng.choice(n, 20, replace=False)  # confident mistakes ...
    logits[wrong] = 0.0
    logits[wrong, (labels[wrong] + 1) % c] = 6.0
    mask = np.ones(n, bool)
    mask[wrong] = False  # ... that the OOD rule catches
    plain = calibration_summary(logits, labels, logits, labels, 0.99, 0.5)
    masked = calibration_summary(logits, labels, logits, labels, 0.99, 0.5,
                                 val_in_distribution=mask, test_in_distribution=mask)
    # The confidence threshold is chosen on every validation image; the mask only removes answers.
    assert masked["abstain_threshold"] == plain["abstain_threshold"]
    assert masked["test_accuracy_at_threshold"] >= plain["test_accuracy_at_threshold"]
    assert masked["test_coverage"] <= min(plain["test_coverage"], mask.mean()) + 1e-12
    with pytest.raises(ValueError, match="mask"):
        calibration_summary(logits, labels, logits, labels, 0.99, 0.5, val_in_distribution=mask[:10])


def test_ece_sampling_floor_is_what_a_calibrated_model_shows_and_shrinks_with_n():
    from plantml.calibration import ece_sampling_floor, expected_calibration_error

    rng = np.random.default_rng(1)

    def calibrated_sample(n):
        conf = rng.uniform(0.5, 1.0, n)
        probs = np.stack([conf, 1 - conf], axis=1)
        labels = np.where(rng.random(n) < conf, 0, 1)  # correct with probability = confidence
        return probs, labels

    small, small_labels = calibrated_sample(72)
    median, low, high = ece_sampling_floor(small, draws=400)
    assert 0.0 < low < median < high < 0.3
    # A truly calibrated model's ECE on that sample lands inside the floor's range, well above zero.
    assert low <= expected_calibration_error(small, small_labels) <= high
    big, _ = calibrated_sample(5000)
    assert ece_sampling_floor(big, draws=100)[0] < median / 3  # noise falls like 1/sqrt(n)
    with pytest.raises(ValueError):
        ece_sampling_floor(np.zeros((0, 2)))


def test_domain_coverage_cap_answers_the_floor_of_every_domain():
    from plantml.calibration import domain_coverage_cap

    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.95,   # lab: confident
                     0.90, 0.80, 0.70, 0.60, 0.50])  # field: less so
    domains = ["lab"] * 5 + ["field"] * 5
    cap = domain_coverage_cap(conf, domains, 0.6)
    # 60 % of 5 field images = 3: the third most confident field image (0.70) sets the cap
    assert cap["threshold"] == pytest.approx(0.70) and cap["domain"] == "field"
    assert cap["per_domain"]["lab"] == pytest.approx(0.97)
    answered = conf >= cap["threshold"]
    for d in ("lab", "field"):
        m = np.array(domains) == d
        assert answered[m].mean() >= 0.6
    # images the OOD rule refuses do not count as answerable: the cap goes lower
    ood_ok = np.array([True] * 5 + [False, True, True, True, True])
    assert domain_coverage_cap(conf, domains, 0.6, ood_ok)["threshold"] == pytest.approx(0.60)
    # fewer images pass the OOD rule than the floor asks: answer all of them (cap 0)
    assert domain_coverage_cap(conf, domains, 1.0, ood_ok)["per_domain"]["field"] == 0.0
    with pytest.raises(ValueError):
        domain_coverage_cap(conf, domains[:3], 0.5)
    with pytest.raises(ValueError):
        domain_coverage_cap(conf, domains, 0.0)


def test_calibration_summary_lowers_the_threshold_to_the_domain_floor_and_says_so():
    from plantml.calibration import calibration_summary

    rng = np.random.default_rng(3)
    n_lab, n_field, c = 300, 60, 4
    labels = rng.integers(0, c, n_lab + n_field)
    logits = rng.normal(0, 1, (n_lab + n_field, c))
    # lab: confident and right; field: right 80 % of the time with low margins
    logits[np.arange(n_lab), labels[:n_lab]] += 8.0
    right = rng.random(n_field) < 0.8
    field_idx = np.arange(n_lab, n_lab + n_field)
    logits[field_idx, np.where(right, labels[n_lab:], (labels[n_lab:] + 1) % c)] += 1.5
    domains = ["lab"] * n_lab + ["field"] * n_field
    plain = calibration_summary(logits, labels, logits, labels, 0.99, 0.5)
    floored = calibration_summary(logits, labels, logits, labels, 0.99, 0.5, val_domains=domains,
                                  domain_min_coverage=0.7)
    assert plain["domain_cap"] is None
    cap = floored["domain_cap"]
    assert cap["domain"] == "field" and floored["abstain_threshold"] < plain["abstain_threshold"]
    assert cap["threshold_for_precision"] == pytest.approx(plain["abstain_threshold"])
    probs_field = np.exp(logits[field_idx] / floored["temperature"])
    probs_field /= probs_field.sum(1, keepdims=True)
    assert (probs_field.max(1) >= floored["abstain_threshold"]).mean() >= 0.7
    # a floor the precision threshold already meets changes nothing
    easy = calibration_summary(logits, labels, logits, labels, 0.99, 0.5, val_domains=domains,
                               domain_min_coverage=0.01)
    assert easy["domain_cap"] is None and easy["abstain_threshold"] == plain["abstain_threshold"]


def test_the_domain_floor_does_nothing_with_a_single_domain():
    from plantml.calibration import calibration_summary

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(0, 1, (200, 3))
    logits[np.arange(200), labels] += 2.0
    plain = calibration_summary(logits, labels, logits, labels, 0.99, 0.5)
    one = calibration_summary(logits, labels, logits, labels, 0.99, 0.5, val_domains=["lab"] * 200,
                              domain_min_coverage=0.9)
    assert one["domain_cap"] is None and one["abstain_threshold"] == plain["abstain_threshold"]
