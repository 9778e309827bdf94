"""Torch-free image decoding and preprocessing, shared by training, evaluation,
serving and edge.

There is exactly one definition of "what the model sees": :func:`preprocess_image`.
Training's evaluation transform calls it too, and a test pins that ONNX/OpenVINO
inputs built here equal the tensors the model was evaluated on.

Resize rule (``shorter_side_center_crop``): scale the shorter side to ``size`` with
bilinear filtering, then take the centred ``size``x``size`` crop. PlantVillage images are
square, so for them this is a plain resize; a phone photo keeps its aspect ratio and
loses only the edges.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest decoded image accepted from an untrusted source (pixels, after JPEG draft
#: scaling). Larger declared dimensions are refused before decoding, which is what stops a
#: decompression bomb. 16 MP decodes to at most 64 MB (RGBA); the service also holds at
#: most this many decoded pixels per worker at once (``serving.app``).
MAX_IMAGE_PIXELS = 16_000_000

#: The limit :func:`load_image` applies to local files (training data, edge CLI input):
#: trusted paths, where a large scan or TIFF should still load.
MAX_FILE_IMAGE_PIXELS = 40_000_000

#: Longest side / shortest side accepted. The model sees a centred square, so a strip
#: longer than this holds almost nothing of it; refusing it bounds the work per pixel.
MAX_ASPECT_RATIO = 100.0

#: A JPEG whose shorter side is at least twice this is decoded at 1/2, 1/4 or 1/8 scale by
#: libjpeg (``Image.draft``), keeping the shorter side >= this. The DCT-domain reduction is an
#: area average, so what the model sees barely changes (a test bounds it), while a 48 MP
#: phone photo decodes in a fraction of the time and memory.
DRAFT_MIN_SIDE = 512

#: Formats the decoder will even try (``Image.open(formats=...)``); everything else is
#: ``not_image``. ``JPEG`` includes MPO, which many phones write for their photos.
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ROWS_PER_CHUNK = 256


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image.

    Attributes:
        reason: a short machine-readable code (``empty``, ``not_image``, ``truncated``,
            ``too_large``, ``aspect_ratio``, ``unsupported``) used for metrics and error
            messages.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class InputSpec:
    """How a model input is built from an image (stored in ``metadata.json["input"]``)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layout: str = "NCHW"
    color_order: str = "RGB"
    resize: str = "shorter_side_center_crop"
    interpolation: str = "bilinear"
    dtype: str = "float32"
    value_range: tuple[float, float] = field(default=(0.0, 1.0))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InputSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for key in ("mean", "std", "value_range"):
            if key in known:
                known[key] = tuple(float(x) for x in known[key])
        if known.get("resize", "shorter_side_center_crop") != "shorter_side_center_crop":
            raise ValueError(f"unsupported resize rule {known['resize']!r}")
        if known.get("layout", "NCHW") != "NCHW" or known.get("color_order", "RGB") != "RGB":
            raise ValueError("only NCHW / RGB inputs are supported")
        return cls(**known)


def _high_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float image -> 8-bit ``L``, min-max stretched.

    Works in row chunks of ``float32`` so that the peak extra memory is one copy of the
    raw samples plus the 8-bit result (a full-size ``float64`` array would be 8 bytes per
    pixel, several times over).
    """
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"unexpected array shape {arr.shape} for mode {img.mode}")
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("image holds NaN or infinite samples")
    scale = np.float32(255.0 / (hi - lo) if hi > lo else 0.0)
    out = np.empty(arr.shape, dtype=np.uint8)
    for r0 in range(0, arr.shape[0], _ROWS_PER_CHUNK):
        chunk = arr[r0:r0 + _ROWS_PER_CHUNK].astype(np.float32)
        chunk -= np.float32(lo)
        chunk *= scale
        np.clip(chunk, 0.0, 255.0, out=chunk)
        out[r0:r0 + _ROWS_PER_CHUNK] = chunk.astype(np.uint8)
    del arr
    return Image.fromarray(out, mode="L")


def _composite_on_white(img: Image.Image) -> Image.Image:
    """An image with alpha -> RGB over white, with one full-size RGB copy (no RGBA temporaries)."""
    if img.mode not in ("RGBA", "LA"):
        img = img.convert("RGBA")
    if img.mode == "LA":
        out = Image.new("L", img.size, 255)
        out.paste(img.getchannel("L"), (0, 0), img.getchannel("A"))
        return out.convert("RGB")
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(img, (0, 0), img)  # RGBA pasted on RGB: blends with the image's own alpha
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    if img.mode in _HIGH_BIT_MODES:
        high, img = img, None
        img = _high_bit_to_l(high)
        high.close()
        del high
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = _composite_on_white(img)
    return img.convert("RGB") if img.mode != "RGB" else img


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int] | None:
    """The size to ask ``Image.draft`` for, or ``None`` when the image is small enough."""
    if min(width, height) < 2 * min_side:
        return None
    return (math.ceil(width * min_side / min(width, height)), math.ceil(height * min_side / min(width, height)))


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float = MAX_ASPECT_RATIO,
               draft_min_side: int = DRAFT_MIN_SIDE) -> Image.Image:
    """Parse an image header (no pixel decoding yet) and check it against the limits.

    A large JPEG is switched to reduced-scale decoding first (``Image.draft``), so
    ``img.size`` afterwards is the size that will be decoded, and the pixel limit applies
    to it.

    Args:
        data: the encoded file.
        max_pixels: refuse images whose (draft-reduced) width*height exceeds this.
        max_aspect: refuse images whose longer side exceeds this many times the shorter.
        draft_min_side: see :data:`DRAFT_MIN_SIDE`.

    Returns:
        A lazily decoded PIL image; :func:`finish_decode` turns it into RGB.

    Raises:
        ImageDecodeError: empty, not an accepted image format, or over a limit.
    """
    if not data:
        raise ImageDecodeError("empty", "empty image: no bytes received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = img.size
            if width < 1 or height < 1:
                raise ImageDecodeError("not_image", "image has zero width or height")
            if max(width, height) > max_aspect * min(width, height):
                raise ImageDecodeError(
                    "aspect_ratio",
                    f"image dimensions {width}x{height} exceed the aspect-ratio limit of {max_aspect:g}:1",
                )
            wanted = _draft_size(width, height, draft_min_side) if img.format in ("JPEG", "MPO") else None
            if wanted is not None:
                img.draft(None, wanted)
            if img.width * img.height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"image dimensions {width}x{height} exceed the limit of {max_pixels} pixels"
                )
            return img
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            "not_image", f"not an image file (unrecognised format; accepted: {', '.join(ACCEPTED_FORMATS)})"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file can make any decoder raise
        raise _decode_error(exc) from exc


def _decode_error(exc: Exception) -> ImageDecodeError:
    """The client-facing error for whatever a decoder raised (one mapping for opening and decoding)."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageDecodeError("too_large", f"image too large: {exc}")
    if isinstance(exc, (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)):
        return ImageDecodeError("truncated", f"corrupt or truncated image: {exc}")
    return ImageDecodeError("unsupported", f"image could not be decoded: {type(exc).__name__}: {exc}")


def finish_decode(img: Image.Image) -> Image.Image:
    """Decode the pixels of an :func:`open_image` result into an upright 8-bit RGB image.

    Raises:
        ImageDecodeError: truncated/corrupt data or an unconvertible mode.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - a malformed file can make any decoder raise
        raise _decode_error(exc) from exc
    try:
        # in place: without it Pillow returns a full copy even when nothing needs turning
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - broken EXIF should not reject a readable image
        pass
    try:
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError("unsupported", f"image mode {img.mode} could not be converted to RGB: {exc}") from exc


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_aspect: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB image.

    Handles alpha, grayscale, palette, CMYK, 16-bit and EXIF orientation; decodes large
    JPEGs at reduced scale (:data:`DRAFT_MIN_SIDE`). Only :data:`ACCEPTED_FORMATS` are
    tried.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        max_pixels: refuse images whose (draft-reduced) width*height exceeds this.
        max_aspect: refuse images more elongated than this.

    Raises:
        ImageDecodeError: empty, not an image, truncated/corrupt, or over a limit.
    """
    return finish_decode(open_image(data, max_pixels=max_pixels, max_aspect=max_aspect))


def load_image(path: str | Path, max_pixels: int = MAX_FILE_IMAGE_PIXELS) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`).

    Raises:
        ImageDecodeError: if the file cannot be read or decoded (reason ``missing`` for a
            missing file).
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing", f"file not found: {path}") from exc
    except OSError as exc:
        raise ImageDecodeError("unreadable", f"cannot read {path}: {exc}") from exc
    return decode_image(data, max_pixels=max_pixels, max_aspect=float("inf"))


def center_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source-coordinate box whose resize to ``size`` x ``size`` is the
    ``shorter_side_center_crop`` result.

    It is the crop that "scale the shorter side to ``size`` (each side rounded), then take
    the centred square" would cut, mapped back through each axis's scale, so one
    ``resize(..., box=box)`` samples exactly the pixels the two-step version did, without
    ever building the scaled full image (which, for a 1x40,000,000 strip, would not fit in
    memory).
    """
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    sx, sy = new_w / width, new_h / height
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return (left / sx, top / sy, (left + size) / sx, (top + size) / sy)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Apply the ``shorter_side_center_crop`` rule; returns ``uint8`` HWC RGB.

    One bilinear ``resize`` of the centre box (:func:`center_crop_box`): the output never
    depends on how large or elongated the source is, only the box does.
    """
    width, height = img.size
    if (width, height) == (size, size):
        return np.asarray(img, dtype=np.uint8)
    box = center_crop_box(width, height, size)
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def normalize(hwc_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8`` HWC RGB -> normalised ``float32`` CHW."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    chw = hwc_uint8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (chw - mean) / std


def normalize_batch(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8 [N,H,W,3]`` (already resized) -> normalised ``float32 [N,3,H,W]``: :func:`normalize` per batch.

    The training loader's uint8 cache and the OOD feature pass use it; it lives here, not
    in :mod:`plantml.training`, so that models need not import training to reuse it.
    """
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std)


def preprocess_image(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """The one model-input function: RGB image -> ``float32`` CHW tensor."""
    return normalize(resize_center_crop(img, spec.size), spec)


def preprocess_batch(images: Iterable[Image.Image], spec: InputSpec) -> np.ndarray:
    """Stack :func:`preprocess_image` outputs into an ``NCHW`` float32 batch."""
    arrays = [preprocess_image(img, spec) for img in images]
    if not arrays:
        return np.zeros((0, 3, spec.size, spec.size), dtype=np.float32)
    return np.stack(arrays).astype(np.float32, copy=False)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis, with temperature scaling."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, classes: list[str], k: int = 5) -> list[dict[str, Any]]:
    """Top-k ``[{"label", "confidence"}]`` for one probability vector, best first."""
    k = min(k, len(classes))
    idx = np.argsort(-probs)[:k]
    return [{"label": classes[i], "confidence": float(probs[i])} for i in idx]
