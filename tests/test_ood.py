"""The out-of-distribution score (plantml.ood, plantml.models.scored) and its use by serving and edge."""

from __future__ import annotations

import json

import numpy as np
import pytest

from plantml.ood import (REASON_LOW_CONFIDENCE, REASON_OOD, FeatureDetector, choose_ood_threshold, decide,
                         fit_feature_detector, rejection_rate)
from tests.conftest import TINY_CLASSES, make_leaf_image, noise_image


def clusters(n_per_class: int = 60, dim: int = 12, n_classes: int = 3, seed: int = 0, means_seed: int = 0):
    """Gaussian class clusters with a shared, anisotropic covariance (means fixed by ``means_seed``)."""
    means = np.random.default_rng(1000 + means_seed).normal(0, 4, size=(n_classes, dim))
    rng = np.random.default_rng(seed)
    scales = np.linspace(0.3, 2.0, dim)
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = means[y] + rng.normal(0, 1, size=(len(y), dim)) * scales
    return x, y, means, scales


def test_scores_separate_far_points_from_the_training_distribution():
    x, y, means, scales = clusters()
    det = fit_feature_detector(x, y, 3, components=4)
    val, _, _, _ = clusters(seed=1)
    val_scores = det.score(val[:, :])
    rng = np.random.default_rng(2)
    far = means.mean(0) + rng.normal(0, 15, size=(50, x.shape[1]))
    threshold = choose_ood_threshold(val_scores, 0.95)
    assert 0.5 < np.median(val_scores) < 2.0  # RMS distance: about 1 in distribution
    assert rejection_rate(val_scores, threshold) <= 0.05 + 1e-9
    assert rejection_rate(det.score(far), threshold) > 0.9


def test_full_rank_score_is_the_shrunk_mahalanobis_distance():
    x, y, _, _ = clusters(dim=6)
    det = fit_feature_detector(x, y, 3, components=6)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    r = x - means[y]
    cov = r.T @ r / len(r)
    shrunk = (1 - det.shrinkage) * cov + det.shrinkage * np.trace(cov) / 6 * np.eye(6)
    prec = np.linalg.inv(shrunk)
    probe = np.random.default_rng(3).normal(0, 3, size=(20, 6))
    d2 = np.stack([np.einsum("ij,jk,ik->i", probe - m, prec, probe - m) for m in means], 1).min(1)
    np.testing.assert_allclose(det.score(probe), np.sqrt(d2 / 6), rtol=1e-4)
    assert 0.0 <= det.shrinkage <= 1.0


def test_low_rank_keeps_the_leading_directions_and_pools_the_rest():
    x, y, _, _ = clusters(dim=10)
    det = fit_feature_detector(x, y, 3, components=3)
    assert det.basis.shape == (10, 3) and det.variances.shape == (3,)
    assert np.all(np.diff(det.variances) <= 1e-6)  # leading variances in decreasing order
    assert det.rest_variance <= det.variances.min() + 1e-6


@pytest.mark.parametrize("bad, match", [
    (dict(features=np.zeros((5, 3)), labels=np.zeros(4)), "must match"),
    (dict(features=np.full((6, 3), np.nan), labels=np.arange(6) % 3), "NaN"),
    (dict(features=np.random.default_rng(0).normal(size=(6, 3)), labels=np.zeros(6, int)), "every one of the 3"),
    (dict(features=np.ones((6, 3)), labels=np.arange(6) % 3), "do not vary"),
])
def test_fit_rejects_bad_input_with_a_clear_error(bad, match):
    with pytest.raises(ValueError, match=match):
        fit_feature_detector(bad["features"], bad["labels"], 3)


def test_score_rejects_features_of_the_wrong_dimension():
    x, y, _, _ = clusters()
    det = fit_feature_detector(x, y, 3)
    with pytest.raises(ValueError, match=r"shape \(N, 12\)"):
        det.score(np.zeros((2, 5)))


def test_threshold_is_a_validation_quantile_and_checks_its_input():
    scores = np.arange(1, 101, dtype=float)
    assert choose_ood_threshold(scores, 0.95) == 96.0
    assert choose_ood_threshold(scores, 1.0) == 100.0
    for bad in (np.array([]), np.array([1.0, np.inf])):
        with pytest.raises(ValueError, match="non-empty"):
            choose_ood_threshold(bad, 0.9)
    with pytest.raises(ValueError, match="acceptance"):
        choose_ood_threshold(scores, 0.0)


def test_save_and_load_round_trip(tmp_path):
    x, y, _, _ = clusters()
    det = fit_feature_detector(x, y, 3, components=5)
    loaded = FeatureDetector.load(det.save(tmp_path / "d.npz"))
    np.testing.assert_array_equal(loaded.score(x), det.score(x))
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not an OOD detector"):
        FeatureDetector.load(tmp_path / "other.npz")


def test_decide_reports_why_an_input_was_abstained():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.95, 0.05], [0.5, 0.5]])
    scores = np.array([1.0, 1.0, 9.0, 9.0])
    abstained, reasons = decide(probs, scores, 0.6, 2.0)
    assert abstained.tolist() == [False, True, True, True]
    assert reasons == [None, REASON_LOW_CONFIDENCE, REASON_OOD, REASON_OOD]
    abstained, reasons = decide(probs, None, 0.6, None)  # an old bundle: confidence only
    assert abstained.tolist() == [False, True, False, True]


# --------------------------------------------------------------------------- in the graph


def test_scored_classifier_matches_the_model_and_the_numpy_score():
    import torch

    from plantml.models import create_model
    from plantml.models.scored import extract_features, scored_classifier

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, pretrained=False).eval()
    x = np.random.default_rng(0).normal(size=(30, 3, 32, 32)).astype(np.float32)
    feats, logits = extract_features(model, x)
    det = fit_feature_detector(feats, np.arange(30) % 3, 3, components=4)
    with torch.inference_mode():
        got_logits, got_scores = scored_classifier(model, det)(torch.from_numpy(x))
        plain = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got_logits.numpy(), plain, atol=1e-6)
    np.testing.assert_allclose(got_scores.numpy(), det.score(feats), rtol=1e-3, atol=1e-4)


def test_split_head_refuses_an_unknown_model():
    from torch import nn

    from plantml.models.scored import split_head

    with pytest.raises(TypeError, match="penultimate"):
        split_head(nn.Conv2d(3, 3, 1))


def test_scored_bundle_declares_and_checks_its_ood_output(scored_bundle):
    from plantml.bundle import load_bundle

    bundle = load_bundle(scored_bundle)
    meta = bundle.metadata
    assert bundle.outputs == ["logits", "ood_score"]
    assert bundle.ood_threshold is not None and bundle.ood_threshold > 0
    assert meta["parity"]["ood_score_max_rel_diff"]["onnxruntime_fp32"]["max"] < 1e-4
    assert set(meta["parity"]["max_abs_diff"]) == {"onnxruntime_fp32", "openvino_fp32"}


def test_an_ood_threshold_without_an_ood_output_is_refused(tiny_bundle, tmp_path):
    import shutil

    from plantml.bundle import BundleError, load_bundle

    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["calibration"]["ood_threshold"] = 2.0
    (dst / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="no 'ood_score' output"):
        load_bundle(dst)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_edge_answers_leaves_and_abstains_on_noise(scored_bundle, runtime):
    from edge.runtime import EdgeModel

    model = EdgeModel(scored_bundle, runtime=runtime, threads=1)
    leaves = [make_leaf_image(rgb, seed=80_000 + i) for i, rgb in enumerate(TINY_CLASSES.values())]
    noise = [noise_image(seed=s) for s in range(4)]
    preds = model.predict_images(leaves + noise)
    assert [p["label"] for p in preds[:3]] == list(TINY_CLASSES)
    assert all(not p["abstained"] and p["abstain_reason"] is None for p in preds[:3])
    assert all(p["abstained"] and p["abstain_reason"] == REASON_OOD for p in preds[3:])
    assert all(p["ood_score"] > model.bundle.ood_threshold for p in preds[3:])


def test_serving_returns_the_score_and_the_reason(scored_bundle):
    from serving.app import create_app
    from serving.settings import Settings
    from tests.conftest import jpeg_bytes

    app = create_app(Settings(bundle=scored_bundle))
    client = app.test_client()
    leaf = jpeg_bytes(make_leaf_image(TINY_CLASSES["Apple___scab"], seed=5))
    import io

    res = client.post("/predict", data={"files": [(io.BytesIO(leaf), "leaf.jpg"),
                                                  (io.BytesIO(jpeg_bytes(noise_image(seed=9))), "noise.jpg")]},
                      content_type="multipart/form-data")
    assert res.status_code == 200, res.get_data(as_text=True)
    leaf_pred, noise_pred = res.get_json()["predictions"]
    assert leaf_pred["label"] == "Apple___scab" and leaf_pred["abstained"] is False
    assert noise_pred["abstained"] is True and noise_pred["abstain_reason"] == REASON_OOD
    assert noise_pred["ood_score"] > leaf_pred["ood_score"]
    assert client.get("/model").get_json()["serving"]["ood_threshold"] > 0


def _calibration_images() -> np.ndarray:
    from plantml.preprocess import InputSpec, preprocess_image

    spec = InputSpec(size=32)
    return np.stack([preprocess_image(make_leaf_image(rgb, seed=900 + i), spec)
                     for i, rgb in enumerate(list(TINY_CLASSES.values()) * 8)])


def test_ood_head_nodes_are_found_structurally(scored_bundle):
    import onnx
    import openvino as ov

    from plantml.quantize import onnx_ood_head_nodes, openvino_ood_head_nodes

    graph = onnx.load(str(scored_bundle / "model.onnx")).graph
    head = set(onnx_ood_head_nodes(graph))
    ops = {n.name: n.op_type for n in graph.node}
    assert {ops[n] for n in head} >= {"MatMul", "Sub", "ReduceMin", "Sqrt"}
    assert not {ops[n] for n in head} & {"Conv", "Gemm"}  # nothing of the classifier
    ov_head = openvino_ood_head_nodes(ov.Core().read_model(str(scored_bundle / "openvino" / "model.xml")))
    assert "ood_score" in ov_head and not [n for n in ov_head if "Conv" in n]
    assert onnx_ood_head_nodes(onnx.load(str(scored_bundle / "model.onnx")).graph.__class__()) == []


def test_int8_onnx_quantizes_the_classifier_and_keeps_the_ood_head_in_fp32(scored_bundle, tmp_path):
    import onnx

    from plantml.quantize import onnx_ood_head_nodes, quantize_onnx

    head = set(onnx_ood_head_nodes(onnx.load(str(scored_bundle / "model.onnx")).graph))
    out = quantize_onnx(scored_bundle / "model.onnx", tmp_path / "m.int8.onnx", _calibration_images())
    graph = onnx.load(str(out)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 3  # the classifier is quantized
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    float_weights = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    head_matmuls = [n for n in graph.node if n.name in head and n.op_type == "MatMul"]
    assert len(head_matmuls) == 1, [n.name for n in head_matmuls]
    for node in head_matmuls:
        assert not set(node.input) & dequantized, f"{node.name} reads an INT8 tensor"
        assert set(node.input) & float_weights, f"{node.name} should multiply by a float32 constant"
    assert [o.name for o in graph.output] == ["logits", "ood_score"]


def test_int8_openvino_quantizes_the_classifier_and_keeps_the_ood_head_in_fp32(scored_bundle, tmp_path):
    import openvino as ov

    from plantml.quantize import quantize_openvino

    xml = quantize_openvino(scored_bundle / "openvino" / "model.xml", tmp_path / "ov8" / "model.xml",
                            _calibration_images())
    model = ov.Core().read_model(str(xml))
    fq = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert len(fq) >= 3
    head_matmuls = [op for op in model.get_ordered_ops() if op.get_friendly_name() == "/MatMul"]
    assert len(head_matmuls) == 1
    for op in head_matmuls:
        feeding = [i.get_source_output().get_node().get_type_name() for i in op.inputs()]
        assert "FakeQuantize" not in feeding, (op.get_friendly_name(), feeding)
