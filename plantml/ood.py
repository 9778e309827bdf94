"""Out-of-distribution (OOD) score: "is this even a leaf like the ones I was trained on?". Torch-free.

A softmax confidence cannot answer that question: a CNN trained on PlantVillage says
"0.99 Corn rust" about a photo of a temple or a sheet of coloured noise, because the
softmax only compares the known classes with each other. The features before the
classifier do know better: inputs unlike the training images land far from every class
cluster. This module scores that distance.

Method (Lee et al., "A Simple Unified Framework for Detecting Out-of-Distribution
Samples", NeurIPS 2018): class-conditional Gaussians with one shared covariance fitted
on the penultimate features of the **training** split; the score is the Mahalanobis
distance to the nearest class mean. Two choices keep it robust and small:

* **Shrinkage** of the covariance towards a scaled identity, with the Ledoit-Wolf
  optimal coefficient (no knob tuned on OOD data): with a few hundred images and 1280
  feature dimensions the raw covariance is singular.
* **Low rank**: the ``components`` leading eigen-directions keep their own variance and
  the remaining directions share one (their mean eigenvalue). For EfficientNet-Lite0
  that is 1280x64 + 18x1280 numbers (~0.4 MB) instead of a 1280x1280 precision matrix
  (6.5 MB, half the size of the model itself), and the score is two small matrix
  products, so it runs *inside* the exported graph (output ``ood_score``) and serving
  and edge get it for free.

The score is reported as an RMS distance, ``sqrt(d^2 / D)`` with ``D`` the feature
dimension, so typical training images score about 1. The threshold is the
``acceptance`` quantile of the **validation** scores (e.g. 0.95: 5 % of real validation
leaves are turned away); no OOD example is used to pick it.

:func:`decide` is the one abstention rule shared by evaluation, serving and edge:
abstain when the input looks out of distribution, or else when the calibrated top
confidence is below the confidence threshold.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Name of the second output of an exported model that carries the OOD score.
OOD_OUTPUT = "ood_score"
#: Reasons an input was abstained on, as reported by serving and edge.
REASON_OOD = "out_of_distribution"
REASON_LOW_CONFIDENCE = "low_confidence"


@dataclass(frozen=True)
class FeatureDetector:
    """A fitted low-rank, shrunk class-conditional Gaussian model of the training features.

    Attributes:
        means: ``(C, D)`` class means.
        basis: ``(D, K)`` leading eigenvectors of the shrunk shared covariance.
        variances: ``(K,)`` their (shrunk) variances.
        rest_variance: the variance shared by the remaining ``D - K`` directions.
        shrinkage: Ledoit-Wolf coefficient used (0: raw covariance, 1: scaled identity).
        n_fit: number of training feature vectors fitted.
    """

    means: np.ndarray
    basis: np.ndarray
    variances: np.ndarray
    rest_variance: float
    shrinkage: float
    n_fit: int

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def components(self) -> int:
        return int(self.basis.shape[1])

    def score(self, features: np.ndarray, chunk_elements: int = 4_000_000) -> np.ndarray:
        """RMS Mahalanobis distance of each feature vector to its nearest class mean.

        Args:
            features: ``(N, D)`` penultimate features.
            chunk_elements: bound on the temporary residual array (float64 elements, 32 MB).

        Returns:
            ``(N,)`` float64 scores (higher = less like the training data).
        """
        f = np.asarray(features)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must have shape (N, {self.dim}), got {f.shape}")
        # Chunks keep the (chunk, C, D) residual small: for N = 10,000 test images, 38
        # classes and D = 1280 the whole array would be 3.9 GB in float64.
        step = max(1, chunk_elements // max(1, self.means.shape[0] * self.dim))
        out = [self._score_chunk(f[i:i + step]) for i in range(0, len(f), step)]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)

    def _score_chunk(self, features: np.ndarray) -> np.ndarray:
        f = np.asarray(features, dtype=np.float64)
        # d2[n, c] = sum_k (r.v_k)^2 / var_k + (|r|^2 - sum_k (r.v_k)^2) / rest, r = f_n - mu_c
        # (orthonormal v_k). The residual is formed explicitly: expanding
        # |f|^2 - 2 f.mu + |mu|^2 instead cancels catastrophically in float32. The same
        # algebra as the torch head in plantml.models.scored, so the two agree.
        resid = f[:, None, :] - self.means[None, :, :].astype(np.float64)      # (n, C, D)
        proj_sq = (resid @ self.basis.astype(np.float64)) ** 2                  # (n, C, K)
        in_span = (proj_sq / self.variances).sum(-1)
        rest = np.maximum((resid ** 2).sum(-1) - proj_sq.sum(-1), 0.0) / self.rest_variance
        return np.sqrt(np.maximum((in_span + rest).min(1), 0.0) / self.dim)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The detector as plain arrays (for ``np.savez``)."""
        return {
            "means": self.means, "basis": self.basis, "variances": self.variances,
            "rest_variance": np.array(self.rest_variance), "shrinkage": np.array(self.shrinkage),
            "n_fit": np.array(self.n_fit),
        }

    def to_bytes(self) -> bytes:
        """The detector as ``.npz`` bytes (to publish in the run's store)."""
        buf = io.BytesIO()
        np.savez(buf, **self.to_arrays())
        return buf.getvalue()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the detector to an ``.npz`` file atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **self.to_arrays())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str] | Any) -> "FeatureDetector":
        """Read a detector written by :meth:`save` (a path or a binary file object).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file lacks a field.
        """
        with np.load(path if hasattr(path, "read") else Path(path)) as z:
            missing = {"means", "basis", "variances", "rest_variance", "shrinkage", "n_fit"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not an OOD detector file (missing {', '.join(sorted(missing))})")
            return cls(means=z["means"], basis=z["basis"], variances=z["variances"],
                       rest_variance=float(z["rest_variance"]), shrinkage=float(z["shrinkage"]),
                       n_fit=int(z["n_fit"]))


def fit_feature_detector(features: np.ndarray, labels: np.ndarray, n_classes: int,
                         components: int = 64) -> FeatureDetector:
    """Fit the detector on training-split features.

    Args:
        features: ``(N, D)`` penultimate features of training images (no augmentation).
        labels: ``(N,)`` class indices.
        n_classes: number of classes; every class needs at least one image.
        components: leading eigen-directions kept with their own variance (capped at ``D``).

    Raises:
        ValueError: on malformed input, a class without images, or fewer than two images.
    """
    from sklearn.covariance import ledoit_wolf_shrinkage

    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if f.ndim != 2 or f.shape[0] != y.shape[0]:
        raise ValueError(f"features (N, D) and labels (N,) must match, got {f.shape} and {y.shape}")
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise ValueError(f"need at least two feature vectors of dimension >= 1, got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or infinite values")
    if components < 1:
        raise ValueError(f"components must be >= 1, got {components}")
    counts = np.bincount(y.astype(np.int64), minlength=n_classes)
    if len(counts) > n_classes or (counts == 0).any():
        raise ValueError(f"every one of the {n_classes} classes needs training features; counts {counts.tolist()}")
    means = np.stack([f[y == c].mean(0) for c in range(n_classes)])
    resid = f - means[y]
    dim = f.shape[1]
    cov = resid.T @ resid / len(resid)
    scale = float(np.trace(cov) / dim)
    if scale <= 0:
        raise ValueError("features do not vary within classes: cannot fit an OOD detector")
    shrinkage = float(ledoit_wolf_shrinkage(resid, assume_centered=True)) if dim > 1 else 0.0
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    shrunk = (1.0 - shrinkage) * np.clip(eigvals[order], 0.0, None) + shrinkage * scale
    k = min(int(components), dim)
    rest = float(shrunk[k:].mean()) if k < dim else float(shrunk[-1])
    # A floor keeps the score finite when the features are (nearly) rank-deficient.
    floor = 1e-6 * scale
    detector = FeatureDetector(
        means=means.astype(np.float32), basis=eigvecs[:, order[:k]].astype(np.float32),
        variances=np.maximum(shrunk[:k], floor).astype(np.float32), rest_variance=max(rest, floor),
        shrinkage=shrinkage, n_fit=int(f.shape[0]),
    )
    log.info("OOD detector: %d features of dim %d, %d classes, %d components, Ledoit-Wolf shrinkage %.3f",
             f.shape[0], dim, n_classes, k, shrinkage)
    return detector


def choose_ood_threshold(val_scores: np.ndarray, acceptance: float) -> float:
    """The score below which ``acceptance`` of the validation images fall.

    Args:
        val_scores: OOD scores of the validation split (in-distribution by construction).
        acceptance: share of in-distribution inputs to accept, in ``(0, 1]``.

    Raises:
        ValueError: on empty or non-finite scores, or an acceptance out of range.
    """
    s = np.asarray(val_scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError("val_scores must be a non-empty 1-D array of finite scores")
    if not 0.0 < float(acceptance) <= 1.0:
        raise ValueError(f"acceptance must be in (0, 1], got {acceptance}")
    return float(np.quantile(s, float(acceptance), method="higher"))


def decide(probs: np.ndarray, ood_scores: np.ndarray | None, confidence_threshold: float,
           ood_threshold: float | None) -> tuple[np.ndarray, list[str | None]]:
    """Which inputs to abstain on, and why. The rule serving, edge and evaluation share.

    An input is abstained on when its OOD score is above ``ood_threshold`` (reason
    ``out_of_distribution``), or else when its top calibrated probability is below
    ``confidence_threshold`` (reason ``low_confidence``). Without OOD scores or threshold
    only the confidence rule applies.

    Args:
        probs: ``(N, C)`` calibrated probabilities.
        ood_scores: ``(N,)`` scores, or ``None``.
        confidence_threshold: minimum top probability to answer.
        ood_threshold: maximum OOD score to answer, or ``None``.

    Returns:
        ``(abstained (N,) bool, reasons)`` with ``None`` for answered inputs.
    """
    probs = np.asarray(probs)
    low = probs.max(axis=1) < float(confidence_threshold)
    if ood_scores is not None and ood_threshold is not None:
        far = np.asarray(ood_scores, dtype=np.float64).reshape(-1) > float(ood_threshold)
    else:
        far = np.zeros(len(probs), dtype=bool)
    reasons = [REASON_OOD if o else REASON_LOW_CONFIDENCE if c else None for o, c in zip(far, low)]
    return far | low, reasons


def rejection_rate(scores: np.ndarray, threshold: float) -> float:
    """Share of ``scores`` above ``threshold`` (NaN for no scores)."""
    s = np.asarray(scores, dtype=np.float64)
    return float(np.mean(s > threshold)) if s.size else float("nan")


def score_histogram(groups: dict[str, np.ndarray], threshold: float, path: str | os.PathLike[str]) -> Path:
    """Overlaid histograms of OOD scores per group with the threshold marked (for the card).

    Args:
        groups: ``{"validation leaves": scores, "generated non-leaves": scores, ...}``.
        threshold: the OOD threshold.
        path: PNG to write (atomically).
    """
    from plantml.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    finite = [np.asarray(v, dtype=float) for v in groups.values() if len(v)]
    hi = max([float(np.quantile(v, 0.99)) for v in finite] + [threshold * 1.5])
    bins = np.linspace(0.0, hi, 40)
    for (name, scores), colour in zip(groups.items(), ("tab:green", "tab:blue", "tab:red", "tab:orange", "tab:purple")):
        s = np.clip(np.asarray(scores, dtype=float), 0, hi)
        if s.size:
            ax.hist(s, bins=bins, alpha=0.5, color=colour, density=True,
                    label=f"{name} (n={s.size}, {rejection_rate(s, threshold):.0%} rejected)")
    ax.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax.set_xlabel("OOD score (RMS Mahalanobis distance to the nearest class)")
    ax.set_ylabel("density")
    ax.set_title("Out-of-distribution score")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def summary_dict(detector: FeatureDetector, threshold: float, acceptance: float,
                 rates: dict[str, float]) -> dict[str, Any]:
    """What the report, the card and the bundle metadata say about the detector."""
    return {
        "method": "mahalanobis_lowrank_ledoit_wolf",
        "output": OOD_OUTPUT,
        "threshold": float(threshold),
        "acceptance": float(acceptance),
        "components": detector.components,
        "feature_dim": detector.dim,
        "shrinkage": float(detector.shrinkage),
        "n_fit": detector.n_fit,
        "rejection_rate": {k: float(v) for k, v in rates.items()},
    }
