"""The export-time drift reference: what the model saw on its test split.

:func:`reference_stats_step` is an ``extra_steps`` callable for
:func:`plantml.export.export_bundle`. It writes ``reference_stats.csv`` into the bundle:
one row per test-split image with the :mod:`plantml.imagestats` columns, the champion's
``confidence`` and predicted ``label``, and optionally ``emb_pca_0..k`` (PCA of an
embedding; the projection is stored in ``reference_pca.npz``). :func:`load_reference`
reads it back for the analysis. Torch-free; pandas is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from plantml.drift.schema import (CATEGORICAL_COLUMNS, EMBEDDING_PREFIX, LOG_REQUIRED_KEYS, DriftError,
                                  ReferenceMismatchError)
from plantml.imagestats import STAT_COLUMNS, image_statistics
from plantml.preprocess import ImageDecodeError, load_image

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from PIL import Image

    from plantml.bundle import Bundle, BundleWriter

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_stats.csv"
REFERENCE_PCA_FILE = "reference_pca.npz"
REFERENCE_ROLE = "drift_reference"
DEFAULT_PCA_COMPONENTS = 4


def fit_pca(embeddings: np.ndarray, n_components: int = DEFAULT_PCA_COMPONENTS) -> dict[str, np.ndarray]:
    """Principal components of an ``(n, d)`` embedding matrix (numpy SVD, no sklearn).

    Returns:
        ``{"mean": (d,), "components": (k, d), "explained_variance_ratio": (k,)}`` with
        ``k = min(n_components, n - 1, d)``.

    Raises:
        DriftError: for a non-2-D matrix, fewer than 2 rows or non-finite values.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DriftError(f"embeddings must be an (n, d) matrix with n >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DriftError("embeddings contain NaN or infinite values")
    k = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return {"mean": mean, "components": vt[:k], "explained_variance_ratio": ratio}


def project_pca(embeddings: np.ndarray, pca: Mapping[str, np.ndarray]) -> np.ndarray:
    """Project embeddings onto stored principal components; ``(n, k)``."""
    x = np.asarray(embeddings, dtype=np.float64)
    comps = np.asarray(pca["components"], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != comps.shape[1]:
        raise DriftError(f"embeddings have shape {x.shape}, the stored PCA expects (n, {comps.shape[1]})")
    return (x - np.asarray(pca["mean"], dtype=np.float64)) @ comps.T


def _as_image(item: "Image.Image | str | os.PathLike[str]") -> "Image.Image":
    """A PIL image, or a path decoded now (so a large test split is never held in memory)."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return load_image(item)
        except ImageDecodeError as exc:
            raise DriftError(f"reference image {item} cannot be read: {exc}") from exc
    return item


def _checked_inputs(n: int, predicted_labels: Sequence[str], confidences: np.ndarray,
                    classes: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    """Labels as strings and confidences as floats, after checking lengths, ranges and names.

    Raises:
        DriftError: on empty input, mismatched lengths, unknown labels or bad confidences.
    """
    if n == 0:
        raise DriftError("no reference images: the drift reference needs the test split's images")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if len(predicted_labels) != n or len(conf) != n:
        raise DriftError(
            f"reference inputs differ in length: {n} images, {len(predicted_labels)} labels, {len(conf)} confidences"
        )
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        raise DriftError("reference confidences must be finite probabilities in [0, 1]")
    labels = [str(lbl) for lbl in predicted_labels]
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DriftError(f"reference labels not among the bundle's classes: {', '.join(unknown[:5])}")
    return labels, conf


def build_reference_table(
    images: Sequence["Image.Image | str | os.PathLike[str]"],
    predicted_labels: Sequence[str],
    confidences: np.ndarray,
    embeddings: np.ndarray | None = None,
    *,
    classes: Sequence[str] | None = None,
    n_components: int = DEFAULT_PCA_COMPONENTS,
) -> tuple["pd.DataFrame", dict[str, np.ndarray] | None]:
    """One row per image: image statistics, ``confidence``, ``label``, optional PCA columns.

    Args:
        images: the test split as the service would see it: the original decoded images
            (RGB PIL) or their file paths — not the model-size resized arrays, or the
            size and sharpness columns would differ from the service's log by construction.
        predicted_labels: the model's predicted class name per image.
        confidences: the model's (calibrated) top-1 probability per image, in [0, 1].
        embeddings: optional ``(n, d)`` embeddings (penultimate features or logits).
        classes: if given, every label must be one of them.
        n_components: PCA components kept from the embeddings.

    Returns:
        ``(table, pca)``; ``pca`` is ``None`` without embeddings.

    Raises:
        DriftError: on empty input, mismatched lengths, unknown labels or bad confidences.
    """
    import pandas as pd

    n = len(images)
    labels, conf = _checked_inputs(n, predicted_labels, confidences, classes)
    rows = [image_statistics(_as_image(img)) for img in tqdm(images, desc="reference stats", unit="img", leave=False)]
    table = pd.DataFrame(rows, columns=list(STAT_COLUMNS))
    table["confidence"] = conf
    table["label"] = labels
    pca = None
    if embeddings is not None:
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise DriftError(f"embeddings must have one row per image: shape {emb.shape}, {n} images")
        pca = fit_pca(emb, n_components)
        proj = project_pca(emb, pca)
        for i in range(proj.shape[1]):
            table[f"{EMBEDDING_PREFIX}{i}"] = proj[:, i]
    return table, pca


def _write_pca(writer: "BundleWriter", pca: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """Store the PCA projection in the bundle; returns its ``metadata.drift_reference.embedding`` entry."""
    np.savez(writer.dir / REFERENCE_PCA_FILE, **pca)
    writer.add_file(REFERENCE_PCA_FILE, fmt="npz", runtime="none", precision="none", role=REFERENCE_ROLE)
    return {
        "path": REFERENCE_PCA_FILE,
        "source": source,
        "dim": int(pca["components"].shape[1]),
        "n_components": int(pca["components"].shape[0]),
        "explained_variance_ratio": [round(float(v), 6) for v in pca["explained_variance_ratio"]],
    }


def _reference_metadata(table: "pd.DataFrame", metadata: Mapping[str, Any],
                        embedding_info: dict[str, Any] | None) -> dict[str, Any]:
    """The ``metadata["drift_reference"]`` entry describing the stored table."""
    return {
        "path": REFERENCE_FILE,
        "n_rows": int(len(table)),
        "columns": list(table.columns),
        "numeric_columns": [c for c in table.columns if c != "label"],
        "categorical_columns": list(CATEGORICAL_COLUMNS),
        "bundle_version": metadata.get("version"),
        "embedding": embedding_info,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def reference_stats_step(
    images: Sequence["Image.Image | str | os.PathLike[str]"],
    predicted_labels: list[str],
    confidences: np.ndarray,
    embeddings: np.ndarray | None = None,
    *,
    embedding_source: str = "penultimate",
    n_components: int = DEFAULT_PCA_COMPONENTS,
) -> Callable[["BundleWriter", dict], None]:
    """An ``extra_steps`` callable for :func:`plantml.export.export_bundle`.

    The step writes ``reference_stats.csv`` (and ``reference_pca.npz`` with embeddings)
    into the bundle, registers it with role ``drift_reference`` (so ``Bundle.available()``
    and ``model_path`` ignore it) and records ``metadata["drift_reference"]``.

    Args:
        images: the test split's original images (RGB PIL) or their paths (read one at a
            time). Not the resized model inputs: the service computes its statistics on the
            uploaded image, so width, height and sharpness must be comparable.
        predicted_labels: the champion's predicted class names.
        confidences: the champion's top-1 probabilities, with the same temperature the
            service applies (the service logs its response's ``confidence``).
        embeddings: optional ``(n, d)`` features; pass the logits (``embedding_source=
            "logits"``) to let ``plantml drift`` on an image folder project the current
            images too (the exported models output logits only).
        embedding_source: ``"penultimate"`` or ``"logits"`` (recorded in the metadata).
        n_components: PCA components kept.

    Returns:
        ``step(writer, metadata) -> None``.
    """

    def step(writer: "BundleWriter", metadata: dict) -> None:
        table, pca = build_reference_table(
            images, predicted_labels, confidences, embeddings,
            classes=metadata.get("classes"), n_components=n_components,
        )
        table.to_csv(writer.dir / REFERENCE_FILE, index=False, float_format="%.6g")
        writer.add_file(REFERENCE_FILE, fmt="csv", runtime="none", precision="none", role=REFERENCE_ROLE)
        embedding_info = _write_pca(writer, pca, embedding_source) if pca is not None else None
        metadata["drift_reference"] = _reference_metadata(table, metadata, embedding_info)
        log.info("drift reference: %d rows, %d columns", len(table), len(table.columns))

    return step


def load_reference(bundle: "Bundle") -> tuple["pd.DataFrame", dict[str, Any]]:
    """The bundle's reference table and its metadata entry.

    Raises:
        DriftError: if the bundle has no drift reference or the file is unusable.
        ReferenceMismatchError: if the reference was recorded for another bundle version.
    """
    import pandas as pd

    info = bundle.metadata.get("drift_reference")
    if not info:
        raise DriftError(
            f"bundle {bundle.root} has no drift reference (metadata.drift_reference); "
            "re-export it with plantml.drift.reference_stats_step"
        )
    ref_version = str(info.get("bundle_version"))
    if ref_version != bundle.version:
        raise ReferenceMismatchError(
            f"the drift reference in {bundle.root} was computed for bundle version {ref_version}, "
            f"but the bundle is version {bundle.version}; re-export the reference with this model"
        )
    path = bundle.root / info.get("path", REFERENCE_FILE)
    if not path.is_file():
        raise DriftError(f"drift reference file missing: {path}")
    try:
        table = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad reference
        raise DriftError(f"drift reference {path} cannot be read: {exc}") from exc
    missing = [c for c in LOG_REQUIRED_KEYS if c not in table.columns]
    if missing:
        raise DriftError(f"drift reference {path} lacks column(s): {', '.join(missing)}")
    table["label"] = table["label"].astype(str)
    return table, info


def bundle_logit_pca(bundle: "Bundle", n_classes: int) -> dict[str, np.ndarray] | None:
    """The reference PCA if it was fitted on logits (so current images can be projected)."""
    info = (bundle.metadata.get("drift_reference") or {}).get("embedding")
    if not info or info.get("source") != "logits" or int(info.get("dim", -1)) != n_classes:
        return None
    with np.load(bundle.root / info["path"]) as npz:
        return {k: npz[k] for k in npz.files}
