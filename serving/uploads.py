"""Request intake of the plantml API (``/predict``, ``/predict_batch``, the upload page).

Which images a request carries (multipart parts or a raw ``image/*`` body) and its
``top_k`` parameter. The KServe v2 adapter reads tensors instead (:mod:`serving.oip_inputs`);
both decode through :func:`serving.service.prepare_images`.
"""

from __future__ import annotations

from typing import Any

from flask import request

from serving.service import ClientError, read_body

RAW_BODY_TYPES = ("application/octet-stream",)


def read_uploads(fields: tuple[str, ...], max_images: int) -> list[tuple[str | None, bytes]]:
    """The images of a request: multipart parts named ``fields``, or a raw image body.

    Raises:
        ClientError: 415 for another media type, 400 for no image or too many.
    """
    mimetype = (request.mimetype or "").lower()
    if mimetype == "multipart/form-data":
        return _multipart_uploads(fields, max_images)
    if mimetype.startswith("image/") or mimetype in RAW_BODY_TYPES:
        return [(None, read_body())]
    if not mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        raise ClientError(400, "empty", "empty request: send an image as multipart field 'file' or as an image/* body")
    raise ClientError(
        415, "unsupported_media_type",
        f"unsupported Content-Type {mimetype or '(none)'!r}: send multipart/form-data with field "
        f"{fields[0]!r} or a raw image/* body",
    )


def _multipart_uploads(fields: tuple[str, ...], max_images: int) -> list[tuple[str | None, bytes]]:
    """The file parts named ``fields`` of a multipart request, with their file names.

    Raises:
        ClientError: 400 for no file part (naming what was sent instead) or too many.
    """
    # a file input left empty is sent as a part with no filename and no bytes (the
    # upload page's camera input when the photos came from the picker): nothing chosen
    parts = [f for name in fields for f in request.files.getlist(name) if not _unchosen(f)]
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


def _unchosen(part: Any) -> bool:
    """A multipart file part of an input the user left empty (no filename, no bytes)."""
    if part.filename:
        return False
    head = part.stream.read(1)
    part.stream.seek(0)
    return not head


def upload_label(i: int, name: str | None, count: int) -> str:
    """How an error message names upload ``i`` (``image``, ``image 2``, ``image 0 (leaf.jpg)``)."""
    return f"image {i}" + (f" ({name})" if name else "") if count > 1 or name else "image"


def top_k_param(default: int, n_classes: int) -> int:
    """The request's ``top_k`` query parameter, or ``min(default, n_classes)``.

    Raises:
        ClientError: 400 for a non-integer or a value outside ``1..n_classes``.
    """
    raw = request.args.get("top_k")
    if raw is None:
        return min(default, n_classes)
    try:
        k = int(raw)
    except ValueError:
        raise ClientError(400, "bad_parameter", f"top_k={raw!r} is not an integer") from None
    if not 1 <= k <= n_classes:
        raise ClientError(400, "bad_parameter", f"top_k={k} must be between 1 and {n_classes}")
    return k
