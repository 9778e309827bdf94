"""The distill stage: the edge student, distilled from the champion after evaluation.

``student.arch`` at ``student.image_size`` (below the champion's input side), initialised
from the champion's weights when the architectures match (the student is then the
champion distilled to a lower resolution), else from ImageNet; trained by
:func:`plantml.training.distill.distill`; then measured like a branch of the evaluation on
the validation and test splits at its own resolution: accuracy, macro-F1, per domain, its
own temperature and abstain threshold, and its own OOD detector (fitted on its
penultimate features, threshold from its validation scores). The export stage
(:mod:`plantml.pipeline.student_export`) ships it beside the champion only if it passes
the gate there.

The result is a plain dict (``result.json`` beside ``model.pt``): a Metaflow artifact, the
CLI's output, the export stage's input. A student that is disabled or cannot be smaller
than the champion is a result too (``status`` ``disabled``/``skipped`` with the reason), so
the bundle can say why it has none.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

import numpy as np

from plantml import calibration as cal
from plantml import ood
from plantml import shards as sh
from plantml.bundle import sha256_file
from plantml.config import Params
from plantml.evaluation import classification_metrics, domain_metrics
from plantml.models import create_model, freeze_stages, input_normalization
from plantml.pipeline.scoring import fit_detector, score_split
from plantml.preprocess import InputSpec, softmax
from plantml.resources import available_cores
from plantml.training import load_checkpoint, measure_latency_ms, save_checkpoint
from plantml.training.distill import DistillConfig, distill

log = logging.getLogger(__name__)

STUDENT_RESULT = "result.json"
STUDENT_DETECTOR = "ood_detector.npz"


def student_spec(params: Params) -> InputSpec:
    """The student's model input: ``student.image_size`` with its architecture's normalisation."""
    norm = input_normalization(params.student.arch)
    return InputSpec(size=params.student.image_size, mean=norm["mean"], std=norm["std"])


def skip_reason(params: Params, teacher_result: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(status, reason)`` when no student is trained (disabled, or not smaller than the champion), else ``None``."""
    s = params.student
    if not s.enabled:
        return "disabled", "student.enabled is false"
    if s.image_size >= int(teacher_result["image_size"]):
        return "skipped", (f"student.image_size {s.image_size} is not below the champion's input side "
                           f"{teacher_result['image_size']}: the student gets its speed from a lower resolution")
    return None


def distill_student(params: Params, report: Mapping[str, Any], teacher_result: Mapping[str, Any], checkpoint: str,
                    index: sh.ShardIndex, out_dir: str | os.PathLike[str], progress: bool = True,
                    on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Distill the champion into the edge student and evaluate it; write ``model.pt`` and ``result.json``.

    Args:
        params: the run's parameters (``student``, ``train``, ``calibration``).
        report: the evaluation report (the champion and its test metrics).
        teacher_result: the champion's ``TrainResult.to_dict()``.
        checkpoint: the champion's ``model.pt``.
        index: the prepared shards.
        out_dir: receives ``model.pt``, ``ood_detector.npz`` and ``result.json``.
        progress: log each epoch.
        on_epoch_end: called with each epoch's metrics row.

    Returns:
        The student's result (``status``: ``trained``, ``disabled`` or ``skipped``, with ``reason``).
    """
    s = params.student
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "status": "trained", "reason": "", "arch": s.arch, "image_size": s.image_size,
        "teacher": report["champion"], "teacher_arch": teacher_result["arch"],
        "teacher_image_size": int(teacher_result["image_size"]), "teacher_checkpoint_sha256": sha256_file(checkpoint),
        "settings": {k: getattr(s, k) for k in ("epochs", "lr", "temperature", "alpha", "frozen_blocks")},
    }
    skip = skip_reason(params, teacher_result)
    if skip is not None:
        result.update(status=skip[0], reason=skip[1])
        log.info("student %s: %s", *skip)
        return _write_result(out, result)
    import torch

    torch.set_num_threads(available_cores())
    teacher, _ = load_checkpoint(checkpoint)
    spec = student_spec(params)
    student, init, frozen = _build_student(params, teacher, teacher_result)
    outcome = distill(student, teacher, index, _teacher_spec(teacher_result), spec, _config(params),
                      progress=progress, on_epoch_end=on_epoch_end)
    result.update(init=init, classes=list(teacher_result["classes"]), mean=list(spec.mean), std=list(spec.std),
                  num_params=sum(p.numel() for p in student.parameters()), frozen_params=frozen,
                  history=outcome.history, best_epoch=outcome.best_epoch, epochs_run=len(outcome.history),
                  distill_seconds=outcome.seconds)
    result.update(evaluate_student(params, student, index, spec, report, out))
    result["latency_ms"] = measure_latency_ms(student, s.image_size, threads=1)
    result["teacher_latency_ms"] = report["models"][report["champion"]].get("latency_ms")
    ckpt = out / "model.pt"
    save_checkpoint(student.state_dict(), SimpleNamespace(arch=s.arch, classes=result["classes"],
                                                          image_size=s.image_size, mean=result["mean"],
                                                          std=result["std"]), ckpt)
    result["checkpoint"] = str(ckpt.resolve())
    return _write_result(out, result)


def _write_result(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    (out / STUDENT_RESULT).write_text(json.dumps(result, indent=2))
    return result


def _teacher_spec(teacher_result: Mapping[str, Any]) -> InputSpec:
    return InputSpec(size=int(teacher_result["image_size"]), mean=tuple(teacher_result["mean"]),
                     std=tuple(teacher_result["std"]))


def _config(params: Params) -> DistillConfig:
    s, t = params.student, params.train
    return DistillConfig(epochs=s.epochs, lr=s.lr, temperature=s.temperature, alpha=s.alpha,
                         batch_size=t.batch_size, weight_decay=t.weight_decay, warmup_epochs=t.warmup_epochs,
                         patience=t.patience, seed=t.seed, background_replace=t.background_replace,
                         ema_decay=t.ema_decay)


def _build_student(params: Params, teacher: Any, teacher_result: Mapping[str, Any]) -> tuple[Any, str, int]:
    """``(student, how it was initialised, frozen parameters)``: the champion's weights when the arch matches."""
    import torch

    s = params.student
    same = s.arch == teacher_result["arch"]
    student = create_model(s.arch, num_classes=len(teacher_result["classes"]), pretrained=not same,
                           image_size=s.image_size)
    if same:
        student.load_state_dict(teacher.state_dict())
    frozen = freeze_stages(student, s.frozen_blocks)
    init = f"champion ({teacher_result['arch']} at {teacher_result['image_size']} px)" if same else "imagenet"
    return student.to(memory_format=torch.channels_last), init, frozen


def evaluate_student(params: Params, model: Any, index: sh.ShardIndex, spec: InputSpec,
                     report: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """The student's test metrics (overall, per domain), calibration, OOD threshold and FP32 comparison.

    Returns:
        ``{"metrics", "by_domain", "calibration", "ood", "vs_champion_fp32"}`` (plain data).
    """
    c = params.calibration
    # the champion's scoring: the loader resizes its shards to the student's side
    detector = fit_detector(params, model, index, spec) if c.ood_enabled else None
    val, test = (score_split(model, index, split, spec, detector) for split in ("val", "test"))
    val_lg, val_y, val_s = val.logits, val.labels, val.ood_scores
    test_lg, test_y, test_s = test.logits, test.labels, test.ood_scores
    classes = list(index.classes)
    masks: dict[str, np.ndarray] = {}
    ood_block = None
    if detector is not None:
        threshold = ood.choose_ood_threshold(val_s, c.ood_acceptance)
        masks = {"val_in_distribution": val_s <= threshold, "test_in_distribution": test_s <= threshold}
        detector.save(out / STUDENT_DETECTOR)
        ood_block = {"threshold": float(threshold), "detector": str((out / STUDENT_DETECTOR).resolve()),
                     "test_rejection_rate": float(np.mean(test_s > threshold)) if len(test_s) else 0.0}
    summary = cal.calibration_summary(val_lg, val_y, test_lg, test_y, c.target_precision, c.min_coverage, **masks,
                                      val_domains=val.domains, domain_min_coverage=c.domain_min_coverage)
    metrics = classification_metrics(test_y, softmax(test_lg), classes)
    by_domain = domain_metrics(test_y, softmax(test_lg, summary["temperature"]),
                               test.domains, classes, summary["abstain_threshold"],
                               masks.get("test_in_distribution"))
    champ = report["models"][report["champion"]]
    return {
        "metrics": {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "n_test": int(len(test_y))},
        "by_domain": {d: {k: v for k, v in m.items() if k in ("accuracy", "macro_f1", "n", "coverage")}
                      for d, m in by_domain.items()},
        "calibration": {"temperature": summary["temperature"], "abstain_threshold": summary["abstain_threshold"],
                        "ece": summary["ece"], "test_coverage": summary["test_coverage"]},
        "ood": ood_block,
        "vs_champion_fp32": {"champion_accuracy": champ["accuracy"],
                             "accuracy_drop": float(champ["accuracy"] - metrics["accuracy"])},
    }
