"""Serving's calibration, checked with exact values (issue 17, point 5).

A copy of the scored tiny bundle (``logits`` + ``ood_score`` outputs) with
``temperature`` 8 and a non-zero ``abstain_threshold``: the test computes the raw model
outputs itself (ONNX Runtime on the bundle's ``model.onnx``, inputs normalised by hand
from the bundle's mean/std), applies softmax with the temperature, and expects exactly
those confidences, ``abstained`` flags and reasons from ``/predict``, ``/predict_batch``
and the OIP ``/v2/models/<name>/versions/<v>/infer`` endpoint. The thresholds are chosen
so that at temperature 1 nothing abstains on confidence: a server that ignored the
temperature, the abstain threshold or the OOD threshold gets different answers.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, make_leaf_image, noise_image
    from tests.support.serving import Client, metric, parse_metrics
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, make_leaf_image, noise_image
    from support.serving import Client, metric, parse_metrics

TEMPERATURE = 8.0
CLASSES = list(TINY_CLASSES)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def calibrated(scored_bundle, tmp_path_factory):
    """The scored bundle re-calibrated, the probe images, and every expected answer, computed here."""
    import onnxruntime as ort

    bundle = tmp_path_factory.mktemp("calibrated") / "bundle"
    shutil.copytree(scored_bundle, bundle)
    meta = json.loads((bundle / "metadata.json").read_text())
    size, mean, std = meta["input"]["size"], np.array(meta["input"]["mean"]), np.array(meta["input"]["std"])

    # 32x32 PNGs (the model's input size, lossless): the server's resize is the identity on them
    images = [make_leaf_image(TINY_CLASSES[c], size=size, seed=500 + i) for c in CLASSES for i in range(4)]
    images += [noise_image(size=size, seed=s) for s in (1, 2)]
    x = np.stack([((np.asarray(im.convert("RGB"), np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
                  for im in images]).astype(np.float32)
    sess = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, scores = sess.run(None, {sess.get_inputs()[0].name: x})
    scores = scores.reshape(-1).astype(np.float64)
    probs = _softmax(logits, TEMPERATURE)
    conf = probs.max(axis=1)
    leaves, noise = slice(0, 12), slice(12, 14)

    # OOD threshold between the leaves and the noise; abstain threshold between the 4th and 5th most
    # confident leaf (4 answered, 8 under it), where at temperature 1 every leaf is far above it
    assert scores[leaves].max() < scores[noise].min(), scores
    ood_threshold = float((scores[leaves].max() + scores[noise].min()) / 2)
    ranked = np.sort(conf[leaves])[::-1]
    assert ranked[3] - ranked[4] > 2e-3, ranked  # a clear gap, no float-rounding coin flips
    abstain_threshold = float((ranked[3] + ranked[4]) / 2)
    assert _softmax(logits, 1.0)[leaves].max(axis=1).min() > abstain_threshold + 0.1  # temperature matters

    meta["calibration"] = {"temperature": TEMPERATURE, "abstain_threshold": abstain_threshold,
                           "ood_threshold": ood_threshold}
    (bundle / "metadata.json").write_text(json.dumps(meta, indent=2))

    reasons = ["out_of_distribution" if s > ood_threshold else "low_confidence" if c < abstain_threshold else None
               for s, c in zip(scores, conf)]
    assert reasons.count(None) == 4 and reasons.count("low_confidence") == 8
    assert reasons.count("out_of_distribution") == 2
    return {"bundle": bundle, "name": meta["name"], "version": meta["version"], "x": x,
            "pngs": [_png(i) for i in images],
            "probs": probs, "conf": conf, "scores": scores, "labels": [CLASSES[i] for i in probs.argmax(axis=1)],
            "reasons": reasons, "abstain_threshold": abstain_threshold, "ood_threshold": ood_threshold}


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def client(request, calibrated):
    from serving.app import create_app
    from serving.settings import Settings

    app = create_app(Settings(bundle=calibrated["bundle"], runtime=request.param, top_k=3))
    return Client(flask_client=app.test_client())


def test_predict_applies_temperature_and_both_thresholds(client, calibrated):
    files = [(f"probe{i}.png", data) for i, data in enumerate(calibrated["pngs"])]
    r = client.post_files("/predict", files, ctype="image/png")
    assert r.status == 200, r.body
    preds = r.body["predictions"]
    assert len(preds) == 14
    for i, p in enumerate(preds):
        assert p["label"] == calibrated["labels"][i]
        assert p["confidence"] == pytest.approx(calibrated["conf"][i], abs=2e-5), i
        assert [t["confidence"] for t in p["top_k"]] == pytest.approx(
            sorted(calibrated["probs"][i], reverse=True), abs=2e-5)
        assert p["ood_score"] == pytest.approx(calibrated["scores"][i], rel=1e-4, abs=1e-4), i
        assert p["abstain_reason"] == calibrated["reasons"][i], (i, p, calibrated["abstain_threshold"])
        assert p["abstained"] is (calibrated["reasons"][i] is not None)
    samples = parse_metrics(client.get("/metrics").body)
    assert metric(samples, "plantml_abstained_total") >= 10  # counted (the module's other tests add more)


def test_low_confidence_in_the_legacy_fields(client, calibrated):
    i = calibrated["reasons"].index("low_confidence")
    r = client.post_files("/predict", [("leaf.png", calibrated["pngs"][i])], ctype="image/png")
    assert r.status == 200
    assert r.body["abstained"] is True and r.body["abstain_reason"] == "low_confidence"
    assert r.body["prediction"] == "uncertain" and r.body["confidence"] == 0.0
    assert r.body["best_guess"]["class"] == calibrated["labels"][i]
    assert r.body["best_guess"]["confidence"] == pytest.approx(calibrated["conf"][i], abs=2e-5)
    assert r.body["top5_predictions"][0] == {"class": "uncertain", "confidence": 0.0}

    answered = calibrated["reasons"].index(None)
    r = client.post_files("/predict", [("leaf.png", calibrated["pngs"][answered])], ctype="image/png")
    assert r.body["abstained"] is False and r.body["abstain_reason"] is None and "best_guess" not in r.body
    assert r.body["prediction"] == calibrated["labels"][answered]
    assert r.body["confidence"] == pytest.approx(calibrated["conf"][answered], abs=2e-5)


def test_model_info_shows_the_calibration(client, calibrated):
    info = client.get("/model").body
    assert info["calibration"]["temperature"] == TEMPERATURE
    assert info["calibration"]["abstain_threshold"] == pytest.approx(calibrated["abstain_threshold"])
    assert info["calibration"]["ood_threshold"] == pytest.approx(calibrated["ood_threshold"])


@pytest.mark.parametrize("as_bytes", [False, True], ids=["fp32_tensor", "png_bytes"])
def test_oip_versioned_infer_outputs_exact(client, calibrated, as_bytes):
    if as_bytes:
        data = [base64.b64encode(b).decode() for b in calibrated["pngs"]]
        tensor = {"name": "image", "shape": [len(data)], "datatype": "BYTES", "data": data}
    else:
        x = calibrated["x"]
        tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
    path = f"/v2/models/{calibrated['name']}/versions/{calibrated['version']}/infer"
    r = client.request("POST", path, json.dumps({"id": "cal", "inputs": [tensor]}).encode(), "application/json")
    assert r.status == 200, r.body
    assert r.body["model_name"] == calibrated["name"] and r.body["model_version"] == calibrated["version"]
    assert r.body["id"] == "cal"
    out = {o["name"]: o for o in r.body["outputs"]}
    assert set(out) == {"probabilities", "label", "confidence", "abstained", "ood_score"}
    assert out["confidence"]["datatype"] == "FP32" and out["confidence"]["shape"] == [14]
    assert out["abstained"]["datatype"] == "BOOL" and out["ood_score"]["datatype"] == "FP32"
    assert out["probabilities"]["shape"] == [14, 3]
    assert np.asarray(out["probabilities"]["data"]).reshape(14, 3) == pytest.approx(calibrated["probs"], abs=2e-5)
    assert out["confidence"]["data"] == pytest.approx(calibrated["conf"], abs=2e-5)
    assert out["ood_score"]["data"] == pytest.approx(calibrated["scores"], rel=1e-4, abs=1e-4)
    assert out["label"]["data"] == calibrated["labels"]
    assert out["abstained"]["data"] == [reason is not None for reason in calibrated["reasons"]]


def test_oip_unknown_version_is_404(client, calibrated):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": calibrated["x"][:1].reshape(-1).tolist()}]}).encode()
    r = client.request("POST", f"/v2/models/{calibrated['name']}/versions/999/infer", body, "application/json")
    assert r.status == 404 and r.body["reason"] == "model_not_found", r.body
    r = client.get(f"/v2/models/{calibrated['name']}/versions/{calibrated['version']}")
    assert r.status == 200 and r.body["versions"] == [calibrated["version"]]
