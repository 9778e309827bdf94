"""Integration: the real service under gunicorn on a free loopback port.

2 workers: readiness, predictions, Prometheus counters summed across workers (also after a
worker is killed and respawned), the drift feed and summary gauges in multiprocess mode;
the ``plantml-serve`` exec path with a graceful SIGTERM that finishes an in-flight
request; a tampered bundle refused at start; a model served from a real MLflow sqlite
registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import (GunicornServer, children_of, clean_env, counts_by_pid, free_port,
                                       metric, multipart, parse_metrics, wait_for, accepted_by)
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import (GunicornServer, children_of, clean_env, counts_by_pid, free_port, metric,
                                 multipart, parse_metrics, wait_for, accepted_by)

pytestmark = pytest.mark.integration
LABELS = list(TINY_CLASSES)


def leaf(label: str, seed: int = 7) -> bytes:
    return jpeg_bytes(make_leaf_image(TINY_CLASSES[label], size=64, seed=seed))


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gunicorn_main")
    srv = GunicornServer(tmp, workers=2, env={
        "PLANTML_BUNDLE": str(tiny_bundle),
        "PLANTML_DRIFT_LOG": str(tmp / "drift" / "feed.jsonl"),
        "PLANTML_DRIFT_SUMMARY": str(tmp / "drift_summary.json"),
    }).start()
    yield srv
    srv.stop()


def _post(srv, label: str, seed: int) -> requests.Response:
    body, ctype = multipart([("file", f"{label}.jpg", leaf(label, seed), "image/jpeg")])
    return requests.post(srv.url("/predict"), data=body, headers={"Content-Type": ctype}, timeout=60)


def _scrape(srv) -> dict:
    r = requests.get(srv.url("/metrics"), timeout=30)
    assert r.status_code == 200
    return parse_metrics(r.text)


def test_ready_predict_and_counters_sum_across_workers(served):
    workers = served.workers()
    assert len(workers) == 2
    assert requests.get(served.url("/ready"), timeout=10).json()["model"]["name"] == "tiny-test-model"
    # Rounds of 30 concurrent requests until each worker has answered some (bounded: 4 rounds). Who
    # answered is read from the values in each worker's own counter file, not from the file's existence
    # (every worker creates its files at start-up, whether it serves anything or not).
    sent = 0
    by_pid: dict[int, float] = {}
    for _round in range(4):
        jobs = [(LABELS[i % 3], sent + i) for i in range(30)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            replies = list(pool.map(lambda job: _post(served, *job), jobs))
        assert [r.status_code for r in replies] == [200] * 30
        assert [r.json()["prediction"] for r in replies] == [label for label, _ in jobs]
        sent += 30
        by_pid = counts_by_pid(served.metrics_dir, "plantml_predictions_total")
        if all(by_pid.get(pid, 0) > 0 for pid in workers):
            break
    assert all(by_pid.get(pid, 0) > 0 for pid in workers), ("a worker served nothing", workers, by_pid)
    assert sum(by_pid.values()) == sent and set(by_pid) <= set(workers), (by_pid, sent)
    bad = [requests.post(served.url("/predict"), data=b"not an image", headers={"Content-Type": "image/jpeg"},
                         timeout=30) for _ in range(4)]
    assert [r.status_code for r in bad] == [400] * 4 and all(r.json()["reason"] == "not_image" for r in bad)

    for _ in range(4):  # whichever worker answers the scrape, the sums are the same
        s = _scrape(served)
        for label in LABELS:
            assert metric(s, "plantml_predictions_total", label=label) == sent // 3
        assert metric(s, "plantml_predictions_total") == sum(by_pid.values()) == sent
        assert metric(s, "plantml_prediction_confidence_count") == sent
        assert metric(s, "plantml_rejected_inputs_total", reason="not_image") == 4
        assert metric(s, "flask_http_request_total", method="POST", status="200") == sent
        assert metric(s, "flask_http_request_total", method="POST", status="400") == 4
        assert metric(s, "flask_http_request_duration_seconds_count", endpoint="predict", status="200") == sent
        info = [(k, v) for k, v in s.items() if k[0] == "plantml_model_info"]
        assert len(info) == 1 and info[0][1] == 1.0, info  # one series, not one per worker
        assert dict(info[0][0][1]) == {"name": "tiny-test-model", "version": "1", "runtime": "onnxruntime",
                                       "precision": "fp32"}


def test_counters_survive_a_worker_crash(served):
    before = metric(_scrape(served), "plantml_predictions_total")
    assert before > 0
    by_pid = counts_by_pid(served.metrics_dir, "plantml_predictions_total")
    victim = max(served.workers(), key=lambda pid: by_pid.get(pid, 0))
    victim_count = by_pid.get(victim, 0)
    assert victim_count > 0, by_pid  # the killed worker's own counts are what must survive
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = served.workers()
        if len(workers) == 2 and victim not in workers:
            break
        time.sleep(0.1)
    served.wait_ready()
    assert len(served.workers()) == 2 and victim not in served.workers()
    r = _post(served, LABELS[0], 999)
    assert r.status_code == 200
    assert metric(_scrape(served), "plantml_predictions_total") == before + 1
    after = counts_by_pid(served.metrics_dir, "plantml_predictions_total")
    assert after.get(victim, 0) == victim_count  # the dead worker's file still counts, unchanged


def test_drift_feed_and_summary_under_gunicorn(served):
    feed = served.tmp_path / "drift" / "feed.jsonl"
    expected = int(metric(_scrape(served), "plantml_predictions_total"))
    deadline = time.monotonic() + 20
    rows: list = []
    while time.monotonic() < deadline:
        rows = [json.loads(line) for line in feed.read_text().splitlines()] if feed.exists() else []
        if len(rows) >= expected:
            break
        time.sleep(0.2)
    # the worker killed in the previous test may have lost at most its unflushed tail
    assert expected - 5 <= len(rows) <= expected
    assert {r["label"] for r in rows} == set(LABELS) and all("g_mean" in r for r in rows)

    s = _scrape(served)
    assert metric(s, "plantml_drift_share") == 0 and not any(k[0] == "plantml_drift_share" for k in s)
    (served.tmp_path / "drift_summary.json").write_text(json.dumps({"drift_detected": True, "drift_share": 0.25}))
    for _ in range(3):
        s = _scrape(served)
        assert metric(s, "plantml_drift_share") == 0.25 and metric(s, "plantml_drift_detected") == 1


def _slow_request(port: int, body: bytes, ctype: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sock.sendall(head + body[: len(body) // 2])
    return sock


def test_cli_serves_and_sigterm_finishes_in_flight_request(tiny_bundle, tmp_path):
    port = free_port()
    env = clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"), PLANTML_ACCESS_LOG="false")
    log = open(tmp_path / "serve.log", "wb")
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "--bundle", str(tiny_bundle), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while time.monotonic() - started < 60:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.05)
        ready_after = time.monotonic() - started
        assert ready_after < 60, (tmp_path / "serve.log").read_text()
        assert len(children_of(proc.pid)) == 1  # exec'd: the CLI process *is* the gunicorn master

        idle = requests.Session()  # an idle keep-alive client must not hold up the shutdown
        assert idle.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        body, ctype = multipart([("file", "leaf.jpg", leaf(LABELS[1]), "image/jpeg")])
        sock = _slow_request(port, body, ctype)
        # in flight: the worker has accepted the connection (it holds the socket), the body half sent
        wait_for(lambda: accepted_by(children_of(proc.pid), sock), 10, "the worker to accept the slow request")
        proc.send_signal(signal.SIGTERM)
        term_sent = time.monotonic()
        wait_for(lambda: "Handling signal: term" in (tmp_path / "serve.log").read_text(errors="replace"), 10,
                 "the master to handle SIGTERM")
        sock.sendall(body[len(body) // 2:])
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
        sock.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw[:300]
        assert json.loads(payload)["prediction"] == LABELS[1]
        assert proc.wait(30) == 0
        assert time.monotonic() - term_sent < 10  # not the 30 s grace period
        idle.close()
        with pytest.raises(requests.ConnectionError):  # and it no longer accepts
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_tampered_bundle_refused_at_start(tiny_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    with open(bad / "openvino" / "model.bin", "r+b") as fh:
        fh.write(b"\x00\x01\x02\x03")
    srv = GunicornServer(tmp_path, workers=2, env={"PLANTML_BUNDLE": str(bad)}, ready_timeout=30)
    srv.start(wait=False)
    assert srv.proc.wait(60) != 0
    srv.stop()
    assert "sha256 mismatch for openvino/model.bin" in srv.log()


def test_missing_model_source_is_a_clear_error(tmp_path):
    srv = GunicornServer(tmp_path, workers=1, env={})
    srv.start(wait=False)
    assert srv.proc.wait(60) != 0
    srv.stop()
    assert "no model to serve: set PLANTML_BUNDLE" in srv.log()


@pytest.fixture(scope="module")
def registered(tiny_bundle, tmp_path_factory):
    """The tiny bundle registered in a real MLflow sqlite store (in a temp folder)."""
    from plantml.registry import register_bundle

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(tmp)  # mlflow's default artifact root is relative to the working directory
    try:
        info = register_bundle(tiny_bundle, model_name="plantml-tiny", tracking_uri=uri)
    finally:
        os.chdir(cwd)
    return {"tracking_uri": uri, "model_uri": info["model_uri"], "version": info["version"], "tmp": tmp,
            "run_id": info["run_id"], "name": info["name"], "sha256": info["bundle_sha256"]}


def test_model_from_mlflow_registry_under_gunicorn(registered, tmp_path):
    srv = GunicornServer(tmp_path, workers=2, env={
        "PLANTML_MODEL_URI": registered["model_uri"], "MLFLOW_TRACKING_URI": registered["tracking_uri"],
        "PLANTML_MODEL_CACHE": str(tmp_path / "cache"),
    }, ready_timeout=120)
    with srv:
        meta = requests.get(srv.url("/model"), timeout=10).json()
        assert meta["serving"]["source"] == "models:/plantml-tiny@champion"
        assert meta["name"] == "tiny-test-model"
        r = _post(srv, LABELS[2], 5)
        assert r.status_code == 200 and r.json()["prediction"] == LABELS[2]
        # downloaded once, by the master, for both workers
        assert len(list((tmp_path / "cache").iterdir())) == 1
    assert srv.proc.returncode == 0


def test_registry_in_process_and_unknown_model(registered, tiny_bundle, tmp_path, monkeypatch):
    """Outside gunicorn the app fetches the model itself; an unknown model is a clear load error."""
    from serving.app import create_app
    from serving.predictor import ModelLoadError, build_predictor
    from serving.settings import Settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    monkeypatch.delenv("PLANTML_FETCHED_BUNDLE", raising=False)
    app = create_app(Settings(model_uri=registered["model_uri"], model_cache=tmp_path / "cache"))
    client = app.test_client()
    assert client.get("/model").get_json()["serving"]["source"] == registered["model_uri"]
    reply = client.post("/predict", data=leaf(LABELS[0]), content_type="image/jpeg")
    assert reply.get_json()["prediction"] == LABELS[0]
    with pytest.raises(ModelLoadError, match="could not fetch models:/no-such-model@champion"):
        build_predictor(Settings(model_uri="models:/no-such-model@champion", model_cache=tmp_path / "cache"))


def test_registry_version_and_run_uris(registered, tiny_bundle, tmp_path, monkeypatch):
    """The documented URI forms besides ``@alias``: ``models:/NAME/VERSION`` and ``runs:/RUN_ID/bundle``,
    through plantml.registry.fetch_bundle and the service's fetch (``serving.predictor.fetch_model``, which the
    master's fetch child runs too)."""
    from plantml.registry import bundle_sha256, fetch_bundle
    from serving.app import create_app
    from serving.settings import Settings

    by_version = f"models:/{registered['name']}/{registered['version']}"
    by_run = f"runs:/{registered['run_id']}/bundle"
    got = fetch_bundle(by_version, tmp_path / "direct", tracking_uri=registered["tracking_uri"])
    assert bundle_sha256(got) == bundle_sha256(tiny_bundle) == registered["sha256"]

    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered["tracking_uri"])
    monkeypatch.delenv("PLANTML_FETCHED_BUNDLE", raising=False)
    for uri in (by_version, by_run):
        cache = tmp_path / ("cache-" + uri.split(":")[0])
        app = create_app(Settings(model_uri=uri, model_cache=cache))
        client = app.test_client()
        assert client.get("/model").get_json()["serving"]["source"] == uri
        reply = client.post("/predict", data=leaf(LABELS[1]), content_type="image/jpeg")
        assert reply.status_code == 200 and reply.get_json()["prediction"] == LABELS[1], (uri, reply.get_json())
        (served_from,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
        assert bundle_sha256(served_from) == registered["sha256"], uri
