"""Bad and unusual input: every bad request gets a JSON error with the right status, never
a 500 and never a dead worker, and the next good request is still answered correctly.

The same cases run twice: against Flask's test client (fast) and against a real gunicorn
with 2 workers (integration), where worker pids are checked before and after. A
hypothesis fuzz over the upload path runs in both modes too.
"""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import (Client, GunicornServer, bad_cases, metric, multipart, parse_metrics,
                                       unusual_images)
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import Client, GunicornServer, bad_cases, metric, multipart, parse_metrics, unusual_images

GOOD_LABEL = "Tomato___healthy"
CASES = bad_cases()
ALLOWED_STATUSES = {200, 400, 413, 415}
# Fuzz runs that replay: the same examples on every run (derandomize: the seed is fixed by the test's
# name, so a CI failure reproduces locally with a plain rerun), and the failing example printed as a
# ``@reproduce_failure`` blob. No example database: nothing to carry between machines.
REPLAYABLE = dict(deadline=None, database=None, derandomize=True, print_blob=True)


@pytest.fixture(scope="module")
def good_jpeg() -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[GOOD_LABEL], size=64, seed=7))


@pytest.fixture(scope="module")
def flask_client(tiny_bundle):
    from serving.app import create_app
    from serving.settings import Settings

    app = create_app(Settings(bundle=tiny_bundle, workers=1))
    return Client(flask_client=app.test_client())


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    srv = GunicornServer(tmp_path_factory.mktemp("gunicorn_badinput"), workers=2,
                         env={"PLANTML_BUNDLE": str(tiny_bundle)}).start()
    srv.initial_workers = srv.workers()
    assert len(srv.initial_workers) == 2, srv.log()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http_client(server):
    return Client(base_url=server.base)


def _assert_error(reply, case) -> None:
    assert reply.status == case.status, (case.id, reply.status, reply.body)
    assert isinstance(reply.body, dict) and isinstance(reply.body.get("error"), str) and reply.body["error"], reply
    assert reply.body.get("reason") == case.reason, (case.id, reply.body)


def _assert_good(client: Client, jpeg: bytes) -> None:
    reply = client.post_files("/predict", [("leaf.jpg", jpeg)])
    assert reply.status == 200, reply.body
    assert reply.body["prediction"] == GOOD_LABEL


# --------------------------------------------------------------------------- Flask test client


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_flask(flask_client, good_jpeg, case):
    path, body, ctype = case.build(good_jpeg)
    _assert_error(flask_client.request("POST", path, body, ctype), case)


def test_good_request_after_bad_flask(flask_client, good_jpeg):
    for case in CASES:
        flask_client.request("POST", *case.build(good_jpeg))
    _assert_good(flask_client, good_jpeg)


@pytest.mark.parametrize("name", list(unusual_images(make_leaf_image((40, 160, 40), size=48))))
def test_unusual_valid_images_flask(flask_client, name):
    data = unusual_images(make_leaf_image(TINY_CLASSES[GOOD_LABEL], size=48, seed=3))[name]
    reply = flask_client.post_files("/predict", [(name, data)], ctype="application/octet-stream")
    assert reply.status == 200, (name, reply.body)
    assert reply.body["prediction"] in TINY_CLASSES
    raw = flask_client.request("POST", "/predict", data, "image/*")
    assert raw.status == 200, (name, raw.body)


def test_exif_rotation_is_applied(flask_client):
    """A 64x40 JPEG tagged 'rotate 90' is served as 40x64 (checked via the drift stats path)."""
    from plantml.preprocess import decode_image

    data = unusual_images(make_leaf_image(TINY_CLASSES[GOOD_LABEL], size=48))["exif_rotated_jpeg"]
    assert decode_image(data).size == (40, 64)
    assert flask_client.request("POST", "/predict", data, "image/jpeg").status == 200


def test_unknown_route_and_method_are_json(flask_client):
    r = flask_client.get("/nope")
    assert r.status == 404 and "error" in r.body
    r = flask_client.get("/predict")
    assert r.status == 405 and "error" in r.body


def test_rejections_are_counted_by_reason(tiny_bundle, good_jpeg):
    from serving.app import create_app
    from serving.settings import Settings

    client = Client(flask_client=create_app(Settings(bundle=tiny_bundle)).test_client())
    by_id = {c.id: c for c in CASES}
    for cid in ("text_as_jpeg", "text_as_jpeg", "truncated_jpeg", "png_bomb_header", "text_plain", "over_upload_limit"):
        client.request("POST", *by_id[cid].build(good_jpeg))
    samples = parse_metrics(client.get("/metrics").body)
    assert metric(samples, "plantml_rejected_inputs_total", reason="not_image") == 2
    assert metric(samples, "plantml_rejected_inputs_total", reason="truncated") == 1
    assert metric(samples, "plantml_rejected_inputs_total", reason="too_large") == 1
    assert metric(samples, "plantml_rejected_inputs_total", reason="unsupported_media_type") == 1
    assert metric(samples, "plantml_rejected_inputs_total", reason="payload_too_large") == 1
    assert metric(samples, "flask_http_request_total", status="500") == 0


# --------------------------------------------------------------------------- fuzz

def _mutate(data: bytes, rng: random.Random, n_ops: int) -> bytes:
    buf = bytearray(data)
    for _ in range(n_ops):
        op = rng.randrange(4)
        if not buf:
            break
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] = rng.randrange(256)
        elif op == 1:
            del buf[pos:pos + rng.randrange(1, 64)]
        elif op == 2:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            buf = buf[:pos]
    return bytes(buf)


def _seed_files() -> list[bytes]:
    img = make_leaf_image(TINY_CLASSES[GOOD_LABEL], size=40, seed=11)
    out = []
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()
CONTENT_TYPES = ["image/jpeg", "image/png", "application/octet-stream", "text/plain", "image/*", None, "multipart"]


@st.composite
def upload(draw):
    kind = draw(st.sampled_from(["mutated", "random", "valid"]))
    if kind == "random":
        data = draw(st.binary(max_size=3000))
    else:
        seed = draw(st.sampled_from(SEEDS))
        ops = 0 if kind == "valid" else draw(st.integers(1, 12))
        data = _mutate(seed, random.Random(draw(st.integers(0, 2**32 - 1))), ops)
    return data, draw(st.sampled_from(CONTENT_TYPES)), draw(st.sampled_from(["/predict", "/predict_batch", "/v2"]))


def _send_fuzz(client: Client, data: bytes, ctype: str | None, route: str):
    if route == "/v2":
        body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(data).decode()]}]}).encode()
        return client.request("POST", "/v2/models/tiny-test-model/infer", body, "application/json")
    if ctype == "multipart":
        field = "files" if route == "/predict_batch" else "file"
        body, mp_type = multipart([(field, "fuzz.bin", data, "image/jpeg")])
        return client.request("POST", route, body, mp_type)
    return client.request("POST", route, data, ctype)


def _check_fuzz_reply(reply) -> None:
    assert reply.status in ALLOWED_STATUSES, (reply.status, reply.body)
    assert isinstance(reply.body, dict), reply.body
    if reply.status != 200:
        assert isinstance(reply.body.get("error"), str)
    else:
        preds = reply.body.get("predictions") or reply.body.get("outputs")
        assert preds, reply.body


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF the fuzzer makes
@settings(max_examples=150, **REPLAYABLE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=upload())
def test_fuzz_upload_flask(flask_client, case):
    _check_fuzz_reply(_send_fuzz(flask_client, *case))


def test_good_request_after_fuzz_flask(flask_client, good_jpeg):
    _assert_good(flask_client, good_jpeg)


@settings(max_examples=60, **REPLAYABLE, suppress_health_check=[HealthCheck.too_slow])
@given(payload=st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["inputs", "name", "shape", "datatype", "data", "outputs", "id", "x"]), children, max_size=5),
    max_leaves=20))
def test_fuzz_oip_json_flask(tiny_bundle, payload):
    client = _shared_oip_client(tiny_bundle)
    reply = client.request("POST", "/v2/models/tiny-test-model/infer", json.dumps(payload).encode(), "application/json")
    assert reply.status in ALLOWED_STATUSES, (payload, reply.status, reply.body)
    if reply.status != 200:
        assert "error" in reply.body


_OIP_CLIENT: dict[str, Client] = {}


def _shared_oip_client(bundle) -> Client:
    if "c" not in _OIP_CLIENT:
        from serving.app import create_app
        from serving.settings import Settings

        _OIP_CLIENT["c"] = Client(flask_client=create_app(Settings(bundle=bundle)).test_client())
    return _OIP_CLIENT["c"]


# --------------------------------------------------------------------------- real gunicorn


@pytest.mark.integration
def test_bad_input_gunicorn(server, http_client, good_jpeg):
    """Every bad case over HTTP: right status, JSON error, 0 server errors, no worker death."""
    failures = []
    for case in CASES:
        path, body, ctype = case.build(good_jpeg)
        reply = http_client.request("POST", path, body, ctype)
        if (reply.status != case.status or not isinstance(reply.body, dict) or not reply.body.get("error")
                or reply.body.get("reason") != case.reason):
            failures.append((case.id, reply.status, case.reason, reply.body))
    assert not failures, failures
    assert server.workers() == server.initial_workers, server.log()
    _assert_good(http_client, good_jpeg)
    samples = parse_metrics(http_client.get("/metrics").body)
    assert metric(samples, "flask_http_request_total", status="500") == 0


@pytest.mark.integration
def test_unusual_images_gunicorn(server, http_client):
    images = unusual_images(make_leaf_image(TINY_CLASSES[GOOD_LABEL], size=48, seed=3))
    statuses = {name: http_client.post_files("/predict", [(name, data)]).status for name, data in images.items()}
    assert set(statuses.values()) == {200}, statuses


@pytest.mark.integration
@settings(max_examples=40, **REPLAYABLE,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=upload())
def test_fuzz_upload_gunicorn(http_client, case):
    _check_fuzz_reply(_send_fuzz(http_client, *case))


@pytest.mark.integration
def test_gunicorn_healthy_after_everything(server, http_client, good_jpeg):
    """Runs last in this module: same workers, no 500s, and a good image still answered right."""
    assert server.workers() == server.initial_workers, server.log()
    _assert_good(http_client, good_jpeg)
    samples = parse_metrics(http_client.get("/metrics").body)
    assert metric(samples, "flask_http_request_total", status="500") == 0
    assert "Traceback" not in server.log()
