"""Robustness and bias checks beyond the random split. Torch-free (PIL + numpy).

PlantVillage photos are lab shots on uniform backgrounds; a random split of them
rewards memorising the photo conditions. These checks report what a single accuracy
number hides:

* :data:`CORRUPTIONS` / :func:`evaluate_corruptions` - accuracy on the test split under
  common image corruptions at several severities, in the spirit of ImageNet-C
  (Hendrycks & Dietterich 2019): brightness, contrast, blur, JPEG quality, noise,
  rotation and crop. Each corruption is ``fn(img, severity 1..5, rng) -> img`` on PIL
  images, deterministic for a seed, and keeps the image's size and mode.
* :func:`background_baseline` - a classifier that sees only a strip of border pixels
  (the leaf in the middle is masked out). Noyan (2022) got 49.0 % on the 38
  PlantVillage classes (chance 2.6 %) from only 8 background pixels per image; a high
  number here means the split rewards the background.
* :func:`shortcut_check` - the background shortcut between domains. Field photos exist
  for some crops only (apple, in the shared sets), so a model can learn "orchard
  background => apple". Lab leaves of the *other* crops, cut out with the plain-backdrop
  mask (:mod:`plantml.backdrop`) and pasted onto backgrounds cut from field photos, must
  not be predicted as a field crop; the share that is, next to the same leaves on their
  own backdrop, measures the shortcut.
* :func:`non_leaf_images` / :func:`non_leaf_photos` / :func:`abstain_rate` - inputs
  that are not leaves at all; a calibrated model with an abstain threshold should
  mostly refuse them.

``predict_proba`` arguments take a list of PIL images and return ``(N, C)``
probabilities, so the same code runs over torch (in the flow) or ONNX Runtime /
OpenVINO (on an exported bundle).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from plantml.backdrop import leaf_mask, paste_leaf
from plantml.plots import pyplot, save_figure
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

PredictProba = Callable[[list[Image.Image]], np.ndarray]
Corruption = Callable[[Image.Image, int, np.random.Generator], Image.Image]

#: Images are corrupted relative to this reference side, so a blur radius means the same
#: thing on a 64 px test image and a 256 px PlantVillage photo.
_REFERENCE_SIDE = 224.0


# --------------------------------------------------------------------------- corruptions


def _check_severity(severity: int) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return int(severity)


def _as_rgb(img: Image.Image) -> Image.Image:
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
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[_check_severity(severity) - 1]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    hsv = np.asarray(_as_rgb(img).convert("HSV"), dtype=np.float32)
    hsv[..., 2] = np.clip(hsv[..., 2] + sign * shift * 255.0, 0, 255)
    out = Image.fromarray(hsv.round().astype(np.uint8), "HSV").convert("RGB")
    return _restore_mode(out, img)


def contrast(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Pull pixels toward the image mean: keep 40 %, 30 %, 20 %, 10 %, 5 % of the contrast."""
    keep = (0.4, 0.3, 0.2, 0.1, 0.05)[_check_severity(severity) - 1]
    arr = np.asarray(_as_rgb(img), dtype=np.float32)
    mean = arr.mean(axis=(0, 1), keepdims=True)
    out = np.clip((arr - mean) * keep + mean, 0, 255)
    return _restore_mode(Image.fromarray(out.round().astype(np.uint8), "RGB"), img)


def gaussian_blur(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, sigma 1, 2, 3, 4, 6 px at 224 px (scaled to the image size)."""
    sigma = (1.0, 2.0, 3.0, 4.0, 6.0)[_check_severity(severity) - 1] * _scale(img)
    out = _as_rgb(img).filter(ImageFilter.GaussianBlur(radius=max(0.5, sigma)))
    return _restore_mode(out, img)


def jpeg_quality(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Re-encode as JPEG at quality 25, 18, 15, 10, 7 (ImageNet-C levels)."""
    quality = (25, 18, 15, 10, 7)[_check_severity(severity) - 1]
    buf = io.BytesIO()
    _as_rgb(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = decoded.convert("RGB")
    return _restore_mode(out, img)


def gaussian_noise(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Additive Gaussian noise, sigma 0.08-0.38 of full range (ImageNet-C levels)."""
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[_check_severity(severity) - 1]
    arr = np.asarray(_as_rgb(img), dtype=np.float32) / 255.0
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
    angle = (5.0, 10.0, 15.0, 25.0, 35.0)[_check_severity(severity) - 1]
    angle *= 1.0 if rng.random() < 0.5 else -1.0
    rgb = _as_rgb(img)
    fill = _border_colour(np.asarray(rgb))
    out = rgb.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False, fillcolor=fill)
    return _restore_mode(out, img)


def crop(img: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Keep a random off-centre window of 90, 80, 70, 60, 50 % of each side, resized back.

    Mimics a close-up or badly framed photo: the leaf is larger and may be cut off.
    """
    keep = (0.9, 0.8, 0.7, 0.6, 0.5)[_check_severity(severity) - 1]
    rgb = _as_rgb(img)
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


# --------------------------------------------------------------------------- evaluation


def _predict_in_batches(predict_proba: PredictProba, images: Sequence[Image.Image], n_classes: int | None,
                        batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        probs = np.asarray(predict_proba(chunk))
        if probs.ndim != 2 or probs.shape[0] != len(chunk):
            raise ValueError(
                f"predict_proba returned shape {probs.shape} for {len(chunk)} images; expected (N, C) probabilities"
            )
        if n_classes is not None and probs.shape[1] != n_classes:
            raise ValueError(f"predict_proba returned {probs.shape[1]} classes, earlier calls returned {n_classes}")
        n_classes = probs.shape[1]
        out.append(probs)
    return np.concatenate(out)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def evaluate_corruptions(
    images: list[Image.Image],
    labels: np.ndarray,
    predict_proba: PredictProba,
    severities: Iterable[int] = (1, 3, 5),
    seed: int = 0,
    corruptions: Sequence[str] | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Accuracy on clean images and under each corruption at each severity.

    Every (corruption, severity) pair gets its own generator seeded from
    ``(seed, corruption index, severity)``, so the result does not depend on the order
    or on which other corruptions run.

    Args:
        images: test images (PIL, any size).
        labels: ``(N,)`` integer class indices.
        predict_proba: list of PIL images -> ``(N, C)`` probabilities.
        severities: levels from 1 (mild) to 5 (severe).
        seed: base seed.
        corruptions: names to run (default: all of :data:`CORRUPTIONS`).
        batch_size: images per ``predict_proba`` call.

    Returns:
        Rows ``{"corruption", "severity", "accuracy", "n"}``; the first is
        ``{"corruption": "clean", "severity": 0, ...}``.

    Raises:
        ValueError: on empty input, mismatched labels, an unknown corruption or a bad severity.
    """
    from tqdm.auto import tqdm

    labels = np.asarray(labels)
    if len(images) == 0:
        raise ValueError("evaluate_corruptions: no images given")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"evaluate_corruptions: {len(images)} images but labels of shape {labels.shape}")
    names = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    severities = [_check_severity(s) for s in severities]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    clean = _predict_in_batches(predict_proba, images, None, batch_size)
    n_classes = clean.shape[1]
    rows: list[dict[str, Any]] = [
        {"corruption": "clean", "severity": 0, "accuracy": _accuracy(clean, labels), "n": len(images)}
    ]
    combos = [(name, s) for name in names for s in severities]
    for name, severity in tqdm(combos, desc="corruptions", leave=False, disable=None):
        rng = np.random.default_rng([int(seed), list(CORRUPTIONS).index(name), severity])
        fn = CORRUPTIONS[name]
        corrupted = [fn(img, severity, rng) for img in images]
        probs = _predict_in_batches(predict_proba, corrupted, n_classes, batch_size)
        rows.append({"corruption": name, "severity": severity, "accuracy": _accuracy(probs, labels), "n": len(images)})
        log.debug("%s@%d: accuracy %.4f", name, severity, rows[-1]["accuracy"])
    return rows


def robustness_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`evaluate_corruptions` rows.

    Returns:
        ``{"clean_accuracy", "mean_corrupted_accuracy", "relative_accuracy",
        "worst": {"corruption", "severity", "accuracy"}, "per_corruption": {name: mean},
        "per_severity": {severity: mean}}``. ``relative_accuracy`` is mean corrupted
        accuracy / clean accuracy (0 when clean accuracy is 0).

    Raises:
        ValueError: without a clean row or without corrupted rows.
    """
    clean = [r for r in rows if r["corruption"] == "clean"]
    corrupted = [r for r in rows if r["corruption"] != "clean"]
    if not clean:
        raise ValueError("robustness_summary: rows have no 'clean' row (use evaluate_corruptions)")
    if not corrupted:
        raise ValueError("robustness_summary: rows have no corrupted rows")
    clean_acc = float(clean[0]["accuracy"])
    mean_acc = float(np.mean([r["accuracy"] for r in corrupted]))
    worst = min(corrupted, key=lambda r: r["accuracy"])
    per_corruption: dict[str, float] = {}
    for name in dict.fromkeys(r["corruption"] for r in corrupted):
        per_corruption[name] = float(np.mean([r["accuracy"] for r in corrupted if r["corruption"] == name]))
    per_severity = {
        int(s): float(np.mean([r["accuracy"] for r in corrupted if r["severity"] == s]))
        for s in sorted({r["severity"] for r in corrupted})
    }
    return {
        "clean_accuracy": clean_acc,
        "mean_corrupted_accuracy": mean_acc,
        "relative_accuracy": mean_acc / clean_acc if clean_acc > 0 else 0.0,
        "worst": {"corruption": worst["corruption"], "severity": int(worst["severity"]),
                  "accuracy": float(worst["accuracy"])},
        "per_corruption": per_corruption,
        "per_severity": per_severity,
    }


def robustness_gate(summary: dict[str, Any], min_relative_accuracy: float) -> dict[str, Any]:
    """Check ``robustness.min_relative_accuracy``; the caller fails the run if not passed.

    Returns:
        ``{"passed", "relative_accuracy", "min_relative_accuracy", "message"}``.
    """
    rel = float(summary["relative_accuracy"])
    passed = rel >= float(min_relative_accuracy)
    message = (
        f"robustness gate {'passed' if passed else 'FAILED'}: mean corrupted accuracy is {rel:.3f} of clean "
        f"(minimum {float(min_relative_accuracy):.3f}); worst {summary['worst']['corruption']}@"
        f"{summary['worst']['severity']} = {summary['worst']['accuracy']:.3f}"
    )
    return {"passed": passed, "relative_accuracy": rel, "min_relative_accuracy": float(min_relative_accuracy),
            "message": message}


def robustness_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per corruption, one column per severity, plus the mean."""
    clean = [r for r in rows if r["corruption"] == "clean"]
    corrupted = [r for r in rows if r["corruption"] != "clean"]
    severities = sorted({int(r["severity"]) for r in corrupted})
    lines = ["| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
             "|---|" + "---:|" * (len(severities) + 1)]
    if clean:
        acc = clean[0]["accuracy"]
        lines.append("| clean | " + " | ".join(f"{acc:.3f}" for _ in severities) + f" | {acc:.3f} |")
    for name in dict.fromkeys(r["corruption"] for r in corrupted):
        by_s = {int(r["severity"]): r["accuracy"] for r in corrupted if r["corruption"] == name}
        cells = [f"{by_s[s]:.3f}" if s in by_s else "-" for s in severities]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(list(by_s.values())):.3f} |")
    return "\n".join(lines)


def robustness_chart(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Line chart: accuracy vs severity per corruption (severity 0 = clean), as PNG."""
    summary = robustness_summary(rows)
    plt = pyplot()

    clean = summary["clean_accuracy"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in summary["per_corruption"]:
        pts = sorted((int(r["severity"]), float(r["accuracy"])) for r in rows if r["corruption"] == name)
        xs, ys = [0] + [p[0] for p in pts], [clean] + [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", lw=1.5, label=name)
    ax.axhline(clean, color="black", ls="--", lw=1, label=f"clean {clean:.3f}")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(sorted({0} | {int(r["severity"]) for r in rows}))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy under corruptions (mean {summary['mean_corrupted_accuracy']:.3f}, "
                 f"{summary['relative_accuracy']:.0%} of clean)")
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- background bias


def border_features(img: Image.Image, border: int = 8, size: int = 256, bins: int = 8) -> np.ndarray:
    """Colour features of the outer ``border`` pixels only (the centre, where the leaf is, is ignored).

    The image is first brought to ``size`` x ``size`` with the same
    shorter-side-resize-and-centre-crop rule the model uses. Features: per-channel mean
    and standard deviation in RGB and HSV, and an RGB histogram with ``bins`` bins per
    channel, all over the border strip.
    """
    from plantml.preprocess import resize_center_crop

    if border < 1 or 2 * border >= size:
        raise ValueError(f"border must be between 1 and {size // 2 - 1} pixels for size {size}, got {border}")
    rgb = resize_center_crop(_as_rgb(img), size)
    hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV"))
    mask = np.zeros(rgb.shape[:2], dtype=bool)
    mask[:border, :] = mask[-border:, :] = True
    mask[:, :border] = mask[:, -border:] = True
    px_rgb = rgb[mask].astype(np.float32) / 255.0
    px_hsv = hsv[mask].astype(np.float32) / 255.0
    hist = [np.histogram(px_rgb[:, c], bins=bins, range=(0.0, 1.0))[0] / len(px_rgb) for c in range(3)]
    return np.concatenate([px_rgb.mean(0), px_rgb.std(0), px_hsv.mean(0), px_hsv.std(0), *hist]).astype(np.float32)


def background_baseline(
    train_images: Sequence[Image.Image],
    train_labels: np.ndarray,
    test_images: Sequence[Image.Image],
    test_labels: np.ndarray,
    border: int = 8,
    size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy of a classifier that sees only the image border (the leaf masked out).

    Logistic regression on :func:`border_features` (colour statistics and histograms of
    the outer ``border`` pixels at ``size`` px). If it beats chance by far, the split can be
    solved from background and lighting alone, and a high model accuracy on that split
    says less about recognising disease.

    Args:
        train_images, train_labels: fitting data (the training split).
        test_images, test_labels: reporting data (the test split).
        border: strip width in pixels.
        size: side the images are brought to before taking the strip (PlantVillage: 256).
        seed: random state of the classifier.

    Returns:
        ``{"accuracy", "chance", "uniform_chance", "lift", "n_train", "n_test", "n_classes",
        "border", "size", "features", "classifier"}``. ``chance`` is the accuracy of always
        predicting the most frequent training class; ``lift`` = accuracy / chance.

    Raises:
        ValueError: on empty or mismatched input, or fewer than two training classes.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    if len(train_images) == 0 or len(test_images) == 0:
        raise ValueError("background_baseline: both the training and the test images must be non-empty")
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise ValueError(
            f"background_baseline: {len(train_images)} train images vs {len(train_labels)} labels, "
            f"{len(test_images)} test images vs {len(test_labels)} labels"
        )
    classes, counts = np.unique(train_labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError("background_baseline: the training labels hold fewer than two classes")
    x_train = np.stack([border_features(im, border, size) for im in train_images])
    x_test = np.stack([border_features(im, border, size) for im in test_images])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed))
    clf.fit(x_train, train_labels)
    accuracy = float(np.mean(clf.predict(x_test) == test_labels))
    majority = classes[int(np.argmax(counts))]
    chance = float(np.mean(test_labels == majority))
    n_classes = int(len(np.unique(np.concatenate([train_labels, test_labels]))))
    return {
        "accuracy": accuracy,
        "chance": chance,
        "uniform_chance": 1.0 / n_classes,
        "lift": accuracy / chance if chance > 0 else float("inf"),
        "n_train": int(len(train_images)),
        "n_test": int(len(test_images)),
        "n_classes": n_classes,
        "border": int(border),
        "size": int(size),
        "features": "border-strip RGB/HSV mean+std and 8-bin RGB histograms",
        "classifier": "standardised multinomial logistic regression",
    }


# --------------------------------------------------------------------------- non-leaf inputs


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


# --------------------------------------------------------------------------- domain shortcut


def field_background(photo: np.ndarray, size: int, rng: np.random.Generator, min_share: float = 0.5) -> np.ndarray:
    """A random crop (``min_share``..1 of the side) of a field photo, resized to ``size`` x ``size``."""
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(min_share, 1.0))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop.resize((size, size), Image.BILINEAR))


def shortcut_check(
    predict_proba: PredictProba,
    lab_images: Sequence[np.ndarray],
    lab_labels: Sequence[int],
    field_images: Sequence[np.ndarray],
    target_classes: Sequence[int],
    classes: Sequence[str],
    max_images: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """How often lab leaves of non-field crops, pasted onto field backgrounds, are called a field crop.

    Args:
        predict_proba: ``list[PIL] -> (N, C)`` probabilities.
        lab_images: ``uint8 [H,W,3]`` plain-backdrop photos (e.g. the lab test split).
        lab_labels: their class indices.
        field_images: ``uint8`` field photos the backgrounds are cut from.
        target_classes: class indices of the crops the field photos show (``Apple___*``).
        classes: class names.
        max_images: at most this many lab leaves are pasted (spread over classes).
        seed: fixes the choice of leaves, backgrounds and crops.

    Returns:
        ``{"target_classes", "n", "n_no_mask", "target_rate", "target_rate_original",
        "shortcut_lift", "accuracy_pasted", "accuracy_original", "per_class": {...},
        "examples": [...]}``: ``target_rate`` is the share of pasted leaves predicted as any
        target class, ``target_rate_original`` the same leaves on their own backdrop;
        ``shortcut_lift`` their difference. Leaves whose backdrop gives no mask are
        counted in ``n_no_mask`` and skipped.

    Raises:
        ValueError: with no field image, no target class, or no lab leaf outside the targets.
    """
    targets = sorted({int(t) for t in target_classes})
    if not field_images:
        raise ValueError("shortcut_check: no field photos to cut backgrounds from")
    if not targets:
        raise ValueError("shortcut_check: no target (field) classes")
    labels = np.asarray(lab_labels, dtype=int)
    candidates = [i for i in range(len(lab_images)) if labels[i] not in targets]
    if not candidates:
        raise ValueError("shortcut_check: no lab leaf of a class outside the field classes")
    rng = np.random.default_rng(seed)
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    pasted, originals, kept, n_no_mask = [], [], [], 0
    for i in order:
        if len(kept) >= max_images:
            break
        img = np.asarray(lab_images[i], dtype=np.uint8)
        mask = leaf_mask(img)
        if mask is None:
            n_no_mask += 1
            continue
        bg = field_background(np.asarray(field_images[int(rng.integers(len(field_images)))]), img.shape[0], rng)
        pasted.append(Image.fromarray(paste_leaf(img, mask, bg)))
        originals.append(Image.fromarray(img))
        kept.append(i)
    if not kept:
        return {"target_classes": [classes[t] for t in targets], "n": 0, "n_no_mask": n_no_mask,
                "target_rate": float("nan"), "target_rate_original": float("nan"), "shortcut_lift": float("nan"),
                "accuracy_pasted": float("nan"), "accuracy_original": float("nan"), "per_class": {}, "examples": []}
    y = labels[kept]
    pred_pasted = _predict_in_batches(predict_proba, pasted, len(classes), 32).argmax(1)
    pred_original = _predict_in_batches(predict_proba, originals, len(classes), 32).argmax(1)
    hit_pasted, hit_original = np.isin(pred_pasted, targets), np.isin(pred_original, targets)
    per_class = {}
    for c in sorted(set(y.tolist())):
        m = y == c
        per_class[classes[c]] = {"n": int(m.sum()), "target_rate": float(hit_pasted[m].mean()),
                                 "target_rate_original": float(hit_original[m].mean())}
    examples = [{"class": classes[int(y[j])], "predicted": classes[int(pred_pasted[j])]}
                for j in np.flatnonzero(hit_pasted)[:10]]
    out = {
        "target_classes": [classes[t] for t in targets],
        "n": int(len(kept)),
        "n_no_mask": int(n_no_mask),
        "target_rate": float(hit_pasted.mean()),
        "target_rate_original": float(hit_original.mean()),
        "shortcut_lift": float(hit_pasted.mean() - hit_original.mean()),
        "accuracy_pasted": float(np.mean(pred_pasted == y)),
        "accuracy_original": float(np.mean(pred_original == y)),
        "per_class": per_class,
        "examples": examples,
    }
    log.info("shortcut check: %d non-field lab leaves on field backgrounds -> %.3f predicted as %s (own backdrop "
             "%.3f); accuracy %.3f -> %.3f", out["n"], out["target_rate"], "/".join(out["target_classes"][:2]) +
             ("..." if len(targets) > 2 else ""), out["target_rate_original"], out["accuracy_original"],
             out["accuracy_pasted"])
    return out
