"""Training-time augmentation (Albumentations, imported inside the functions that build it)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from plantml.backdrop import replace_background


def augmentation_factory(size: int, background_p: float = 0.0) -> Any:
    """``seed -> train_augmentation(size, seed, background_p)``, picklable for loader worker processes."""
    return functools.partial(train_augmentation, size, background_p=background_p)


def _background_transform(p: float) -> Any:
    """An Albumentations transform putting plain-backdrop leaves on random backgrounds (:mod:`plantml.backdrop`)."""
    import albumentations as A

    class ReplaceBackground(A.ImageOnlyTransform):
        """Albumentations wrapper of :func:`plantml.backdrop.replace_background`."""

        def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
            """The image with its plain backdrop replaced (unchanged when it has none)."""
            return replace_background(img, self.random_generator)

    return ReplaceBackground(p=p)


def train_augmentation(size: int, seed: int | None = None, background_p: float = 0.0) -> Any:
    """Albumentations pipeline for training (uint8 HWC in, uint8 HWC out).

    Leaves have no canonical orientation, so all flips and 90° turns are label-preserving;
    mild crops, colour jitter and blur mimic framing, lighting and focus differences.
    With ``background_p > 0``, that share of plain-backdrop (lab) photos first get their
    backdrop replaced by a random cluttered one, so "plain backdrop" stops being a cue
    (field photos have no plain backdrop and pass unchanged).
    """
    import albumentations as A

    first = [_background_transform(background_p)] if background_p > 0 else []
    return A.Compose([
        *first,
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.02, p=0.7),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
    ], seed=seed)
