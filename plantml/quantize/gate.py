"""The accuracy gate of one runtime: quantize with each scheme until one keeps FP32's accuracy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from plantml.quantize.measure import Runner, evaluate, median_latency_ms

log = logging.getLogger(__name__)

#: ``(threads, output=0) -> runner``; ``output=None`` returns every output of the model.
RunnerFactory = Callable[..., Runner]


@dataclass(frozen=True)
class RuntimeJob:
    """One runtime's FP32 model and the INT8 schemes to try on it, in order."""

    fp32_files: list[Path]
    fp32_runner: RunnerFactory
    builds: Sequence[tuple[str, Callable[[], list[Path]]]]  # (scheme, quantize -> files written)
    int8_runner: RunnerFactory


def quantize_and_gate(
    runtime: str, job: RuntimeJob, evx: np.ndarray, evy: np.ndarray, max_drop: float, threads: int
) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """Quantize with each of the job's schemes in turn until one passes the gate.

    Args:
        runtime: ``openvino`` or ``onnxruntime`` (for logs).
        job: the runtime's FP32 model and INT8 schemes.
        evx: preprocessed test images.
        evy: their labels.
        max_drop: largest tolerated ``fp32 - int8`` accuracy.
        threads: inference threads for the accuracy runs (latency is 1 thread).

    Returns:
        ``(int8 metrics, fp32 metrics, files of the last scheme tried)``; ``int8["scheme"]``
        names that scheme and ``int8["tried"]`` lists every scheme with its accuracy drop.
    """
    fp32 = evaluate(job.fp32_runner(threads), evx, evy)
    fp32["latency_ms"] = median_latency_ms(job.fp32_runner(1), evx)
    fp32["size_bytes"] = dir_size(job.fp32_files)
    tried: list[dict[str, Any]] = []
    int8: dict[str, Any] = {}
    files: list[Path] = []
    for scheme, build in job.builds:
        try:
            files = build()
            acc_runner = job.int8_runner(threads)
        except Exception as exc:  # noqa: BLE001 - a failed quantization must not fail the export
            log.warning("%s INT8 quantization (%s) failed: %s", runtime, scheme, exc)
            int8 = {"kept": False, "error": f"{type(exc).__name__}: {exc}", "accuracy_drop": None, "scheme": scheme}
            tried.append({"scheme": scheme, "error": int8["error"]})
            files = []
            continue
        int8 = _gate_scheme(job, scheme, acc_runner, files, fp32, evx, evy, max_drop)
        tried.append({"scheme": scheme, "accuracy_drop": int8["accuracy_drop"], "latency_ms": int8["latency_ms"]})
        log.info("%s INT8 %s: accuracy drop %.2f pt", runtime, scheme, int8["accuracy_drop"] * 100)
        if int8["kept"]:
            break
    int8["tried"] = tried
    return int8, fp32, files


def _gate_scheme(job: RuntimeJob, scheme: str, acc_runner: Runner, files: list[Path], fp32: dict[str, Any],
                 evx: np.ndarray, evy: np.ndarray, max_drop: float) -> dict[str, Any]:
    """One built INT8 model's figures and whether its accuracy drop is within ``max_drop``."""
    int8: dict[str, Any] = evaluate(acc_runner, evx, evy)
    drop = fp32["accuracy"] - int8["accuracy"]
    int8.update(
        accuracy_drop=float(drop),
        kept=bool(drop <= max_drop + 1e-9),
        size_bytes=dir_size(files),
        latency_ms=median_latency_ms(job.int8_runner(1), evx),
        scheme=scheme,
    )
    return int8


def ood_agreement(fp32_all: Runner, int8_all: Runner, images: np.ndarray, threshold: float,
                  batch_size: int = 16) -> dict[str, float]:
    """How far INT8 moves the OOD score: its features are 8-bit, the head is FP32.

    Args:
        fp32_all: the FP32 model returning every output (the OOD score second).
        int8_all: the INT8 model, likewise.
        images: preprocessed test images.
        threshold: the bundle's OOD threshold.
        batch_size: images per call.

    Returns:
        ``{"ood_score_median_rel_diff", "ood_decision_agreement"}`` over ``images``
        (agreement: same side of ``threshold`` as FP32).
    """
    ref, got = [], []
    for i in range(0, len(images), batch_size):
        ref.append(np.asarray(fp32_all(images[i:i + batch_size])[1]).reshape(-1))
        got.append(np.asarray(int8_all(images[i:i + batch_size])[1]).reshape(-1))
    r, g = np.concatenate(ref), np.concatenate(got)
    return {
        "ood_score_median_rel_diff": float(np.median(np.abs(g - r) / np.maximum(np.abs(r), 1e-6))),
        "ood_decision_agreement": float(np.mean((g > threshold) == (r > threshold))),
    }


def dir_size(paths: list[Path]) -> int:
    """Total bytes of the files among ``paths`` (missing ones count 0)."""
    return int(sum(p.stat().st_size for p in paths if p.is_file()))
