"""A classifier with its out-of-distribution score in the same graph.

:class:`ScoredClassifier` wraps a trained model and a fitted
:class:`plantml.ood.FeatureDetector`; its forward returns ``(logits, ood_score)``. The
export step writes *this* module to ONNX/OpenVINO, so every runtime that runs the bundle
(serving, edge, a third-party KServe server) gets the score as a second output named
``ood_score`` without extracting features itself. The score's algebra matches
:meth:`plantml.ood.FeatureDetector.score` (numpy), which the tests check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from plantml.preprocess import normalize_batch


def split_head(model: Any) -> tuple[Any, Any]:
    """``(features_fn, classifier)``: the model up to its penultimate features, and its last layer.

    Works for timm models (``forward_features`` + ``forward_head(pre_logits=True)`` +
    ``get_classifier()``: EfficientNet, MobileNet, VisionTransformer) and for a plain
    ``nn.Sequential`` ending in a linear layer (the tiny test CNN).

    Raises:
        TypeError: for a model whose head cannot be found.
    """
    from torch import nn

    if hasattr(model, "forward_features") and hasattr(model, "forward_head") and hasattr(model, "get_classifier"):
        return (lambda x: model.forward_head(model.forward_features(x), pre_logits=True)), model.get_classifier()
    if isinstance(model, nn.Sequential) and isinstance(model[-1], nn.Linear):
        body = model[:-1]
        return body, model[-1]
    raise TypeError(f"cannot find the penultimate features of a {type(model).__name__}")


def features_and_logits(model: Any, x: Any) -> tuple[Any, Any]:
    """Penultimate features and logits of a batch in one forward pass (torch tensors)."""
    features_fn, classifier = split_head(model)
    features = features_fn(x)
    return features, classifier(features)


def _scored_classifier_class() -> type:
    import torch
    from torch import nn

    class ScoredClassifier(nn.Module):
        """``x -> (logits, ood_score)``; the detector's arrays are constant buffers."""

        #: names the ONNX export gives the two outputs (see plantml.export.export_onnx)
        output_names = ("logits", "ood_score")

        def __init__(self, model: nn.Module, detector: Any) -> None:
            super().__init__()
            self.model = model
            means = torch.as_tensor(np.asarray(detector.means, dtype=np.float32))
            basis = torch.as_tensor(np.asarray(detector.basis, dtype=np.float32))
            self.register_buffer("means", means)                              # (C, D)
            self.register_buffer("basis", basis)                              # (D, K), orthonormal columns
            self.register_buffer("inv_var", 1.0 / torch.as_tensor(np.asarray(detector.variances, np.float32)))
            self.inv_rest = float(1.0 / detector.rest_variance)
            self.inv_dim = float(1.0 / detector.dim)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features, logits = features_and_logits(self.model, x)
            # Explicit residuals (N, C, D): expanding |f - mu|^2 would cancel in float32.
            resid = features.unsqueeze(1) - self.means.unsqueeze(0)
            proj = resid @ self.basis                                           # (N, C, K)
            proj_sq = proj * proj
            outside = torch.clamp((resid * resid).sum(-1) - proj_sq.sum(-1), min=0.0)
            d2 = (proj_sq * self.inv_var).sum(-1) + outside * self.inv_rest
            return logits, torch.sqrt(torch.amin(d2, dim=1) * self.inv_dim)

    return ScoredClassifier


def scored_classifier(model: Any, detector: Any) -> Any:
    """Wrap ``model`` (eval mode) so that it also returns the OOD score of ``detector``."""
    return _scored_classifier_class()(model.eval(), detector).eval()


def extract_features(model: Any, x: np.ndarray, spec: Any = None,
                     batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """``(features, logits)`` as numpy, in chunks.

    Args:
        x: a preprocessed ``NCHW`` float batch, or, with ``spec``, ``uint8 [N,H,W,3]`` images
            already resized, normalised chunk by chunk (no float copy of the whole set).
        spec: the :class:`~plantml.preprocess.InputSpec` for ``uint8`` images.
    """
    import torch

    feats, logits = [], []
    model = model.eval()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            chunk = normalize_batch(x[i:i + batch_size], spec) if spec is not None else x[i:i + batch_size]
            f, lo = features_and_logits(model, torch.from_numpy(np.ascontiguousarray(chunk)))
            feats.append(f.float().numpy())
            logits.append(lo.float().numpy())
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(feats), np.concatenate(logits)
