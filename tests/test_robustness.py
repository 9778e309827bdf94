"""Corruptions, the robustness table, the background baseline and non-leaf inputs (plantml.robustness)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from plantml.robustness import (
    CORRUPTIONS,
    NON_LEAF_KINDS,
    abstain_rate,
    background_baseline,
    border_features,
    corrupt,
    evaluate_corruptions,
    non_leaf_images,
    non_leaf_photos,
    robustness_chart,
    robustness_gate,
    robustness_summary,
    robustness_table,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEAF_COLOURS = [(40, 160, 40), (150, 110, 30), (60, 60, 150)]


def leaf_photo(leaf_rgb, background_rgb=(200, 200, 190), size: int = 64, seed: int = 0) -> Image.Image:
    """A textured 'leaf' (noisy ellipse) on a noisy background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), background_rgb)
    m = size // 5
    ImageDraw.Draw(img).ellipse((m, m + size // 10, size - m, size - m - size // 10), fill=tuple(leaf_rgb))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def mean_colour_model(images: list[Image.Image]) -> np.ndarray:
    """A real (if simple) classifier: softmax over negative distance of the centre colour to each class."""
    feats = np.stack([np.asarray(im.convert("RGB"), np.float32)[24:40, 24:40].reshape(-1, 3).mean(0) for im in images])
    d = np.linalg.norm(feats[:, None, :] - np.asarray(LEAF_COLOURS, np.float32)[None], axis=2)
    z = -d / 10.0
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


# --------------------------------------------------------------------------- corruptions


def test_corruption_names():
    assert list(CORRUPTIONS) == ["brightness", "contrast", "gaussian_blur", "jpeg_quality", "gaussian_noise",
                                 "rotation", "crop"]


@pytest.mark.parametrize("name", list(CORRUPTIONS))
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_corruption_changes_pixels_keeps_size_and_mode(name, mode):
    img = leaf_photo(LEAF_COLOURS[0], size=72).convert(mode)
    for severity in range(1, 6):
        out = CORRUPTIONS[name](img, severity, np.random.default_rng(0))
        assert isinstance(out, Image.Image)
        assert out.size == img.size and out.mode == img.mode
        assert diff(out, img) > 0.5, f"{name}@{severity} left the image (almost) unchanged"
    assert img.size == (72, 72)  # the input is not modified in place


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruption_deterministic_for_seed(name):
    img = leaf_photo(LEAF_COLOURS[1], seed=3)
    a = CORRUPTIONS[name](img, 3, np.random.default_rng(123))
    b = CORRUPTIONS[name](img, 3, np.random.default_rng(123))
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", ["gaussian_noise", "crop"])
def test_random_corruptions_depend_on_seed(name):
    img = leaf_photo(LEAF_COLOURS[1], seed=3)
    a, b = corrupt(img, name, 3, seed=1), corrupt(img, name, 3, seed=2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_severity_5_is_stronger_than_1(name):
    img = leaf_photo(LEAF_COLOURS[0], size=96, seed=5)
    mild = CORRUPTIONS[name](img, 1, np.random.default_rng(7))
    severe = CORRUPTIONS[name](img, 5, np.random.default_rng(7))
    assert diff(severe, img) > diff(mild, img)


@pytest.mark.parametrize("severity", [0, 6, 2.5, True, "3"])
def test_bad_severity_is_rejected(severity):
    with pytest.raises(ValueError, match="severity"):
        CORRUPTIONS["contrast"](leaf_photo(LEAF_COLOURS[0]), severity, np.random.default_rng(0))


def test_corrupt_rejects_unknown_name_and_non_image():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(leaf_photo(LEAF_COLOURS[0]), "fog", 1)
    with pytest.raises(TypeError, match="PIL image"):
        CORRUPTIONS["contrast"](np.zeros((8, 8, 3), np.uint8), 1, np.random.default_rng(0))


# --------------------------------------------------------------------------- evaluation


def labelled_set(n_per_class: int = 6) -> tuple[list[Image.Image], np.ndarray]:
    images, labels = [], []
    for c, rgb in enumerate(LEAF_COLOURS):
        for i in range(n_per_class):
            images.append(leaf_photo(rgb, seed=100 * c + i))
            labels.append(c)
    return images, np.array(labels)


def test_evaluate_corruptions_rows_and_determinism():
    images, labels = labelled_set()
    rows = evaluate_corruptions(images, labels, mean_colour_model, severities=(1, 5), seed=0, batch_size=7)
    assert rows[0] == {"corruption": "clean", "severity": 0, "accuracy": 1.0, "n": len(images)}
    assert [(r["corruption"], r["severity"]) for r in rows[1:]] == [(c, s) for c in CORRUPTIONS for s in (1, 5)]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    # Severe contrast loss and heavy noise hurt a colour model; it must show in the table.
    by = {(r["corruption"], r["severity"]): r["accuracy"] for r in rows}
    assert by[("contrast", 5)] < 1.0
    again = evaluate_corruptions(images, labels, mean_colour_model, severities=(1, 5), seed=0)
    assert again == rows
    # Each (corruption, severity) has its own seed: running a subset gives the same numbers.
    subset = evaluate_corruptions(images, labels, mean_colour_model, severities=(5,), corruptions=["gaussian_noise"])
    assert subset[1]["accuracy"] == by[("gaussian_noise", 5)]


def test_evaluate_corruptions_bad_input():
    images, labels = labelled_set(2)
    with pytest.raises(ValueError, match="no images"):
        evaluate_corruptions([], np.zeros(0, int), mean_colour_model)
    with pytest.raises(ValueError, match="labels"):
        evaluate_corruptions(images, labels[:-1], mean_colour_model)
    with pytest.raises(ValueError, match="unknown corruption"):
        evaluate_corruptions(images, labels, mean_colour_model, corruptions=["snow"])
    with pytest.raises(ValueError, match="severity"):
        evaluate_corruptions(images, labels, mean_colour_model, severities=(0,))
    with pytest.raises(ValueError, match="predict_proba returned shape"):
        evaluate_corruptions(images, labels, lambda ims: np.zeros(len(ims)))


def test_summary_gate_table_chart(tmp_path):
    rows = [
        {"corruption": "clean", "severity": 0, "accuracy": 0.9, "n": 10},
        {"corruption": "blur", "severity": 1, "accuracy": 0.9, "n": 10},
        {"corruption": "blur", "severity": 5, "accuracy": 0.5, "n": 10},
        {"corruption": "noise", "severity": 1, "accuracy": 0.8, "n": 10},
        {"corruption": "noise", "severity": 5, "accuracy": 0.2, "n": 10},
    ]
    s = robustness_summary(rows)
    assert s["clean_accuracy"] == 0.9
    assert s["mean_corrupted_accuracy"] == pytest.approx(0.6)
    assert s["relative_accuracy"] == pytest.approx(0.6 / 0.9)
    assert s["worst"] == {"corruption": "noise", "severity": 5, "accuracy": 0.2}
    assert s["per_corruption"] == pytest.approx({"blur": 0.7, "noise": 0.5})
    assert s["per_severity"] == pytest.approx({1: 0.85, 5: 0.35})
    assert robustness_gate(s, 0.6)["passed"] is True
    failed = robustness_gate(s, 0.7)
    assert failed["passed"] is False and "FAILED" in failed["message"] and "noise@5" in failed["message"]
    table = robustness_table(rows)
    assert "| noise | 0.800 | 0.200 | 0.500 |" in table
    assert table.splitlines()[0] == "| corruption | severity 1 | severity 5 | mean |"
    png = robustness_chart(rows, tmp_path / "sub" / "robustness.png")
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in png.parent.iterdir()] == ["robustness.png"]


def test_summary_needs_clean_and_corrupted_rows(tmp_path):
    with pytest.raises(ValueError, match="clean"):
        robustness_summary([{"corruption": "blur", "severity": 1, "accuracy": 0.5}])
    with pytest.raises(ValueError, match="corrupted"):
        robustness_summary([{"corruption": "clean", "severity": 0, "accuracy": 0.5}])
    with pytest.raises(ValueError):
        robustness_chart([{"corruption": "clean", "severity": 0, "accuracy": 0.5}], tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- background baseline


def biased_split(background_encodes_class: bool, n_per_class: int, seed: int):
    """Images whose class is carried by the background (biased) or only by the leaf (fair)."""
    backgrounds = [(220, 215, 200), (170, 175, 185), (120, 110, 100)]
    images, labels = [], []
    for c in range(3):
        for i in range(n_per_class):
            bg = backgrounds[c] if background_encodes_class else backgrounds[0]
            images.append(leaf_photo(LEAF_COLOURS[c], bg, size=64, seed=seed + 100 * c + i))
            labels.append(c)
    return images, np.array(labels)


def test_background_baseline_detects_background_shortcut():
    train = biased_split(True, 12, seed=0)
    test = biased_split(True, 6, seed=5000)
    res = background_baseline(*train, *test, border=4, size=64)
    assert res["accuracy"] >= 0.95
    assert res["chance"] == pytest.approx(1 / 3) and res["uniform_chance"] == pytest.approx(1 / 3)
    assert res["lift"] >= 2.5
    assert res["n_train"] == 36 and res["n_test"] == 18 and res["n_classes"] == 3 and res["border"] == 4


def test_background_baseline_blind_to_the_leaf():
    # Same background for all classes, the class is only in the leaf: the baseline is near chance.
    train = biased_split(False, 12, seed=0)
    test = biased_split(False, 10, seed=5000)
    res = background_baseline(*train, *test, border=4, size=64)
    assert res["accuracy"] <= 0.6


def test_border_features_ignore_the_centre():
    a = leaf_photo(LEAF_COLOURS[0], seed=1)
    b = a.copy()
    b.paste((255, 0, 255), (16, 16, 48, 48))  # repaint the centre only
    assert np.allclose(border_features(a, 4, 64), border_features(b, 4, 64))
    c = a.copy()
    c.paste((255, 0, 255), (0, 0, 64, 2))  # repaint part of the border
    assert not np.allclose(border_features(a, 4, 64), border_features(c, 4, 64))


def test_background_baseline_bad_input():
    images, labels = biased_split(True, 3, seed=0)
    with pytest.raises(ValueError, match="non-empty"):
        background_baseline([], [], images, labels)
    with pytest.raises(ValueError, match="labels"):
        background_baseline(images, labels[:-1], images, labels)
    with pytest.raises(ValueError, match="two classes"):
        background_baseline(images, np.zeros(len(images), int), images, labels, size=64, border=4)
    with pytest.raises(ValueError, match="border"):
        background_baseline(images, labels, images, labels, border=40, size=64)


# --------------------------------------------------------------------------- non-leaf inputs


def test_non_leaf_images_are_varied_and_deterministic():
    imgs = non_leaf_images(n=2 * len(NON_LEAF_KINDS), size=48, seed=3)
    assert len(imgs) == 2 * len(NON_LEAF_KINDS)
    assert all(im.size == (48, 48) and im.mode == "RGB" for im in imgs)
    again = non_leaf_images(n=2 * len(NON_LEAF_KINDS), size=48, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, again))
    other = non_leaf_images(n=2 * len(NON_LEAF_KINDS), size=48, seed=4)
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(imgs, other))
    stds = [np.asarray(im, np.float32).reshape(-1, 3).std(0).max() for im in imgs]
    assert min(stds) == 0.0 and max(stds) > 50  # flat colours and noise are both there
    assert len({np.asarray(im).tobytes() for im in imgs}) == len(imgs)


def test_non_leaf_images_bad_args():
    with pytest.raises(ValueError):
        non_leaf_images(n=-1)
    assert non_leaf_images(n=0) == []


def test_non_leaf_photos():
    photos = non_leaf_photos(n=6, size=64, seed=0)
    if not photos:
        pytest.skip("neither scikit-learn nor matplotlib sample photos are installed")
    assert len(photos) == 6 and all(p.size == (64, 64) and p.mode == "RGB" for p in photos)
    assert np.asarray(photos[0], np.float32).std() > 10


def test_abstain_rate():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5], [0.99, 0.01]])
    assert abstain_rate(probs, 0.7) == 0.5
    assert abstain_rate(probs, 0.0) == 0.0
    assert abstain_rate(probs, 1.0) == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        abstain_rate(np.zeros((0, 2)), 0.5)
