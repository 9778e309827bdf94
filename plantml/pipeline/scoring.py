"""Model passes over the shards: logits, labels, domains and OOD scores, batch by batch.

torch and :mod:`plantml.loader` (which imports torch at import time) are imported inside
the functions: importing the pipeline for its light stages (``prepare``, ``repo_path``)
must not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from plantml import ood
from plantml import shards as sh
from plantml.config import Params
from plantml.data import ManifestRow
from plantml.models.scored import features_and_logits
from plantml.pipeline.samples import domains_of, load_manifest, subset_samples
from plantml.preprocess import InputSpec, preprocess_batch, softmax

#: ``list[PIL image] -> probabilities [N, C]``, what the robustness checks call.
PredictProba = Callable[[Sequence[Any]], np.ndarray]


@dataclass
class SplitScores:
    """One model's pass over a split: everything later stages need, nothing per-pixel."""

    logits: np.ndarray
    labels: np.ndarray
    ood_scores: np.ndarray | None
    domains: np.ndarray | None = None   # each image's domain (from the manifest), object array


def torch_proba(model: Any, spec: InputSpec, temperature: float = 1.0) -> PredictProba:
    """``list[PIL] -> probabilities`` over a torch model, through the shared preprocessing.

    Args:
        model: a torch classifier (logits out).
        spec: the model's input specification.
        temperature: the calibration temperature applied to the logits.

    Returns:
        The prediction function.
    """
    import torch

    def predict(images: Sequence[Any]) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(preprocess_batch(images, spec))).numpy()
        return softmax(logits, temperature)

    return predict


def torch_logits(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The logits of a torch model over a normalised batch ``x``, run ``batch_size`` images at a time.

    Args:
        model: a torch classifier.
        x: normalised images ``[N, 3, H, W]``.
        batch_size: images per forward pass.
    """
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                               for i in range(0, len(x), batch_size)])


def score_split(model: Any, index: sh.ShardIndex, split: str, spec: InputSpec, detector: Any = None,
                batch_size: int = 64, rows: Sequence[ManifestRow] | None = None) -> SplitScores:
    """Stream a split through ``model``: logits, labels, domains and (with ``detector``) OOD scores.

    Features are scored batch by batch and dropped, so memory holds ``N x classes``
    numbers, not ``N x 1280`` features or the images.

    Args:
        model: the torch classifier.
        index: the prepared shards.
        split: ``val`` or ``test`` (any split name of the index).
        spec: the model's input specification.
        detector: the model's OOD detector (``None``: no OOD scores).
        batch_size: images per forward pass.
        rows: the manifest (read from the store when not given), for each image's domain.

    Returns:
        The split's :class:`SplitScores`.
    """
    import torch

    from plantml.loader import iterate_split  # torch at import: see the module docstring

    logits, labels, scores, keys = [], [], [], []
    model = model.eval()
    with torch.inference_mode():
        for x, y, k in iterate_split(index, split, spec, batch_size, with_key=True):
            keys += list(k)
            feats, lg = features_and_logits(model, x)
            logits.append(lg.float().numpy())
            labels.append(y.numpy())
            if detector is not None:
                scores.append(detector.score(feats.float().numpy()))
    n_classes = len(index.classes)
    return SplitScores(np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
                       np.concatenate(labels) if labels else np.zeros(0, np.int64),
                       np.concatenate(scores) if detector is not None and scores else None,
                       domains_of(keys, rows if rows is not None else load_manifest(index)))


def fit_detector(params: Params, model: Any, index: sh.ShardIndex, spec: InputSpec) -> Any:
    """The model's OOD detector, fitted on a random training subset (``calibration.ood_max_fit_images``).

    Args:
        params: the run's parameters.
        model: the torch classifier.
        index: the prepared shards.
        spec: the model's input specification.

    Returns:
        A fitted :class:`plantml.ood.FeatureDetector`.
    """
    import torch

    from plantml.loader import to_model_input  # torch at import: see the module docstring

    c = params.calibration
    samples = subset_samples(index, "train", c.ood_max_fit_images, params.data.seed)
    feats = []
    model = model.eval()
    with torch.inference_mode():
        for i in range(0, len(samples), 64):
            chunk = samples[i:i + 64]
            x = to_model_input(torch.from_numpy(np.stack([s.pixels for s in chunk])), spec)
            feats.append(features_and_logits(model, x)[0].float().numpy())
    labels = np.array([s.label for s in samples])
    return ood.fit_feature_detector(np.concatenate(feats), labels, len(index.classes), c.ood_components)
