"""The champion beyond the random split: OOD score, corruptions, background-only baseline,
the background-shortcut check and non-leaf inputs.

Each function returns one plain section of the evaluation report; all work on capped
subsets, so their memory does not grow with the data set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from plantml import ood
from plantml import robustness as rob
from plantml import shards as sh
from plantml import storage
from plantml.config import Params
from plantml.data import DEFAULT_DOMAIN, ManifestRow, rows_for
from plantml.models.scored import extract_features
from plantml.pipeline.results import CalibrationResult, OODResult, RobustnessResult
from plantml.pipeline.samples import pil_image, sample_image, subset_samples
from plantml.pipeline.scoring import PredictProba
from plantml.preprocess import InputSpec, preprocess_batch, softmax

log = logging.getLogger(__name__)

#: Training images the background-only baseline fits on (resized shard pixels).
BACKGROUND_TRAIN_IMAGES = 2000


def ood_summary(params: Params, detector: Any, val_scores: np.ndarray, test_scores: np.ndarray,
                detector_uri: str) -> OODResult:
    """The champion's OOD section of the report; publishes the detector at ``detector_uri``.

    The export step (maybe on another machine) reads the detector from there, never from
    this step's disk.

    Args:
        params: the run's parameters (``calibration.ood_acceptance``).
        detector: the champion's fitted detector.
        val_scores, test_scores: its scores of the validation and test images.
        detector_uri: where to publish the detector (folder path or ``s3://``).

    Returns:
        The detector's summary (threshold, rejection rates), where it is published, and the scores.
    """
    c = params.calibration
    threshold = ood.choose_ood_threshold(val_scores, c.ood_acceptance)
    summary = ood.summary_dict(detector, threshold, c.ood_acceptance, {
        "validation": ood.rejection_rate(val_scores, threshold), "test": ood.rejection_rate(test_scores, threshold)})
    uri = storage.write_bytes(detector_uri, detector.to_bytes())
    log.info("OOD threshold %.4f (%.0f %% of validation accepted); test rejected %.3f", threshold,
             100 * c.ood_acceptance, summary["rejection_rate"]["test"])
    return OODResult(summary, uri, val_scores.tolist(), test_scores.tolist())


def robustness_subset(params: Params, index: sh.ShardIndex, rows: Sequence[ManifestRow],
                      size: int) -> tuple[list[Any], np.ndarray]:
    """The capped, stratified test subset the corruption sweep and the baseline run on.

    Args:
        params: the run's parameters (``robustness.max_images``, ``data.seed``).
        index: the prepared shards.
        rows: the manifest.
        size: the model's input size (originals are shrunk to twice that).

    Returns:
        ``(PIL images, integer labels)``.
    """
    sub = subset_samples(index, "test", params.robustness.max_images, params.data.seed, rows, with_originals=True)
    return [sample_image(s, size) for s in sub], np.array([s.label for s in sub])


def corruption_report(params: Params, predict: PredictProba, images: Sequence[Any],
                      labels: np.ndarray) -> RobustnessResult:
    """Accuracy under each corruption and severity of ``robustness.severities``.

    Args:
        params: the run's parameters.
        predict: the champion's calibrated prediction function.
        images, labels: the test subset (:func:`robustness_subset`).

    Returns:
        The rows per corruption and severity, their summary and the subset size.
    """
    rows = rob.evaluate_corruptions(images, labels, predict, params.robustness.severities, seed=params.data.seed)
    return RobustnessResult(rows, rob.robustness_summary(rows), len(images))


def background_report(params: Params, index: sh.ShardIndex, images: Sequence[Any],
                      labels: np.ndarray) -> dict[str, Any]:
    """The background-only baseline: how well border pixels alone predict the class.

    Args:
        params: the run's parameters.
        index: the prepared shards (the baseline fits on training pixels).
        images, labels: the test subset it is scored on.

    Returns:
        :func:`plantml.robustness.background_baseline`'s result, with ``train_images`` saying what it fitted on.
    """
    train_sub = subset_samples(index, "train", BACKGROUND_TRAIN_IMAGES, params.data.seed)
    out = rob.background_baseline(
        [pil_image(s.pixels) for s in train_sub], np.array([s.label for s in train_sub]),
        images, labels, border=params.robustness.background_border, seed=params.data.seed)
    out["train_images"] = "resized training pixels (shards)"
    return out


def shortcut_report(params: Params, predict: PredictProba, index: sh.ShardIndex, rows: Sequence[ManifestRow],
                    classes: Sequence[str]) -> dict[str, Any]:
    """The background-shortcut check on this run's data (:func:`plantml.robustness.shortcut_check`).

    Leaves: lab-domain test images of the classes no other domain has. Backgrounds: the
    other domains' test photos (never trained on). Not applicable to a one-domain run.

    Args:
        params: the run's parameters (``robustness.shortcut_max_images``, ``max_shortcut_rate``).
        predict: the champion's calibrated prediction function.
        index: the prepared shards.
        rows: the manifest.
        classes: the class names, in the model's order.

    Returns:
        The check's result with ``applicable`` (and ``reason`` when it is not).
    """
    test = rows_for(rows, "test")
    field_classes = {r.label for r in rows if r.domain != DEFAULT_DOMAIN}
    if not field_classes:
        return {"applicable": False, "reason": f"no photos outside the {DEFAULT_DOMAIN} domain in this run"}
    lab_keys = {r.key for r in test if r.domain == DEFAULT_DOMAIN and r.label not in field_classes}
    field_keys = {r.key for r in test if r.domain != DEFAULT_DOMAIN}
    if not lab_keys or not field_keys:
        return {"applicable": False, "reason": "no lab test leaf of another crop, or no field test photo"}
    lab, field = [], []
    for s in sh.iter_split(index, "test"):
        if s.key in lab_keys:
            lab.append(s)
        elif s.key in field_keys:
            field.append(s.pixels)
    index_of = {c: i for i, c in enumerate(classes)}
    out = rob.shortcut_check(predict, [s.pixels for s in lab], [s.label for s in lab], field,
                             [index_of[c] for c in sorted(field_classes)], classes,
                             max_images=params.robustness.shortcut_max_images, seed=params.data.seed)
    out["applicable"] = True
    out["max_target_rate"] = params.robustness.max_shortcut_rate
    return out


def non_leaf_inputs(params: Params, size: int) -> tuple[list[Any], list[Any]]:
    """``(generated non-leaf images, non-leaf photos)`` at least 224 px, deterministic for ``data.seed``.

    Args:
        params: the run's parameters.
        size: the model's input size.
    """
    side = max(size, 224)
    return (rob.non_leaf_images(n=60, size=side, seed=params.data.seed),
            rob.non_leaf_photos(n=12, size=side, seed=params.data.seed))


def non_leaf_report(model: Any, spec: InputSpec, calib: CalibrationResult, detector: Any,
                    ood_threshold: float | None, non_leaf: Sequence[Any], photos: Sequence[Any]) -> dict[str, Any]:
    """Abstention on generated non-leaf images and non-leaf photos, with and without the OOD rule.

    Args:
        model: the champion (torch).
        spec: its input specification.
        calib: its calibration (temperature, abstain threshold).
        detector: its OOD detector, or ``None``.
        ood_threshold: the OOD threshold (``None`` without a detector).
        non_leaf, photos: the two sets of inputs.

    Returns:
        ``{"n", "n_photos", "abstain_rate", "abstain_rate_confidence_only", ...}``; the
        ``photo_`` keys for the photos; ``ood_rate`` and ``scores`` with a detector.
    """
    out: dict[str, Any] = {"n": len(non_leaf), "n_photos": len(photos)}
    for key, images in (("", non_leaf), ("photo_", photos)):
        if not images:
            out.update({f"{key}abstain_rate": float("nan"), f"{key}abstain_rate_confidence_only": float("nan")})
            continue
        feats, logits = extract_features(model, preprocess_batch(list(images), spec))
        probs = softmax(logits, calib.temperature)
        scores = detector.score(feats) if detector is not None else None
        abstained, _ = ood.decide(probs, scores, calib.abstain_threshold, ood_threshold)
        out[f"{key}abstain_rate"] = float(abstained.mean())
        out[f"{key}abstain_rate_confidence_only"] = rob.abstain_rate(probs, calib.abstain_threshold)
        if scores is not None:
            out[f"{key}ood_rate"] = ood.rejection_rate(scores, ood_threshold)
            out[f"{key}scores"] = scores.tolist()
    return out


def ood_histogram(ood_result: OODResult, non_leaf: Mapping[str, Any], path: Path) -> Path:
    """The OOD scores of leaves and non-leaves against the threshold, as a PNG at ``path``.

    Args:
        ood_result: the champion's OOD result (validation and test scores, threshold).
        non_leaf: the non-leaf report (its ``scores`` and ``photo_scores``).
        path: the PNG to write.
    """
    groups = {"validation leaves": np.asarray(ood_result.val_scores),
              "test leaves": np.asarray(ood_result.test_scores),
              "generated non-leaves": np.asarray(non_leaf.get("scores", [])),
              "non-leaf photos": np.asarray(non_leaf.get("photo_scores", []))}
    return ood.score_histogram(groups, ood_result.threshold, path)
