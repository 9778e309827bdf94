"""The built-in DEMO dataset: synthetic leaves, generated, never real.

It exists so that ``python flows/train_flow.py run`` works on a fresh machine with no
download. Each class is a drawn leaf (an ellipse with a midrib and veins on a grey
lab-like backdrop) with a class-specific lesion pattern, loosely inspired by real
symptoms: none (healthy), brown spots with halos, orange rust pustules, large dark
blight patches, yellow mosaic mottling, white powdery patches. Class names start with
``DEMO_`` so that no result on them can be mistaken for a PlantVillage result.

Generation is deterministic for a seed and skipped when the folder already holds the
same configuration (a ``DEMO.json`` stamp records it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

DEMO_CLASSES = (
    "DEMO_Leaf___healthy",
    "DEMO_Leaf___brown_spot",
    "DEMO_Leaf___rust",
    "DEMO_Leaf___blight",
    "DEMO_Leaf___mosaic_virus",
    "DEMO_Leaf___powdery_mildew",
    "DEMO_Leaf___leaf_scorch",
    "DEMO_Leaf___black_rot",
)
STAMP = "DEMO.json"


def _leaf_mask(size: int, rng: np.random.Generator) -> tuple[Image.Image, tuple[float, float, float, float, float]]:
    """A rotated ellipse leaf mask; returns the mask and (cx, cy, a, b, angle)."""
    cx, cy = size * rng.uniform(0.42, 0.58), size * rng.uniform(0.42, 0.58)
    a, b = size * rng.uniform(0.30, 0.42), size * rng.uniform(0.17, 0.27)
    angle = rng.uniform(0, math.pi)
    pts = []
    for t in np.linspace(0, 2 * math.pi, 90, endpoint=False):
        # A slight point at the tip makes it leaf-like rather than a plain ellipse.
        r = 1.0 + 0.12 * max(0.0, math.cos(t)) ** 6
        x, y = a * r * math.cos(t), b * math.sin(t)
        pts.append((cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    return mask, (cx, cy, a, b, angle)


def _point_on_leaf(geom: tuple[float, float, float, float, float], rng: np.random.Generator, inner: float = 0.85):
    cx, cy, a, b, angle = geom
    r, t = math.sqrt(rng.uniform(0, 1)) * inner, rng.uniform(0, 2 * math.pi)
    x, y = a * r * math.cos(t), b * r * math.sin(t)
    return cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)


def _blobs(draw: ImageDraw.ImageDraw, geom, rng, n: tuple[int, int], radius: tuple[float, float], colour, halo=None):
    for _ in range(int(rng.integers(*n))):
        x, y = _point_on_leaf(geom, rng)
        r = rng.uniform(*radius)
        if halo is not None:
            draw.ellipse((x - r * 1.6, y - r * 1.6, x + r * 1.6, y + r * 1.6), fill=halo)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def draw_leaf(label: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one synthetic leaf of class ``label`` (one of :data:`DEMO_CLASSES`)."""
    bg = tuple(int(v) for v in rng.integers(150, 215, size=1).repeat(3) + rng.integers(-8, 8, size=3))
    img = Image.new("RGB", (size, size), bg)
    mask, geom = _leaf_mask(size, rng)
    g = int(rng.integers(105, 160))
    leaf_rgb = (int(rng.integers(35, 75)), g, int(rng.integers(25, 60)))
    leaf = Image.new("RGB", (size, size), leaf_rgb)
    draw = ImageDraw.Draw(leaf)
    cx, cy, a, b, angle = geom
    ca, sa = math.cos(angle), math.sin(angle)
    vein = tuple(min(255, c + 35) for c in leaf_rgb)
    draw.line((cx - a * ca, cy - a * sa, cx + a * ca, cy + a * sa), fill=vein, width=max(1, size // 80))
    for k in np.linspace(-0.7, 0.7, 7):
        x0, y0 = cx + k * a * ca, cy + k * a * sa
        for side in (-1, 1):
            dx, dy = 0.35 * a * ca - side * 0.8 * b * sa, 0.35 * a * sa + side * 0.8 * b * ca
            draw.line((x0, y0, x0 + dx * 0.6, y0 + dy * 0.6), fill=vein, width=1)
    s = size / 128.0
    name = label.split("___")[-1]
    if name == "brown_spot":
        _blobs(draw, geom, rng, (6, 12), (2.0 * s, 4.0 * s), (110, 70, 35), halo=(170, 160, 60))
    elif name == "rust":
        _blobs(draw, geom, rng, (25, 45), (0.8 * s, 1.8 * s), (215, 120, 30))
    elif name == "blight":
        _blobs(draw, geom, rng, (2, 4), (7.0 * s, 13.0 * s), (60, 45, 30))
    elif name == "mosaic_virus":
        _blobs(draw, geom, rng, (10, 18), (4.0 * s, 8.0 * s), (185, 190, 70))
    elif name == "powdery_mildew":
        _blobs(draw, geom, rng, (5, 10), (4.0 * s, 9.0 * s), (225, 228, 215))
    elif name == "leaf_scorch":
        _blobs(draw, geom, rng, (14, 24), (1.5 * s, 3.0 * s), (125, 40, 55))
    elif name == "black_rot":
        _blobs(draw, geom, rng, (3, 6), (4.0 * s, 7.0 * s), (25, 20, 20), halo=(120, 85, 45))
    leaf = leaf.filter(ImageFilter.GaussianBlur(radius=0.6 * s))
    img.paste(leaf, (0, 0), mask)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 5, size=arr.shape) + rng.uniform(-15, 15)  # sensor noise and exposure
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def ensure_demo_dataset(
    out_dir: str | os.PathLike[str], n_classes: int = 6, per_class: int = 40, size: int = 128, seed: int = 0
) -> Path:
    """Generate the demo dataset into ``out_dir`` unless the same one is already there.

    Written into a temporary sibling and renamed into place, so an interrupted run never
    leaves a half-generated dataset that a later run would trust.

    Returns:
        ``out_dir`` (a PlantVillage-style ``<root>/<Class>/*.jpg`` folder).
    """
    out = Path(out_dir)
    config = {"classes": list(DEMO_CLASSES[:n_classes]), "per_class": per_class, "size": size, "seed": seed,
              "generator": "plantml.demo_data v1", "note": "SYNTHETIC DEMO DATA - not real leaves"}
    stamp = out / STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == config:
                return out
        except json.JSONDecodeError:
            pass
    if n_classes > len(DEMO_CLASSES):
        raise ValueError(f"the demo generator has {len(DEMO_CLASSES)} classes, {n_classes} requested")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for label in tqdm(config["classes"], desc="generate demo leaves", unit="class"):
        (tmp / label).mkdir()
        for i in range(per_class):
            draw_leaf(label, size, rng).save(tmp / label / f"demo_{i:04d}.jpg", quality=92)
    (tmp / "README.txt").write_text(
        "SYNTHETIC DEMO DATASET generated by plantml.demo_data. These are drawn leaves, not photographs;\n"
        "results on them say nothing about real plant disease detection. Use --data-dir for real data.\n"
    )
    (tmp / STAMP).write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same dataset first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (stamp.is_file() and json.loads(stamp.read_text()) == config):
            raise
    log.info("generated the synthetic DEMO dataset: %d classes x %d images in %s", n_classes, per_class, out)
    return out
