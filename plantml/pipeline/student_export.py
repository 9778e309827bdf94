"""The edge student in the bundle: exported like the champion into ``student/``, behind its gate.

The student is written as a complete bundle of its own in the champion bundle's
``student/`` folder (``student/metadata.json``, its FP32 ONNX + OpenVINO models, its INT8
models behind the same INT8 gate as the champion's), by the same
:func:`plantml.export.export_bundle` and :func:`plantml.quantize.int8_export_step`. So it
carries its own input spec (its smaller side), classes, calibration and OOD threshold, and
every reader of the champion (serving, the MLflow model, the registry, drift) is unchanged:
the top-level ``files`` list holds only the champion's. The top-level ``metadata.json``
gets a ``student`` block that pins ``student/metadata.json`` by sha256
(:func:`plantml.bundle.load_student_bundle` checks it).

**The gate** (both parts, on the same stratified test subset as the champion's INT8 gate,
each model through the session it will run in):

* accuracy: a student model (FP32, or an INT8 kept by its own INT8 gate) is shipped only
  if it is at most ``student.max_accuracy_drop`` below the champion FP32 (ONNX Runtime) on
  those images, overall and in every domain present; the others are removed from
  ``student/`` (``student_gate_left_out`` in its metadata, ``gate.left_out`` with the figures);
* speed: the champion's fastest model over the fastest student model that passed, batch 1,
  1 thread, median of 30 runs, at least ``student.min_speedup``.

A student with no model passing, or not faster (or never trained), is removed from the
bundle and the block says why (``kept: false``, ``reason``) — never silently.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from plantml import shards as sh
from plantml.bundle import METADATA_FILE, STUDENT_DIR, sha256_file
from plantml.config import Params
from plantml.export import export_bundle
from plantml.models.scored import scored_classifier
from plantml.ood import FeatureDetector
from plantml.pipeline.samples import pil_image, subset_samples
from plantml.preprocess import InputSpec, normalize_batch, resize_center_crop
from plantml.quantize import int8_export_step, median_latency_ms, predict_labels
from plantml.resources import available_cores
from plantml.runtime import batch_runner
from plantml.training import load_checkpoint

log = logging.getLogger(__name__)

ABSENT_REASON = "no student was distilled for this run (the flow's distill step, `plantml distill`)"


def student_export_step(params: Params, student: Mapping[str, Any] | None, index: sh.ShardIndex,
                        gate_samples: Sequence[sh.Sample], gate_domains: Sequence[str],
                        lineage: Mapping[str, Any]) -> Callable[[Any, dict[str, Any]], None]:
    """The export step that adds the student (or the reason it has none) to the bundle being written.

    Args:
        params: the run's parameters.
        student: the distill stage's result (``None``: no student was distilled).
        index: the prepared shards (INT8 calibration images).
        gate_samples: the champion's gate subset of the test split (same images, resized for the student).
        gate_domains: each gate sample's domain.
        lineage: the champion's lineage (the student's sub-bundle gets it too).
    """
    def step(writer: Any, metadata: dict[str, Any]) -> None:
        if not student or student.get("status") != "trained":
            metadata["student"] = {"kept": False, "status": (student or {}).get("status", "absent"),
                                   "reason": (student or {}).get("reason") or ABSENT_REASON}
            log.info("student: none in the bundle (%s)", metadata["student"]["reason"])
            return
        metadata["student"] = _export_and_gate(params, student, index, gate_samples, gate_domains, lineage,
                                               writer, metadata)

    return step


def student_images(samples: Sequence[sh.Sample], spec: InputSpec) -> np.ndarray:
    """Shard samples resized to the student's side by the shared preprocessing rule, normalised (NCHW)."""
    return normalize_batch(np.stack([resize_center_crop(pil_image(s.pixels), spec.size) for s in samples]), spec)


def downscaled(model: Any, in_size: int, out_size: int) -> Any:
    """``model`` behind an exact, exportable antialiased bilinear downscale from ``in_size`` to ``out_size``.

    The student trained on the champion's ``in_size`` inputs resized on the device
    (:func:`plantml.training.distill.resized_input`); shipping it behind the same resize
    keeps its input (and so every reader's preprocessing) the champion's. Measured on the
    real sample: resizing the photo straight to 112 px instead cost the 112 px student
    6.4 points (docs/edge-student.md). The resize is separable, so it is two matrix
    products with the rows torch's own antialiased interpolation gives (MatMul exports to
    every runtime; ONNX ``Resize`` with antialias does not).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    eye = torch.eye(in_size)[None, None]
    w = F.interpolate(eye, size=(out_size, in_size), mode="bilinear", antialias=True, align_corners=False)[0, 0]

    class Downscaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model
            self.output_names = tuple(getattr(model, "output_names", ("logits",)))
            self.register_buffer("rows", w.contiguous())
            self.register_buffer("cols", w.t().contiguous())

        def forward(self, x: Any) -> Any:
            return self.inner(torch.matmul(torch.matmul(self.rows, x), self.cols))

    return Downscaled().eval()


def _student_model(student: Mapping[str, Any]) -> Any:
    model, _ = load_checkpoint(student["checkpoint"])
    ood_block = student.get("ood")
    if ood_block:
        model = scored_classifier(model, FeatureDetector.load(Path(ood_block["detector"])))
    return downscaled(model, int(student["teacher_image_size"]), int(student["image_size"]))


def _export_and_gate(params: Params, student: Mapping[str, Any], index: sh.ShardIndex,
                     gate_samples: Sequence[sh.Sample], gate_domains: Sequence[str], lineage: Mapping[str, Any],
                     writer: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """Export the student into ``student/``, gate it against the champion, keep or remove it; the block."""
    # the champion's input side: the model downscales inside (see downscaled)
    spec = InputSpec(size=int(student["teacher_image_size"]), mean=tuple(student["mean"]), std=tuple(student["std"]))
    x = student_images(gate_samples, spec)
    y = np.array([s.label for s in gate_samples])
    sub_meta = _write_student_bundle(params, student, index, spec, x, y, lineage, writer, metadata)
    root = Path(writer.dir)
    champion_models = [(f["runtime"], f["precision"], root / f["path"]) for f in writer.files
                       if f.get("role", "model") == "model"]
    student_models = [(f["runtime"], f["precision"], root / STUDENT_DIR / f["path"]) for f in sub_meta["files"]
                      if f.get("role", "model") == "model"]
    x_champ = normalize_batch(np.stack([s.pixels for s in gate_samples]), InputSpec.from_dict(metadata["input"]))
    gate = gate_student(params, champion_models, student_models, x_champ, x, y, np.asarray(gate_domains))
    block = {
        "kept": gate["passed"], "status": "kept" if gate["passed"] else "rejected", "reason": gate["reason"],
        "path": STUDENT_DIR, "arch": student["arch"], "image_size": int(student["image_size"]),
        "input_note": f"input {spec.size} px (the champion's), downscaled to {student['image_size']} px inside",
        "input": spec.to_dict(), "teacher": student["teacher"], "init": student.get("init"),
        "metrics": {"fp32_torch": student["metrics"], "by_domain": student["by_domain"]},
        "calibration": sub_meta["calibration"], "gate": gate,
        "distill_seconds": student.get("distill_seconds"), "epochs_run": student.get("epochs_run"),
        "int8": sub_meta.get("int8"),
    }
    if gate["passed"]:
        if gate["left_out"]:
            drop_models(root / STUDENT_DIR, list(gate["left_out"]))
        block["metadata_sha256"] = sha256_file(root / STUDENT_DIR / METADATA_FILE)
        block["models"] = gate["shipped"]
    else:
        shutil.rmtree(root / STUDENT_DIR, ignore_errors=True)
        block["path"] = None
    log.info("student: %s (%s)", block["status"], gate["reason"])
    return block


def _write_student_bundle(params: Params, student: Mapping[str, Any], index: sh.ShardIndex, spec: InputSpec,
                          x: np.ndarray, y: np.ndarray, lineage: Mapping[str, Any], writer: Any,
                          metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Export the student (FP32 + INT8 behind its gate) as a bundle in ``<bundle>/student``; its metadata."""
    steps: list[Any] = [lambda w, m: m.update(model_resolution=int(student["image_size"]))]
    q = params.export.int8
    if q.enabled:
        calib = student_images(subset_samples(index, "train", q.calibration_images, params.data.seed), spec)
        steps.append(int8_export_step(calib, x, y, q.max_accuracy_drop, threads=available_cores(),
                                      population=index.count("test")))
    cal = student["calibration"]
    calibration = {"temperature": cal["temperature"], "abstain_threshold": cal["abstain_threshold"],
                   "target_precision": params.calibration.target_precision}
    if student.get("ood"):
        calibration["ood_threshold"] = student["ood"]["threshold"]
    parent = Path(writer.dir)
    with tempfile.TemporaryDirectory(dir=parent.parent, prefix=".student-") as tmp:
        path, sub_meta = export_bundle(
            _student_model(student), out_root=Path(tmp), name=f"{metadata['name']}-student",
            architecture=student["arch"], classes=list(metadata["classes"]), input_spec=spec, parity_inputs=x[:8],
            metrics={"fp32": student["metrics"], "by_domain": student["by_domain"]},
            lineage={**lineage, "role": "edge student", "teacher": student["teacher"],
                     "teacher_checkpoint_sha256": student.get("teacher_checkpoint_sha256")},
            params=params.to_dict(), calibration=calibration, opset=params.export.opset,
            parity_tolerance=params.export.parity_tolerance, version=metadata["version"], extra_steps=steps)
        os.replace(path, parent / STUDENT_DIR)
    return sub_meta


def _accuracy(pred: np.ndarray, y: np.ndarray, domains: np.ndarray) -> dict[str, Any]:
    """Overall and per-domain accuracy of predictions (``n`` per domain)."""
    out: dict[str, Any] = {"all": {"accuracy": float(np.mean(pred == y)) if len(y) else 0.0, "n": int(len(y))}}
    for d in sorted(set(domains.tolist())):
        m = domains == d
        out[str(d)] = {"accuracy": float(np.mean(pred[m] == y[m])), "n": int(m.sum())}
    return out


def gate_student(params: Params, champion_models: Sequence[tuple[str, str, Path]],
                 student_models: Sequence[tuple[str, str, Path]], x_champ: np.ndarray, x_student: np.ndarray,
                 y: np.ndarray, domains: np.ndarray) -> dict[str, Any]:
    """The student's gate: accuracy vs the champion FP32 (overall, per domain) and 1-thread speed.

    Args:
        params: ``student.max_accuracy_drop`` and ``student.min_speedup``.
        champion_models: ``(runtime, precision, path)`` of every champion model in the bundle.
        student_models: the same for the student's.
        x_champ: the gate images at the champion's input.
        x_student: the same images at the student's input.
        y: their labels.
        domains: their domains.

    Returns:
        ``{"passed", "reason", "champion_fp32", "student": {model: accuracy}, "latency_ms", "speedup", ...}``.
    """
    s = params.student
    threads = available_cores()
    reference = next(p for r, pr, p in champion_models if r == "onnxruntime" and pr == "fp32")
    champ = _accuracy(predict_labels(batch_runner(reference, "onnxruntime", threads), x_champ), y, domains)
    student_acc, left_out = {}, {}
    for runtime, precision, path in student_models:
        name = f"{runtime}_{precision}"
        student_acc[name] = acc = _accuracy(predict_labels(batch_runner(path, runtime, threads), x_student), y, domains)
        bad = [f"{d} {a['accuracy']:.4f} vs champion {champ[d]['accuracy']:.4f}" for d, a in acc.items()
               if champ[d]["accuracy"] - a["accuracy"] > s.max_accuracy_drop + 1e-9]
        if bad:
            left_out[name] = f"{name}: " + ", ".join(bad)
    passing = [k for k in student_acc if k not in left_out]
    latency = {"champion": _latencies(champion_models, x_champ), "student": _latencies(student_models, x_student)}
    best_c = min(latency["champion"].values())
    best_s = min(latency["student"][k] for k in passing) if passing else None
    speedup = best_c / best_s if best_s else 0.0
    if not passing:
        reason = f"no student model within {s.max_accuracy_drop * 100:.2f} pt of the champion FP32: " + \
            "; ".join(left_out.values())
    elif speedup < s.min_speedup:
        reason = (f"not faster enough: champion's fastest {best_c:.2f} ms / student's fastest within the accuracy "
                  f"gate {best_s:.2f} ms = {speedup:.2f}x < {s.min_speedup}x")
    else:
        reason = (f"{', '.join(passing)} within {s.max_accuracy_drop * 100:.2f} pt of the champion FP32 (overall and "
                  f"per domain), {speedup:.2f}x faster ({best_c:.2f} -> {best_s:.2f} ms, 1 thread)")
        if left_out:
            reason += "; left out (accuracy): " + "; ".join(left_out.values())
    passed = bool(passing) and speedup >= s.min_speedup
    return {"passed": passed, "reason": reason, "shipped": passing if passed else [], "left_out": left_out,
            "max_accuracy_drop": s.max_accuracy_drop, "min_speedup": s.min_speedup, "n_images": int(len(y)),
            "champion_fp32": champ, "student": student_acc, "latency_ms": latency,
            "latency": "batch 1, 1 thread, median of 30 runs", "speedup": speedup}


def drop_models(sub_dir: Path, names: Sequence[str]) -> None:
    """Remove the student models that missed the accuracy gate from its sub-bundle (files and ``files`` list)."""
    meta_path = sub_dir / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    gone = [f for f in meta["files"] if f"{f['runtime']}_{f['precision']}" in names]
    for f in gone:
        (sub_dir / f["path"]).unlink(missing_ok=True)
        parent = (sub_dir / f["path"]).parent
        if parent != sub_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    meta["files"] = [f for f in meta["files"] if f not in gone]
    meta["student_gate_left_out"] = sorted(names)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, meta_path)


def _latencies(models: Sequence[tuple[str, str, Path]], x: np.ndarray) -> dict[str, float]:
    return {f"{r}_{p}": median_latency_ms(batch_runner(path, r, 1), x) for r, p, path in models}
