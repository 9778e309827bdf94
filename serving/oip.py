"""KServe Open Inference Protocol v2 (REST), as Triton speaks it, over the service's predictor.

Routes (the blueprint of :func:`oip_blueprint`, which the app factory registers; its
routes keep the app-level endpoint names ``oip_*`` rather than a blueprint's ``oip.*``,
because the endpoint is the ``endpoint`` label of the request metrics that the alert
rules and the dashboard select on):

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``;
* ``GET /v2/models/<name>[/versions/<v>]`` (model metadata), ``.../ready``;
* ``POST /v2/models/<name>[/versions/<v>]/infer``.

One input tensor per request (read by :mod:`serving.oip_inputs`): ``BYTES`` ``[N]`` of
encoded images, ``UINT8`` ``[N, H, W, 3]`` RGB pixels, or ``FP32`` ``[N, 3, S, S]`` already
preprocessed. Tensor data come as JSON or with the binary tensor data extension
(:mod:`serving.oip_binary`), which ``tritonclient.http`` uses by default; outputs go
back as binary data when the request asks for it (an output's ``binary_data``
parameter, or the request's ``binary_data_output``). An output's
``classification: k`` parameter (Triton's classification extension) turns
``probabilities`` into the top-k ``"score:index:label"`` strings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Flask, Response, jsonify

from plantml import __version__

from serving import oip_binary
from serving.oip_inputs import (InputTensor, array_from_tensor, bad_tensor, images_from_tensor, parse_infer_request,
                                pixels_from_tensor)
from serving.predictor import Predictor
from serving.service import ClientError, PreparedImage, ServiceState, not_ready_reason

log = logging.getLogger(__name__)

#: Triton's ``platform`` names for the runtimes this service runs (ONNX Runtime backend:
#: ``onnxruntime_onnx``; the OpenVINO backend reports its backend name).
TRITON_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
#: Protocol extensions this server implements (``GET /v2``'s ``extensions``).
EXTENSIONS = ["binary_tensor_data", "classification"]


@dataclass
class OutputTensor:
    """One output of an answer, before it is written as JSON or binary data."""

    name: str
    datatype: str
    shape: list[int]
    values: Any  # numpy array, or a list of str for BYTES


# --------------------------------------------------------------------------- metadata


def platform_name(runtime: str) -> str:
    """The ``platform`` Triton reports for a model run by ``runtime``."""
    return TRITON_PLATFORMS.get(runtime, runtime)


def check_model_name(state: ServiceState, name: str, version: str | None = None) -> Predictor:
    """The predictor, when ``name`` (and ``version``, if given) is the served model.

    Raises:
        ClientError: 404 for another model or version, 503 while no model is loaded.
    """
    predictor = state.require_predictor()
    if name != predictor.name:
        raise ClientError(404, "model_not_found", f"model {name!r} not found; this server serves {predictor.name!r}")
    if version is not None and version != predictor.version:
        raise ClientError(404, "model_not_found", f"version {version!r} of {name!r} not found; "
                                                  f"this server serves version {predictor.version!r}")
    return predictor


def model_metadata(predictor: Predictor) -> dict[str, Any]:
    """The v2 model metadata response (``GET /v2/models/<name>``)."""
    s, c = predictor.spec.size, len(predictor.classes)
    return {
        "name": predictor.name,
        "versions": [predictor.version],
        "platform": platform_name(predictor.runtime),
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, c]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "abstained", "datatype": "BOOL", "shape": [-1]},
            *([{"name": "ood_score", "datatype": "FP32", "shape": [-1]}]
              if predictor.ood_threshold is not None else []),
        ],
        "parameters": {"classes": predictor.classes, "runtime": predictor.runtime, "precision": predictor.precision},
    }


# --------------------------------------------------------------------------- answer


def run_inference(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> list[OutputTensor]:
    """Forward the input, record metrics and the drift feed; the answer's outputs."""
    images: list[PreparedImage] | None = None
    if tensor.datatype in ("BYTES", "UINT8"):
        read = images_from_tensor if tensor.datatype == "BYTES" else pixels_from_tensor
        images = read(state, predictor, tensor)
        result = predictor.forward(np.stack([im.tensor for im in images]))
    elif tensor.datatype == "FP32":
        result = predictor.forward(array_from_tensor(state, predictor, tensor))
    else:
        raise bad_tensor(f"unsupported input datatype {tensor.datatype!r}: use BYTES (encoded images), "
                         "UINT8 (RGB pixels [N, H, W, 3]) or FP32 (preprocessed)")
    state.metrics.inference_seconds.observe(result.inference_seconds)
    state.metrics.batch_size.observe(len(result.probabilities))
    probs = np.asarray(result.probabilities, dtype=np.float32)
    idx = probs.argmax(axis=1)
    labels = [predictor.classes[i] for i in idx]
    conf = probs[np.arange(len(idx)), idx].astype(np.float32)
    abstained = np.asarray(result.abstained, dtype=bool)
    state.metrics.observe_predictions(labels, [float(c) for c in conf], [bool(a) for a in abstained])
    if images is not None and state.drift is not None:
        for img, label, c, a in zip(images, labels, conf, abstained):
            if img.thumbnail is not None:
                state.drift.submit(img.thumbnail, label, float(c), bool(a), size=img.size)
    n = len(labels)
    outputs = [
        OutputTensor("probabilities", "FP32", [n, probs.shape[1]], probs),
        OutputTensor("label", "BYTES", [n], labels),
        OutputTensor("confidence", "FP32", [n], conf),
        OutputTensor("abstained", "BOOL", [n], abstained),
    ]
    if result.ood_scores is not None:
        outputs.append(OutputTensor("ood_score", "FP32", [n], np.asarray(result.ood_scores, dtype=np.float32)))
    return outputs


def classification(output: OutputTensor, k: Any, classes: list[str]) -> OutputTensor:
    """Triton's classification extension: the top ``k`` of ``probabilities`` as ``"score:index:label"``.

    Raises:
        ClientError: 400 for another output or a ``k`` that is not a positive integer.
    """
    if output.name != "probabilities":
        raise bad_tensor(f"the classification parameter applies to 'probabilities', not {output.name!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise bad_tensor(f"classification must be a positive integer, got {k!r}")
    k = min(k, len(classes))
    probs = output.values
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = [f"{probs[r, j]:.6f}:{j}:{classes[j]}" for r in range(len(probs)) for j in order[r]]
    return OutputTensor("probabilities", "BYTES", [len(probs), k], rows)


def select_outputs(body: dict[str, Any], outputs: list[OutputTensor],
                   classes: list[str]) -> list[tuple[OutputTensor, bool]]:
    """The outputs the request asked for, each with whether it goes back as binary data.

    Raises:
        ClientError: 400 for a malformed ``outputs`` list or an unknown output name.
    """
    params = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
    wanted = body.get("outputs")
    if wanted is None:
        return [(o, oip_binary.wants_binary(None, params)) for o in outputs]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                               for o in wanted):
        raise bad_tensor("'outputs' must be a list of {\"name\": ...} objects")
    by_name = {o.name: o for o in outputs}
    unknown = [o["name"] for o in wanted if o["name"] not in by_name]
    if unknown:
        raise bad_tensor(f"unknown output(s) {unknown}; available: {', '.join(by_name)}")
    chosen = []
    for req in wanted:
        out = by_name[req["name"]]
        out_params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
        if out_params.get("classification") is not None:
            out = classification(out, out_params["classification"], classes)
        chosen.append((out, oip_binary.wants_binary(req, params)))
    return chosen


def _json_values(out: OutputTensor) -> list[Any]:
    if out.datatype == "BYTES":
        return list(out.values)
    if out.datatype == "BOOL":
        return [bool(v) for v in np.asarray(out.values).reshape(-1)]
    return [float(v) for v in np.asarray(out.values).reshape(-1)]


def render_answer(body: dict[str, Any], predictor: Predictor,
                  chosen: list[tuple[OutputTensor, bool]]) -> tuple[bytes, dict[str, str]]:
    """The response body (JSON, or JSON + binary data) and its headers."""
    header_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out, binary in chosen:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if binary:
            blob = oip_binary.encode_tensor(out.datatype, out.values)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_values(out)
        header_outputs.append(entry)
    answer: dict[str, Any] = {"model_name": predictor.name, "model_version": predictor.version,
                              "outputs": header_outputs}
    if isinstance(body.get("id"), str):
        answer = {"id": body["id"], **answer}
    return oip_binary.encode_response(answer, blobs)


def infer(state: ServiceState, name: str, version: str | None) -> Response:
    """``POST /v2/models/<name>[/versions/<v>]/infer``."""
    predictor = check_model_name(state, name, version)
    body, tensor = parse_infer_request()
    outputs = run_inference(state, predictor, tensor)
    chosen = select_outputs(body, outputs, predictor.classes)
    payload, headers = render_answer(body, predictor, chosen)
    return Response(payload, status=200, headers=headers)


# --------------------------------------------------------------------------- routes


def oip_blueprint(state: ServiceState) -> Blueprint:
    """The v2 protocol over ``state``, for ``app.register_blueprint``.

    The routes are added when the blueprint is registered, under the app-level endpoint
    names ``oip_*`` (see the module docstring: they are metric labels the alerts select on).
    """
    blueprint = Blueprint("oip", __name__)
    blueprint.record_once(lambda setup: _add_routes(setup.app, state))
    return blueprint


def _add_routes(app: Flask, state: ServiceState) -> None:
    """Add the v2 routes to ``app`` (endpoint names ``oip_*``, see the module docstring)."""
    @app.get("/v2")
    def oip_server():
        return jsonify({"name": "plantml", "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/health/live")
    def oip_live():
        return jsonify({"live": True})

    @app.get("/v2/health/ready")
    def oip_ready():
        if not_ready_reason(state) is not None:
            return jsonify({"ready": False}), 503
        return jsonify({"ready": True})

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    def oip_model(name: str, version: str | None = None):
        return jsonify(model_metadata(check_model_name(state, name, version)))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    def oip_model_ready(name: str, version: str | None = None):
        predictor = check_model_name(state, name, version)
        return jsonify({"name": predictor.name, "ready": True})

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    def oip_infer(name: str, version: str | None = None):
        return infer(state, name, version)


__all__ = ["EXTENSIONS", "TRITON_PLATFORMS", "model_metadata", "oip_blueprint", "platform_name"]
