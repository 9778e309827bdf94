"""Inputs that are not leaves at all: a calibrated model with an abstain threshold should mostly refuse them."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency colour noise (a coarse random grid upsampled bicubically)."""
    coarse = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC))


def _non_leaf(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    other = tuple(int(v) for v in rng.integers(0, 256, 3))
    if kind == "uniform_noise":
        return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")
    if kind == "gaussian_noise":
        arr = rng.normal(127.5, 60.0, size=(size, size, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "smooth_noise":
        return Image.fromarray(_smooth_noise(rng, size, int(rng.integers(3, 9))), "RGB")
    if kind == "flat":
        return Image.new("RGB", (size, size), colour)
    if kind == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        ramp = t[None, :, None] if rng.random() < 0.5 else t[:, None, None]
        arr = np.asarray(colour, np.float32) * (1 - ramp) + np.asarray(other, np.float32) * ramp
        return Image.fromarray(np.broadcast_to(arr, (size, size, 3)).astype(np.uint8), "RGB")
    if kind == "radial":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        r = np.sqrt((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / np.sqrt(2))
        arr = np.asarray(colour, np.float32) * (1 - r[..., None]) + np.asarray(other, np.float32) * r[..., None]
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if kind == "stripes":
        period = int(rng.integers(4, max(5, size // 6)))
        idx = np.arange(size) // period % 2
        mask = idx[None, :] if rng.random() < 0.5 else idx[:, None]
        arr = np.where(np.broadcast_to(mask, (size, size))[..., None] == 1, colour, other)
        return Image.fromarray(arr.astype(np.uint8), "RGB")
    if kind == "checkerboard":
        period = int(rng.integers(4, max(5, size // 6)))
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((yy // period + xx // period) % 2)[..., None] == 1
        return Image.fromarray(np.where(mask, colour, other).astype(np.uint8), "RGB")
    if kind == "shapes":
        img = Image.new("RGB", (size, size), colour)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 12))):
            x0, y0 = (int(v) for v in rng.integers(0, size, 2))
            x1, y1 = x0 + int(rng.integers(size // 10, size // 2)), y0 + int(rng.integers(size // 10, size // 2))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = ("ellipse", "rectangle", "line")[int(rng.integers(0, 3))]
            if shape == "ellipse":
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape == "rectangle":
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(2, max(3, size // 20))))
        return img
    raise ValueError(f"unknown non-leaf kind {kind!r}")


#: The kinds :func:`non_leaf_images` cycles through.
NON_LEAF_KINDS = ("uniform_noise", "gaussian_noise", "smooth_noise", "flat", "gradient", "radial", "stripes",
                  "checkerboard", "shapes")


def non_leaf_images(n: int = 60, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Generated images that are certainly not leaves, for the abstention check.

    Cycles through :data:`NON_LEAF_KINDS`: uniform and Gaussian pixel noise, smooth
    colour noise, flat colours, linear and radial gradients, stripes, checkerboards and
    random shapes. Deterministic for a seed.

    Args:
        n: number of images.
        size: side in pixels (RGB squares).
        seed: random seed.
    """
    if n < 0 or size < 8:
        raise ValueError(f"non_leaf_images: need n >= 0 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    return [_non_leaf(NON_LEAF_KINDS[i % len(NON_LEAF_KINDS)], rng, size) for i in range(n)]


def non_leaf_photos(n: int = 12, size: int = 224, seed: int = 0) -> list[Image.Image]:
    """Real photographs of things that are not leaves, from files shipped with the training extra.

    Sources: scikit-learn's sample images (``china.jpg``: a temple; ``flower.jpg``: a
    flower close-up) and matplotlib's ``grace_hopper.jpg`` (a portrait). ``n`` random
    square crops (40-100 % of the shorter side, random flips) are taken round-robin
    and resized to ``size``. Missing sources are skipped; returns ``[]`` if none is installed.
    """
    photos: list[Image.Image] = []
    try:
        from sklearn.datasets import load_sample_images

        photos += [Image.fromarray(np.asarray(a), "RGB") for a in load_sample_images().images]
    except Exception as exc:  # noqa: BLE001 - optional source
        log.info("scikit-learn sample images unavailable: %s", exc)
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
            photos.append(Image.open(fh).convert("RGB"))
    except Exception as exc:  # noqa: BLE001 - optional source
        log.info("matplotlib sample photo unavailable: %s", exc)
    if not photos:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.4, 1.0))
        left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        img = photo.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(img)
    return out


def abstain_rate(probs: np.ndarray, threshold: float) -> float:
    """Share of inputs whose top confidence is below ``threshold`` (the model abstains).

    Raises:
        ValueError: on empty or non-2-D input.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"abstain_rate: expected non-empty (N, C) probabilities, got shape {probs.shape}")
    return float(np.mean(probs.max(axis=1) < float(threshold)))
