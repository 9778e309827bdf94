import json
import shutil

import numpy as np
import pytest

from plantml.bundle import BundleError, BundleWriter, load_bundle
from plantml.export import export_bundle, onnxruntime_runner, openvino_runner, torch_runner
from plantml.preprocess import InputSpec


def test_bundle_metadata_follows_design(tiny_bundle):
    meta = json.loads((tiny_bundle / "metadata.json").read_text())
    for key in ("schema_version", "name", "version", "architecture", "classes", "input", "files", "metrics",
                "calibration", "lineage"):
        assert key in meta
    assert {"size", "mean", "std", "layout", "color_order", "resize"} <= set(meta["input"])
    assert all({"path", "format", "precision", "sha256"} <= set(f) for f in meta["files"])
    assert {"git_commit", "created_at", "data_manifest_sha256"} <= set(meta["lineage"])


def test_parity_at_batch_1_2_8(tiny_bundle):
    parity = json.loads((tiny_bundle / "metadata.json").read_text())["parity"]["max_abs_diff"]
    for runtime in ("onnxruntime_fp32", "openvino_fp32"):
        assert set(parity[runtime]) == {"batch_1", "batch_2", "batch_8", "max"}
        assert parity[runtime]["max"] <= 1e-4


def test_exported_models_accept_any_batch(tiny_bundle):
    b = load_bundle(tiny_bundle)
    x = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    ort = onnxruntime_runner(b.model_path("onnxruntime"))(x)
    ov = openvino_runner(b.model_path("openvino"))(x)
    assert ort.shape == ov.shape == (5, 3)
    np.testing.assert_allclose(ort, ov, atol=1e-4)


def test_tampered_file_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="sha256 mismatch for model.onnx"):
        load_bundle(copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="bundle file missing: model.onnx"):
        load_bundle(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="bundle directory not found"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="no metadata.json"):
        load_bundle(tmp_path)


def test_failed_export_leaves_nothing(tmp_path):
    """An exception inside the writer (here: a parity failure) removes the half-written bundle."""
    torch = pytest.importorskip("torch")

    class Drifting(torch.nn.Module):
        """A model whose output changes between calls, so parity must fail."""

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
            return self.lin(x.mean((2, 3))) + (0.0 if exporting else float(self.calls))

    from plantml.export import ExportError

    with pytest.raises(ExportError, match="disagrees with torch"):
        export_bundle(Drifting(), out_root=tmp_path, name="m", architecture="x", classes=["a", "b"],
                      input_spec=InputSpec(size=16), parity_inputs=np.zeros((8, 3, 16, 16), np.float32),
                      metrics={}, lineage={}, version="1")
    assert list(tmp_path.iterdir()) == []


def test_writer_is_atomic_and_points_latest(tmp_path):
    with BundleWriter(tmp_path, "n", "1") as w:
        (w.dir / "m.onnx").write_bytes(b"x")
        w.add_file("m.onnx", fmt="onnx", runtime="onnxruntime", precision="fp32")
        assert not (tmp_path / "n-1").exists()
        w.commit({"name": "n", "version": "1", "architecture": "a", "classes": ["a", "b"],
                  "input": InputSpec(size=16).to_dict(), "metrics": {}, "calibration": {}, "lineage": {}})
    assert (tmp_path / "latest").resolve() == (tmp_path / "n-1").resolve()
    assert load_bundle(tmp_path / "latest").version == "1"


def test_torch_runner_matches_onnx_on_tiny_model(tiny_bundle):
    torch = pytest.importorskip("torch")
    from plantml.models import create_model

    model = create_model("tiny_cnn", 3).eval()
    from plantml.export import export_onnx

    path = export_onnx(model, tiny_bundle.parent / "check.onnx", 32)
    x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(torch_runner(model)(x), onnxruntime_runner(path)(x), atol=1e-5)
    path.unlink()
    del torch
