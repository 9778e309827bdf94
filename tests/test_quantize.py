"""INT8 export step: NNCF (OpenVINO) and ONNX Runtime QDQ quantization with an accuracy gate.

Runs the real quantizers on the tiny CNN of conftest (32x32 inputs), through
``plantml.export.export_bundle(extra_steps=[...])`` exactly as the flow does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests._edge_bundles import SIZE, eval_set, export_tiny, int8_tiny_bundle, tiny_model
from plantml.bundle import load_bundle
from plantml.quantize import int8_export_step, macro_f1


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    return int8_tiny_bundle(tmp_path_factory)


def test_int8_models_are_written_registered_and_verified(int8_bundle):
    path, _ = int8_bundle
    bundle = load_bundle(path)  # verifies sha256 of every file, INT8 included
    assert set(bundle.available()) == {
        ("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"), ("openvino", "int8"),
    }
    assert bundle.model_path("onnxruntime", "int8") == path / "model.int8.onnx"
    assert bundle.model_path("openvino", "int8") == path / "openvino_int8" / "model.xml"
    files = {f["path"]: f for f in bundle.metadata["files"]}
    assert files["openvino_int8/model.bin"]["role"] == "weights"
    assert files["openvino_int8/model.bin"]["precision"] == "int8"
    assert files["model.int8.onnx"]["format"] == "onnx"


def test_int8_models_really_are_quantized(int8_bundle):
    import onnx

    path, _ = int8_bundle
    ops = {n.op_type for n in onnx.load(str(path / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    xml = (path / "openvino_int8" / "model.xml").read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml


def test_int8_metrics_and_gate_report(int8_bundle):
    path, meta = int8_bundle
    stored = json.loads((path / "metadata.json").read_text())
    for runtime in ("openvino", "onnxruntime"):
        m = stored["metrics"][f"int8_{runtime}"]
        assert m["kept"] is True
        assert m["accuracy"] == pytest.approx(1.0)
        assert m["accuracy_drop"] <= 0.01
        assert m["size_bytes"] > 0 and m["latency_ms"] > 0
        assert 0.0 <= m["macro_f1"] <= 1.0
        fp32 = stored["metrics"][f"fp32_{runtime}"]
        assert fp32["accuracy"] == pytest.approx(1.0) and fp32["latency_ms"] > 0
    report = stored["int8"]
    assert report["gate"]["max_accuracy_drop"] == 0.01
    assert sorted(report["passed"]) == ["onnxruntime", "openvino"]
    # The documented rule: INT8 is recommended only if it passed the gate AND is faster than FP32.
    for runtime in ("openvino", "onnxruntime"):
        int8, fp32 = stored["metrics"][f"int8_{runtime}"], stored["metrics"][f"fp32_{runtime}"]
        faster = int8["latency_ms"] < fp32["latency_ms"]
        expected = "int8" if runtime in report["passed"] and faster else "fp32"
        assert report["recommended"][runtime] == expected, (runtime, int8["latency_ms"], fp32["latency_ms"])
        assert report["results"][runtime]["speedup_vs_fp32"] == pytest.approx(
            fp32["latency_ms"] / int8["latency_ms"], rel=1e-2)
    assert "<=" in report["results"]["openvino"]["why"]
    assert stored["metrics"]["fp32"] == {"accuracy": 1.0}, "the flow's own FP32 metrics are left alone"


def test_int8_models_agree_with_fp32(int8_bundle):
    from plantml.quantize import onnxruntime_runner, openvino_runner

    path, _ = int8_bundle
    ex, _ = eval_set(3, seed=123_000)
    for fp32, int8 in [
        (onnxruntime_runner(path / "model.onnx"), onnxruntime_runner(path / "model.int8.onnx")),
        (openvino_runner(path / "openvino" / "model.xml"), openvino_runner(path / "openvino_int8" / "model.xml")),
    ]:
        a, b = fp32(ex), int8(ex)
        assert (a.argmax(1) == b.argmax(1)).all()
        assert not np.allclose(a, b, atol=1e-7), "INT8 outputs identical to FP32: nothing was quantized"


def test_gate_rejects_and_deletes_int8_that_loses_accuracy(tmp_path):
    _, calib = tiny_model()
    ex, ey = eval_set()
    # Calibrating on images 20x too dark makes every activation range far too narrow:
    # real images saturate and the INT8 models collapse to one class.
    step = int8_export_step(calib[:1] * 0.05, ex, ey, max_accuracy_drop=0.01, threads=1)
    path, _ = export_tiny(tmp_path, step)
    stored = load_bundle(path).metadata
    assert set(load_bundle(path).available()) == {("onnxruntime", "fp32"), ("openvino", "fp32")}
    assert not (path / "model.int8.onnx").exists()
    assert not (path / "openvino_int8").exists()
    for runtime in ("openvino", "onnxruntime"):
        m = stored["metrics"][f"int8_{runtime}"]
        assert m["kept"] is False and m["accuracy_drop"] > 0.01
        assert ">" in stored["int8"]["results"][runtime]["why"]
        assert stored["int8"]["recommended"][runtime] == "fp32"
    assert stored["int8"]["passed"] == []
    # ONNX Runtime tried both schemes, fastest first, before giving up.
    tried = stored["metrics"]["int8_onnxruntime"]["tried"]
    assert [t["scheme"] for t in tried] == ["qdq_u8s8_reduce_range", "qdq_s8s8"]
    assert all(t["accuracy_drop"] > 0.01 for t in tried)


@pytest.mark.parametrize(
    "calib, labels, drop, match",
    [
        (np.zeros((0, 3, SIZE, SIZE), np.float32), None, 0.01, "empty"),
        (np.zeros((4, SIZE, SIZE), np.float32), None, 0.01, "NCHW"),
        (np.zeros((4, 3, SIZE, SIZE), np.uint8), None, 0.01, "float"),
        (np.full((4, 3, SIZE, SIZE), np.nan, np.float32), None, 0.01, "NaN"),
        (np.zeros((4, 3, SIZE, SIZE), np.float32), np.zeros(5, int), 0.01, "one label per eval image"),
        (np.zeros((4, 3, SIZE, SIZE), np.float32), np.zeros(30, float), 0.01, "integer"),
        (np.zeros((4, 3, SIZE, SIZE), np.float32), None, 5.0, "max_accuracy_drop"),
    ],
)
def test_bad_inputs_are_refused_with_a_named_problem(calib, labels, drop, match):
    ex, ey = eval_set()
    with pytest.raises(ValueError, match=match):
        int8_export_step(calib, ex, ey if labels is None else labels, drop)


def test_mismatch_with_the_bundle_fails_the_export_and_leaves_nothing(tmp_path):
    _, calib = tiny_model()
    ex, ey = eval_set()
    step = int8_export_step(calib, ex, ey + 5, 0.01)  # labels beyond the bundle's 3 classes
    with pytest.raises(ValueError, match="eval_labels must lie in"):
        export_tiny(tmp_path, step)
    assert list(tmp_path.iterdir()) == [], "a failed export must not leave a half-written bundle"


def test_images_of_another_size_than_the_bundle_are_refused(tmp_path):
    from plantml.bundle import BundleWriter

    ex, ey = eval_set()
    step = int8_export_step(np.zeros((4, 3, 16, 16), np.float32), ex, ey, 0.01)
    with BundleWriter(tmp_path, "x", "1") as writer:
        with pytest.raises(ValueError, match="the bundle's input size"):
            step(writer, {"classes": ["a", "b", "c"], "input": {"size": SIZE}, "architecture": "tiny_cnn"})


def test_macro_f1_by_hand():
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp0 fp0 fn1 -> 0
    assert macro_f1(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(np.array([0, 0, 1]), np.array([0, 0, 1])) == 1.0


def test_quantize_module_does_not_import_torch():
    code = "import sys, plantml.quantize; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_nncf_imports_after_metaflow_patched_typing():
    """Metaflow's vendored typing_extensions breaks a plain `import nncf` in the same process."""
    import subprocess
    import sys

    code = ("import typing_extensions\nimport metaflow._vendor.typing_extensions\n"
            "from plantml.quantize import import_nncf\n"
            "import_nncf(); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_int8_recommended_only_when_it_passed_and_is_faster(tmp_path, monkeypatch):
    """Both sides of the rule on a bundle where both INT8 models pass the gate: the OpenVINO INT8
    model measures slower than its FP32 (-> fp32 recommended), the ONNX Runtime one faster (-> int8).

    The latencies are fixed (the order of measurement is FP32 then INT8, OpenVINO then ONNX
    Runtime) so the decision, not the machine's speed, is what is tested.
    """
    import plantml.quantize.gate as gate  # where the gate looks the timer up

    timings = iter([2.0, 3.0, 2.0, 1.0])  # openvino fp32, openvino int8, onnxruntime fp32, onnxruntime int8
    monkeypatch.setattr(gate, "median_latency_ms", lambda runner, sample, *a, **k: next(timings))
    _, calib = tiny_model()
    ex, ey = eval_set()
    path, _ = export_tiny(tmp_path, int8_export_step(calib, ex, ey, 0.01, threads=1))
    report = load_bundle(path).metadata["int8"]
    assert sorted(report["passed"]) == ["onnxruntime", "openvino"], report
    assert report["recommended"] == {"openvino": "fp32", "onnxruntime": "int8"}, report
    assert report["results"]["openvino"]["speedup_vs_fp32"] == pytest.approx(2 / 3, rel=1e-2)
    assert report["results"]["onnxruntime"]["speedup_vs_fp32"] == pytest.approx(2.0)
