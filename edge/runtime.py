"""Offline inference over an exported bundle: one :class:`EdgeModel` over OpenVINO or
ONNX Runtime, FP32 or INT8. No torch, no network.

The model input is built by :mod:`plantml.preprocess` — the same function serving and
evaluation use — and the bundle is loaded with :func:`plantml.bundle.load_bundle`, which
verifies every file's sha256 before anything runs. Choosing the runtime, opening the
session (the service's settings, with the thread count left to the caller) and the
temperature + abstention rule are :mod:`plantml.runtime`'s, shared with serving; this
module adds what only the edge needs: file paths in, one result row per image out.

Example::

    from PIL import Image
    from edge.runtime import EdgeModel

    model = EdgeModel("artifacts/bundles/latest", precision="int8", threads=1)
    print(model.predict_images([Image.open("leaf.jpg")]))

A bundle may ship an **edge student** (a smaller/faster model distilled from the champion,
in its ``student/`` folder with its own input size and calibration): ``model="student"``
loads it through the digest the bundle pins (:func:`plantml.bundle.load_student_bundle`),
and :func:`default_model` says which one the CLI runs when none is named.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from plantml.bundle import BundleError, load_bundle, load_student_bundle, student_block
from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, InputSpec, load_image, preprocess_batch, top_k
from plantml.runtime import (  # noqa: F401 - re-exported for edge.cli and callers
    PRECISIONS,
    RUNTIMES,
    Calibration,
    InferenceError,
    SessionOptions,
    check_batch,
    check_precision,
    choose_runtime,
    installed_runtimes,
    open_session,
    runtime_installed,
)

log = logging.getLogger(__name__)

#: Preference order when no runtime is named (the edge CLI's name for :data:`plantml.runtime.RUNTIMES`).
RUNTIME_PREFERENCE = RUNTIMES

#: The edge name of :class:`plantml.runtime.InferenceError` (the CLI and callers catch it by this name).
EdgeError = InferenceError

#: The models a bundle can hold: the champion (always) and the edge student (when it passed its gate).
MODELS = ("champion", "student")


def default_model(bundle_dir: str | os.PathLike[str], precision: str | None = None) -> str:
    """``"student"`` when the bundle ships an edge student (with a ``precision`` model, if one is named),
    else ``"champion"``."""
    block = student_block(bundle_dir)
    if not block:
        return "champion"
    shipped = block.get("models")
    return "student" if precision is None or shipped is None or any(
        m.endswith(f"_{precision}") for m in shipped) else "champion"


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
        model: ``"champion"`` (default) or ``"student"`` (the bundle's edge student; a bundle
            without one is a :class:`BundleError` giving the reason it has none).

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
        model: str = "champion",
    ) -> None:
        # Settings are checked before the bundle is read, so a typo is named as such.
        self.precision = check_precision(precision)
        if model not in MODELS:
            raise EdgeError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
        options = SessionOptions(threads=threads, openvino_f32=openvino_f32)
        self.model = model
        self.bundle = load_student_bundle(bundle_dir) if model == "student" else load_bundle(bundle_dir)
        self.runtime = choose_runtime(self.bundle, precision, runtime)
        self.threads = threads
        self.openvino_f32 = openvino_f32
        self.model_path = self.bundle.model_path(self.runtime, precision)
        self.spec: InputSpec = self.bundle.input_spec
        self.classes = self.bundle.classes
        self.calibration = Calibration.of(self.bundle)
        try:
            self._session = open_session(self.model_path, self.runtime, options)
        except Exception as exc:  # noqa: BLE001 - a runtime refusing the model is a bundle problem
            raise BundleError(f"{self.runtime} could not load {self.model_path}: {exc}") from exc
        #: the runtime's own object (``onnxruntime.InferenceSession`` or ``openvino.CompiledModel``)
        self.session: Any = self._session.native
        log.info("loaded %s (%s %s, threads=%s)", self.bundle.root, self.runtime, precision, threads or "default")

    def describe(self) -> dict[str, Any]:
        """Name, version, runtime, precision and threads of the loaded model."""
        return {
            "name": self.bundle.name,
            "version": self.bundle.version,
            "model": self.model,
            "architecture": self.bundle.metadata.get("architecture"),
            "input_size": self.spec.size,
            "runtime": self.runtime,
            "precision": self.precision,
            "threads": self.threads,
            "openvino_precision_hint": (
                ("f32" if self.openvino_f32 else "default") if self.runtime == "openvino" else None
            ),
        }

    def outputs(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(logits, ood_scores or None)`` for a preprocessed ``NCHW`` float32 batch."""
        outs = self._session.run(check_batch(batch, self.spec.size))
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
        decided = self.calibration.apply([logits] if scores is None else [logits, scores])
        probs, scores = decided.probabilities, decided.ood_scores
        out = []
        for i, p in enumerate(probs):
            best = int(np.argmax(p))
            row = {
                "label": self.classes[best],
                "confidence": float(p[best]),
                "top_k": top_k(p, self.classes, k),
                "abstained": bool(decided.abstained[i]),
                "abstain_reason": decided.reasons[i],
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
