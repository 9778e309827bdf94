"""The INT8 step of a bundle export: quantize both runtimes, gate, keep or delete, and report.

:func:`int8_export_step` builds the step :func:`plantml.export.export_bundle` runs
(``extra_steps``); it writes ``metadata["metrics"]["int8_*"|"fp32_*"]`` and
``metadata["int8"]`` (the gate, which runtime passed and why, the recommended precision).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from plantml.quantize.gate import RuntimeJob, ood_agreement, quantize_and_gate
from plantml.quantize.inputs import check_calibration_images
from plantml.quantize.onnx_int8 import quantize_onnx
from plantml.quantize.openvino_int8 import is_transformer, quantize_openvino
# The gate measures the session the service runs: the runners of plantml.runtime.
from plantml.runtime import onnxruntime_runner, openvino_runner

log = logging.getLogger(__name__)

ONNX_INT8_PATH = "model.int8.onnx"
OPENVINO_INT8_DIR = "openvino_int8"
ONNX_FP32_PATH = "model.onnx"
OPENVINO_FP32_XML = "openvino/model.xml"


def int8_export_step(
    calibration_images: np.ndarray,
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    max_accuracy_drop: float,
    threads: int = 2,
    population: int | None = None,
) -> Callable[[Any, dict[str, Any]], None]:
    """Build the INT8 step for :func:`plantml.export.export_bundle` (``extra_steps``).

    The step quantizes the bundle's ONNX and OpenVINO FP32 models, measures FP32 and INT8
    of each runtime on ``eval_images``/``eval_labels`` (the test split), keeps an INT8
    model only if its accuracy drop is within ``max_accuracy_drop``, registers kept files
    with the writer (sha256) and deletes rejected ones. It writes
    ``metadata["metrics"]["int8_openvino"|"int8_onnxruntime"]`` (``accuracy``,
    ``macro_f1``, ``accuracy_drop``, ``kept``, ``size_bytes``, ``latency_ms``),
    ``metadata["metrics"]["fp32_openvino"|"fp32_onnxruntime"]`` (the same figures for
    FP32) and ``metadata["int8"]`` (the gate, which passed and why, and the recommended
    precision per runtime).

    Args:
        calibration_images: preprocessed ``NCHW`` float32 training images (>= 300 in real runs).
        eval_images: preprocessed test images.
        eval_labels: their class indices (in the bundle's class order).
        max_accuracy_drop: largest tolerated ``fp32 - int8`` accuracy (a fraction, 0.01 = 1 point).
        threads: inference threads for the accuracy runs (latency is always 1 thread).
        population: size of the test split ``eval_images`` were drawn from (recorded with
            the subset size so a reader can judge the gate's precision).

    Raises:
        ValueError: at construction, for malformed inputs (so a flow fails before training
            artefacts are exported, with the problem named).
    """
    calib = check_calibration_images(calibration_images)
    evx = check_calibration_images(eval_images, "eval_images")
    evy = np.asarray(eval_labels)
    if evy.ndim != 1 or len(evy) != len(evx):
        raise ValueError(f"eval_labels must be 1-D with one label per eval image ({len(evx)}), got shape {evy.shape}")
    if not np.issubdtype(evy.dtype, np.integer):
        raise ValueError(f"eval_labels must be integer class indices, got dtype {evy.dtype}")
    if not 0.0 <= float(max_accuracy_drop) <= 1.0:
        raise ValueError(f"max_accuracy_drop must be a fraction in [0, 1], got {max_accuracy_drop}")
    if len(calib) < 300:
        log.warning("INT8 calibration on %d images (>= 300 recommended)", len(calib))

    def step(writer: Any, metadata: dict[str, Any]) -> None:
        _run_int8_step(writer, metadata, calib, evx, evy, float(max_accuracy_drop), threads)
        metadata["int8"]["eval_population"] = int(population if population is not None else len(evx))

    return step


def _run_int8_step(
    writer: Any, metadata: dict[str, Any], calib: np.ndarray, evx: np.ndarray, evy: np.ndarray,
    max_drop: float, threads: int,
) -> None:
    """Quantize, gate and keep or delete each runtime's INT8 model; ``metadata["int8"]`` reports it."""
    _check_fits_bundle(metadata, calib, evx, evy)
    root = Path(writer.dir)
    transformer = is_transformer(metadata.get("architecture"))
    metrics = metadata.setdefault("metrics", {})
    report = _new_report(max_drop, len(calib), len(evx), transformer)
    ood_threshold = metadata.get("calibration", {}).get("ood_threshold")
    for runtime, job in _runtime_jobs(root, calib, transformer).items():
        log.info("INT8 %s: quantizing and evaluating on %d test images", runtime, len(evx))
        int8, fp32, files = quantize_and_gate(runtime, job, evx, evy, max_drop, threads)
        metrics[f"int8_{runtime}"] = int8
        metrics[f"fp32_{runtime}"] = fp32
        if int8.get("kept") and ood_threshold is not None:
            # Runners returning every output (output=None): the OOD score is the second.
            int8.update(ood_agreement(job.fp32_runner(threads, output=None),
                                      job.int8_runner(threads, output=None), evx, float(ood_threshold)))
        if int8.get("kept"):
            _register(writer, root, runtime, files)
            report["passed"].append(runtime)
            report["recommended"][runtime] = "int8" if int8["latency_ms"] < fp32["latency_ms"] else "fp32"
            why = _kept_reason(int8, max_drop)
        else:
            _discard(writer, root, runtime, files)
            report["recommended"][runtime] = "fp32"
            why = _rejected_reason(int8, max_drop)
        report["results"][runtime] = {"kept": bool(int8.get("kept")), "why": why,
                                      "speedup_vs_fp32": _speedup(fp32, int8)}
        log.info("INT8 %s: %s (%s)", runtime, "kept" if int8.get("kept") else "rejected", why)
    metadata["int8"] = report


def _check_fits_bundle(metadata: dict[str, Any], calib: np.ndarray, evx: np.ndarray, evy: np.ndarray) -> None:
    """Labels within the bundle's classes and images at its input size, or a ValueError naming the problem."""
    n_classes = len(metadata["classes"])
    if evy.min() < 0 or evy.max() >= n_classes:
        raise ValueError(f"eval_labels must lie in [0, {n_classes}) for this bundle's {n_classes} classes")
    size = int(metadata["input"]["size"])
    if calib.shape[2:] != (size, size) or evx.shape[2:] != (size, size):
        raise ValueError(
            f"INT8 images must be {size}x{size} (the bundle's input size), got calibration "
            f"{calib.shape[2:]} and eval {evx.shape[2:]}"
        )


def _new_report(max_drop: float, n_calib: int, n_eval: int, transformer: bool) -> dict[str, Any]:
    """``metadata["int8"]`` before any runtime is gated: the gate and the schemes."""
    return {
        "gate": {"metric": "accuracy", "max_accuracy_drop": max_drop, "compared_with": "fp32 of the same runtime"},
        "calibration_images": int(n_calib),
        "eval_images": int(n_eval),
        "scheme": {
            "openvino": "NNCF post-training quantization"
            + (" (ModelType.TRANSFORMER, mixed preset)" if transformer else " (performance preset)"),
            "onnxruntime": "static QDQ, per-channel, MinMax calibration: U8S8 with reduce_range, else S8S8",
        },
        "openvino_inference_precision_hint": "f32",
        "latency": "1 thread, batch 1, median of 30 runs",
        "passed": [],
        "results": {},
        "recommended": {},
    }


def _runtime_jobs(root: Path, calib: np.ndarray, transformer: bool) -> dict[str, RuntimeJob]:
    """Each runtime's FP32 model and INT8 schemes (latency runners are 1 thread; accuracy runners ``threads``)."""
    ov_fp32, ov_int8 = root / OPENVINO_FP32_XML, root / OPENVINO_INT8_DIR / "model.xml"
    onnx_fp32, onnx_int8 = root / ONNX_FP32_PATH, root / ONNX_INT8_PATH
    return {
        "openvino": RuntimeJob(
            fp32_files=[ov_fp32, ov_fp32.with_suffix(".bin")],
            fp32_runner=lambda t, output=0: openvino_runner(ov_fp32, t, output=output),
            builds=[("nncf", lambda: _build_ov(root, calib, transformer))],
            int8_runner=lambda t, output=0: openvino_runner(ov_int8, t, output=output),
        ),
        "onnxruntime": RuntimeJob(
            fp32_files=[onnx_fp32],
            fp32_runner=lambda t, output=0: onnxruntime_runner(onnx_fp32, t, output=output),
            # U8S8 + reduce_range is the fast scheme on x86 without VNNI; if it misses the
            # gate, S8S8 (slower there, often more accurate) gets its chance.
            builds=[("qdq_u8s8_reduce_range", lambda: [quantize_onnx(onnx_fp32, onnx_int8, calib)]),
                    ("qdq_s8s8", lambda: [quantize_onnx(onnx_fp32, onnx_int8, calib, signed_activations=True)])],
            int8_runner=lambda t, output=0: onnxruntime_runner(onnx_int8, t, output=output),
        ),
    }


def _kept_reason(int8: dict[str, Any], max_drop: float) -> str:
    why = f"{int8['scheme']}: accuracy drop {int8['accuracy_drop'] * 100:.2f} pt <= {max_drop * 100:.2f} pt"
    rejected = [t for t in int8["tried"] if t["scheme"] != int8["scheme"]]
    if rejected:
        why += " (rejected first: " + ", ".join(
            f"{t['scheme']} " + (f"drop {t['accuracy_drop'] * 100:.2f} pt" if "accuracy_drop" in t
                                 else "failed") for t in rejected) + ")"
    return why


def _rejected_reason(int8: dict[str, Any], max_drop: float) -> str:
    if "error" in int8:
        return f"quantization failed: {int8['error']}"
    return ("accuracy drop " + ", ".join(f"{t['scheme']} {t['accuracy_drop'] * 100:.2f} pt"
                                         for t in int8["tried"] if "accuracy_drop" in t)
            + f" > {max_drop * 100:.2f} pt")


def _speedup(fp32: dict[str, Any], int8: dict[str, Any]) -> float | None:
    """FP32 over INT8 latency, rounded (``None`` when INT8 was never timed)."""
    speed = fp32["latency_ms"] / int8["latency_ms"] if int8.get("latency_ms") else None
    return None if speed is None else round(float(speed), 3)


def _build_ov(root: Path, calib: np.ndarray, transformer: bool) -> list[Path]:
    xml = quantize_openvino(root / OPENVINO_FP32_XML, root / OPENVINO_INT8_DIR / "model.xml", calib,
                            transformer=transformer)
    return [xml, xml.with_suffix(".bin")]


def _register(writer: Any, root: Path, runtime: str, files: list[Path]) -> None:
    for f in files:
        rel = f.relative_to(root).as_posix()
        fmt = "onnx" if runtime == "onnxruntime" else "openvino"
        role = "weights" if f.suffix == ".bin" else "model"
        writer.add_file(rel, fmt=fmt, runtime=runtime, precision="int8", role=role)


def _discard(writer: Any, root: Path, runtime: str, files: list[Path]) -> None:
    """Delete a rejected INT8 model: its registered files and whatever a failed quantizer half-wrote."""
    for f in files:
        _remove(writer, root, f)
    if runtime == "openvino":
        shutil.rmtree(root / OPENVINO_INT8_DIR, ignore_errors=True)
    else:
        (root / ONNX_INT8_PATH).unlink(missing_ok=True)


def _remove(writer: Any, root: Path, f: Path) -> None:
    if hasattr(writer, "remove_file"):
        writer.remove_file(f.relative_to(root).as_posix())
    elif f.is_file():
        f.unlink()
