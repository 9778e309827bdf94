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
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest decoded image accepted (pixels). Larger declared dimensions are refused
#: before decoding, which is what stops a decompression bomb.
MAX_IMAGE_PIXELS = 40_000_000

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageDecodeError(ValueError):
    """An input could not be turned into an RGB image.

    Attributes:
        reason: a short machine-readable code (``empty``, ``not_image``, ``truncated``,
            ``too_large``, ``unsupported``) used for metrics and error messages.
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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an upright 8-bit RGB image.

    Handles alpha, grayscale, palette, CMYK, 16-bit and EXIF orientation.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        max_pixels: refuse images whose declared width*height exceeds this.

    Raises:
        ImageDecodeError: empty, not an image, truncated/corrupt, or too large.
    """
    if not data:
        raise ImageDecodeError("empty", "empty image: no bytes received")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_large", f"image dimensions {width}x{height} exceed the limit of {max_pixels} pixels"
                )
            if width < 1 or height < 1:
                raise ImageDecodeError("not_image", "image has zero width or height")
            img.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not_image", "not an image file (unrecognised format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError("too_large", f"image too large: {exc}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        raise ImageDecodeError("truncated", f"corrupt or truncated image: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - a malformed file can make any decoder raise
        raise ImageDecodeError("unsupported", f"image could not be decoded: {type(exc).__name__}: {exc}") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - broken EXIF should not reject a readable image
        pass
    try:
        return _to_rgb(img)
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError("unsupported", f"image mode {img.mode} could not be converted to RGB: {exc}") from exc


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
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
    return decode_image(data, max_pixels=max_pixels)


def resize_center_crop(img: Image.Image, size: int) -> np.ndarray:
    """Apply the ``shorter_side_center_crop`` rule; returns ``uint8`` HWC RGB."""
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    if (new_w, new_h) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.uint8)


def normalize(hwc_uint8: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8`` HWC RGB -> normalised ``float32`` CHW."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    chw = hwc_uint8.astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return (chw - mean) / std


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
