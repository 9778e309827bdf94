"""Documented settings that had no test (issue 17, point 9): ``PLANTML_TIMEOUT``,
``PLANTML_HTTP_THREADS``, the drift-log rotation settings, and the drift feed flushed on
SIGTERM. Real gunicorn on a free loopback port where the behaviour lives there; bounded
loops, polling with deadlines (no sleeps as hand-offs).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
import requests

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import GunicornServer, accepted_by, multipart, wait_for
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import GunicornServer, accepted_by, multipart, wait_for

LABELS = list(TINY_CLASSES)


def leaf(label: str, seed: int = 7) -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[label], size=64, seed=seed))


def _post(srv, label: str, seed: int = 7) -> requests.Response:
    body, ctype = multipart([("file", f"{label}.jpg", leaf(label, seed), "image/jpeg")])
    return requests.post(srv.url("/predict"), data=body, headers={"Content-Type": ctype}, timeout=60)


@pytest.mark.integration
def test_timeout_and_http_threads_reach_gunicorn(tiny_bundle, tmp_path):
    """PLANTML_TIMEOUT=2: a worker silent for 2 s (stopped) is killed and replaced within seconds, not
    after the 60 s default; PLANTML_HTTP_THREADS=3 is the gthread worker's thread count."""
    srv = GunicornServer(tmp_path, workers=1, env={"PLANTML_BUNDLE": str(tiny_bundle), "PLANTML_TIMEOUT": "2",
                                                   "PLANTML_HTTP_THREADS": "3", "PLANTML_LOG_LEVEL": "debug"})
    with srv:
        log = srv.log_path.read_text(errors="replace")
        # gunicorn prints its effective configuration at debug level
        assert "worker_class: serving.worker.BufferingThreadWorker" in log and "\n  threads: 3\n" in log, log[-3000:]
        assert "\n  timeout: 2\n" in log, log[-3000:]
        (victim,) = srv.workers()
        os.kill(victim, signal.SIGSTOP)  # alive but silent: no heartbeat
        stopped = time.monotonic()
        try:
            replacement = wait_for(lambda: [p for p in srv.workers() if p != victim], 20,
                                   "the master to replace the silent worker")
        finally:
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
        waited = time.monotonic() - stopped
        assert 1.5 <= waited < 15, waited  # PLANTML_TIMEOUT, not the 60 s default
        assert f"WORKER TIMEOUT (pid:{victim})" in srv.log(), srv.log()
        assert len(replacement) == 1
        srv.wait_ready()
        assert _post(srv, LABELS[0]).json()["prediction"] == LABELS[0]


def test_drift_log_rotation_settings(tiny_bundle, tmp_path):
    """PLANTML_DRIFT_LOG_MAX_MB / _BACKUPS from the environment: rotated above the size, PATH.1 newest,
    no more than BACKUPS rotated files, no line lost or torn in the files kept."""
    from serving.app import create_app
    from serving.settings import Settings

    feed = tmp_path / "drift" / "feed.jsonl"
    settings = Settings.from_env({"PLANTML_BUNDLE": str(tiny_bundle), "PLANTML_DRIFT_LOG": str(feed),
                                  "PLANTML_DRIFT_LOG_MAX_MB": "0.001", "PLANTML_DRIFT_LOG_BACKUPS": "2"})
    app = create_app(settings)
    drift = app.extensions["plantml"].drift
    assert drift.max_bytes == 1048 and drift.backups == 2
    client = app.test_client()
    for i in range(8):  # one record per request, written before the next: one rotation check each
        label = LABELS[i % 3]
        assert client.post("/predict", data=leaf(label, seed=i), content_type="image/jpeg").status_code == 200
        assert drift.flush(10)
    record_bytes = len(feed.read_bytes()) if feed.exists() else 0
    files = sorted(p.name for p in feed.parent.iterdir() if not p.name.endswith(".lock"))
    assert files == ["feed.jsonl", "feed.jsonl.1", "feed.jsonl.2"], files
    for path in [feed, feed.with_name("feed.jsonl.1"), feed.with_name("feed.jsonl.2")]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert rows and path.stat().st_size < 1048 + record_bytes + 1, (path, path.stat().st_size)
    # the newest record is in PATH, the one before it at the end of PATH.1
    newest = json.loads(feed.read_text().splitlines()[-1])
    assert newest["label"] == LABELS[7 % 3]
    previous = json.loads(feed.with_name("feed.jsonl.1").read_text().splitlines()[-1])
    assert previous["timestamp"] <= newest["timestamp"]
    drift.close()


@pytest.mark.integration
def test_drift_feed_flushed_on_sigterm(tiny_bundle, tmp_path):
    """A prediction answered during the graceful shutdown still reaches the drift feed before exit 0."""
    feed = tmp_path / "drift" / "feed.jsonl"
    srv = GunicornServer(tmp_path, workers=1, env={"PLANTML_BUNDLE": str(tiny_bundle), "PLANTML_DRIFT_LOG": str(feed)})
    srv.start()
    try:
        for i in range(3):
            assert _post(srv, LABELS[i]).status_code == 200
        body, ctype = multipart([("file", "late.jpg", leaf(LABELS[2], seed=11), "image/jpeg")])
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock.sendall(head + body[: len(body) // 2])
        wait_for(lambda: accepted_by(srv.workers(), sock), 10, "the worker to accept the request")
        srv.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "Handling signal: term" in srv.log(), 10, "the master to handle SIGTERM")
        sock.sendall(body[len(body) // 2:])
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        sock.close()
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
        assert srv.proc.wait(30) == 0, srv.log()
    finally:
        srv.stop()
    rows = [json.loads(line) for line in feed.read_text().splitlines()]
    assert [r["label"] for r in rows] == [LABELS[0], LABELS[1], LABELS[2], LABELS[2]], rows
