"""KServe Open Inference Protocol v2 (REST), as Triton speaks it, over the service's predictor.

Routes (registered on the app by :func:`register_oip_routes`; the Flask endpoint names
``oip_*`` are the ``endpoint`` label of the request metrics, which the alert rules and
the dashboard select on, so they are app routes rather than a blueprint's ``oip.*``):

* ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``;
* ``GET /v2/models/<name>[/versions/<v>]`` (model metadata), ``.../ready``;
* ``POST /v2/models/<name>[/versions/<v>]/infer``.

One input tensor per request: ``BYTES`` ``[N]`` (or ``[N, 1]``) of encoded images, or
``FP32`` ``[N, 3, H, W]`` already preprocessed. Tensor data come as JSON or with the
binary tensor data extension (:mod:`serving.oip_binary`), which ``tritonclient.http``
uses by default; outputs go back as binary data when the request asks for it (an
output's ``binary_data`` parameter, or the request's ``binary_data_output``). An output's
``classification: k`` parameter (Triton's classification extension) turns
``probabilities`` into the top-k ``"score:index:label"`` strings.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Flask, Response, jsonify, request

from plantml import __version__

from serving import oip_binary
from serving.limits import trim_heap
from serving.oip_binary import BinaryDataError
from serving.predictor import Predictor
from serving.service import (TRIM_AFTER_PIXELS, ClientError, PreparedImage, ServiceState, not_ready_reason,
                             prepare_image, read_body)

log = logging.getLogger(__name__)

#: Triton's ``platform`` names for the runtimes this service runs (ONNX Runtime backend:
#: ``onnxruntime_onnx``; the OpenVINO backend reports its backend name).
TRITON_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}
#: Protocol extensions this server implements (``GET /v2``'s ``extensions``).
EXTENSIONS = ["binary_tensor_data", "classification"]
#: Media types the infer endpoint accepts (tritonclient sends none at all).
INFER_MEDIA_TYPES = ("", "application/json", oip_binary.BINARY_CONTENT_TYPE)
#: A BYTES element that is base64 text rather than an encoded image (every raster format
#: has bytes outside this alphabet within its first bytes, so the two never mix up).
B64_TEXT = re.compile(rb"(?:data:[\w/+.-]*;base64,)?[A-Za-z0-9+/_=-]+\s*")


@dataclass
class InputTensor:
    """The request's input tensor: its header fields and its data (JSON list or raw bytes)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any  # the JSON ``data`` (when ``raw`` is None)
    raw: bytes | None  # the binary data, with the binary tensor data extension


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


# --------------------------------------------------------------------------- request


def _bad(message: str) -> ClientError:
    return ClientError(400, "bad_tensor", message)


def parse_infer_request() -> tuple[dict[str, Any], InputTensor]:
    """The JSON inference header and its one input tensor, with binary data cut out.

    Raises:
        ClientError: 415 for another media type, 400 for malformed JSON or tensors.
    """
    mimetype = (request.mimetype or "").lower()
    if mimetype not in INFER_MEDIA_TYPES and not mimetype.endswith("+json"):
        raise ClientError(415, "unsupported_media_type",
                          f"unsupported Content-Type {mimetype!r}: the v2 infer endpoint takes application/json "
                          f"(or {oip_binary.BINARY_CONTENT_TYPE} with {oip_binary.HEADER})")
    try:
        head, blob = oip_binary.split_body(read_body(), request.headers.get(oip_binary.HEADER))
    except BinaryDataError as exc:
        raise _bad(str(exc)) from None
    try:
        body = json.loads(head)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ClientError(400, "malformed_json", f"inference header is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("inference request must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise _bad("inference request needs a non-empty 'inputs' list")
    if len(inputs) != 1:
        raise _bad(f"expected exactly one input tensor, got {len(inputs)}")
    if not isinstance(inputs[0], dict):
        raise _bad("each input tensor must be an object with name, shape, datatype, data")
    try:
        (raw,) = oip_binary.take_binary_inputs(inputs, blob)
    except BinaryDataError as exc:
        raise _bad(str(exc)) from None
    tensor = inputs[0]
    if raw is None and "data" not in tensor:
        raise _bad("input tensor has neither 'data' nor a binary_data_size parameter")
    return body, InputTensor(name=str(tensor.get("name", "")), datatype=str(tensor.get("datatype", "")).upper(),
                             shape=_tensor_shape(tensor), data=tensor.get("data"), raw=raw)


def _tensor_shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                           and d >= 0 for d in shape):
        raise _bad(f"input 'shape' must be a list of non-negative integers, got {shape!r}")
    return shape


def decode_b64(text: str, i: int) -> bytes:
    """An image sent as base64 text (standard or URL-safe, padding optional, ``data:`` prefix allowed).

    Raises:
        ClientError: 400 when it is not base64.
    """
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = text.strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4),
                                altchars=b"-_" if ("-" in text or "_" in text) else None, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"BYTES element {i} is not valid base64") from None


def _json_image(item: Any, i: int) -> bytes:
    if isinstance(item, dict) and isinstance(item.get("b64"), str):
        item = item["b64"]
    if not isinstance(item, str):
        raise _bad(f"BYTES element {i} must be a base64 string")
    return decode_b64(item, i)


def _binary_image(item: bytes, i: int) -> bytes:
    """A binary BYTES element: the encoded image itself, or base64 text of one."""
    if B64_TEXT.fullmatch(item):
        return decode_b64(item.decode("ascii"), i)
    return item


def _image_elements(tensor: InputTensor) -> list[bytes]:
    shape = tensor.shape
    if len(shape) == 2 and shape[1] == 1:
        shape = [shape[0]]
    if len(shape) != 1:
        raise _bad(f"a BYTES image tensor has shape [N], got {tensor.shape}")
    n = shape[0]
    if tensor.raw is not None:
        try:
            items: list[Any] = oip_binary.decode_bytes_elements(tensor.raw)
        except BinaryDataError as exc:
            raise _bad(str(exc)) from None
    else:
        items = tensor.data if isinstance(tensor.data, list) else None
        if items is None:
            raise _bad(f"BYTES tensor of shape [{n}] needs a list of {n} base64 strings, "
                       f"got {type(tensor.data).__name__}")
    if len(items) != n:
        raise _bad(f"BYTES tensor of shape [{n}] needs {n} data elements, got {len(items)}")
    return items


def images_from_tensor(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> list[PreparedImage]:
    """Decode a BYTES tensor's images one at a time within the request's pixel budget."""
    items = _image_elements(tensor)
    check_count(state, len(items))
    budget_left = state.settings.max_request_pixels
    prepared: list[PreparedImage] = []
    try:
        for i, item in enumerate(items):
            data = _binary_image(item, i) if tensor.raw is not None else _json_image(item, i)
            one = prepare_image(state, predictor.spec, data, f"input[{i}]", budget_left)
            budget_left -= one.size[0] * one.size[1]
            prepared.append(one)
    finally:
        if state.settings.max_request_pixels - budget_left >= TRIM_AFTER_PIXELS:
            trim_heap()
    return prepared


def array_from_tensor(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> np.ndarray:
    """The ``[N, 3, S, S]`` float32 batch of an FP32 tensor (JSON or binary data).

    Raises:
        ClientError: 400 for a wrong shape, a value count that does not fit, or NaN/inf.
    """
    s, shape = predictor.spec.size, tensor.shape
    if len(shape) != 4 or shape[1:] != [3, s, s]:
        raise _bad(f"FP32 input must have shape [N, 3, {s}, {s}], got {shape}")
    check_count(state, shape[0])
    if tensor.raw is not None:
        try:
            arr = oip_binary.decode_fixed(tensor.raw, "FP32", shape).astype(np.float32)
        except BinaryDataError as exc:
            raise _bad(str(exc)) from None
    else:
        if not isinstance(tensor.data, list):
            raise _bad("FP32 input 'data' must be a (flat or nested) list of numbers")
        try:
            arr = np.asarray(tensor.data, dtype=np.float32)
        except (ValueError, TypeError):
            raise _bad("FP32 input 'data' must contain only numbers (and be rectangular)") from None
        if arr.size != math.prod(shape):
            raise _bad(f"FP32 input has {arr.size} values; shape {shape} needs {math.prod(shape)}")
        arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise _bad("FP32 input contains NaN or infinity")
    return arr


def check_count(state: ServiceState, n: int) -> None:
    """Refuse an empty batch or one over ``PLANTML_MAX_IMAGES``."""
    if n < 1:
        raise _bad("input tensor holds no images (batch size 0)")
    if n > state.settings.max_images:
        raise ClientError(400, "too_many_images",
                          f"{n} images in one request; the limit is {state.settings.max_images} (PLANTML_MAX_IMAGES)")


# --------------------------------------------------------------------------- answer


def run_inference(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> list[OutputTensor]:
    """Forward the input, record metrics and the drift feed; the answer's outputs."""
    images: list[PreparedImage] | None = None
    if tensor.datatype == "BYTES":
        images = images_from_tensor(state, predictor, tensor)
        result = predictor.forward(np.stack([im.tensor for im in images]))
    elif tensor.datatype == "FP32":
        result = predictor.forward(array_from_tensor(state, predictor, tensor))
    else:
        raise _bad(f"unsupported input datatype {tensor.datatype!r}: use BYTES (encoded images) or FP32")
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
        raise _bad(f"the classification parameter applies to 'probabilities', not {output.name!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise _bad(f"classification must be a positive integer, got {k!r}")
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
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    by_name = {o.name: o for o in outputs}
    unknown = [o["name"] for o in wanted if o["name"] not in by_name]
    if unknown:
        raise _bad(f"unknown output(s) {unknown}; available: {', '.join(by_name)}")
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


def register_oip_routes(app: Flask, state: ServiceState) -> None:
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


__all__ = ["EXTENSIONS", "TRITON_PLATFORMS", "model_metadata", "platform_name", "register_oip_routes"]
