"""The evaluate stage: every trained model on the test split, the champion, and the champion beyond the split.

:func:`evaluate_models` reads like its report: score each model (:func:`evaluate_model`),
choose the champion (:func:`choose_and_record_champion`), test the champion beyond the
random split (:func:`evaluate_beyond_split`), draw the coverage curve, write the files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from plantml import calibration as cal
from plantml import ood
from plantml import robustness as rob
from plantml import shards as sh
from plantml import storage
from plantml.config import Params
from plantml.data import ManifestRow
from plantml.evaluation import (classification_metrics, domain_metrics, plot_comparison, plot_confusion_matrix,
                                plot_roc, plot_training_curves)
from plantml.pipeline.beyond_split import (background_report, corruption_report, non_leaf_inputs, non_leaf_report,
                                           ood_histogram, ood_summary, robustness_subset, shortcut_report)
from plantml.pipeline.champion import domain_gate_results, pick_champion
from plantml.pipeline.paths import repo_path
from plantml.pipeline.reports import write_evaluation_files
from plantml.pipeline.results import CalibrationResult, ChampionDecision, EvaluationReport, ModelReport
from plantml.pipeline.samples import load_manifest
from plantml.pipeline.scoring import SplitScores, fit_detector, score_split, torch_proba
from plantml.preprocess import InputSpec, softmax
from plantml.resources import available_cores
from plantml.training import load_checkpoint, measure_latency_ms

log = logging.getLogger(__name__)


@dataclass
class EvaluatedModel:
    """One model after its test pass: its report, plus what the champion's later checks reuse."""

    model: Any
    spec: InputSpec
    detector: Any  # its OOD detector, or None
    val: SplitScores
    test: SplitScores
    val_by_domain: dict[str, Any]
    report: ModelReport


def evaluate_models(params: Params, results: Mapping[str, Mapping[str, Any]], checkpoints: Mapping[str, str],
                    index: sh.ShardIndex, out_dir: str | os.PathLike[str], is_demo: bool = False,
                    store: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Test-split metrics for every trained model, the champion, calibration and robustness.

    Every pass streams the shards (:mod:`plantml.loader`); memory is bounded by the
    per-image outputs (logits, OOD scores) and the capped subsets (OOD fit, corruption
    sweep, background baseline), not by the size of the splits.

    Args:
        params: the run's parameters.
        results: ``{name: TrainResult.to_dict()}`` of the branches that succeeded.
        checkpoints: ``{name: path to model.pt}``.
        index: the prepared shards.
        out_dir: receives plots (PNG), ``metrics.json`` and ``report.json``.
        is_demo: the data is the synthetic demo set.
        store: where the champion's OOD detector is published for the export step
            (default: ``out_dir``); its URI is ``report["ood"]["detector_uri"]``.
        progress: show progress bars.

    Returns:
        The evaluation report (plain dict, :meth:`EvaluationReport.to_dict`; ``models``,
        ``champion``, ``champion_reason``, ``calibration``, ``robustness``,
        ``background_baseline``, ``non_leaf``, ``plots``).

    Gates are checked separately by :func:`plantml.pipeline.enforce_quality_gates`.
    """
    if not results:
        raise RuntimeError("no model finished training: nothing to evaluate")
    _use_all_cores()
    out = repo_path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    classes, size = first["classes"], first["image_size"]
    rows = load_manifest(index)
    report = EvaluationReport(classes=classes, is_demo=is_demo, n_val=index.count("val"), n_test=index.count("test"))
    evaluated = {name: evaluate_model(params, name, res, checkpoints[name], index, rows, plots)
                 for name, res in results.items()}
    report.models = {name: e.report for name, e in evaluated.items()}
    choose_and_record_champion(params, report, evaluated, {n: r["history"] for n, r in results.items()}, plots)
    champ = evaluated[report.champion.name]
    evaluate_beyond_split(params, report, champ, index, rows, size, store or str(out), plots)
    report.plots["coverage"] = _coverage_plot(params, champ, plots / "coverage_accuracy.png")
    payload = report.to_dict()
    write_evaluation_files(payload, out)
    return payload


def _use_all_cores() -> None:
    """Evaluation runs alone (after the training branches joined): torch may take every core."""
    import torch

    torch.set_num_threads(available_cores())


def evaluate_model(params: Params, name: str, result: Mapping[str, Any], checkpoint: str, index: sh.ShardIndex,
                   rows: Sequence[ManifestRow], plots: Path) -> EvaluatedModel:
    """One trained model on the validation and test splits: metrics, calibration, per domain, plots.

    Each model gets its own OOD detector (fitted on a capped training subset), so the
    validation and test passes score OOD batch by batch and keep no features.

    Args:
        params: the run's parameters.
        name: the model's key in ``train.models``.
        result: its ``TrainResult.to_dict()``.
        checkpoint: path of its ``model.pt``.
        index: the prepared shards.
        rows: the manifest.
        plots: the folder its PNGs go to.

    Returns:
        The model with its scores and :class:`ModelReport`.
    """
    classes, size = result["classes"], result["image_size"]
    model, _ = load_checkpoint(checkpoint)
    spec = InputSpec(size=size, mean=tuple(result["mean"]), std=tuple(result["std"]))
    detector = fit_detector(params, model, index, spec) if params.calibration.ood_enabled else None
    val, test = (score_split(model, index, split, spec, detector, rows=rows) for split in ("val", "test"))
    metrics = classification_metrics(test.labels, softmax(test.logits), classes)
    masks = _in_distribution_masks(params, detector, val, test)
    calib_conf, calib = _calibrate(params, val, test, masks)
    report = ModelReport(
        metrics=metrics, arch=result["arch"], num_params=result["num_params"],
        latency_ms=measure_latency_ms(model, size, threads=1), train_seconds=result["train_seconds"],
        best_epoch=result["best_epoch"], epochs_run=result["epochs_run"], calibration=calib,
        calibration_confidence_only=calib_conf if masks else None)
    # Per domain, with the probabilities and the abstain rule the bundle will answer with.
    report.by_domain = _domain_metrics(test, calib, classes, masks.get("test_in_distribution"))
    val_by_domain = _domain_metrics(val, calib, classes, masks.get("val_in_distribution"))
    report.plots = model_plots(name, report, test, classes, plots)
    log.info("%s: test accuracy %.4f macro-F1 %.4f latency %.1f ms", name, report.accuracy, report.macro_f1,
             report.latency_ms)
    return EvaluatedModel(model, spec, detector, val, test, val_by_domain, report)


def _in_distribution_masks(params: Params, detector: Any, val: SplitScores,
                           test: SplitScores) -> dict[str, np.ndarray]:
    """Which validation and test images the OOD rule accepts (empty without a detector)."""
    if detector is None:
        return {}
    threshold = ood.choose_ood_threshold(val.ood_scores, params.calibration.ood_acceptance)
    return {"val_in_distribution": val.ood_scores <= threshold, "test_in_distribution": test.ood_scores <= threshold}


def _calibrate(params: Params, val: SplitScores, test: SplitScores,
               masks: Mapping[str, np.ndarray]) -> tuple[CalibrationResult, CalibrationResult]:
    """``(confidence-only calibration, the calibration the bundle answers with)``.

    With the OOD rule (``masks``) the abstain threshold is chosen on the images it accepts;
    without it the two are the same.
    """
    c = params.calibration
    floor = {"val_domains": val.domains, "domain_min_coverage": c.domain_min_coverage}
    conf_only = cal.calibration_summary(val.logits, val.labels, test.logits, test.labels, c.target_precision,
                                        c.min_coverage, **floor)
    with_ood = cal.calibration_summary(val.logits, val.labels, test.logits, test.labels, c.target_precision,
                                       c.min_coverage, **masks, **floor) if masks else conf_only
    return CalibrationResult.from_summary(conf_only), CalibrationResult.from_summary(with_ood)


def _domain_metrics(scores: SplitScores, calib: CalibrationResult, classes: Sequence[str],
                    answered: np.ndarray | None) -> dict[str, Any]:
    """Per-domain metrics of one split under the model's temperature and abstain rule."""
    return domain_metrics(scores.labels, softmax(scores.logits, calib.temperature), scores.domains, classes,
                          calib.abstain_threshold, answered)


def model_plots(name: str, report: ModelReport, test: SplitScores, classes: Sequence[str],
                plots: Path) -> dict[str, str]:
    """One model's PNGs: test confusion matrix, one-vs-rest ROC, reliability diagram.

    Args:
        name: the model's key.
        report: its report (confusion matrix, architecture, temperature).
        test: its test-split scores.
        classes: the class names.
        plots: the folder they go to.

    Returns:
        ``{"confusion", "roc", "reliability"}`` -> path.
    """
    probs = softmax(test.logits)
    temperature = report.calibration.temperature
    confusion = report.metrics["confusion_matrix"]
    return {
        "confusion": str(plot_confusion_matrix(confusion, classes, plots / f"confusion_{name}.png",
                                               f"{name} ({report.arch}) test confusion")),
        "roc": str(plot_roc(test.labels, probs, classes, plots / f"roc_{name}.png", f"{name} one-vs-rest ROC")),
        "reliability": str(cal.reliability_diagram(probs, softmax(test.logits, temperature), test.labels,
                                                   plots / f"reliability_{name}.png", temperature=temperature)),
    }


def choose_and_record_champion(params: Params, report: EvaluationReport, evaluated: Mapping[str, EvaluatedModel],
                               histories: Mapping[str, Any], plots: Path) -> None:
    """Choose the champion and record what follows from it: domain abstention, domain gates, comparison plots.

    Args:
        params: the run's parameters.
        report: the report with every model's :class:`ModelReport`; completed in place.
        evaluated: the evaluated models (for the champion's validation metrics per domain).
        histories: ``{name: per-epoch training history}`` for the training-curves plot.
        plots: the folder the PNGs go to.
    """
    models = report.model_dicts()
    report.champion = ChampionDecision(*pick_champion(params, models))
    champ = evaluated[report.champion.name]
    report.domain_abstention = cal.domain_abstention(champ.val_by_domain, champ.report.by_domain,
                                                     params.calibration.min_coverage)
    report.domain_gates = domain_gate_results(params, champ.report.by_domain)
    report.plots["curves"] = str(plot_training_curves(histories, plots / "training_curves.png"))
    report.plots["comparison"] = str(plot_comparison(models, plots / "comparison.png"))


def evaluate_beyond_split(params: Params, report: EvaluationReport, champ: EvaluatedModel, index: sh.ShardIndex,
                          rows: Sequence[ManifestRow], size: int, store: str, plots: Path) -> None:
    """The champion beyond the random split: OOD score, corruptions, background-only baseline,
    background shortcut, non-leaf inputs. Completes ``report`` in place.

    Args:
        params: the run's parameters.
        report: the report with its champion chosen.
        champ: the champion, evaluated.
        index: the prepared shards.
        rows: the manifest.
        size: the model input size.
        store: where the OOD detector is published (``ood_detector.npz`` in it).
        plots: the folder the PNGs go to.
    """
    calib = champ.report.calibration
    if champ.detector is not None:
        report.ood = ood_summary(params, champ.detector, champ.val.ood_scores, champ.test.ood_scores,
                                 storage.join(store, "ood_detector.npz"))
    predict = torch_proba(champ.model, champ.spec, calib.temperature)
    images, labels = robustness_subset(params, index, rows, size)
    report.robustness = corruption_report(params, predict, images, labels)
    report.plots["robustness"] = str(rob.robustness_chart(report.robustness.rows, plots / "robustness.png"))
    report.background_baseline = background_report(params, index, images, labels)
    report.shortcut = shortcut_report(params, predict, index, rows, report.classes)
    non_leaf, photos = non_leaf_inputs(params, size)
    report.non_leaf = non_leaf_report(champ.model, champ.spec, calib, champ.detector,
                                      report.ood.threshold if report.ood else None, non_leaf, photos)
    if report.ood is not None:
        report.ood.add_rejection_rates(generated_non_leaves=report.non_leaf["ood_rate"],
                                       non_leaf_photos=report.non_leaf["photo_ood_rate"])
        report.plots["ood"] = str(ood_histogram(report.ood, report.non_leaf, plots / "ood_scores.png"))


def _coverage_plot(params: Params, champ: EvaluatedModel, path: Path) -> str:
    """The champion's accuracy against coverage as the abstain threshold moves, with its operating point."""
    calib = champ.report.calibration
    curve = cal.coverage_accuracy_curve(softmax(champ.test.logits, calib.temperature), champ.test.labels)
    # With the OOD rule the operating point is not on the confidence-only curve: mark it.
    operating_point = ((calib.test_coverage, calib.test_accuracy_at_threshold) if champ.detector is not None
                       else None)
    return str(cal.coverage_accuracy_plot(curve, calib.abstain_threshold, path,
                                          target_precision=params.calibration.target_precision,
                                          operating_point=operating_point))
