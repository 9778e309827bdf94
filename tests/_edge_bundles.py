"""Test helper (edge/INT8 tests): one tiny bundle WITH INT8 models, built once per session.

Imported by test_quantize.py, test_edge_runtime.py, test_edge_cli.py and
test_edge_binary.py. A plain module cache (not a conftest fixture) so the real NNCF and
ONNX Runtime quantization runs once however many of those modules are collected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import TINY_CLASSES, _train_tiny_model, make_leaf_image

SIZE = 32
CLASSES = list(TINY_CLASSES)
_CACHE: dict[str, Any] = {}


def eval_set(n_per_class: int = 10, seed: int = 90_000) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed synthetic leaves of every tiny class, with labels."""
    from plantml.preprocess import InputSpec, preprocess_image

    spec = InputSpec(size=SIZE)
    xs, ys = [], []
    for c, name in enumerate(CLASSES):
        for i in range(n_per_class):
            xs.append(preprocess_image(make_leaf_image(TINY_CLASSES[name], seed=seed + c * 100 + i), spec))
            ys.append(c)
    return np.stack(xs), np.array(ys)


def tiny_model() -> tuple[Any, np.ndarray]:
    """The conftest tiny CNN and its training inputs (cached)."""
    if "model" not in _CACHE:
        _CACHE["model"] = _train_tiny_model(CLASSES, SIZE)
    return _CACHE["model"]


def export_tiny(out_root: Path, step: Any, version: str = "1") -> tuple[Path, dict[str, Any]]:
    """Export the tiny model with one extra step, as the flow does."""
    from plantml.export import export_bundle
    from plantml.preprocess import InputSpec

    model, calib = tiny_model()
    return export_bundle(
        model, out_root=out_root, name="tiny-int8", architecture="tiny_cnn", classes=CLASSES,
        input_spec=InputSpec(size=SIZE), parity_inputs=calib,
        metrics={"fp32": {"accuracy": 1.0}}, lineage={"data_manifest_sha256": "t"}, version=version,
        calibration={"temperature": 1.0, "abstain_threshold": 0.5},
        extra_steps=[step],
    )


def int8_tiny_bundle(tmp_path_factory: Any) -> tuple[Path, dict[str, Any]]:
    """A bundle with ONNX/OpenVINO FP32 and INT8 (gate 1 point), built once per session."""
    if "int8" not in _CACHE:
        from plantml.quantize import int8_export_step

        _, calib = tiny_model()
        ex, ey = eval_set()
        step = int8_export_step(calib, ex, ey, 0.01, threads=1)
        _CACHE["int8"] = export_tiny(tmp_path_factory.mktemp("int8_bundle"), step)
    return _CACHE["int8"]
