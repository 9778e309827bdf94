"""KServe Open Inference Protocol v2 as stock clients speak it (issue 14, item 5).

The unit part builds binary-extension bodies by hand and reads answers with
``tritonclient``'s own parser (Flask test client, no process). The integration part
drives a real gunicorn server with ``tritonclient.http`` itself: defaults (binary tensor
data both ways) and JSON (``binary_data=False``), and checks the same top-1 as
``/predict`` for the same images: 20 real photos of ``../shared/data/plantvillage-mini``
where present, synthetic leaves otherwise. ``PLANTML_EVAL_BUNDLE`` (a trained bundle)
replaces the tiny test bundle when set.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import SHARED_SAMPLE, TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import Client, GunicornServer
except ImportError:  # pragma: no cover
    from conftest import SHARED_SAMPLE, TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import Client, GunicornServer

from serving.app import create_app
from serving.oip_binary import HEADER, decode_bytes_elements, encode_bytes_elements, split_body
from serving.predictor import build_predictor
from serving.settings import Settings

LABELS = list(TINY_CLASSES)
INFER = "/v2/models/tiny-test-model/infer"
REAL_PHOTOS = 20


def leaf(label: str, seed: int = 7) -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[label], size=64, seed=seed))


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    """A request body with the binary tensor data extension (what tritonclient sends)."""
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {HEADER: str(len(text))}


def bytes_input(images: list[bytes], name: str = "image") -> tuple[dict, bytes]:
    blob = encode_bytes_elements(images)
    return {"name": name, "shape": [len(images)], "datatype": "BYTES",
            "parameters": {"binary_data_size": len(blob)}}, blob


def triton_result(reply_body: bytes, headers) -> "object":
    """Parse an answer with tritonclient's own InferResult (the stock client's parser)."""
    http = pytest.importorskip("tritonclient.http")
    length = headers.get(HEADER)
    return http.InferResult.from_response_body(reply_body, header_length=int(length) if length else None)


NOT_IMAGE = bytes_input([b"\x00\x01 not an image"])


@pytest.fixture(scope="module")
def flask_app(tiny_bundle):
    return create_app(Settings(bundle=tiny_bundle), predictor=build_predictor(Settings(bundle=tiny_bundle)))


def post(app, body: bytes, headers: dict[str, str], path: str = INFER):
    return app.test_client().post(path, data=body, headers=headers)


# --------------------------------------------------------------------------- codec


def test_bytes_elements_round_trip_and_split():
    items = [b"", b"abc", bytes(range(256))]
    raw = encode_bytes_elements(items)
    assert raw[:4] == struct.pack("<I", 0) and decode_bytes_elements(raw) == items
    assert split_body(b'{"a":1}xyz', "7") == (b'{"a":1}', b"xyz")
    assert split_body(b'{"a":1}', None) == (b'{"a":1}', b"")


# --------------------------------------------------------------------------- Flask test client


def test_binary_bytes_request_and_binary_response(flask_app):
    images = [leaf(lab, seed=3) for lab in LABELS]
    tensor, blob = bytes_input(images)
    body, headers = binary_body({"inputs": [tensor], "parameters": {"binary_data_output": True}}, blob)
    r = post(flask_app, body, headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == "application/octet-stream" and HEADER in r.headers
    head = json.loads(r.get_data()[:int(r.headers[HEADER])])
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in head["outputs"])
    result = triton_result(r.get_data(), r.headers)
    assert [v.decode() for v in result.as_numpy("label")] == LABELS
    probs = result.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.as_numpy("abstained").dtype == np.bool_ and not result.as_numpy("abstained").any()
    np.testing.assert_allclose(result.as_numpy("confidence"), probs.max(axis=1), atol=1e-6)


def test_binary_request_json_answer_and_per_output_choice(flask_app):
    tensor, blob = bytes_input([leaf(LABELS[1])])
    body, headers = binary_body({"inputs": [tensor], "outputs": [
        {"name": "label", "parameters": {"binary_data": False}},
        {"name": "confidence", "parameters": {"binary_data": True}}]}, blob)
    r = post(flask_app, body, headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    head = json.loads(r.get_data()[:int(r.headers[HEADER])])
    assert head["outputs"][0]["data"] == [LABELS[1]]
    assert head["outputs"][1]["parameters"]["binary_data_size"] == 4
    # no binary output asked for: a plain JSON answer without the header
    body, headers = binary_body({"inputs": [tensor]}, blob)
    r = post(flask_app, body, headers)
    assert r.status_code == 200 and HEADER not in r.headers and r.is_json
    assert r.get_json()["outputs"][1]["data"] == [LABELS[1]]


def test_binary_fp32_uint8_bytes_and_base64_text_agree(flask_app):
    from plantml.preprocess import decode_image, preprocess_image

    spec = flask_app.extensions["plantml"].predictor.spec
    jpeg = leaf(LABELS[2], seed=11)
    arr = preprocess_image(decode_image(jpeg), spec)[None].astype("<f4")
    raw = arr.tobytes()
    fp32 = {"name": "input", "shape": list(arr.shape), "datatype": "FP32", "parameters": {"binary_data_size": len(raw)}}
    pixels = np.asarray(decode_image(jpeg), dtype=np.uint8)[None]
    uint8 = {"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
             "parameters": {"binary_data_size": pixels.size}}
    answers = []
    for tensor, blob in [(fp32, raw), bytes_input([jpeg]), bytes_input([base64.b64encode(jpeg)]),
                         (uint8, pixels.tobytes())]:
        body, headers = binary_body({"inputs": [tensor], "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}}]}, blob)
        r = post(flask_app, body, headers)
        assert r.status_code == 200, r.get_data(as_text=True)
        answers.append(triton_result(r.get_data(), r.headers).as_numpy("probabilities"))
    np.testing.assert_allclose(answers[0], answers[1], atol=1e-6)
    np.testing.assert_allclose(answers[1], answers[2], atol=0)
    np.testing.assert_allclose(answers[1], answers[3], atol=0)  # decoded RGB pixels == the encoded image
    # UINT8 pixels as JSON too
    small = np.asarray(decode_image(jpeg).resize((8, 6)), dtype=np.uint8)[None]
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(small.shape), "datatype": "UINT8",
                                   "data": small.reshape(-1).tolist()}]}).encode()
    r = post(flask_app, body, {"Content-Type": "application/json"})
    assert r.status_code == 200 and r.get_json()["outputs"][1]["data"] == [LABELS[2]], r.get_data(as_text=True)
    assert LABELS[int(answers[0].argmax())] == LABELS[2]


def test_classification_extension(flask_app):
    tensor, blob = bytes_input([leaf(LABELS[0])])
    body, headers = binary_body({"inputs": [tensor], "outputs": [
        {"name": "probabilities", "parameters": {"classification": 2, "binary_data": False}}]}, blob)
    r = post(flask_app, body, headers)
    out = r.get_json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 2]
    score, index, label = out["data"][0].split(":")
    assert label == LABELS[0] and int(index) == 0 and 0 < float(score) <= 1


# each malformed framing and the specific refusal it must get (reason, a fragment of the error text)
MALFORMED_EXPECTED = {
    "header_not_int": ("bad_tensor", "Inference-Header-Content-Length must be an integer, got 'abc'"),
    "header_too_long": ("bad_tensor", "Inference-Header-Content-Length is 999 but the body has 14 bytes"),
    "header_zero": ("bad_tensor", "Inference-Header-Content-Length is 0 but the body has 14 bytes"),
    "size_past_end": ("bad_tensor", "declares 100 bytes of binary data but only 10 follow"),
    "bytes_left_over": ("bad_tensor", "5 bytes after the JSON header belong to no input"),
    "data_and_binary": ("bad_tensor", "has both 'data' and a binary_data_size parameter"),
    "element_past_end": ("bad_tensor", "BYTES element 0 declares 50 bytes; 2 remain"),
    "bad_size_param": ("bad_tensor", "binary_data_size must be a non-negative integer, got -1"),
    "fp32_wrong_bytes": ("bad_tensor", "needs 12288 bytes, got 12"),
    "fp32_nan": ("bad_tensor", "NaN or infinity"),
    "count_mismatch": ("bad_tensor", "needs 2 data elements, got 1"),
    "uint8_not_rgb": ("bad_tensor", "got [1, 4, 4, 4]"),
    "uint8_wrong_bytes": ("bad_tensor", "needs 48 bytes, got 40"),
    "uint8_json_out_of_range": ("bad_tensor", "integers in 0..255"),
    "no_data_at_all": ("bad_tensor", "neither 'data' nor a binary_data_size"),
    "not_an_image": ("not_image", "not an image file"),
}


@pytest.mark.parametrize("case, body, headers", [
    ("header_not_int", b'{"inputs": []}', {HEADER: "abc"}),
    ("header_too_long", b'{"inputs": []}', {HEADER: "999"}),
    ("header_zero", b'{"inputs": []}', {HEADER: "0"}),
    ("size_past_end", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                               "parameters": {"binary_data_size": 100}}]}, b"x" * 10)),
    ("bytes_left_over", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                 "parameters": {"binary_data_size": 4}}]},
                                     struct.pack("<I", 0) + b"extra")),
    ("data_and_binary", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"],
                                                 "parameters": {"binary_data_size": 4}}]}, struct.pack("<I", 0))),
    ("element_past_end", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                  "parameters": {"binary_data_size": 6}}]},
                                      struct.pack("<I", 50) + b"ab")),
    ("bad_size_param", *binary_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": -1}}]})),
    ("fp32_wrong_bytes", *binary_body({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                  "parameters": {"binary_data_size": 12}}]}, b"\0" * 12)),
    ("fp32_nan", *binary_body({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                          "parameters": {"binary_data_size": 3 * 32 * 32 * 4}}]},
                              np.full(3 * 32 * 32, np.nan, "<f4").tobytes())),
    ("count_mismatch", *binary_body({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                                "parameters": {"binary_data_size": 4}}]}, struct.pack("<I", 0))),
    ("uint8_not_rgb", *binary_body({"inputs": [{"name": "pixels", "shape": [1, 4, 4, 4], "datatype": "UINT8",
                                               "parameters": {"binary_data_size": 64}}]}, b"\0" * 64)),
    ("uint8_wrong_bytes", *binary_body({"inputs": [{"name": "pixels", "shape": [1, 4, 4, 3], "datatype": "UINT8",
                                                   "parameters": {"binary_data_size": 40}}]}, b"\0" * 40)),
    ("uint8_json_out_of_range", json.dumps({"inputs": [{"name": "pixels", "shape": [1, 1, 1, 3], "datatype": "UINT8",
                                                        "data": [0, 300, 0]}]}).encode(), {}),
    ("no_data_at_all", b'{"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}', {}),
    ("not_an_image", *binary_body({"inputs": [NOT_IMAGE[0]]}, NOT_IMAGE[1])),
])
def test_malformed_binary_requests_are_400(flask_app, case, body, headers):
    r = post(flask_app, body, {**headers, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400, (case, r.get_data(as_text=True))
    want_reason, want_text = MALFORMED_EXPECTED[case]
    assert r.is_json and r.get_json()["reason"] == want_reason, (case, r.get_json())
    assert want_text in r.get_json()["error"], (case, r.get_json())


def test_platform_named_as_triton(tiny_bundle):
    from serving.oip import platform_name

    assert platform_name("onnxruntime") == "onnxruntime_onnx" and platform_name("openvino") == "openvino"
    for runtime, expected in [("onnxruntime", "onnxruntime_onnx"), ("openvino", "openvino")]:
        settings = Settings(bundle=tiny_bundle, runtime=runtime)
        c = Client(flask_client=create_app(settings, predictor=build_predictor(settings)).test_client())
        meta = c.get("/v2/models/tiny-test-model").body
        assert meta["platform"] == expected and meta["parameters"]["precision"] == "fp32"
        assert [i["datatype"] for i in meta["inputs"]] == ["FP32", "BYTES", "UINT8"]
    assert "binary_tensor_data" in c.get("/v2").body["extensions"]


# --------------------------------------------------------------------------- real server, stock client


def _photos() -> list[tuple[str, bytes]]:
    """20 real photos across the sample's classes when present, else synthetic leaves."""
    if SHARED_SAMPLE.is_dir():
        files = sorted(p for p in SHARED_SAMPLE.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        if len(files) >= REAL_PHOTOS:
            step = len(files) // REAL_PHOTOS
            return [(p.name, p.read_bytes()) for p in files[::step][:REAL_PHOTOS]]
    return [(f"{lab}-{i}.jpg", leaf(lab, seed=100 + i)) for i in range(7) for lab in LABELS][:REAL_PHOTOS]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    bundle = os.environ.get("PLANTML_EVAL_BUNDLE") or str(tiny_bundle)
    with GunicornServer(tmp_path_factory.mktemp("kserve"), workers=2, env={"PLANTML_BUNDLE": bundle}) as srv:
        yield srv


@pytest.fixture(scope="module")
def photos_and_predict(server):
    """The photos and the top-1 that ``/predict`` gives each (one multipart request)."""
    photos = _photos()
    body = Client(base_url=server.base).post_files("/predict", photos)
    assert body.status == 200, body.body
    return photos, [p["label"] for p in body.body["predictions"]]


def _triton(server):
    http = pytest.importorskip("tritonclient.http")
    return http, http.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=30.0,
                                            network_timeout=60.0)


def _model_name(server) -> str:
    import requests

    return requests.get(server.url("/model"), timeout=10).json()["name"]


@pytest.mark.integration
def test_tritonclient_defaults_binary(server, photos_and_predict):
    """``tritonclient.http`` with its defaults: binary tensor data in the request and the answer."""
    http, client = _triton(server)
    photos, expected = photos_and_predict
    name = _model_name(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    assert meta["platform"] in {"onnxruntime_onnx", "openvino"}
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    inp = http.InferInput("image", [len(photos)], "BYTES")
    inp.set_data_from_numpy(np.array([data for _, data in photos], dtype=np.object_))  # binary_data=True
    result = client.infer(name, [inp])  # no outputs named: every output, as binary data
    labels = [v.decode() for v in result.as_numpy("label")]
    assert labels == expected, f"{sum(a != b for a, b in zip(labels, expected))} of {len(photos)} differ"
    classes = meta["parameters"]["classes"]
    probs = result.as_numpy("probabilities")
    assert [classes[i] for i in probs.argmax(axis=1)] == expected
    # named outputs with the client's default (binary) and the classification extension
    result = client.infer(name, [inp], outputs=[http.InferRequestedOutput("label"),
                                                http.InferRequestedOutput("probabilities", class_count=1)])
    assert [v.decode() for v in result.as_numpy("label")] == expected
    assert [v.decode().split(":")[2] for v in result.as_numpy("probabilities").reshape(-1)] == expected
    client.close()


@pytest.mark.integration
def test_tritonclient_json_mode(server, photos_and_predict):
    """``binary_data=False`` everywhere: images as base64 text in the JSON (the only way JSON can carry them)."""
    http, client = _triton(server)
    photos, expected = photos_and_predict
    name = _model_name(server)
    inp = http.InferInput("image", [len(photos)], "BYTES")
    inp.set_data_from_numpy(np.array([base64.b64encode(data) for _, data in photos], dtype=np.object_),
                            binary_data=False)
    outputs = [http.InferRequestedOutput(n, binary_data=False) for n in ("label", "confidence", "abstained")]
    result = client.infer(name, [inp], outputs=outputs)
    assert result.get_response()["outputs"][0]["data"] == expected  # plain JSON answer
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == expected
    assert result.as_numpy("confidence").shape == (len(photos),)
    client.close()


@pytest.mark.integration
def test_tritonclient_fp32_binary_tensor(server, photos_and_predict):
    """A preprocessed FP32 batch sent as raw bytes gives the same top-1 as the encoded images."""
    from plantml.bundle import load_bundle
    from plantml.preprocess import decode_image, preprocess_image

    http, client = _triton(server)
    photos, expected = photos_and_predict
    name = _model_name(server)
    bundle = load_bundle(Path(os.environ.get("PLANTML_EVAL_BUNDLE") or server.env["PLANTML_BUNDLE"]))
    batch = np.stack([preprocess_image(decode_image(data), bundle.input_spec) for _, data in photos[:8]])
    inp = http.InferInput("input", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch.astype(np.float32))
    result = client.infer(name, [inp], outputs=[http.InferRequestedOutput("label")])
    assert [v.decode() for v in result.as_numpy("label")] == expected[:8]
    client.close()
