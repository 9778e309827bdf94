"""Reading a KServe v2 inference request: the JSON header, its one input tensor, the images.

Tensor data come as JSON or with the binary tensor data extension (:mod:`serving.oip_binary`).
Three kinds of input become a model batch here:

* ``BYTES`` ``[N]`` (or ``[N, 1]``): encoded images, base64 text in JSON or the file's bytes
  as binary data;
* ``UINT8`` ``[N, H, W, 3]``: RGB pixels (decoded frames), resized and normalised here as
  any upload is;
* ``FP32`` ``[N, 3, S, S]``: an already preprocessed batch.

Every image passes the same limits as an upload (per-image and per-request pixels, the
worker's pixel gate). Problems are :class:`~serving.service.ClientError` (400, 413, 415).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import request
from PIL import Image

from plantml.preprocess import preprocess_image

from serving import oip_binary
from serving.drift_feed import shrink_for_stats
from serving.oip_binary import BinaryDataError
from serving.predictor import Predictor
from serving.service import ClientError, PreparedImage, ServiceState, prepare_images, read_body

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


def bad_tensor(message: str) -> ClientError:
    """A 400 ``bad_tensor`` error."""
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
        raise bad_tensor(str(exc)) from None
    try:
        body = json.loads(head)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ClientError(400, "malformed_json", f"inference header is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_tensor("inference request must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise bad_tensor("inference request needs a non-empty 'inputs' list")
    if len(inputs) != 1:
        raise bad_tensor(f"expected exactly one input tensor, got {len(inputs)}")
    if not isinstance(inputs[0], dict):
        raise bad_tensor("each input tensor must be an object with name, shape, datatype, data")
    try:
        (raw,) = oip_binary.take_binary_inputs(inputs, blob)
    except BinaryDataError as exc:
        raise bad_tensor(str(exc)) from None
    tensor = inputs[0]
    if raw is None and "data" not in tensor:
        raise bad_tensor("input tensor has neither 'data' nor a binary_data_size parameter")
    return body, InputTensor(name=str(tensor.get("name", "")), datatype=str(tensor.get("datatype", "")).upper(),
                             shape=_tensor_shape(tensor), data=tensor.get("data"), raw=raw)


def _tensor_shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and not isinstance(d, bool)
                                                           and d >= 0 for d in shape):
        raise bad_tensor(f"input 'shape' must be a list of non-negative integers, got {shape!r}")
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
        raise bad_tensor(f"BYTES element {i} is not valid base64") from None


def _json_image(item: Any, i: int) -> bytes:
    if isinstance(item, dict) and isinstance(item.get("b64"), str):
        item = item["b64"]
    if not isinstance(item, str):
        raise bad_tensor(f"BYTES element {i} must be a base64 string")
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
        raise bad_tensor(f"a BYTES image tensor has shape [N], got {tensor.shape}")
    n = shape[0]
    if tensor.raw is not None:
        try:
            items: list[Any] = oip_binary.decode_bytes_elements(tensor.raw)
        except BinaryDataError as exc:
            raise bad_tensor(str(exc)) from None
    else:
        items = tensor.data if isinstance(tensor.data, list) else None
        if items is None:
            raise bad_tensor(f"BYTES tensor of shape [{n}] needs a list of {n} base64 strings, "
                             f"got {type(tensor.data).__name__}")
    if len(items) != n:
        raise bad_tensor(f"BYTES tensor of shape [{n}] needs {n} data elements, got {len(items)}")
    return items


def images_from_tensor(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> list[PreparedImage]:
    """Decode a BYTES tensor's images one at a time within the request's pixel budget."""
    items = _image_elements(tensor)
    check_count(state, len(items))
    extract = _binary_image if tensor.raw is not None else _json_image
    # a generator: element i is decoded from base64 / the binary section only when its turn comes
    return prepare_images(state, predictor.spec, ((f"input[{i}]", extract(item, i)) for i, item in enumerate(items)))


def array_from_tensor(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> np.ndarray:
    """The ``[N, 3, S, S]`` float32 batch of an FP32 tensor (JSON or binary data).

    Raises:
        ClientError: 400 for a wrong shape, a value count that does not fit, or NaN/inf.
    """
    s, shape = predictor.spec.size, tensor.shape
    if len(shape) != 4 or shape[1:] != [3, s, s]:
        raise bad_tensor(f"FP32 input must have shape [N, 3, {s}, {s}], got {shape}")
    check_count(state, shape[0])
    if tensor.raw is not None:
        try:
            arr = oip_binary.decode_fixed(tensor.raw, "FP32", shape).astype(np.float32)
        except BinaryDataError as exc:
            raise bad_tensor(str(exc)) from None
    else:
        if not isinstance(tensor.data, list):
            raise bad_tensor("FP32 input 'data' must be a (flat or nested) list of numbers")
        try:
            arr = np.asarray(tensor.data, dtype=np.float32)
        except (ValueError, TypeError):
            raise bad_tensor("FP32 input 'data' must contain only numbers (and be rectangular)") from None
        if arr.size != math.prod(shape):
            raise bad_tensor(f"FP32 input has {arr.size} values; shape {shape} needs {math.prod(shape)}")
        arr = arr.reshape(shape)
    if not np.isfinite(arr).all():
        raise bad_tensor("FP32 input contains NaN or infinity")
    return arr


def check_count(state: ServiceState, n: int) -> None:
    """Refuse an empty batch or one over ``PLANTML_MAX_IMAGES``."""
    if n < 1:
        raise bad_tensor("input tensor holds no images (batch size 0)")
    if n > state.settings.max_images:
        raise ClientError(400, "too_many_images",
                          f"{n} images in one request; the limit is {state.settings.max_images} (PLANTML_MAX_IMAGES)")


def pixels_from_tensor(state: ServiceState, predictor: Predictor, tensor: InputTensor) -> list[PreparedImage]:
    """A UINT8 ``[N, H, W, 3]`` tensor of RGB pixels, preprocessed as uploads are.

    Raises:
        ClientError: 400 for a wrong shape or values, an image over the per-image pixel
            limit; 413 over the request's pixel budget.
    """
    shape = tensor.shape
    if len(shape) != 4 or shape[3] != 3 or min(shape[1:3]) < 1:
        raise bad_tensor(f"a UINT8 input holds RGB pixels of shape [N, H, W, 3], got {shape}")
    n, h, w = shape[:3]
    check_count(state, n)
    if h * w > state.settings.max_image_pixels:
        raise ClientError(400, "too_large", f"{w}x{h} pixels per image is over the "
                                            f"{state.settings.max_image_megapixels:g} megapixel limit")
    if n * h * w > state.settings.max_request_pixels:
        raise ClientError(413, "too_many_pixels", f"{n} images of {w}x{h} are over the request's "
                                                  f"{state.settings.max_request_megapixels:g} megapixels")
    if tensor.raw is not None:
        try:
            arr = oip_binary.decode_fixed(tensor.raw, "UINT8", shape)
        except BinaryDataError as exc:
            raise bad_tensor(str(exc)) from None
    else:
        try:
            values = np.asarray(tensor.data, dtype=np.int64) if isinstance(tensor.data, list) else None
        except (ValueError, TypeError, OverflowError):
            values = None
        if values is None or values.size != math.prod(shape) or values.min() < 0 or values.max() > 255:
            raise bad_tensor(f"UINT8 input 'data' must be {math.prod(shape)} integers in 0..255")
        arr = values.astype(np.uint8).reshape(shape)
    prepared = []
    for frame in arr:
        with state.gate.reserve(h * w):
            rgb = Image.fromarray(np.ascontiguousarray(frame), "RGB")
            thumbnail = shrink_for_stats(rgb.copy()) if state.drift is not None else None
            prepared.append(PreparedImage(tensor=preprocess_image(rgb, predictor.spec), size=(w, h),
                                          thumbnail=thumbnail))
    return prepared


__all__ = ["InputTensor", "array_from_tensor", "bad_tensor", "check_count", "decode_b64", "images_from_tensor",
           "parse_infer_request", "pixels_from_tensor"]
