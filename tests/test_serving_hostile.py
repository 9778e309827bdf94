"""Integration: hostile input against real gunicorn with the deployed settings (issue 13).

One server, configured as ``k8s/base/configmap.yaml`` deploys it (2 workers x 1 inference
thread, 2 request threads, 16 images and 10 MB per request, metrics on their own port,
drift feed on, ``MALLOC_ARENA_MAX=2``), runs inside a memory cgroup so that a case that
makes it allocate without bound is killed inside the group, never on the machine. Every
case is followed by a good image that must be answered correctly, and the module ends by
checking the bars of the issue:

* no answer is a 5xx;
* every worker's peak RSS (VmHWM) stays <= 300 MB through the whole suite;
* ``/health`` answers within 1 s while 16 slow clients are held;
* the workers that started are the workers that finish (no restart, no OOM kill).

``PLANTML_READ_TIMEOUT`` is 5 s here (30 s deployed) only to keep the test short.
Everything is loopback and bounded in count and time.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
import os
import socket
import time

import pytest
import requests

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import (Client, GunicornServer, MemoryCgroup, bad_cases, free_port, multipart,
                                       peak_rss_mb, png_bytes, png_with_declared_size, unusual_images, wait_for,
                                       accepted_by)
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import (Client, GunicornServer, MemoryCgroup, bad_cases, free_port, multipart, peak_rss_mb,
                                 png_bytes, png_with_declared_size, unusual_images, wait_for, accepted_by)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not MemoryCgroup.available(),
                       reason="needs a writable memory cgroup to confine out-of-memory cases (run as root)"),
]

LABEL = "Tomato___Late_blight"
PEAK_RSS_LIMIT_MB = 300.0
CGROUP_LIMIT = 1536 * 1024 * 1024  # the whole server (master + 2 workers); the pod limit is 1 GiB
READ_TIMEOUT_S = 5
MAX_IMAGES = 16


def _good() -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[LABEL], size=64, seed=11))


@pytest.fixture(scope="module")
def hostile(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    cgroup = MemoryCgroup("plantml-hostile", CGROUP_LIMIT).create()
    metrics_port = free_port()
    srv = GunicornServer(tmp, workers=2, preexec_fn=cgroup.enter, env={
        "PLANTML_BUNDLE": str(tiny_bundle), "PLANTML_THREADS": "1", "PLANTML_HTTP_THREADS": "2",
        "PLANTML_MAX_IMAGES": str(MAX_IMAGES), "PLANTML_MAX_UPLOAD_MB": "10",
        "PLANTML_METRICS_PORT": str(metrics_port), "PLANTML_READ_TIMEOUT": str(READ_TIMEOUT_S),
        "PLANTML_DRIFT_LOG": str(tmp / "drift" / "predictions.jsonl"), "MALLOC_ARENA_MAX": "2",
    })
    srv.metrics_port = metrics_port
    srv.cgroup = cgroup
    srv.statuses = []
    try:
        srv.start()
        srv.initial_workers = srv.workers()
        assert len(srv.initial_workers) == 2
        yield srv
    finally:
        srv.stop(sig=signal.SIGTERM, timeout=30)
        cgroup.remove()


def _record(srv, status: int, what: str) -> None:
    srv.statuses.append((what, status))
    assert status < 500, f"{what}: answered {status}\n{srv.log()}"


def _post(srv, path: str, body: bytes, ctype: str, timeout: float = 60) -> requests.Response:
    return requests.post(srv.url(path), data=body, headers={"Content-Type": ctype}, timeout=timeout)


def _good_after(srv, what: str) -> None:
    """The service still answers a good image correctly, and no worker was replaced."""
    r = _post(srv, "/predict", _good(), "image/jpeg")
    _record(srv, r.status_code, f"good image after {what}")
    assert r.status_code == 200 and r.json()["prediction"] == LABEL, (what, r.text[:300])
    assert srv.workers() == srv.initial_workers, f"a worker was restarted after {what}\n{srv.log()}"


# --------------------------------------------------------------------------- memory (findings 1, 4)

MEMORY_CASES = {
    # (body builder, expected status, expected reason)
    "png16_6300x6300_77kb": (lambda: png_bytes(6300, 6300, color_type=0, bit_depth=16), 400, "too_large"),
    "png16_4000x4000_accepted": (lambda: png_bytes(4000, 4000, color_type=0, bit_depth=16), 200, None),
    "rgba_6000x6000": (lambda: png_bytes(6000, 6000, color_type=6), 400, "too_large"),
    "rgba_4000x4000_accepted": (lambda: png_bytes(4000, 4000, color_type=6), 200, None),
    "gray_alpha_4000x4000_accepted": (lambda: png_bytes(4000, 4000, color_type=4), 200, None),
    "strip_50x800000": (lambda: png_bytes(50, 800_000), 400, "aspect_ratio"),
    "strip_10x4000000": (lambda: png_bytes(10, 4_000_000), 400, "aspect_ratio"),
    "strip_1x40000000": (lambda: png_bytes(1, 40_000_000, color_type=0), 400, "aspect_ratio"),
    "strip_100x10000_accepted": (lambda: png_bytes(100, 10_000), 200, None),
    "bomb_header_60000": (lambda: png_with_declared_size(60000, 60000), 400, "too_large"),
}


@pytest.mark.parametrize("name", list(MEMORY_CASES))
def test_memory_case(hostile, name):
    build, status, reason = MEMORY_CASES[name]
    r = _post(hostile, "/predict", build(), "image/png")
    _record(hostile, r.status_code, name)
    assert r.status_code == status, (name, r.text[:300])
    if reason:
        assert r.json()["reason"] == reason and r.json()["error"]
    _good_after(hostile, name)


def test_many_large_images_in_one_request(hostile):
    """Six 3500x3500 PNGs (73.5 MP) exceed the request's pixel budget: 413, nothing held after."""
    big = png_bytes(3500, 3500)
    six, ctype = multipart([("file", f"{i}.png", big, "image/png") for i in range(6)])
    r = _post(hostile, "/predict", six, ctype)
    _record(hostile, r.status_code, "six large PNGs")
    assert r.status_code == 413 and r.json()["reason"] == "too_many_pixels", r.text[:300]
    four, ctype = multipart([("file", f"{i}.png", big, "image/png") for i in range(4)])  # 49 MP: within budget
    r = _post(hostile, "/predict", four, ctype)
    _record(hostile, r.status_code, "four large PNGs")
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4
    _good_after(hostile, "many large images")


def test_large_jpeg_photo_is_decoded_at_reduced_scale(hostile):
    """A 24 MP JPEG (over the 16 MP limit at full scale) is answered: libjpeg decodes it at 1/4."""
    photo = make_leaf_image(TINY_CLASSES[LABEL], size=64, seed=3).resize((6000, 4000))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=70)
    r = _post(hostile, "/predict", buf.getvalue(), "image/jpeg")
    _record(hostile, r.status_code, "24 MP JPEG")
    assert r.status_code == 200 and r.json()["prediction"] == LABEL
    _good_after(hostile, "24 MP JPEG")


def test_existing_bad_input_corpus(hostile):
    client = Client(base_url=hostile.base)
    good = _good()
    for case in bad_cases(max_images=MAX_IMAGES, size=32):
        path, body, ctype = case.build(good)
        r = client.request("POST", path, body, ctype)
        _record(hostile, r.status, case.id)
        assert r.status == case.status, (case.id, r.body)
    base = make_leaf_image(TINY_CLASSES[LABEL], size=48, seed=3)
    for name, data in unusual_images(base).items():
        r = client.post_files("/predict", [(name, data)], ctype="application/octet-stream")
        _record(hostile, r.status, name)
        assert r.status == 200, (name, r.body)
    _good_after(hostile, "the bad-input corpus")


def test_unaccepted_format_is_not_an_image(hostile):
    buf = io.BytesIO()
    make_leaf_image(TINY_CLASSES[LABEL], size=48).save(buf, format="PPM")
    r = _post(hostile, "/predict", buf.getvalue(), "image/x-portable-pixmap")
    _record(hostile, r.status_code, "PPM")
    assert r.status_code == 400 and r.json()["reason"] == "not_image"
    _good_after(hostile, "PPM")


# --------------------------------------------------------------------------- stalled clients (finding 2)


def _health_seconds(srv) -> float:
    started = time.monotonic()
    r = requests.get(srv.url("/health"), timeout=10)
    _record(srv, r.status_code, "health while slow clients are held")
    assert r.status_code == 200
    return time.monotonic() - started


def _read_answer(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def test_slow_clients_hold_no_thread_and_meet_a_deadline(hostile):
    held = []
    try:
        for _ in range(16):  # headers started, never finished
            s = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            held.append(s)
        for _ in range(2):  # a body shorter than its Content-Length
            s = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n"
                      + b"\xff" * 10)
            held.append(s)
        # every slow client has been accepted by a worker (holds a buffer there) before /health is timed
        wait_for(lambda: all(accepted_by(hostile.workers(), s) for s in held), 10, "the slow clients to be accepted")
        latencies = [_health_seconds(hostile) for _ in range(5)]
        assert max(latencies) < 1.0, latencies
        r = _post(hostile, "/predict", _good(), "image/jpeg", timeout=10)  # and predictions still flow
        _record(hostile, r.status_code, "prediction while slow clients are held")
        assert r.status_code == 200 and r.json()["prediction"] == LABEL
        # the total read deadline answers every one of them (408) and closes it
        answers = [_read_answer(s, READ_TIMEOUT_S + 5) for s in held]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), [a[:40] for a in answers]
        assert all(json.loads(a.partition(b"\r\n\r\n")[2])["reason"] == "request_timeout" for a in answers)
    finally:
        for s in held:
            s.close()
    _good_after(hostile, "slow clients")


def test_byte_a_second_client_cannot_extend_its_deadline(hostile):
    s = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
    try:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        started = time.monotonic()
        answer = b""
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            s.settimeout(0.5)
            try:
                answer = s.recv(4096)
            except socket.timeout:
                continue
            if answer:
                break
        answer += _read_answer(s, 2)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:60]
        assert time.monotonic() - started < READ_TIMEOUT_S + 3
    finally:
        s.close()
    _good_after(hostile, "a byte-a-second client")


# --------------------------------------------------------------------------- protocol (findings 3, 9, 10)


def _scrape(srv) -> str:
    r = requests.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10)
    _record(srv, r.status_code, "scrape")
    assert r.status_code == 200
    return r.text


def test_unknown_methods_add_no_metric_series(hostile):
    before = _scrape(hostile)
    for i in range(40):
        method = "X" + chr(65 + i // 26) + chr(65 + i % 26)
        r = requests.request(method, hostile.url("/predict"), timeout=10)
        _record(hostile, r.status_code, f"method {method}")
        assert r.status_code == 405 and r.json()["reason"] == "method_not_allowed"
    after = _scrape(hostile)
    assert 'method="X' not in after
    assert len(after.splitlines()) <= len(before.splitlines()) + 30, (len(before.splitlines()), len(after.splitlines()))
    _good_after(hostile, "unknown methods")


def test_metrics_only_on_the_metrics_port_and_model_trimmed(hostile):
    r = requests.get(hostile.url("/metrics"), timeout=10)
    _record(hostile, r.status_code, "/metrics on the API port")
    assert r.status_code == 404
    r = requests.get(f"http://127.0.0.1:{hostile.metrics_port}/predict", timeout=10)
    _record(hostile, r.status_code, "API on the metrics port")
    assert r.status_code == 404
    meta = requests.get(hostile.url("/model"), timeout=10).json()
    assert not {"params", "lineage", "files"} & set(meta) and meta["serving"]["source"] == "bundle"


def test_chunked_upload_over_the_limit_is_413(hostile):
    good = _good()

    def body():
        yield good
        for _ in range(12):
            yield b"\0" * (1024 * 1024)

    r = requests.post(hostile.url("/predict"), data=body(), headers={"Content-Type": "image/jpeg"}, timeout=60)
    _record(hostile, r.status_code, "12 MB chunked upload")
    assert r.status_code == 413 and r.json()["reason"] == "payload_too_large", r.text[:200]
    r = requests.post(hostile.url("/predict"), data=iter([good]), headers={"Content-Type": "image/jpeg"}, timeout=60)
    _record(hostile, r.status_code, "small chunked upload")
    assert r.status_code == 200 and r.json()["prediction"] == LABEL
    _good_after(hostile, "chunked uploads")


# --------------------------------------------------------------------------- the bars, over the whole module


def test_zz_bars_over_the_whole_suite(hostile):
    """Runs last (module order): peak RSS, restarts and OOM kills over everything above."""
    assert hostile.proc.poll() is None, hostile.log()
    assert hostile.workers() == hostile.initial_workers, hostile.log()
    assert hostile.cgroup.oom_kills() == 0
    peaks = {pid: peak_rss_mb(pid) for pid in hostile.workers()}
    assert max(peaks.values()) <= PEAK_RSS_LIMIT_MB, peaks
    assert not [s for s in hostile.statuses if s[1] >= 500]
    assert len(hostile.statuses) > 100
    print(f"\nworker peak RSS (MiB): {peaks}; cgroup peak {hostile.cgroup.peak_mb():.0f} MiB; "
          f"{len(hostile.statuses)} answers, none 5xx")


# --------------------------------------------------------------------------- a bad reload (finding 5)


def test_a_bad_reload_keeps_the_healthy_worker_serving(tiny_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cgroup = MemoryCgroup("plantml-reload", CGROUP_LIMIT).create()
    srv = GunicornServer(tmp_path, workers=2, preexec_fn=cgroup.enter, env={
        "PLANTML_BUNDLE": str(bundle), "PLANTML_RELOAD_RETRY_SECONDS": "1"})
    try:
        srv.start()
        weights = bundle / "openvino" / "model.bin"
        original = weights.read_bytes()
        weights.write_bytes(original[:-4] + b"\0\1\2\3")  # the bundle changes on disk ...
        victim, survivor = srv.workers()
        os.kill(victim, signal.SIGKILL)  # ... and one worker dies
        wait_for(lambda: len(srv.workers()) == 2 and victim not in srv.workers(), 30, "the respawned worker")
        # the respawned worker has found the bundle changed and stays up unready (polled, not slept on)
        wait_for(lambda: "stays up unready and retries" in srv.log() or srv.proc.poll() is not None, 30,
                 "the respawned worker to fail its load")
        assert srv.proc.poll() is None, srv.log()  # the master did not halt
        assert survivor in srv.workers()
        assert "stays up unready and retries" in srv.log()
        # the server says it is not ready, whichever worker answers; the healthy one still predicts
        assert {requests.get(srv.url("/ready"), timeout=10).status_code for _ in range(6)} == {503}
        codes = [_post(srv, "/predict", _good(), "image/jpeg").status_code for _ in range(8)]
        assert 200 in codes and set(codes) <= {200, 503}, codes
        weights.write_bytes(original)  # fixed on disk: the worker loads it without a restart
        wait_for(lambda: requests.get(srv.url("/ready"), timeout=10).status_code == 200, 20, "the reload",
                 interval=0.3)
        assert {requests.get(srv.url("/ready"), timeout=10).status_code for _ in range(6)} == {200}
        assert cgroup.oom_kills() == 0
    finally:
        srv.stop()
        cgroup.remove()
