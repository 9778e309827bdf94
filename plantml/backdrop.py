"""The plain lab backdrop: find the leaf on it, and put the leaf on another background.

PlantVillage photos show one leaf on a uniform backdrop, so the backdrop itself is a
label-free segmentation: pixels far (in colour) from the border's colour are the leaf.
Two users need that mask:

* training (:func:`replace_background`, through :func:`plantml.data.train_augmentation`):
  a lab leaf on a random cluttered background, so that "plain backdrop" stops being
  evidence of anything;
* the shortcut check (:func:`paste_leaf`, :mod:`plantml.robustness`): lab leaves of crops
  that have no field photos, pasted onto backgrounds cut from field photos, must not be
  predicted as the field crop.

Photos without a plain backdrop (field photos) are recognised (:func:`has_plain_backdrop`)
and left alone. Torch-free (numpy + PIL), cheap enough to run inside loader workers.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageFilter

log = logging.getLogger(__name__)

#: Border strip (fraction of the side) whose colours define the backdrop.
BORDER_FRACTION = 0.05
#: A backdrop is "plain" when a smooth colour surface (quadratic in x, y) fits its border
#: pixels to within this median absolute RGB residual. Measured on 300 lab and all 240 field
#: photos of the shared sets at 160 px (``benchmarks/domain_ablation.py --mask-stats``): lab
#: median 6.0, 95th percentile 12.3; field 1st percentile 11.1, median 18.9. At 11 a mask is
#: found on 91 % of lab photos and 0.8 % (2 of 240) of field photos: lab backdrops are plain
#: up to shading, orchards are not.
PLAIN_BORDER_RESIDUAL = 11.0
#: A pixel belongs to the leaf when it is this far (RGB distance) from the backdrop surface.
LEAF_DISTANCE = 45.0
#: A usable mask covers between these shares of the image (else: the backdrop guess failed).
MIN_LEAF_SHARE, MAX_LEAF_SHARE = 0.05, 0.9


def _design(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(x), x, y, x * y, x * x, y * y], axis=1)


def _fit_backdrop(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """A smooth colour surface fitted to the border (robust: refit on the 70 % closest), and its median residual.

    Returns:
        ``(coefficients [6, 3], median absolute residual of the border pixels)``.
    """
    h, w = pixels.shape[:2]
    b = max(1, int(round(min(h, w) * BORDER_FRACTION)))
    ring = np.zeros((h, w), bool)
    ring[:b], ring[-b:], ring[:, :b], ring[:, -b:] = True, True, True, True
    yy, xx = np.nonzero(ring)
    design = _design(yy / h - 0.5, xx / w - 0.5)
    values = pixels[ring].astype(np.float64)
    coef = _least_squares(design, values)
    resid = np.abs(values - design @ coef).mean(axis=1)
    # A leaf touching the border is an outlier of the backdrop: refit without the worst 30 %.
    keep = resid <= np.percentile(resid, 70)
    coef = _least_squares(design[keep], values[keep])
    resid = np.abs(values - design @ coef).mean(axis=1)
    return coef, float(np.median(resid))


def _least_squares(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    # Normal equations of a 6-term fit: a 6x6 solve, ~50x faster than lstsq's SVD in a loader worker.
    gram = design.T @ design + 1e-6 * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ values)


def border_residual(pixels: np.ndarray) -> float:
    """How far the border is from a smooth backdrop (median absolute RGB residual; 0: perfectly plain)."""
    return _fit_backdrop(pixels)[1]


def has_plain_backdrop(pixels: np.ndarray) -> bool:
    """Whether ``uint8 [H,W,3]`` looks like a lab photo: a plain (smoothly shaded) border around the subject."""
    return border_residual(pixels) <= PLAIN_BORDER_RESIDUAL


def leaf_mask(pixels: np.ndarray) -> np.ndarray | None:
    """The leaf of a plain-backdrop photo as a ``bool [H,W]`` mask, or ``None`` if it has no plain backdrop.

    Pixels far from the backdrop surface fitted to the border are leaf (shadows count as
    leaf: they are dark, and cutting them out would leave a halo); a median filter
    removes speckle and a small closing fills lesions that happen to match the backdrop.
    ``None`` also when the mask covers implausibly little or much of the image.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H,W,3] pixels, got shape {pixels.shape}")
    coef, residual = _fit_backdrop(pixels)
    if residual > PLAIN_BORDER_RESIDUAL:
        return None
    h, w = pixels.shape[:2]
    # The mask is found at half size above 96 px (4x fewer pixels to filter) and scaled back.
    step = 2 if min(h, w) > 96 else 1
    small = pixels[::step, ::step].astype(np.float32)
    sh, sw = small.shape[:2]
    yy, xx = np.mgrid[0:sh, 0:sw]
    surface = (_design((yy.ravel() * step) / h - 0.5, (xx.ravel() * step) / w - 0.5) @ coef).reshape(sh, sw, 3)
    dist = np.sqrt(((small - surface) ** 2).sum(axis=2))
    raw = Image.fromarray(((dist > LEAF_DISTANCE) * 255).astype(np.uint8))
    cleaned = raw.filter(ImageFilter.MedianFilter(3)).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
    if step > 1:
        cleaned = cleaned.resize((w, h), Image.BILINEAR)
    mask = np.asarray(cleaned) > 127
    share = float(mask.mean())
    if not MIN_LEAF_SHARE <= share <= MAX_LEAF_SHARE:
        return None
    return mask


def paste_leaf(pixels: np.ndarray, mask: np.ndarray, background: np.ndarray, feather: float = 1.5) -> np.ndarray:
    """The masked leaf of ``pixels`` over ``background`` (same size), with a slightly soft edge."""
    if background.shape != pixels.shape:
        background = np.asarray(Image.fromarray(background).resize(pixels.shape[1::-1], Image.BILINEAR))
    alpha = Image.fromarray((mask * 255).astype(np.uint8))
    if feather > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(feather))
    a = (np.asarray(alpha, dtype=np.float32) / 255.0)[..., None]
    return np.clip(a * pixels + (1 - a) * background, 0, 255).astype(np.uint8)


def random_background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A cluttered, field-like background: blurred blobs of foliage, soil, sky and shadow colours."""
    palette = np.array([[40, 70, 30], [70, 110, 40], [110, 140, 60], [90, 70, 50], [140, 120, 90],
                        [170, 190, 210], [30, 35, 30], [200, 200, 170]], dtype=np.float32)
    cells = int(rng.integers(3, 9))
    coarse = palette[rng.integers(len(palette), size=(cells, cells))]
    coarse += rng.normal(0, 18, size=coarse.shape)
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, float(rng.uniform(3, 14)), size=(size, size, 3))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.5)))))


def replace_background(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plain-backdrop photo's leaf on a random background; other photos unchanged."""
    mask = leaf_mask(pixels)
    if mask is None:
        return pixels
    return paste_leaf(pixels, mask, random_background(pixels.shape[0], rng))
