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
probabilities (:mod:`~plantml.robustness.predict`), so the same code runs over torch (in
the flow) or ONNX Runtime / OpenVINO (on an exported bundle).

One job per module: :mod:`~plantml.robustness.corruptions` (the corruptions),
:mod:`~plantml.robustness.sweep` (the sweep and its summary, gate, table and chart),
:mod:`~plantml.robustness.background` (the border-only baseline),
:mod:`~plantml.robustness.shortcut` (the domain shortcut) and
:mod:`~plantml.robustness.non_leaf` (non-leaf inputs). Every public name is re-exported
here, so ``from plantml.robustness import X`` keeps working.
"""

from __future__ import annotations

from plantml.robustness.background import background_baseline, border_features
from plantml.robustness.corruptions import (CORRUPTIONS, Corruption, brightness, contrast, corrupt, crop,
                                            gaussian_blur, gaussian_noise, jpeg_quality, rotation)
from plantml.robustness.non_leaf import NON_LEAF_KINDS, abstain_rate, non_leaf_images, non_leaf_photos
from plantml.robustness.predict import PredictProba
from plantml.robustness.shortcut import field_background, shortcut_check
from plantml.robustness.sweep import (evaluate_corruptions, robustness_chart, robustness_gate, robustness_summary,
                                      robustness_table)

__all__ = [
    "CORRUPTIONS", "NON_LEAF_KINDS", "Corruption", "PredictProba", "abstain_rate", "background_baseline",
    "border_features", "brightness", "contrast", "corrupt", "crop", "evaluate_corruptions", "field_background",
    "gaussian_blur", "gaussian_noise", "jpeg_quality", "non_leaf_images", "non_leaf_photos", "robustness_chart",
    "robustness_gate", "robustness_summary", "robustness_table", "rotation", "shortcut_check",
]
