"""The background-only baseline: how far the image border alone predicts the class.

Noyan (2022) got 49.0 % on the 38 PlantVillage classes (chance 2.6 %) from only 8
background pixels per image; a high number here means the split rewards the background.
scikit-learn is imported inside :func:`background_baseline`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image

from plantml.preprocess import resize_center_crop
from plantml.robustness.corruptions import as_rgb


def border_features(img: Image.Image, border: int = 8, size: int = 256, bins: int = 8) -> np.ndarray:
    """Colour features of the outer ``border`` pixels only (the centre, where the leaf is, is ignored).

    The image is first brought to ``size`` x ``size`` with the same
    shorter-side-resize-and-centre-crop rule the model uses. Features: per-channel mean
    and standard deviation in RGB and HSV, and an RGB histogram with ``bins`` bins per
    channel, all over the border strip.
    """
    if border < 1 or 2 * border >= size:
        raise ValueError(f"border must be between 1 and {size // 2 - 1} pixels for size {size}, got {border}")
    rgb = resize_center_crop(as_rgb(img), size)
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

    train_labels, test_labels, classes, counts = _checked_baseline_inputs(train_images, train_labels, test_images,
                                                                          test_labels)
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


def _checked_baseline_inputs(
    train_images: Sequence[Image.Image], train_labels: Any, test_images: Sequence[Image.Image], test_labels: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train labels, test labels, training classes, their counts)`` once the input is checked.

    Raises:
        ValueError: on empty or mismatched input, or fewer than two training classes.
    """
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
    return train_labels, test_labels, classes, counts
