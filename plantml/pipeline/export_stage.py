"""The export stage: the champion as a bundle (ONNX + OpenVINO FP32, INT8 behind its gate, drift reference)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from plantml import shards as sh
from plantml import storage
from plantml.config import Params
from plantml.data import ManifestRow, rows_for
from plantml.drift.reference import reference_stats_step
from plantml.export import export_bundle
from plantml.model_card import model_card_step
from plantml.models.scored import scored_classifier
from plantml.ood import FeatureDetector
from plantml.pipeline.paths import repo_path
from plantml.pipeline.results import CalibrationResult
from plantml.pipeline.samples import (batched, domains_of, load_manifest, pil_image, stratified_subset,
                                      subset_samples)
from plantml.pipeline.scoring import torch_logits
from plantml.pipeline.student_export import student_export_step
from plantml.preprocess import InputSpec, decode_image, normalize_batch, softmax
from plantml.quantize import int8_export_step
from plantml.resources import available_cores
from plantml.training import load_checkpoint

#: An ``extra_steps`` callable of :func:`plantml.export.export_bundle`.
ExportStep = Callable[..., Any]


def export_champion(params: Params, report: Mapping[str, Any], train_result: Mapping[str, Any], checkpoint: str,
                    index: sh.ShardIndex, lineage: Mapping[str, Any],
                    out_root: str | os.PathLike[str] | None = None,
                    progress: bool = True,
                    data_summary: Mapping[str, Any] | None = None,
                    student: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Export the champion to a bundle: ONNX + OpenVINO FP32 (parity-checked), INT8 behind the
    accuracy gate, drift reference statistics, calibration and metrics.

    The bundle also gets ``MODEL_CARD.md`` (:mod:`plantml.model_card`) from the metadata and
    ``data_summary``. Everything comes from the checkpoint, the report and the shard store: the OOD
    detector is read from ``report["ood"]["detector_uri"]``, never from the evaluate
    step's disk. The INT8 gate and the drift reference use stratified test subsets of at
    most ``export.int8.max_eval_images`` / ``export.max_reference_images`` images (the
    subset sizes and the gate's standard error are recorded in the metadata).

    Args:
        params: the run's parameters.
        report: the evaluation report (as returned, or read back from ``report.json``).
        train_result: the champion's ``TrainResult.to_dict()``.
        checkpoint: path of the champion's ``model.pt``.
        index: the prepared shards.
        lineage: run ids, data manifest digest, git commit (goes to ``metadata.json``).
        out_root: where the bundle folder is created (default ``export.out_dir``).
        progress: show progress bars.
        data_summary: the prepared data's summary (for the model card).
        student: the distill stage's result; the edge student goes to ``student/`` if it passes its
            gate (:mod:`plantml.pipeline.student_export`), else ``metadata["student"]`` says why not.

    Returns:
        ``(bundle_path, metadata)``.
    """
    import torch

    torch.set_num_threads(available_cores())
    model, _ = load_checkpoint(checkpoint)
    calib = CalibrationResult.from_summary(report["models"][report["champion"]]["calibration"])
    classes = train_result["classes"]
    spec = InputSpec(size=train_result["image_size"], mean=tuple(train_result["mean"]), std=tuple(train_result["std"]))
    rows = load_manifest(index)
    gate = subset_samples(index, "test", params.export.int8.max_eval_images, params.data.seed, rows)
    x_gate, y_gate = normalize_batch(np.stack([s.pixels for s in gate]), spec), np.array([s.label for s in gate])
    metrics = bundle_metrics(report, index.count("test"))
    steps = _export_steps(params, index, spec, x_gate, y_gate)
    steps.append(_reference_step(params, model, spec, index, rows, calib.temperature, classes))
    steps.append(student_export_step(params, student, index, gate, domains_of([s.key for s in gate], rows),
                                     lineage))
    steps.append(model_card_step(data_summary))  # last: it reports what the steps before measured
    return export_bundle(
        _with_ood_score(model, report.get("ood")), out_root=repo_path(out_root or params.export.out_dir),
        name=params.export.name, architecture=train_result["arch"], classes=classes, input_spec=spec,
        parity_inputs=x_gate[:8], metrics=metrics, lineage=lineage, params=params.to_dict(),
        calibration=bundle_calibration(params, calib, report.get("ood")), opset=params.export.opset,
        parity_tolerance=params.export.parity_tolerance, extra_steps=steps,
    )


def _with_ood_score(model: Any, ood_report: Mapping[str, Any] | None) -> Any:
    """The model the bundle holds: with an OOD detector, ``(logits, ood_score)`` (serving and edge read both)."""
    if not ood_report:
        return model
    detector = FeatureDetector.load(io.BytesIO(storage.read_bytes(ood_report["detector_uri"])))
    return scored_classifier(model, detector)


def bundle_metrics(report: Mapping[str, Any], n_test: int) -> dict[str, Any]:
    """The bundle's ``metrics``: the champion's FP32 test metrics, calibration, robustness, per domain.

    Args:
        report: the evaluation report.
        n_test: images in the test split.

    Returns:
        The metrics dict (the INT8 step adds its own keys during the export).
    """
    champ = report["models"][report["champion"]]
    calib = champ["calibration"]
    metrics = {
        "fp32": {k: champ[k] for k in ("accuracy", "macro_f1", "roc_auc_ovr_macro", "latency_ms")},
        "ece_uncalibrated": calib["ece_uncalibrated"], "ece": calib["ece"],
        "coverage_at_threshold": calib["test_coverage"], "accuracy_at_threshold": calib["test_accuracy_at_threshold"],
        "robustness": report["robustness"]["summary"],
        "background_baseline": report["background_baseline"],
        "non_leaf_abstain_rate": report["non_leaf"]["abstain_rate"],
        "n_test": n_test, "is_demo_data": report["is_demo"],
        "by_domain": _finite(report.get("by_domain", {})),
    }
    if report.get("shortcut", {}).get("applicable"):
        metrics["shortcut"] = {k: v for k, v in report["shortcut"].items() if k not in ("per_class", "examples")}
    if report.get("ood"):
        metrics["ood"] = {k: v for k, v in report["ood"].items() if k not in ("scores", "detector_uri")}
    return metrics


def bundle_calibration(params: Params, calib: CalibrationResult,
                       ood_report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The bundle's ``calibration``: temperature, abstain threshold, target precision, OOD threshold.

    Args:
        params: the run's parameters (``calibration.target_precision``).
        calib: the champion's calibration.
        ood_report: the report's ``ood`` section (``None``: no OOD rule).
    """
    out: dict[str, Any] = {"temperature": calib.temperature, "abstain_threshold": calib.abstain_threshold,
                           "target_precision": params.calibration.target_precision}
    if ood_report:
        out["ood_threshold"] = ood_report["threshold"]
    return out


def _export_steps(params: Params, index: sh.ShardIndex, spec: InputSpec, x_gate: np.ndarray,
                  y_gate: np.ndarray) -> list[ExportStep]:
    """The INT8 step (when ``export.int8.enabled``), calibrated on a training subset and gated on ``x_gate``."""
    q = params.export.int8
    if not q.enabled:
        return []
    calib_samples = subset_samples(index, "train", q.calibration_images, params.data.seed)
    x_calib = normalize_batch(np.stack([s.pixels for s in calib_samples]), spec)
    return [int8_export_step(x_calib, x_gate, y_gate, q.max_accuracy_drop, threads=available_cores(),
                             population=index.count("test"))]


def _finite(tree: Any) -> Any:
    """NaN/inf -> None, recursively: metadata.json stays strict JSON (e.g. nothing answered in a domain)."""
    if isinstance(tree, Mapping):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


class _StreamedOriginals:
    """The original photos of chosen test samples, decoded one at a time on iteration.

    The drift reference needs every photo at its original size (width, height and
    sharpness columns are compared with what the service sees); holding a few thousand
    12 MP field photos at once would not fit, so they are streamed from the shards.
    """

    def __init__(self, index: sh.ShardIndex, keys: Sequence[str]) -> None:
        self.index, self.keys = index, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[Any]:
        wanted = set(self.keys)
        for s in sh.iter_split(self.index, "test", with_originals=True):
            if s.key in wanted:
                yield decode_image(s.original) if s.original else pil_image(s.pixels)


def _reference_step(params: Params, model: Any, spec: InputSpec, index: sh.ShardIndex, rows: Sequence[ManifestRow],
                    temperature: float, classes: Sequence[str]) -> ExportStep:
    """The drift-reference export step over a stratified test subset, streamed."""
    keys = {r.key for r in stratified_subset(rows_for(rows, "test"), params.export.max_reference_images,
                                             params.data.seed)}
    logits, ordered = [], []
    for s_batch in batched(s for s in sh.iter_split(index, "test") if s.key in keys):
        logits.append(torch_logits(model, normalize_batch(np.stack([s.pixels for s in s_batch]), spec)))
        ordered += [s.key for s in s_batch]
    test_logits = np.concatenate(logits)
    probs = softmax(test_logits, temperature)
    return reference_stats_step(_StreamedOriginals(index, ordered), [classes[i] for i in probs.argmax(1)],
                                probs.max(1), embeddings=test_logits, embedding_source="logits")
