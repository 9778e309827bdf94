"""The background shortcut between domains.

Field photos exist for some crops only (apple, in the shared sets), so a model can learn
"orchard background => apple". Lab leaves of the *other* crops, cut out with the
plain-backdrop mask (:mod:`plantml.backdrop`) and pasted onto backgrounds cut from field
photos, must not be predicted as a field crop; the share that is, next to the same
leaves on their own backdrop, measures the shortcut.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

from plantml.backdrop import leaf_mask, paste_leaf
from plantml.robustness.predict import PredictProba, predict_in_batches

log = logging.getLogger(__name__)


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
    labels, candidates = _non_target_leaves(field_images, targets, lab_labels, len(lab_images))
    rng = np.random.default_rng(seed)
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    pairs = _paste_onto_field(lab_images, field_images, order, max_images, rng)
    if not pairs.kept:
        return _no_leaf_result([classes[t] for t in targets], pairs.n_no_mask)
    out = _shortcut_rates(predict_proba, pairs, labels[pairs.kept], targets, classes)
    log.info("shortcut check: %d non-field lab leaves on field backgrounds -> %.3f predicted as %s (own backdrop "
             "%.3f); accuracy %.3f -> %.3f", out["n"], out["target_rate"], "/".join(out["target_classes"][:2]) +
             ("..." if len(targets) > 2 else ""), out["target_rate_original"], out["accuracy_original"],
             out["accuracy_pasted"])
    return out


@dataclass
class _Pasted:
    """Lab leaves pasted onto field backgrounds, beside the same leaves on their own backdrop."""

    pasted: list[Image.Image] = field(default_factory=list)
    originals: list[Image.Image] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # indices into the lab images
    n_no_mask: int = 0


def _non_target_leaves(field_images: Sequence[np.ndarray], targets: list[int], lab_labels: Sequence[int],
                       n_lab: int) -> tuple[np.ndarray, list[int]]:
    """``(the lab labels as an array, indices of the lab leaves outside the field classes)``.

    Raises:
        ValueError: with no field image, no target class, or no lab leaf outside the targets.
    """
    if not field_images:
        raise ValueError("shortcut_check: no field photos to cut backgrounds from")
    if not targets:
        raise ValueError("shortcut_check: no target (field) classes")
    labels = np.asarray(lab_labels, dtype=int)
    candidates = [i for i in range(n_lab) if labels[i] not in targets]
    if not candidates:
        raise ValueError("shortcut_check: no lab leaf of a class outside the field classes")
    return labels, candidates


def _paste_onto_field(lab_images: Sequence[np.ndarray], field_images: Sequence[np.ndarray], order: list[int],
                      max_images: int, rng: np.random.Generator) -> _Pasted:
    """Up to ``max_images`` leaves in ``order``, each on a random field background (no mask: skipped, counted)."""
    out = _Pasted()
    for i in order:
        if len(out.kept) >= max_images:
            break
        img = np.asarray(lab_images[i], dtype=np.uint8)
        mask = leaf_mask(img)
        if mask is None:
            out.n_no_mask += 1
            continue
        bg = field_background(np.asarray(field_images[int(rng.integers(len(field_images)))]), img.shape[0], rng)
        out.pasted.append(Image.fromarray(paste_leaf(img, mask, bg)))
        out.originals.append(Image.fromarray(img))
        out.kept.append(i)
    return out


def _no_leaf_result(target_names: list[str], n_no_mask: int) -> dict[str, Any]:
    """The result when no leaf could be cut out: every rate NaN."""
    return {"target_classes": target_names, "n": 0, "n_no_mask": n_no_mask,
            "target_rate": float("nan"), "target_rate_original": float("nan"), "shortcut_lift": float("nan"),
            "accuracy_pasted": float("nan"), "accuracy_original": float("nan"), "per_class": {}, "examples": []}


def _shortcut_rates(predict_proba: PredictProba, pairs: _Pasted, y: np.ndarray, targets: list[int],
                    classes: Sequence[str]) -> dict[str, Any]:
    """Predict the pasted and the original leaves; the shares called a target class, overall and per class."""
    pred_pasted = predict_in_batches(predict_proba, pairs.pasted, len(classes), 32).argmax(1)
    pred_original = predict_in_batches(predict_proba, pairs.originals, len(classes), 32).argmax(1)
    hit_pasted, hit_original = np.isin(pred_pasted, targets), np.isin(pred_original, targets)
    per_class = {}
    for c in sorted(set(y.tolist())):
        m = y == c
        per_class[classes[c]] = {"n": int(m.sum()), "target_rate": float(hit_pasted[m].mean()),
                                 "target_rate_original": float(hit_original[m].mean())}
    examples = [{"class": classes[int(y[j])], "predicted": classes[int(pred_pasted[j])]}
                for j in np.flatnonzero(hit_pasted)[:10]]
    return {
        "target_classes": [classes[t] for t in targets],
        "n": int(len(pairs.kept)),
        "n_no_mask": int(pairs.n_no_mask),
        "target_rate": float(hit_pasted.mean()),
        "target_rate_original": float(hit_original.mean()),
        "shortcut_lift": float(hit_pasted.mean() - hit_original.mean()),
        "accuracy_pasted": float(np.mean(pred_pasted == y)),
        "accuracy_original": float(np.mean(pred_original == y)),
        "per_class": per_class,
        "examples": examples,
    }
