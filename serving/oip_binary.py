"""The binary tensor data extension of the KServe v2 / Triton HTTP/REST protocol.

A request or response that uses it has an ``Inference-Header-Content-Length: N`` header;
its body is the N-byte JSON inference header followed by the raw bytes of each tensor
that carries ``"parameters": {"binary_data_size": size}`` instead of ``"data"``, in the
order of the ``inputs`` (or ``outputs``) list. Fixed-width tensors are little-endian in
row-major order (``BOOL`` one byte each); a ``BYTES`` tensor is each element as a 4-byte
little-endian length followed by that many bytes. See Triton's
``docs/protocol/extension_binary_data.md``; ``tritonclient.http`` uses it by default.

Pure functions over bytes and numpy, no Flask: malformed input raises
:class:`BinaryDataError`, which the protocol adapter answers with a 400.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Iterable

import numpy as np

#: The HTTP header that announces the length of the JSON part of a binary body.
HEADER = "Inference-Header-Content-Length"
#: Content-Type of a response whose body holds binary tensor data (what Triton sends).
BINARY_CONTENT_TYPE = "application/octet-stream"

#: Fixed-width datatypes this service reads or writes, as little-endian numpy dtypes.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


class BinaryDataError(ValueError):
    """The binary part of a request does not match its JSON header."""


def split_body(raw: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Split a request body into its JSON header and the binary tensor data after it.

    Args:
        raw: the whole request body.
        header_length: the ``Inference-Header-Content-Length`` header's value, if sent.

    Returns:
        ``(json_bytes, binary_bytes)``; without the header the whole body is JSON.

    Raises:
        BinaryDataError: the header is not an integer in ``[1, len(raw)]``.
    """
    if header_length is None:
        return raw, b""
    try:
        n = int(header_length.strip())
    except ValueError:
        raise BinaryDataError(f"{HEADER} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(raw):
        raise BinaryDataError(f"{HEADER} is {n} but the body has {len(raw)} bytes")
    return raw[:n], raw[n:]


def binary_size(tensor: dict[str, Any]) -> int | None:
    """The tensor's ``parameters.binary_data_size`` (``None`` when its data is JSON).

    Raises:
        BinaryDataError: the parameter is present but not a non-negative integer.
    """
    params = tensor.get("parameters")
    if not isinstance(params, dict) or "binary_data_size" not in params:
        return None
    size = params["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BinaryDataError(f"binary_data_size must be a non-negative integer, got {size!r}")
    return size


def take_binary_inputs(inputs: list[dict[str, Any]], blob: bytes) -> list[bytes | None]:
    """Cut the binary part of a body into each input's raw bytes, in the order of ``inputs``.

    Args:
        inputs: the ``inputs`` list of the JSON header.
        blob: the bytes after the JSON header.

    Returns:
        One entry per input: its raw bytes, or ``None`` for an input whose data is JSON.

    Raises:
        BinaryDataError: sizes that do not add up to the binary part, or a tensor that
            has both ``data`` and ``binary_data_size``.
    """
    out: list[bytes | None] = []
    offset = 0
    for i, tensor in enumerate(inputs):
        size = binary_size(tensor)
        if size is None:
            out.append(None)
            continue
        if "data" in tensor:
            raise BinaryDataError(f"input {i} has both 'data' and a binary_data_size parameter")
        if offset + size > len(blob):
            raise BinaryDataError(f"input {i} declares {size} bytes of binary data but only "
                                  f"{len(blob) - offset} follow the JSON header")
        out.append(blob[offset:offset + size])
        offset += size
    if offset != len(blob):
        raise BinaryDataError(f"{len(blob) - offset} bytes after the JSON header belong to no input "
                              f"(the inputs' binary_data_size add up to {offset})")
    return out


def decode_bytes_elements(raw: bytes) -> list[bytes]:
    """The elements of a binary ``BYTES`` tensor (each a 4-byte little-endian length + data).

    Raises:
        BinaryDataError: a length runs past the end of the data.
    """
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BinaryDataError(f"BYTES tensor data ends inside the length of element {len(items)}")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise BinaryDataError(f"BYTES element {len(items)} declares {n} bytes; {len(raw) - offset} remain")
        items.append(raw[offset:offset + n])
        offset += n
    return items


def encode_bytes_elements(items: Iterable[bytes]) -> bytes:
    """Serialise ``BYTES`` elements (the inverse of :func:`decode_bytes_elements`)."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_fixed(raw: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """A fixed-width tensor from its raw little-endian bytes.

    Raises:
        BinaryDataError: an unknown datatype, or a byte count that does not fit ``shape``.
    """
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise BinaryDataError(f"binary data of datatype {datatype!r} is not supported")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(raw) != count * dtype.itemsize:
        raise BinaryDataError(f"{datatype} tensor of shape {shape} needs {count * dtype.itemsize} bytes, "
                              f"got {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def encode_tensor(datatype: str, values: np.ndarray | list[str]) -> bytes:
    """Raw bytes of an output tensor: ``BYTES`` length-prefixed (UTF-8), others little-endian."""
    if datatype == "BYTES":
        return encode_bytes_elements(v.encode() if isinstance(v, str) else bytes(v) for v in values)
    return np.ascontiguousarray(values, dtype=NUMPY_DTYPES[datatype]).tobytes()


def wants_binary(requested: dict[str, Any] | None, request_params: dict[str, Any]) -> bool:
    """Whether an output goes back as binary data.

    The output's own ``parameters.binary_data`` decides; without it the request's
    ``parameters.binary_data_output`` (what ``tritonclient`` sets when it names no
    outputs); by default JSON.
    """
    params = requested.get("parameters") if requested else None
    if isinstance(params, dict) and "binary_data" in params:
        return bool(params["binary_data"])
    return bool(request_params.get("binary_data_output", False))


def encode_response(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    """The body and extra headers of a response: plain JSON, or JSON + binary data.

    Args:
        header: the JSON inference response (outputs sent as binary already carry
            ``parameters.binary_data_size`` and no ``data``).
        blobs: the binary outputs' bytes, in the order they appear in ``header["outputs"]``.
    """
    text = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(blobs), {"Content-Type": BINARY_CONTENT_TYPE, HEADER: str(len(text))}


__all__ = ["BINARY_CONTENT_TYPE", "HEADER", "BinaryDataError", "binary_size", "decode_bytes_elements", "decode_fixed",
           "encode_bytes_elements", "encode_response", "encode_tensor", "split_body", "take_binary_inputs",
           "wants_binary"]
