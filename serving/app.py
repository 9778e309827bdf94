"""The Flask application: prediction endpoints, health, metrics, OIP v2 and an upload page.

``create_app(settings=None, predictor=None)`` is the factory. Under gunicorn the
predictor is built by the ``post_fork`` hook (one per worker, after the fork) and picked
up here; outside gunicorn the factory builds it itself.

Endpoints (see ``docs/serving.md`` for examples):

* ``POST /predict`` - multipart field ``file`` (repeatable) or a raw ``image/*`` body.
* ``POST /predict_batch`` - multipart field ``files`` (the predecessor service's batch call).
* ``GET /health``, ``GET /ready``, ``GET /classes``, ``GET /model`` (= ``/model/info``),
  ``GET /metrics``.
* KServe Open Inference Protocol v2 REST: ``GET /v2``, ``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/<name>[/versions/<v>]``, ``.../ready``,
  ``POST .../infer`` with a BYTES tensor of base64-encoded images or an FP32 ``[N,3,H,W]``
  tensor.
* ``GET /`` - an upload page (no external assets); ``POST /`` renders an answer without
  JavaScript.

Errors are JSON ``{"error": "...", "reason": "..."}``: 400 for a corrupt, truncated,
non-image or oversized-dimension upload and for malformed requests, 413 over the body
limit, 415 for an unsupported media type, 404/405 for unknown routes, 503 while no model
is loaded. A bad request never yields a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, render_template, request
from PIL import Image
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from plantml.preprocess import ImageDecodeError, finish_decode, open_image, preprocess_image, top_k

from serving.drift_feed import DriftFeed, shrink_for_stats
from serving.limits import PixelGate, trim_heap
from serving.metrics import REQUEST_BUCKETS, ServingMetrics
from serving.predictor import (ModelLoadError, Predictor, build_predictor, set_worker_load_error, unready_workers,
                               worker_load_error, worker_predictor)
from serving.settings import Settings

log = logging.getLogger(__name__)

LEGACY_TOP = 5  # the predecessor service always listed five classes in top5_predictions
RAW_BODY_TYPES = ("application/octet-stream",)
#: Methods answered by the app at all. Anything else is refused by :class:`MethodFilter`
#: before Flask sees it, so a made-up method never becomes a metrics label.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})
#: After a request that decoded at least this many pixels, give freed heap back to the OS.
TRIM_AFTER_PIXELS = 2_000_000


class ClientError(Exception):
    """A request the client got wrong; becomes a JSON error with ``status``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class PreparedImage:
    """One upload reduced to what the rest of the request needs (the full image is gone)."""

    tensor: np.ndarray  # CHW float32, the model input
    size: tuple[int, int]  # decoded width, height
    thumbnail: Image.Image | None  # the drift feed's 128-px thumbnail, when the feed is on


@dataclass
class ServiceState:
    """Per-app state: settings, the model (once loaded), metrics and the drift feed."""

    settings: Settings
    metrics: ServingMetrics
    predictor: Predictor | None = None
    drift: DriftFeed | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    gate: PixelGate | None = None

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = PixelGate(self.settings.max_image_pixels)

    def set_predictor(self, predictor: Predictor) -> None:
        """Install a loaded model: readiness, model-info gauge and drift feed follow it."""
        self.predictor = predictor
        self.load_error = None
        self.metrics.set_model(predictor.name, predictor.version, predictor.runtime, predictor.precision)
        if self.settings.drift_log is not None:
            if self.drift is not None:
                self.drift.close()
            self.drift = DriftFeed(
                self.settings.drift_log, model_name=predictor.name, model_version=predictor.version,
                max_bytes=int(self.settings.drift_log_max_mb * 1024 * 1024), backups=self.settings.drift_log_backups,
                on_drop=self.metrics.drift_dropped.inc,
            )

    def require_predictor(self) -> Predictor:
        if self.predictor is None:
            detail = f": {self.load_error}" if self.load_error else ""
            raise ClientError(503, "not_ready", "model not loaded yet" + detail)
        return self.predictor


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
    _register_oip_routes(app, state)
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


def _not_ready_reason(state: ServiceState) -> str | None:
    """Why the server is not ready (this worker without a model, or a sibling worker), or ``None``."""
    if state.predictor is None:
        return "model not loaded" + (f": {state.load_error}" if state.load_error else "")
    others = unready_workers()
    if others:
        return f"{others} worker(s) of this server could not load the model (see the server log)"
    return None


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


def _read_uploads(fields: tuple[str, ...], max_images: int) -> list[tuple[str | None, bytes]]:
    """The images of a request: multipart parts named ``fields``, or a raw image body.

    Raises:
        ClientError: 415 for another media type, 400 for no image or too many.
    """
    mimetype = (request.mimetype or "").lower()
    if mimetype == "multipart/form-data":
        parts = [f for name in fields for f in request.files.getlist(name)]
        if not parts:
            as_text = [name for name in fields if name in request.form]
            if as_text:
                raise ClientError(400, "no_file", f"multipart field {as_text[0]!r} was sent as a text value, not as a "
                                                  "file upload (give the part a filename, e.g. curl -F file=@leaf.jpg)")
            present = sorted(set(request.files) | set(request.form))
            hint = f" (got field(s): {', '.join(present)})" if present else ""
            raise ClientError(400, "no_file", f"no image in multipart field {' or '.join(map(repr, fields))}{hint}")
        if len(parts) > max_images:
            raise ClientError(400, "too_many_images",
                              f"{len(parts)} images in one request; the limit is {max_images} (PLANTML_MAX_IMAGES)")
        return [(p.filename or None, p.read()) for p in parts]
    if mimetype.startswith("image/") or mimetype in RAW_BODY_TYPES:
        return [(None, _read_body())]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise ClientError(400, "empty", "empty request: send an image as multipart field 'file' or as an image/* body")
    raise ClientError(
        415, "unsupported_media_type",
        f"unsupported Content-Type {mimetype or '(none)'!r}: send multipart/form-data with field "
        f"{fields[0]!r} or a raw image/* body",
    )


def _read_body() -> bytes:
    """The whole request body, refusing one over the limit even without a Content-Length.

    With ``Transfer-Encoding: chunked`` werkzeug's stream stops *at* the limit rather than
    failing, so a 12 MB chunked upload would be cut to 10 MB and answered; one more read
    tells the two apart.
    """
    stream = request.stream
    limit = request.max_content_length
    data = stream.read() if limit is None else stream.read(limit)
    if limit is not None and len(data) >= limit and stream.read(1):
        raise RequestEntityTooLarge()
    return data


def _which(i: int, name: str | None, count: int) -> str:
    return f"image {i}" + (f" ({name})" if name else "") if count > 1 or name else "image"


def _prepare_one(state: ServiceState, spec: Any, data: bytes, label: str, budget_left: int) -> PreparedImage:
    """Decode one upload and reduce it to its model input (and drift thumbnail).

    The header is checked first (per-image pixel and aspect limits, then the request's
    remaining pixel budget); the decode then waits for room in the worker's
    :class:`~serving.limits.PixelGate`. The full-size image lives only inside this call.

    Raises:
        ClientError: 400 for a bad or over-limit image, 413 over the request's pixel budget.
    """
    try:
        img = open_image(data, max_pixels=state.settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise ClientError(400, exc.reason, f"{label}: {exc}") from exc
    pixels = img.width * img.height
    if pixels > budget_left:
        raise ClientError(413, "too_many_pixels",
                          f"{label}: the request's images add up to more than "
                          f"{state.settings.max_request_megapixels:g} megapixels (PLANTML_MAX_REQUEST_MEGAPIXELS); "
                          "send fewer or smaller images per request")
    with state.gate.reserve(pixels):
        try:
            rgb = finish_decode(img)  # may be ``img`` itself (an upright RGB file)
        except ImageDecodeError as exc:
            raise ClientError(400, exc.reason, f"{label}: {exc}") from exc
        del img
        tensor = preprocess_image(rgb, spec)
        size = rgb.size
        thumbnail = shrink_for_stats(rgb) if state.drift is not None else None
        del rgb
    return PreparedImage(tensor=tensor, size=size, thumbnail=thumbnail)


def _prepare_all(state: ServiceState, spec: Any, uploads: list[tuple[str | None, bytes]]) -> list[PreparedImage]:
    """Decode and reduce the uploads one at a time within the request's pixel budget."""
    budget_left = state.settings.max_request_pixels
    prepared: list[PreparedImage] = []
    decoded = 0
    try:
        for i, (name, data) in enumerate(uploads):
            item = _prepare_one(state, spec, data, _which(i, name, len(uploads)), budget_left)
            pixels = item.size[0] * item.size[1]
            budget_left -= pixels
            decoded += pixels
            prepared.append(item)
    finally:
        if decoded >= TRIM_AFTER_PIXELS:
            trim_heap()
    return prepared


def _top_k_param(state: ServiceState, n_classes: int) -> int:
    raw = request.args.get("top_k")
    if raw is None:
        return min(state.settings.top_k, n_classes)
    try:
        k = int(raw)
    except ValueError:
        raise ClientError(400, "bad_parameter", f"top_k={raw!r} is not an integer") from None
    if not 1 <= k <= n_classes:
        raise ClientError(400, "bad_parameter", f"top_k={k} must be between 1 and {n_classes}")
    return k


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


def _legacy_fields(p: dict[str, Any]) -> dict[str, Any]:
    """The predecessor FastAPI service's per-image fields."""
    return {
        "prediction": p["label"],
        "confidence": p["confidence"],
        "top5_predictions": [{"class": t["label"], "confidence": t["confidence"]} for t in p["_legacy_top"]],
    }


def _prediction_response(state: ServiceState, fields: tuple[str, ...], legacy_each: bool) -> dict[str, Any]:
    started = time.perf_counter()
    predictor = state.require_predictor()
    uploads = _read_uploads(fields, state.settings.max_images)
    k = _top_k_param(state, len(predictor.classes))
    images = _prepare_all(state, predictor.spec, uploads)
    preds, forward_s = _predict(state, images, k)
    items = []
    for (name, _), p in zip(uploads, preds):
        item = {key: v for key, v in p.items() if not key.startswith("_")}
        if name:
            item["filename"] = name
        if legacy_each:
            item.update(_legacy_fields(p))
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
        reason = _not_ready_reason(state)
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


# --------------------------------------------------------------------------- OIP v2


def _check_model_name(state: ServiceState, name: str, version: str | None = None) -> Predictor:
    predictor = state.require_predictor()
    if name != predictor.name:
        raise ClientError(404, "model_not_found", f"model {name!r} not found; this server serves {predictor.name!r}")
    if version is not None and version != predictor.version:
        raise ClientError(404, "model_not_found", f"version {version!r} of {name!r} not found; "
                                                  f"this server serves version {predictor.version!r}")
    return predictor


def _oip_metadata(predictor: Predictor) -> dict[str, Any]:
    s, c = predictor.spec.size, len(predictor.classes)
    return {
        "name": predictor.name,
        "versions": [predictor.version],
        "platform": f"{predictor.runtime}_{predictor.precision}",
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, c]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "abstained", "datatype": "BOOL", "shape": [-1]},
            *([{"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
              if predictor.ood_threshold is not None else []),
        ],
        "parameters": {"classes": predictor.classes},
    }


def _parse_infer_request() -> dict[str, Any]:
    mimetype = (request.mimetype or "").lower()
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise ClientError(415, "unsupported_media_type",
                          f"unsupported Content-Type {mimetype!r}: the v2 infer endpoint takes application/json")
    raw = _read_body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ClientError(400, "malformed_json", f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ClientError(400, "bad_tensor", "inference request must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ClientError(400, "bad_tensor", "inference request needs a non-empty 'inputs' list")
    if len(inputs) != 1:
        raise ClientError(400, "bad_tensor", f"expected exactly one input tensor, got {len(inputs)}")
    if not isinstance(inputs[0], dict):
        raise ClientError(400, "bad_tensor", "each input tensor must be an object with name, shape, datatype, data")
    return body


def _tensor_shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                           and d >= 0 for d in shape):
        raise ClientError(400, "bad_tensor", f"input 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def _b64_image(item: Any, i: int) -> bytes:
    if isinstance(item, dict) and isinstance(item.get("b64"), str):
        item = item["b64"]
    if not isinstance(item, str):
        raise ClientError(400, "bad_tensor", f"BYTES element {i} must be a base64 string")
    if item.startswith("data:") and "," in item:
        item = item.split(",", 1)[1]
    try:
        return base64.b64decode(item + "=" * (-len(item) % 4), altchars=b"-_" if ("-" in item or "_" in item) else None,
                                validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "bad_tensor", f"BYTES element {i} is not valid base64") from None


def _oip_images(state: ServiceState, predictor: Predictor, tensor: dict[str, Any],
                shape: list[int]) -> list[PreparedImage]:
    data = tensor.get("data")
    if len(shape) == 2 and shape[1] == 1:
        shape = [shape[0]]
    if len(shape) != 1:
        raise ClientError(400, "bad_tensor", f"a BYTES image tensor has shape [N], got {shape}")
    n = shape[0]
    if not isinstance(data, list) or len(data) != n:
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ClientError(400, "bad_tensor", f"BYTES tensor of shape [{n}] needs {n} data elements, got {got}")
    _check_count(state, n)
    budget_left = state.settings.max_request_pixels
    prepared: list[PreparedImage] = []
    try:
        for i, item in enumerate(data):
            one = _prepare_one(state, predictor.spec, _b64_image(item, i), f"input[{i}]", budget_left)
            budget_left -= one.size[0] * one.size[1]
            prepared.append(one)
    finally:
        if state.settings.max_request_pixels - budget_left >= TRIM_AFTER_PIXELS:
            trim_heap()
    return prepared


def _oip_array(state: ServiceState, predictor: Predictor, tensor: dict[str, Any], shape: list[int]) -> np.ndarray:
    s = predictor.spec.size
    if len(shape) != 4 or shape[1:] != [3, s, s]:
        raise ClientError(400, "bad_tensor", f"FP32 input must have shape [N, 3, {s}, {s}], got {shape}")
    _check_count(state, shape[0])
    data = tensor.get("data")
    if not isinstance(data, list):
        raise ClientError(400, "bad_tensor", "FP32 input 'data' must be a (flat or nested) list of numbers")
    try:
        arr = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise ClientError(400, "bad_tensor",
                          "FP32 input 'data' must contain only numbers (and be rectangular)") from None
    if arr.size != math.prod(shape):
        raise ClientError(400, "bad_tensor",
                          f"FP32 input has {arr.size} values; shape {shape} needs {math.prod(shape)}")
    if not np.isfinite(arr).all():
        raise ClientError(400, "bad_tensor", "FP32 input contains NaN or infinity")
    return arr.reshape(shape)


def _check_count(state: ServiceState, n: int) -> None:
    if n < 1:
        raise ClientError(400, "bad_tensor", "input tensor holds no images (batch size 0)")
    if n > state.settings.max_images:
        raise ClientError(400, "too_many_images",
                          f"{n} images in one request; the limit is {state.settings.max_images} (PLANTML_MAX_IMAGES)")


def _oip_infer(state: ServiceState, name: str, version: str | None) -> dict[str, Any]:
    predictor = _check_model_name(state, name, version)
    body = _parse_infer_request()
    tensor = body["inputs"][0]
    datatype = str(tensor.get("datatype", "")).upper()
    shape = _tensor_shape(tensor)
    images: list[PreparedImage] | None = None
    if datatype == "BYTES":
        images = _oip_images(state, predictor, tensor, shape)
        result = predictor.forward(np.stack([im.tensor for im in images]))
    elif datatype == "FP32":
        result = predictor.forward(_oip_array(state, predictor, tensor, shape))
    else:
        raise ClientError(400, "bad_tensor",
                          f"unsupported input datatype {tensor.get('datatype')!r}: use BYTES (encoded images) or FP32")
    state.metrics.inference_seconds.observe(result.inference_seconds)
    state.metrics.batch_size.observe(len(result.probabilities))
    probs = result.probabilities
    idx = probs.argmax(axis=1)
    labels = [predictor.classes[i] for i in idx]
    conf = probs[np.arange(len(idx)), idx].astype(np.float32)
    abstained = [bool(a) for a in result.abstained]
    state.metrics.observe_predictions(labels, [float(c) for c in conf], abstained)
    if images is not None and state.drift is not None:
        for img, label, c, a in zip(images, labels, conf, abstained):
            if img.thumbnail is not None:
                state.drift.submit(img.thumbnail, label, float(c), a, size=img.size)
    n = len(labels)
    outputs = {
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [n, probs.shape[1]],
                          "data": [float(v) for v in probs.reshape(-1)]},
        "label": {"name": "label", "datatype": "BYTES", "shape": [n], "data": labels},
        "confidence": {"name": "confidence", "datatype": "FP32", "shape": [n], "data": [float(c) for c in conf]},
        "abstained": {"name": "abstained", "datatype": "BOOL", "shape": [n], "data": abstained},
    }
    if result.ood_scores is not None:
        outputs["ood_score"] = {"name": "ood_score", "datatype": "FP32", "shape": [n],
                                "data": [float(v) for v in result.ood_scores]}
    wanted = body.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise ClientError(400, "bad_tensor", "'outputs' must be a list of {\"name\": ...} objects")
        unknown = [o["name"] for o in wanted if o["name"] not in outputs]
        if unknown:
            raise ClientError(400, "bad_tensor",
                              f"unknown output(s) {unknown}; available: {', '.join(outputs)}")
        selected = [outputs[o["name"]] for o in wanted]
    else:
        selected = list(outputs.values())
    answer: dict[str, Any] = {"model_name": predictor.name, "model_version": predictor.version, "outputs": selected}
    if isinstance(body.get("id"), str):
        answer = {"id": body["id"], **answer}
    return answer


def _register_oip_routes(app: Flask, state: ServiceState) -> None:
    @app.get("/v2")
    def oip_server():
        from plantml import __version__

        return jsonify({"name": "plantml", "version": __version__, "extensions": []})

    @app.get("/v2/health/live")
    def oip_live():
        return jsonify({"live": True})

    @app.get("/v2/health/ready")
    def oip_ready():
        if _not_ready_reason(state) is not None:
            return jsonify({"ready": False}), 503
        return jsonify({"ready": True})

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def oip_model(name: str, version: str | None = None):
        return jsonify(_oip_metadata(_check_model_name(state, name, version)))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def oip_model_ready(name: str, version: str | None = None):
        predictor = _check_model_name(state, name, version)
        return jsonify({"name": predictor.name, "ready": True})

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def oip_infer(name: str, version: str | None = None):
        return jsonify(_oip_infer(state, name, version))


__all__ = ["create_app", "ClientError", "ServiceState", "ModelLoadError"]
