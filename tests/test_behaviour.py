"""Behaviour tests on exported bundles, run through ONNX Runtime exactly as serving and edge run them.

* On the ``tiny_bundle`` fixture (a tiny CNN trained on solid-colour classes): the
  prediction does not change under horizontal/vertical flips or a small brightness
  change, while a change that matters (swapping colour channels) does change it.
* On the real sample (``../shared/data/plantvillage-mini``, or ``PLANTML_REAL_SAMPLE``) and
  the bundle that ``make real-sample-bundle`` trains on it (``scripts/real_sample_bundle.sh``:
  a small, pinned CNN configuration; CI builds it before ``make test``): floors on held-out
  accuracy, per-class accuracy, accuracy and coverage of the answered images at the bundle's
  abstention rule (OOD score, then confidence), and abstention on generated non-leaf images
  and on real non-leaf photos. Each floor below is a value MEASURED on that bundle minus a
  stated margin; the comment next to it gives the measurement and its command
  (docs/testing.md has the table). They are marked ``integration``.

  The bundle is ``PLANTML_EVAL_BUNDLE`` if set, else ``artifacts/real-sample/bundle`` when it
  exists. Without a sample or a bundle these tests skip, saying why, unless
  ``PLANTML_REQUIRE_REAL_SAMPLE=1`` (set by ``.ci/run``): then they fail, so CI can never
  pass without having run them. Another bundle can be held to other floors with the
  ``PLANTML_*_FLOOR`` variables.

  Held-out means the ``test`` split of the manifest the bundle was trained from (found
  through the bundle's own ``params.data.prepared_dir`` and checked against its lineage
  hash, or ``PLANTML_EVAL_MANIFEST``); the per-class floor uses all 60 images of each class
  (a regression guard: 6 held-out images per class are too few for a per-class figure).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from plantml.bundle import load_bundle
from plantml.preprocess import IMAGE_EXTENSIONS, load_image, preprocess_batch, softmax
from plantml.robustness import non_leaf_images, non_leaf_photos
from tests.conftest import TINY_CLASSES, make_leaf_image
from tests.support.real_sample import bundle_splits, missing, real_sample_bundle


def bundle_predictor(bundle_dir: str | Path, temperature: bool = True) -> tuple[Callable, list[str], float]:
    """``predict_proba(list of PIL images) -> (N, C)`` over the bundle's ONNX model, as serving does it."""
    from plantml.export import onnxruntime_runner

    bundle = load_bundle(bundle_dir)
    run = onnxruntime_runner(bundle.model_path("onnxruntime"), threads=1)
    spec = bundle.input_spec
    t = bundle.temperature if temperature else 1.0

    def predict_proba(images: list[Image.Image]) -> np.ndarray:
        out = []
        for start in range(0, len(images), 32):
            out.append(softmax(run(preprocess_batch(images[start:start + 32], spec)), t))
        return np.concatenate(out)

    return predict_proba, bundle.classes, bundle.abstain_threshold


def class_images(classes: list[str], per_class: int = 6, size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    """Fresh synthetic images of each tiny class (seeds not used in training)."""
    images, labels = [], []
    for c, name in enumerate(classes):
        for i in range(per_class):
            images.append(make_leaf_image(TINY_CLASSES[name], size=size, seed=90_000 + 100 * c + i))
            labels.append(c)
    return images, np.array(labels)


@pytest.fixture(scope="module")
def tiny(tiny_bundle):
    predict, classes, _ = bundle_predictor(tiny_bundle)
    images, labels = class_images(classes)
    preds = predict(images).argmax(1)
    # Without this, "invariance" could be a constant model: every class must be recognised.
    assert np.array_equal(preds, labels), f"tiny bundle misclassifies its own classes: {preds} vs {labels}"
    return predict, images, preds


@pytest.mark.parametrize("transpose", [Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM])
def test_flip_invariance(tiny, transpose):
    predict, images, preds = tiny
    flipped = [im.transpose(transpose) for im in images]
    assert np.array_equal(predict(flipped).argmax(1), preds)


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_small_brightness_change_invariance(tiny, factor):
    predict, images, preds = tiny
    changed = [ImageEnhance.Brightness(im).enhance(factor) for im in images]
    assert np.array_equal(predict(changed).argmax(1), preds)


def test_meaningful_change_changes_prediction(tiny):
    """Counter-check: the invariance tests can fail. Swapping R and B turns the classes' colours into others."""
    predict, images, preds = tiny
    swapped = [Image.fromarray(np.asarray(im)[..., ::-1].copy(), "RGB") for im in images]
    assert np.mean(predict(swapped).argmax(1) != preds) >= 0.3


# --------------------------------------------------------------------------- real sample (integration)

# Floors for the bundle of `make real-sample-bundle` (EfficientNet-Lite0, 128 px, <= 3 epochs,
# frozen_blocks 3, seed 42; the pinned settings are in scripts/real_sample_bundle.sh).
# Measured 2026-11-29 on a 2-core AMD EPYC (AVX2, no AVX-512) with:
#   make real-sample-bundle && PLANTML_EVAL_BUNDLE=artifacts/real-sample/bundle \
#     .venv/bin/python -m pytest -q -rP tests/test_behaviour.py -m integration
# (each test prints its measured value; -rP shows it). Margins are about 2.5 binomial
# standard errors of the measured value at its sample size (run-to-run variation of CPU
# training: thread counts, summation order, a shared machine), at least one image.
FLOORS = {
    # measured 0.9020 on the 204 test-split images (evaluate step: 0.9020 too); SE 0.021; margin 0.05
    "HELDOUT_ACCURACY": 0.85,
    # measured min 0.600 (Tomato___Target_Spot, 36/60); SE 0.063; margin 0.15 (9 images). Catches a class
    # collapsing (wrong class order, a lost folder), not small drifts.
    "CLASS_ACCURACY": 0.45,
    # measured 0.9690 on the 129 answered held-out images (calibrated for 0.99 on validation); SE 0.015; margin 0.04
    "ACCEPTED_ACCURACY": 0.93,
    # measured 0.6324 of 204 held-out images answered; SE 0.034; margin 0.08
    "COVERAGE": 0.55,
    # measured 0.667 (40/60 generated non-leaf images abstained); margin 0.117 (7 images). The README's
    # "100 %" is the benchmark bundle (224 px, full training; docs/benchmarks.md), not this small one.
    "NON_LEAF_ABSTAIN": 0.55,
    # measured 1.000 (12/12 crops of scikit-learn/matplotlib photos); margin 2 photos
    "NON_LEAF_PHOTO_ABSTAIN": 0.83,
}


def floor(name: str) -> float:
    """The floor ``name``: ``PLANTML_<NAME>_FLOOR`` from the environment, else the measured default."""
    return float(os.environ.get(f"PLANTML_{name}_FLOOR", FLOORS[name]))


@pytest.fixture(scope="module")
def real_predictions():
    sample, bundle_dir = real_sample_bundle()
    predict = abstaining_predictor(bundle_dir)
    bundle = load_bundle(bundle_dir)
    classes = bundle.classes
    index = {name: i for i, name in enumerate(classes)}
    splits = bundle_splits(bundle_dir)
    images, labels, held_out = [], [], []
    for folder in sorted(p for p in sample.iterdir() if p.is_dir()):
        if folder.name not in index:
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(load_image(f))
                labels.append(index[folder.name])
                held_out.append(splits.get(f"{folder.name}/{f.name}") == "test")
    if not images:
        missing(f"none of the bundle's classes ({', '.join(classes[:3])}, ...) is a folder of {sample}")
    if splits and not any(held_out):
        missing(f"the manifest of {bundle_dir} names no test image of {sample}")
    preds, abstained = predict(images)
    held_out = np.array(held_out) if splits else np.ones(len(images), dtype=bool)
    return {"preds": preds, "abstained": abstained, "labels": np.array(labels), "held_out": held_out,
            "classes": classes, "threshold": bundle.abstain_threshold, "predict": predict}


def abstaining_predictor(bundle_dir: str | Path) -> Callable[[list[Image.Image]], tuple[np.ndarray, np.ndarray]]:
    """``images -> (predicted class indices, abstained)`` through the edge runtime itself."""
    from edge.runtime import EdgeModel

    model = EdgeModel(bundle_dir, runtime="onnxruntime", threads=2)
    index = {name: i for i, name in enumerate(model.classes)}

    def predict(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        preds = [p for start in range(0, len(images), 32) for p in model.predict_images(images[start:start + 32], k=1)]
        return np.array([index[p["label"]] for p in preds]), np.array([p["abstained"] for p in preds], dtype=bool)

    return predict


@pytest.mark.integration
def test_held_out_accuracy_floor(real_predictions):
    r = real_predictions
    h = r["held_out"]
    acc = float(np.mean(r["preds"][h] == r["labels"][h]))
    print(f"measured: held-out top-1 accuracy {acc:.4f} on {h.sum()} test-split images (no abstention)")
    assert acc >= floor("HELDOUT_ACCURACY"), f"held-out accuracy {acc:.4f} < floor {floor('HELDOUT_ACCURACY')}"


@pytest.mark.integration
def test_per_class_accuracy_floor(real_predictions):
    r = real_predictions
    preds, labels, classes = r["preds"], r["labels"], r["classes"]
    per_class = {classes[c]: float(np.mean(preds[labels == c] == c)) for c in np.unique(labels)}
    worst = min(per_class, key=per_class.get)
    print(f"measured: lowest per-class accuracy {per_class[worst]:.4f} ({worst}), all {len(labels)} images")
    below = {k: round(v, 3) for k, v in per_class.items() if v < floor("CLASS_ACCURACY")}
    assert not below, f"classes below the accuracy floor {floor('CLASS_ACCURACY')}: {below}"


@pytest.mark.integration
def test_accepted_predictions_accuracy_and_coverage(real_predictions):
    r = real_predictions
    h = r["held_out"]
    accepted = ~r["abstained"][h]
    coverage = float(accepted.mean())
    acc = float(np.mean(r["preds"][h][accepted] == r["labels"][h][accepted])) if accepted.any() else 0.0
    print(f"measured: held-out coverage {coverage:.4f}, accuracy of answered images {acc:.4f} "
          f"(confidence threshold {r['threshold']:.4f})")
    assert coverage >= floor("COVERAGE"), f"the bundle answers only {coverage:.1%} of held-out real leaves"
    assert acc >= floor("ACCEPTED_ACCURACY"), (
        f"accuracy of accepted predictions {acc:.4f} < {floor('ACCEPTED_ACCURACY')} (coverage {coverage:.3f})")


@pytest.mark.integration
def test_non_leaf_images_abstain(real_predictions):
    rate = float(np.mean(real_predictions["predict"](non_leaf_images(n=60, size=256, seed=0))[1]))
    print(f"measured: abstained on {rate:.4f} of 60 generated non-leaf images")
    assert rate >= floor("NON_LEAF_ABSTAIN"), f"abstain rate on generated non-leaf images {rate:.2f} < floor"


@pytest.mark.integration
def test_non_leaf_photos_abstain(real_predictions):
    photos = non_leaf_photos(n=12, size=256, seed=0)
    assert len(photos) == 12, "the sample photos of scikit-learn/matplotlib (training extra) are missing"
    rate = float(np.mean(real_predictions["predict"](photos)[1]))
    print(f"measured: abstained on {rate:.4f} of 12 non-leaf photos")
    assert rate >= floor("NON_LEAF_PHOTO_ABSTAIN"), f"abstain rate on non-leaf photos {rate:.2f} < floor"
