"""Common image corruptions in the spirit of ImageNet-C (Hendrycks & Dietterich 2019).

Brightness, contrast, blur, JPEG quality, noise, rotation and crop. Each corruption is
``fn(img, severity 1..5, rng) -> img`` on PIL images, deterministic for a seed, and
keeps the image's size and mode.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

Corruption = Callable[[Image.Image, int, np.random.Generator], Image.Image]

#: Images are corrupted relative to this reference side, so a blur radius means the same
#: thing on a 64 px test image and a 256 px PlantVillage photo.
_REFERENCE_SIDE = 224.0


def check_severity(severity: int) -> int:
    """``severity`` as an int from 1 to 5, or a ``ValueError``."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return int(severity)


def as_rgb(img: Image.Image) -> Image.Image:
    """The image in RGB (a ``TypeError`` for anything but a PIL image)."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _restore_mode(out: Image.Image, original: Image.Image) -> Image.Image:
    """Return ``out`` in the original image's mode (RGB work, caller's mode back)."""
    if out.mode == original.mode:
        return out
    try:
        return out.convert(original.mode)
    except (ValueError, OSError):
        return out


def _scale(img: Image.Image) -> float:
    return min(img.size) / _REFERENCE_SIDE


def brightness(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Shift the HSV value channel by 0.1-0.5 of full range (ImageNet-C levels).

    The direction (brighter: over-exposed sun; darker: shade) is drawn from ``rng``.
    """
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[check_severity(severity) - 1]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    hsv = np.asarray(as_rgb(img).convert("HSV"), dtype=np.float32)
    hsv[..., 2] = np.clip(hsv[..., 2] + sign * shift * 255.0, 0, 255)
    out = Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")
    return _restore_mode(out, img)


def contrast(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Pull pixels toward the image mean: keep 40 %, 30 %, 20 %, 10 %, 5 % of the contrast."""
    keep = (0.4, 0.3, 0.2, 0.1, 0.05)[check_severity(severity) - 1]
    arr = np.asarray(as_rgb(img), dtype=np.float32)
    mean = arr.mean(axis=(0, 1), keepdims=True)
    out = np.clip((arr - mean) * keep + mean, 0, 255)
    return _restore_mode(Image.fromarray(out.round().astype(np.uint8), "RGB"), img)


def gaussian_blur(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, sigma 1, 2, 3, 4, 6 px at 224 px (scaled to the image size)."""
    sigma = (1.0, 2.0, 3.0, 4.0, 6.0)[check_severity(severity) - 1] * _scale(img)
    out = as_rgb(img).filter(ImageFilter.GaussianBlur(radius=max(0.5, sigma)))
    return _restore_mode(out, img)


def jpeg_quality(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at quality 25, 18, 15, 10, 7 (ImageNet-C levels)."""
    quality = (25, 18, 15, 10, 7)[check_severity(severity) - 1]
    buf = io.BytesIO()
    as_rgb(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = decoded.convert("RGB")
    return _restore_mode(out, img)


def gaussian_noise(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, sigma 0.08-0.38 of full range (ImageNet-C levels)."""
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[check_severity(severity) - 1]
    arr = np.asarray(as_rgb(img), dtype=np.float32) / 255.0
    noisy = np.clip(arr + rng.normal(0.0, sigma, size=arr.shape), 0.0, 1.0)
    return _restore_mode(Image.fromarray((noisy * 255.0).round().astype(np.uint8), "RGB"), img)


def _border_colour(arr: np.ndarray) -> tuple[int, int, int]:
    strip = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return tuple(int(v) for v in np.median(strip, axis=0))


def rotation(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Rotate by 5, 10, 15, 25, 35 degrees (direction from ``rng``), same canvas size.

    The uncovered corners are filled with the median border colour, which looks like
    more background rather than adding black triangles no camera produces.
    """
    angle = (5.0, 10.0, 15.0, 25.0, 35.0)[check_severity(severity) - 1]
    angle *= 1.0 if rng.random() < 0.5 else -1.0
    rgb = as_rgb(img)
    fill = _border_colour(np.asarray(rgb))
    out = rgb.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    return _restore_mode(out, img)


def crop(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Keep a random off-centre window of 90, 80, 70, 60, 50 % of each side, resized back.

    Mimics a close-up or badly framed photo: the leaf is larger and may be cut off.
    """
    keep = (0.9, 0.8, 0.7, 0.6, 0.5)[check_severity(severity) - 1]
    rgb = as_rgb(img)
    w, h = rgb.size
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    out = rgb.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BILINEAR)
    return _restore_mode(out, img)


#: Name -> ``fn(img, severity, rng)``. Order is the table/chart order.
CORRUPTIONS: dict[str, Corruption] = {
    "brightness": brightness,
    "contrast": contrast,
    "gaussian_blur": gaussian_blur,
    "jpeg_quality": jpeg_quality,
    "gaussian_noise": gaussian_noise,
    "rotation": rotation,
    "crop": crop,
}


def corrupt(img: Image.Image, name: str, severity: int, seed: int = 0) -> Image.Image:
    """Apply one named corruption with its own seeded generator (handy for previews)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name](img, severity, np.random.default_rng(seed))
