"""The background-shortcut check and the plain-backdrop leaf mask, on synthetic images.

Behaviour test: a model that answers "apple" whenever the background is cluttered (the
shortcut a lab+orchard training set invites) must be caught; a model that looks at the
leaf must pass. If the check stopped pasting leaves onto field backgrounds, or measured
the wrong classes, the first assertion would fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from plantml import backdrop
from plantml.robustness import shortcut_check

CLASSES = ["Apple___scab", "Apple___healthy", "Tomato___healthy", "Grape___rot"]
LEAF_RGB = {0: (60, 60, 150), 1: (90, 170, 60), 2: (40, 150, 40), 3: (130, 70, 30)}
APPLE = [0, 1]


def lab_photo(label: int, seed: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A leaf (ellipse) of the class colour on a plain, smoothly shaded grey backdrop; and its true mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    shade = 150 + 30 * xx - 20 * yy  # lab backdrops are plain up to a light gradient
    img = np.repeat(shade[..., None], 3, axis=2) + rng.normal(0, 3, size=(size, size, 3))
    m = Image.new("L", (size, size))
    cx, cy = size / 2 + rng.integers(-8, 9), size / 2 + rng.integers(-8, 9)
    ImageDraw.Draw(m).ellipse([cx - 28, cy - 20, cx + 28, cy + 20], fill=255)
    mask = np.asarray(m) > 0
    img[mask] = np.array(LEAF_RGB[label]) + rng.normal(0, 8, size=(int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def field_photo(seed: int, size: int = 128) -> np.ndarray:
    """Orchard-like clutter: random blobs of foliage, sky and soil colours."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(20, 230, size=(12, 12, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.NEAREST), dtype=np.float32)
    return np.clip(img + rng.normal(0, 20, size=img.shape), 0, 255).astype(np.uint8)


def _leaf_colour_class(arr: np.ndarray) -> int:
    centre = arr[arr.shape[0] // 2 - 6: arr.shape[0] // 2 + 6, arr.shape[1] // 2 - 6: arr.shape[1] // 2 + 6]
    colour = centre.reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(colour - np.array(c)).sum() for c in LEAF_RGB.values()]))


def honest_model(images: list[Image.Image]) -> np.ndarray:
    """Looks at the leaf only."""
    out = np.full((len(images), len(CLASSES)), 0.01)
    for i, im in enumerate(images):
        out[i, _leaf_colour_class(np.asarray(im))] = 0.97
    return out / out.sum(1, keepdims=True)


def shortcut_model(images: list[Image.Image]) -> np.ndarray:
    """Cluttered background => Apple___healthy, whatever the leaf; else looks at the leaf."""
    out = honest_model(images)
    for i, im in enumerate(images):
        if not backdrop.has_plain_backdrop(np.asarray(im)):
            out[i] = 0.01
            out[i, 1] = 0.97
    return out / out.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def data():
    labs = [lab_photo(label, seed=100 * label + i) for label in range(4) for i in range(10)]
    return ([img for img, _ in labs], [label for label in range(4) for _ in range(10)],
            [field_photo(7000 + i) for i in range(6)])


def test_the_shortcut_is_caught_and_an_honest_model_passes(data):
    images, labels, fields = data
    caught = shortcut_check(shortcut_model, images, labels, fields, APPLE, CLASSES, seed=1)
    honest = shortcut_check(honest_model, images, labels, fields, APPLE, CLASSES, seed=1)
    # only the 20 non-apple leaves are pasted; every one of them gets a mask here
    assert caught["n"] == honest["n"] == 20 and caught["n_no_mask"] == 0
    assert caught["target_rate"] == 1.0 and caught["target_rate_original"] == 0.0
    assert caught["shortcut_lift"] == 1.0 and caught["accuracy_pasted"] == 0.0
    assert caught["per_class"]["Tomato___healthy"]["target_rate"] == 1.0
    assert caught["examples"][0]["predicted"] == "Apple___healthy"
    assert honest["target_rate"] == 0.0 and honest["accuracy_pasted"] == 1.0
    assert caught["target_classes"] == ["Apple___scab", "Apple___healthy"]


def test_shortcut_check_is_deterministic_and_capped(data):
    images, labels, fields = data
    a = shortcut_check(shortcut_model, images, labels, fields, APPLE, CLASSES, max_images=5, seed=3)
    b = shortcut_check(shortcut_model, images, labels, fields, APPLE, CLASSES, max_images=5, seed=3)
    assert a == b and a["n"] == 5


def test_shortcut_check_refuses_what_it_cannot_measure(data):
    images, labels, fields = data
    with pytest.raises(ValueError, match="no field photos"):
        shortcut_check(honest_model, images, labels, [], APPLE, CLASSES)
    with pytest.raises(ValueError, match="outside the field classes"):
        shortcut_check(honest_model, images[:10], labels[:10], fields, APPLE, CLASSES)


def test_leaf_mask_finds_the_leaf_on_a_plain_backdrop():
    for seed in range(5):
        img, truth = lab_photo(2, seed=seed)
        mask = backdrop.leaf_mask(img)
        assert mask is not None
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.85, iou


def test_cluttered_photos_have_no_plain_backdrop():
    assert all(backdrop.leaf_mask(field_photo(s)) is None for s in range(5))
    assert backdrop.has_plain_backdrop(lab_photo(0, 1)[0])


def test_replace_background_keeps_the_leaf_and_changes_the_backdrop():
    img, truth = lab_photo(3, seed=9)
    out = backdrop.replace_background(img, np.random.default_rng(0))
    # the leaf's interior (away from the feathered edge) is untouched, the backdrop is not
    core = np.asarray(Image.fromarray((truth * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(7))) > 0
    assert core.any() and np.abs(out[core].astype(int) - img[core]).mean() < 3
    assert np.abs(out[~truth].astype(int) - img[~truth]).mean() > 20
    field = field_photo(1)
    assert np.array_equal(backdrop.replace_background(field, np.random.default_rng(0)), field)


def test_augmentation_with_background_replacement_runs_and_keeps_shape():
    pytest.importorskip("albumentations")
    from plantml.data import augmentation_factory

    aug = augmentation_factory(64, background_p=1.0)(5)
    img, _ = lab_photo(1, seed=2)
    out = aug(image=img)["image"]
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_evaluation_runs_the_check_on_a_two_domain_run(tmp_path):
    """The pipeline picks lab test leaves of non-field crops and field test photos from the shards."""
    from plantml.config import params_from_dict
    from plantml.data import DataSource, PixelStaging, prepare_dataset, write_shards
    from plantml.pipeline import _shortcut_report

    lab, field = tmp_path / "lab", tmp_path / "field"
    for label, name in enumerate(CLASSES):
        (lab / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(lab_photo(label, seed=300 * label + i)[0]).save(lab / name / f"{i}.png")
    for name in CLASSES[:2]:
        (field / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(field_photo(900 + 10 * len(name) + i, size=96)).save(field / name / f"{i}.png")
    staging = PixelStaging(96)
    try:
        rows, summary = prepare_dataset([DataSource("lab", str(lab)), DataSource("field", str(field))],
                                        (0.5, 0.2, 0.3), progress=False, staging=staging)
        rows, index = write_shards(rows, summary, staging, str(tmp_path / "s"), 16, progress=False)
    finally:
        staging.close()
    params = params_from_dict({})
    got = _shortcut_report(params, shortcut_model, index, rows, index.classes)
    assert got["applicable"] and got["target_classes"] == sorted(CLASSES[:2])
    assert got["n"] == 6 and got["target_rate"] == 1.0  # 3 test leaves of each of the 2 non-apple classes
    assert _shortcut_report(params, honest_model, index, rows, index.classes)["target_rate"] == 0.0
    one_domain = [r for r in rows if r.domain == "lab"]
    assert not _shortcut_report(params, shortcut_model, index, one_domain, index.classes)["applicable"]
