"""The Flask application: prediction endpoints, health, metrics and the upload page.

``create_app(settings=None, predictor=None)`` is the factory. Under gunicorn the
predictor is built by the ``post_fork`` hook (one per worker, after the fork) and picked
up here; outside gunicorn the factory builds it itself.

Endpoints (see ``docs/serving.md`` for examples):

* ``POST /predict`` - multipart field ``file`` (repeatable) or a raw ``image/*`` body.
* ``POST /predict_batch`` - multipart field ``files`` (the predecessor service's batch call).
* ``GET /health``, ``GET /ready``, ``GET /classes``, ``GET /model`` (= ``/model/info``),
  ``GET /metrics``.
* KServe Open Inference Protocol v2 REST (``GET /v2``, ``/v2/health/*``,
  ``/v2/models/<name>...``): the blueprint of :mod:`serving.oip`.
* ``GET /`` - an upload page (no external assets, relative URLs); ``POST /`` renders the
  answers without JavaScript.

A single-image answer also carries the predecessor service's fields; when the model
abstains they say ``"uncertain"`` (see :func:`_legacy_fields`).

Errors are JSON ``{"error": "...", "reason": "..."}``: 400 for a corrupt, truncated,
non-image or oversized-dimension upload and for malformed requests, 413 over the body
limit, 415 for an unsupported media type, 404/405 for unknown routes, 503 while no model
is loaded. A bad request never yields a 500.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from plantml.model_card import read_model_card
from plantml.preprocess import top_k

from serving.fastjson import use_fast_json
from serving.metrics import REQUEST_BUCKETS, ServingMetrics
from serving.oip import oip_blueprint
from serving.predictor import (ModelLoadError, Predictor, build_predictor, set_worker_load_error, worker_load_error,
                               worker_predictor)
from serving.service import ClientError, PreparedImage, ServiceState, not_ready_reason, prepare_images
from serving.settings import Settings
from serving.uploads import read_uploads, top_k_param, upload_label

log = logging.getLogger(__name__)

LEGACY_TOP = 5  # the predecessor service always listed five classes in top5_predictions
#: What the legacy ``prediction`` field says when the model abstains (see :func:`_legacy_fields`).
UNCERTAIN = "uncertain"
#: Methods answered by the app at all. Anything else is refused by :class:`MethodFilter`
#: before Flask sees it, so a made-up method never becomes a metrics label.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


def create_app(settings: Settings | None = None, predictor: Predictor | None = None, *,
               load_model: bool = True) -> Flask:
    """Build the Flask app.

    Args:
        settings: service settings; read from the environment when ``None``.
        predictor: the model to serve; when ``None``, the one gunicorn's ``post_fork``
            built for this worker, else one built now from ``settings``.
        load_model: with ``False`` and no predictor, start unready (``/ready`` is 503)
            until ``app.extensions["plantml"].set_predictor(...)`` is called.

    Raises:
        SettingsError, ModelLoadError: when a model must be built here and cannot be.
    """
    from prometheus_client import CollectorRegistry
    from prometheus_flask_exporter import PrometheusMetrics

    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    use_fast_json(app)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    registry = CollectorRegistry(auto_describe=True)
    exporter = PrometheusMetrics(
        app, path=None, registry=registry, group_by="endpoint", buckets=REQUEST_BUCKETS,
    )
    state = ServiceState(settings=settings, metrics=ServingMetrics(registry, settings.drift_summary))
    app.extensions["plantml"] = state

    predictor = predictor or worker_predictor()
    if predictor is None and worker_load_error() is not None:
        state.load_error = worker_load_error()
        _start_reload_retries(state)
    elif predictor is None and load_model:
        predictor = build_predictor(settings)
    if predictor is not None:
        state.set_predictor(predictor)

    _register_errors(app, state)
    _register_core_routes(app, state, exporter)
    app.register_blueprint(oip_blueprint(state))
    app.wsgi_app = MethodFilter(app.wsgi_app, state)  # type: ignore[method-assign]
    return app


def _start_reload_retries(state: ServiceState) -> threading.Thread:
    """Retry loading the model in the background (a worker respawned after a bad reload).

    The worker stays up and answers 503 meanwhile; when the bundle is good again (fixed on
    disk, or the pod replaced) it becomes ready without anybody restarting the server.
    """
    def retry() -> None:
        while state.predictor is None:
            time.sleep(state.settings.reload_retry_seconds)
            try:
                predictor = build_predictor(state.settings)
            except ModelLoadError as exc:
                state.load_error = str(exc)
                log.warning("model still not loadable: %s", exc)
                continue
            state.set_predictor(predictor)
            set_worker_load_error(None)
            log.info("model loaded after an earlier failure: %s %s", predictor.name, predictor.version)

    thread = threading.Thread(target=retry, name="model-reload", daemon=True)
    thread.start()
    return thread


class MethodFilter:
    """WSGI middleware: 405 for a method no route could ever accept, answered before Flask.

    prometheus-flask-exporter labels request metrics with the HTTP method; left to Flask,
    every made-up method (``XAA``, ``XAB``, ...) would add a new series to every worker's
    multiprocess files. Here it costs one bounded counter (``reason="bad_method"``). With
    ``PLANTML_METRICS_PORT`` set, it also keeps ``/metrics`` off the API port and
    everything else off the metrics port.
    """

    def __init__(self, app: Any, state: "ServiceState") -> None:
        self.app = app
        self.state = state

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        method = str(environ.get("REQUEST_METHOD", "")).upper()
        if method not in KNOWN_METHODS:
            self.state.metrics.reject("bad_method")
            return _raw_json(start_response, "405 Method Not Allowed",
                             {"error": "method not allowed", "reason": "method_not_allowed"},
                             [("Allow", "GET, HEAD, POST, OPTIONS")])
        metrics_port = self.state.settings.metrics_port
        if metrics_port is not None and "gunicorn.socket" in environ:
            on_metrics_port = _local_port(environ) == metrics_port
            if on_metrics_port != (environ.get("PATH_INFO") == "/metrics"):
                return _raw_json(start_response, "404 Not Found", {"error": "not found", "reason": "not_found"})
        return self.app(environ, start_response)


def _local_port(environ: dict[str, Any]) -> int | None:
    """The port this request arrived on (the listening socket's, not the Host header's)."""
    try:
        return int(environ["gunicorn.socket"].getsockname()[1])
    except (KeyError, OSError, IndexError, TypeError, ValueError):
        return None


def _raw_json(start_response: Any, status: str, body: dict[str, Any],
              headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    payload = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload))),
                            *(headers or [])])
    return [payload]


# --------------------------------------------------------------------------- errors


def _error(status: int, message: str, reason: str) -> tuple[Response, int]:
    return jsonify({"error": message, "reason": reason}), status


def _register_errors(app: Flask, state: ServiceState) -> None:
    @app.errorhandler(ClientError)
    def client_error(exc: ClientError):
        if exc.status != 503:
            state.metrics.reject(exc.reason)
        return _error(exc.status, exc.message, exc.reason)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc: RequestEntityTooLarge):
        state.metrics.reject("payload_too_large")
        return _error(413, f"request body exceeds the {state.settings.max_upload_mb:g} MB limit "
                           "(PLANTML_MAX_UPLOAD_MB)", "payload_too_large")

    @app.errorhandler(TimeoutError)
    def read_timeout(exc: TimeoutError):
        state.metrics.reject("request_timeout")
        return _error(408, "the request was not received in time", "request_timeout")

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        reason = (exc.name or "error").lower().replace(" ", "_")
        if exc.code == 400:  # e.g. a malformed multipart body, caught by werkzeug
            reason = "malformed_request"
            state.metrics.reject(reason)
        return _error(exc.code or 500, exc.description or exc.name, reason)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):  # pragma: no cover - a bug, but still a JSON answer
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error(500, f"internal error: {type(exc).__name__}", "internal")


# --------------------------------------------------------------------------- uploads


def _prepare_all(state: ServiceState, spec: Any, uploads: list[tuple[str | None, bytes]]) -> list[PreparedImage]:
    """Decode and reduce the uploads one at a time within the request's pixel budget."""
    n = len(uploads)
    return prepare_images(state, spec, ((upload_label(i, name, n), data) for i, (name, data) in enumerate(uploads)))


def _predict(state: ServiceState, images: list[PreparedImage], k: int) -> tuple[list[dict[str, Any]], float]:
    """Run prepared images through the model; returns per-image results and the forward time (s)."""
    predictor = state.require_predictor()
    result = predictor.forward(np.stack([im.tensor for im in images]))
    state.metrics.inference_seconds.observe(result.inference_seconds)
    state.metrics.batch_size.observe(len(images))
    out = []
    for i, probs in enumerate(result.probabilities):
        ranked = top_k(probs, predictor.classes, max(k, LEGACY_TOP))
        best = ranked[0]
        item = {
            "label": best["label"],
            "confidence": best["confidence"],
            "top_k": ranked[:k],
            "abstained": bool(result.abstained[i]),
            "abstain_reason": result.abstain_reasons[i],
            "_legacy_top": ranked[:LEGACY_TOP],
        }
        if result.ood_scores is not None:
            item["ood_score"] = float(result.ood_scores[i])
        out.append(item)
    state.metrics.observe_predictions(
        [p["label"] for p in out], [p["confidence"] for p in out], [p["abstained"] for p in out]
    )
    if state.drift is not None:
        for img, p in zip(images, out):
            if img.thumbnail is not None:
                state.drift.submit(img.thumbnail, p["label"], p["confidence"], p["abstained"], size=img.size)
    return out, result.inference_seconds


def _legacy_fields(p: dict[str, Any], shares_confidence: bool = False) -> dict[str, Any]:
    """The predecessor FastAPI service's per-image fields, with abstention made visible.

    Such a client shows ``prediction`` and ``confidence`` (and perhaps the top-5 list) and
    knows nothing of ``abstained``; so when the model abstains, ``prediction`` is
    :data:`UNCERTAIN`, ``confidence`` 0.0 and ``top5_predictions`` starts with
    :data:`UNCERTAIN` (same length as otherwise), while ``best_guess`` keeps the model's
    top-1 and ``abstained`` / ``abstain_reason`` say why.

    Args:
        p: one item of :func:`_predict`.
        shares_confidence: the item's ``confidence`` is also a field of the new schema
            (``/predict_batch`` items), which stays the model's confidence.
    """
    top = [{"class": t["label"], "confidence": t["confidence"]} for t in p["_legacy_top"]]
    fields: dict[str, Any] = {"prediction": p["label"], "confidence": p["confidence"], "top5_predictions": top}
    if p["abstained"]:
        fields["prediction"] = UNCERTAIN
        if not shares_confidence:
            fields["confidence"] = 0.0
        fields["top5_predictions"] = [{"class": UNCERTAIN, "confidence": 0.0}, *top[:len(top) - 1]]
        fields["best_guess"] = {"class": p["label"], "confidence": p["confidence"]}
    fields["abstained"] = p["abstained"]
    fields["abstain_reason"] = p["abstain_reason"]
    return fields


def _prediction_response(state: ServiceState, fields: tuple[str, ...], legacy_each: bool) -> dict[str, Any]:
    started = time.perf_counter()
    predictor = state.require_predictor()
    uploads = read_uploads(fields, state.settings.max_images)
    k = top_k_param(state.settings.top_k, len(predictor.classes))
    images = _prepare_all(state, predictor.spec, uploads)
    preds, forward_s = _predict(state, images, k)
    items = []
    for (name, _), p in zip(uploads, preds):
        item = {key: v for key, v in p.items() if not key.startswith("_")}
        if name:
            item["filename"] = name
        if legacy_each:
            item.update(_legacy_fields(p, shares_confidence=True))
        items.append(item)
    body: dict[str, Any] = {"predictions": items, "model": predictor.describe()}
    if len(preds) == 1 and not legacy_each:
        body.update(_legacy_fields(preds[0]))
    body["inference_time_ms"] = round(forward_s * 1000.0, 3)
    body["processing_time_ms"] = round((time.perf_counter() - started) * 1000.0, 3)
    return body


# --------------------------------------------------------------------------- core routes


def _register_core_routes(app: Flask, state: ServiceState, exporter: Any) -> None:
    @app.get("/")
    def index():
        return render_template("index.html", state=state, result=None, error=None)

    @app.post("/")
    def index_upload():
        """No-JavaScript fallback of the upload page: the answer rendered as HTML."""
        try:
            body = _prediction_response(state, ("file",), legacy_each=False)
            return render_template("index.html", state=state, result=body, error=None)
        except ClientError as exc:
            if exc.status != 503:
                state.metrics.reject(exc.reason)
            return render_template("index.html", state=state, result=None, error=exc.message), exc.status

    @app.post("/predict")
    def predict():
        return jsonify(_prediction_response(state, ("file", "files"), legacy_each=False))

    @app.post("/predict_batch")
    def predict_batch():
        return jsonify(_prediction_response(state, ("files", "file"), legacy_each=True))

    @app.get("/health")
    def health():
        return jsonify({"status": "ok"})

    @app.get("/ready")
    def ready():
        reason = not_ready_reason(state)
        if reason is not None:
            return _error(503, reason, "not_ready")
        return jsonify({"status": "ready", "model": state.predictor.describe()})

    @app.get("/classes")
    def classes():
        predictor = state.require_predictor()
        return jsonify({"classes": predictor.classes, "num_classes": len(predictor.classes)})

    @app.get("/model")
    @app.get("/model/info")
    def model():
        return jsonify(_public_model_info(state, state.require_predictor()))

    @app.get("/metrics")
    @exporter.do_not_track()
    def metrics():
        payload, content_type = state.metrics.render(request.headers.get("Accept"))
        return Response(payload, status=200, content_type=content_type)


#: ``metadata.json`` keys a client may see on ``/model``. Left out on purpose: ``params``
#: (training host paths such as ``data_root``, every hyper-parameter), ``lineage`` (run
#: ids, git commit), ``files`` (paths, hashes) and anything added later: an allow-list.
PUBLIC_METADATA_KEYS = ("schema_version", "name", "version", "architecture", "classes", "input", "outputs",
                        "metrics", "calibration")


def _public_model_info(state: ServiceState, predictor: Predictor) -> dict[str, Any]:
    """What ``GET /model`` shows: the model's contract and quality, not how it was made."""
    meta = predictor.bundle.metadata
    info: dict[str, Any] = {k: meta[k] for k in PUBLIC_METADATA_KEYS if k in meta}
    info["model_card"] = read_model_card(predictor.bundle)  # Markdown written for readers; None for old bundles
    source = predictor.source
    info["serving"] = {
        **predictor.describe(),
        # a registry URI says which model this is; a filesystem path only says where the server keeps it
        "source": source if source.startswith(("models:/", "runs:/")) else "bundle",
        "available": [f"{r}/{p}" for r, p in predictor.bundle.available()],
        "abstain_threshold": predictor.abstain_threshold,
        "ood_threshold": predictor.ood_threshold,
        "temperature": predictor.temperature,
        "max_upload_mb": state.settings.max_upload_mb,
        "max_images": state.settings.max_images,
        "max_image_megapixels": state.settings.max_image_megapixels,
        "max_request_megapixels": state.settings.max_request_megapixels,
    }
    return info


__all__ = ["create_app", "ClientError", "ServiceState", "ModelLoadError"]
