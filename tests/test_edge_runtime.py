"""edge.runtime.EdgeModel: OpenVINO / ONNX Runtime, FP32 / INT8, over a real exported bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests._edge_bundles import CLASSES, int8_tiny_bundle
from tests.conftest import TINY_CLASSES, make_leaf_image
from edge.runtime import EdgeError, EdgeModel, collect_image_paths
from plantml.bundle import BundleError

COMBOS = [("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return int8_tiny_bundle(tmp_path_factory)[0]


def _leaves(seed: int = 300) -> list[Image.Image]:
    return [make_leaf_image(rgb, size=48, seed=seed + i) for i, rgb in enumerate(TINY_CLASSES.values())]


def _edited_copy(src, dst, **calibration):
    shutil.copytree(src, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["calibration"].update(calibration)
    (dst / "metadata.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize("runtime, precision", COMBOS)
def test_every_runtime_and_precision_classifies_the_leaves(bundle, runtime, precision):
    model = EdgeModel(bundle, runtime=runtime, precision=precision, threads=1)
    assert (model.runtime, model.precision) == (runtime, precision)
    preds = model.predict_images(_leaves(), k=3)
    assert [p["label"] for p in preds] == CLASSES
    for p in preds:
        assert set(p) == {"label", "confidence", "top_k", "abstained", "abstain_reason"}
        assert p["top_k"][0] == {"label": p["label"], "confidence": p["confidence"]}
        confs = [t["confidence"] for t in p["top_k"]]
        assert confs == sorted(confs, reverse=True) and len(confs) == 3
        assert 0.5 < p["confidence"] <= 1.0 and p["abstained"] is False


def test_default_runtime_follows_the_measured_preference(bundle):
    """``auto``: ONNX Runtime for FP32, OpenVINO for INT8 (plantml.runtime.AUTO_PREFERENCE)."""
    assert EdgeModel(bundle).runtime == "onnxruntime"
    assert EdgeModel(bundle, precision="int8").runtime == "openvino"


def test_falls_back_to_onnxruntime_when_openvino_is_missing(bundle):
    # A fresh interpreter in which `import openvino` fails, as on an ONNX-Runtime-only install.
    code = (
        "import sys; sys.modules['openvino'] = None\n"
        "from edge.runtime import EdgeModel\n"
        f"m = EdgeModel({str(bundle)!r}, precision='int8')\n"
        "print(m.runtime)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "onnxruntime"
    code_explicit = code.replace("precision='int8'", "runtime='openvino'")
    out = subprocess.run([sys.executable, "-c", code_explicit], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "openvino is not installed" in out.stderr


def test_runtimes_agree_and_match_the_shared_preprocessing(bundle):
    from plantml.preprocess import preprocess_batch, softmax
    from plantml.quantize import onnxruntime_runner

    leaves = _leaves(seed=900)
    ov = EdgeModel(bundle, runtime="openvino").predict_images(leaves)
    ort = EdgeModel(bundle, runtime="onnxruntime").predict_images(leaves)
    spec = EdgeModel(bundle, runtime="onnxruntime").spec
    direct = softmax(onnxruntime_runner(bundle / "model.onnx")(preprocess_batch(leaves, spec)))
    for a, b, ref in zip(ov, ort, direct):
        assert a["label"] == b["label"]
        assert a["confidence"] == pytest.approx(b["confidence"], abs=1e-4)
        assert b["confidence"] == pytest.approx(float(ref.max()), abs=1e-6)


def test_threads_and_openvino_precision_hint_reach_the_runtime(bundle):
    ort = EdgeModel(bundle, runtime="onnxruntime", threads=1)
    assert ort.session.get_session_options().intra_op_num_threads == 1
    ov = EdgeModel(bundle, runtime="openvino", threads=1)
    assert int(ov.session.get_property("INFERENCE_NUM_THREADS")) == 1
    import openvino as ov_api

    assert ov.session.get_property("INFERENCE_PRECISION_HINT") == ov_api.Type.f32
    assert ov.describe()["openvino_precision_hint"] == "f32"
    assert EdgeModel(bundle, runtime="openvino", openvino_f32=False).describe()["openvino_precision_hint"] == "default"


def test_temperature_and_abstain_threshold_come_from_the_bundle(bundle, tmp_path):
    hot = _edited_copy(bundle, tmp_path / "hot", temperature=1e6)
    pred = EdgeModel(hot, runtime="onnxruntime").predict_images(_leaves()[:1])[0]
    assert pred["confidence"] == pytest.approx(1 / 3, abs=1e-3), "temperature must flatten the softmax"
    strict = _edited_copy(bundle, tmp_path / "strict", abstain_threshold=1.01)
    preds = EdgeModel(strict, runtime="onnxruntime").predict_images(_leaves())
    assert all(p["abstained"] for p in preds)
    assert [p["label"] for p in preds] == CLASSES, "abstaining still reports the best label"


def test_predict_paths_reports_unreadable_files_and_keeps_order(bundle, tmp_path):
    good = tmp_path / "a.jpg"
    _leaves()[1].save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    empty = tmp_path / "c.png"
    empty.write_bytes(b"")
    rows = EdgeModel(bundle, runtime="onnxruntime").predict_paths([good, bad, tmp_path / "missing.jpg", empty, good])
    assert [r["path"] for r in rows] == [str(p) for p in (good, bad, tmp_path / "missing.jpg", empty, good)]
    assert rows[0]["label"] == CLASSES[1] and "error" not in rows[0]
    assert rows[1]["error"].startswith(("truncated", "not_image"))
    assert rows[2]["error"].startswith("missing")
    assert rows[3]["error"].startswith("empty")
    assert "label" not in rows[1] and rows[4]["label"] == CLASSES[1]


def test_collect_image_paths_recurses_and_skips_non_images(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    for rel in ("d/b.JPG", "d/sub/a.png", "d/.hidden/x.jpg", "d/notes.txt", "d/sub/.y.jpg"):
        (tmp_path / rel).write_bytes(b"x")
    explicit = tmp_path / "d" / "notes.txt"
    got = collect_image_paths([tmp_path / "d", explicit])
    assert got == [(tmp_path / "d" / "b.JPG", True), (tmp_path / "d" / "sub" / "a.png", True), (explicit, False)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"precision": "fp16"}, "unknown precision"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"runtime": "tensorrt"}, "unknown runtime"),
    ],
)
def test_bad_settings_are_refused(bundle, kwargs, match):
    with pytest.raises(EdgeError, match=match):
        EdgeModel(bundle, **kwargs)


def test_missing_int8_model_is_named(bundle, tmp_path):
    fp32_only = tmp_path / "fp32-only"
    shutil.copytree(bundle, fp32_only)
    meta = json.loads((fp32_only / "metadata.json").read_text())
    meta["files"] = [f for f in meta["files"] if f["precision"] == "fp32"]  # as if INT8 failed its gate
    (fp32_only / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(EdgeError, match="no usable int8 model.*onnxruntime/fp32"):
        EdgeModel(fp32_only, precision="int8")
    with pytest.raises(EdgeError, match="no onnxruntime int8 model"):
        EdgeModel(fp32_only, runtime="onnxruntime", precision="int8")
    assert EdgeModel(fp32_only).precision == "fp32"


def test_corrupt_or_missing_bundle_is_refused(bundle, tmp_path):
    with pytest.raises(BundleError, match="not found"):
        EdgeModel(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    data = bytearray((broken / "model.int8.onnx").read_bytes())
    data[-10] ^= 0xFF
    (broken / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256 mismatch for model.int8.onnx"):
        EdgeModel(broken, runtime="onnxruntime")


def test_logits_checks_the_input_shape(bundle):
    model = EdgeModel(bundle, runtime="onnxruntime")
    with pytest.raises(EdgeError, match="shape"):
        model.logits(np.zeros((1, 3, 8, 8), np.float32))
    assert model.logits(np.zeros((2, 3, 32, 32), np.float32)).shape == (2, 3)
    assert model.predict_images([]) == []


def test_edge_imports_no_training_stack():
    code = (
        "import sys, edge.runtime, edge.cli\n"
        "bad = [m for m in ('torch', 'torchvision', 'timm', 'metaflow', 'mlflow', 'nncf', 'onnxruntime', 'openvino')"
        " if m in sys.modules]\n"
        "sys.exit(str(bad) if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"importing edge pulled in {out.stderr}"
