"""Offline inference over an exported bundle: one :class:`EdgeModel` over OpenVINO or
ONNX Runtime, FP32 or INT8. No torch, no network.

The model input is built by :mod:`plantml.preprocess` — the same function serving and
evaluation use — and the bundle is loaded with :func:`plantml.bundle.load_bundle`, which
verifies every file's sha256 before anything runs.

Example::

    from PIL import Image
    from edge.runtime import EdgeModel

    model = EdgeModel("artifacts/bundles/latest", precision="int8", threads=1)
    print(model.predict_images([Image.open("leaf.jpg")]))
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from plantml.bundle import Bundle, BundleError, load_bundle
from plantml.ood import decide
from plantml.preprocess import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    InputSpec,
    load_image,
    preprocess_batch,
    softmax,
    top_k,
)

log = logging.getLogger(__name__)

#: Preference order when no runtime is named: OpenVINO is the faster CPU runtime here.
RUNTIME_PREFERENCE = ("openvino", "onnxruntime")
PRECISIONS = ("fp32", "int8")


class EdgeError(ValueError):
    """The requested runtime/precision cannot be used with this bundle or installation."""


def runtime_installed(runtime: str) -> bool:
    """Whether the Python package of ``runtime`` can be imported (without importing it)."""
    if runtime in sys.modules:
        return sys.modules[runtime] is not None
    try:
        return importlib.util.find_spec(runtime) is not None
    except (ImportError, ValueError):
        return False


def installed_runtimes() -> list[str]:
    """Runtimes importable in this environment, in preference order."""
    return [r for r in RUNTIME_PREFERENCE if runtime_installed(r)]


def choose_runtime(bundle: Bundle, precision: str, runtime: str | None = None) -> str:
    """Pick the runtime: the one asked for, else the first installed one that has a model.

    Raises:
        EdgeError: unknown runtime, runtime not installed, or no model at that precision.
    """
    have = bundle.available()
    if runtime is not None:
        if runtime not in RUNTIME_PREFERENCE:
            raise EdgeError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_PREFERENCE)}")
        if not runtime_installed(runtime):
            have_rt = ", ".join(installed_runtimes()) or "none"
            raise EdgeError(f"runtime {runtime} is not installed here (installed: {have_rt})")
        if (runtime, precision) not in have:
            raise EdgeError(f"bundle has no {runtime} {precision} model (available: {_fmt(have)})")
        return runtime
    for candidate in RUNTIME_PREFERENCE:
        if (candidate, precision) in have and runtime_installed(candidate):
            return candidate
    raise EdgeError(
        f"no usable {precision} model: bundle has {_fmt(have)}; installed runtimes: "
        f"{', '.join(installed_runtimes()) or 'none'}"
    )


def _fmt(pairs: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{r}/{p}" for r, p in pairs) or "none"


def _onnxruntime_session(path: Path, threads: int | None) -> tuple[Any, Callable[[np.ndarray], list[np.ndarray]]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess, lambda x: sess.run(None, {name: x})


def _openvino_compiled(path: Path, threads: int | None,
                       f32: bool) -> tuple[Any, Callable[[np.ndarray], list[np.ndarray]]]:
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if f32:
        # CPUs with AVX-512 BF16 / AMX would otherwise run the float parts in bfloat16:
        # keep FP32 fidelity (the accuracy the bundle's metrics were measured at).
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> list[np.ndarray]:
        # The request reuses its output buffers: copy before the next call overwrites them.
        res = request.infer([x])
        return [np.array(res[out], copy=True) for out in compiled.outputs]

    return compiled, run


class EdgeModel:
    """A bundle's classifier on one runtime and precision.

    Args:
        bundle_dir: the bundle directory (sha256 of every file verified on load).
        runtime: ``"openvino"``, ``"onnxruntime"`` or ``None`` for the best available
            (OpenVINO if installed and in the bundle, else ONNX Runtime).
        precision: ``"fp32"`` or ``"int8"`` (INT8 exists only if it passed the export gate).
        threads: inference threads (``None``: the runtime's default, all cores).
        openvino_f32: run OpenVINO with ``INFERENCE_PRECISION_HINT=f32`` (default) rather
            than the plugin's default, which is bfloat16 on CPUs that support it.

    Raises:
        plantml.bundle.BundleError: missing/corrupt bundle.
        EdgeError: the runtime/precision is unavailable or a setting is invalid.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        runtime: str | None = None,
        precision: str = "fp32",
        threads: int | None = None,
        openvino_f32: bool = True,
    ) -> None:
        if precision not in PRECISIONS:
            raise EdgeError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if threads is not None and threads < 1:
            raise EdgeError(f"threads must be >= 1, got {threads}")
        self.bundle = load_bundle(bundle_dir)
        self.runtime = choose_runtime(self.bundle, precision, runtime)
        self.precision = precision
        self.threads = threads
        self.openvino_f32 = openvino_f32
        self.model_path = self.bundle.model_path(self.runtime, precision)
        self.spec: InputSpec = self.bundle.input_spec
        self.classes = self.bundle.classes
        #: the runtime's own object (``onnxruntime.InferenceSession`` or ``openvino.CompiledModel``)
        self.session: Any = None
        try:
            if self.runtime == "openvino":
                self.session, self._run = _openvino_compiled(self.model_path, threads, openvino_f32)
            else:
                self.session, self._run = _onnxruntime_session(self.model_path, threads)
        except Exception as exc:  # noqa: BLE001 - a runtime refusing the model is a bundle problem
            raise BundleError(f"{self.runtime} could not load {self.model_path}: {exc}") from exc
        log.info("loaded %s (%s %s, threads=%s)", self.bundle.root, self.runtime, precision, threads or "default")

    def describe(self) -> dict[str, Any]:
        """Name, version, runtime, precision and threads of the loaded model."""
        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "runtime": self.runtime,
            "precision": self.precision,
            "threads": self.threads,
            "openvino_precision_hint": (
                ("f32" if self.openvino_f32 else "default") if self.runtime == "openvino" else None
            ),
        }

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, ood_scores or None)`` for a preprocessed ``NCHW`` float32 batch."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        expected = (3, self.spec.size, self.spec.size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise EdgeError(f"input batch must have shape (N, {', '.join(map(str, expected))}), got {x.shape}")
        outs = self._run(x)
        scores = outs[1].reshape(-1) if len(outs) > 1 and self.bundle.ood_threshold is not None else None
        return outs[0], scores

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw logits for a preprocessed ``NCHW`` float32 batch."""
        return self.outputs(batch)[0]

    def predict_images(self, images: Sequence[Image.Image], k: int = 5) -> list[dict[str, Any]]:
        """Classify decoded RGB images.

        Returns:
            one ``{"label", "confidence", "top_k": [{"label", "confidence"}], "abstained",
            "abstain_reason"}`` per image, in order (plus ``"ood_score"`` when the bundle's
            model has one). ``confidence`` is the temperature-scaled softmax of the top
            class; ``abstained`` follows :func:`plantml.ood.decide`: the OOD score above the
            bundle's ``ood_threshold`` (reason ``out_of_distribution``), or else the
            confidence below its abstain threshold (``low_confidence``).
        """
        if not images:
            return []
        logits, scores = self.outputs(preprocess_batch(images, self.spec))
        probs = softmax(logits, self.bundle.temperature)
        abstained, reasons = decide(probs, scores, self.bundle.abstain_threshold, self.bundle.ood_threshold)
        out = []
        for i, p in enumerate(probs):
            best = int(np.argmax(p))
            row = {
                "label": self.classes[best],
                "confidence": float(p[best]),
                "top_k": top_k(p, self.classes, k),
                "abstained": bool(abstained[i]),
                "abstain_reason": reasons[i],
            }
            if scores is not None:
                row["ood_score"] = float(scores[i])
            out.append(row)
        return out

    def predict_paths(self, paths: Sequence[str | Path], k: int = 5, batch_size: int = 8) -> list[dict[str, Any]]:
        """Classify image files; an unreadable file gives ``{"path", "error"}`` instead."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(paths), batch_size):
            results.extend(self._predict_chunk(paths[start:start + batch_size], k))
        return results

    def _predict_chunk(self, paths: Sequence[str | Path], k: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [{"path": str(p)} for p in paths]
        images, where = [], []
        for i, p in enumerate(paths):
            try:
                images.append(load_image(p))
                where.append(i)
            except ImageDecodeError as exc:
                rows[i]["error"] = f"{exc.reason}: {exc}"
        for i, pred in zip(where, self.predict_images(images, k)):
            rows[i].update(pred)
        return rows


def collect_image_paths(inputs: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """Expand files and folders (recursively) into image paths.

    A file named explicitly is always returned (so an unreadable one is reported); inside
    folders only files with an image extension are taken, hidden ones skipped, sorted.

    Returns:
        ``(path, from_folder)`` pairs in a deterministic order.
    """
    out: list[tuple[Path, bool]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                log.warning("no images under %s", path)
            out.extend((p, True) for p in found)
        else:
            out.append((path, False))
    return out
