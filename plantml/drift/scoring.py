"""Scoring a folder of images as the service would: statistics plus the bundle's prediction.

For ``plantml drift --current FOLDER``: each readable image gets the
:mod:`plantml.imagestats` columns, and the bundle's ONNX FP32 model (through
:mod:`plantml.runtime`, with the service's session settings and calibration) gives its
``confidence`` and ``label``; with a logit PCA in the reference, the ``emb_pca_*``
columns too. Torch-free; pandas and ONNX Runtime are imported inside the functions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm import tqdm

from plantml.drift.reference import bundle_logit_pca, project_pca
from plantml.drift.schema import EMBEDDING_PREFIX
from plantml.imagestats import image_statistics
from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_image, preprocess_batch
from plantml.runtime import Calibration, SessionOptions, open_session

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from PIL import Image

    from plantml.bundle import Bundle

log = logging.getLogger(__name__)


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _decode(paths: Sequence[Path], skipped: list[str]) -> tuple[list["Image.Image"], list[dict[str, Any]]]:
    """Decoded images and their statistics; an unreadable file is noted in ``skipped``, not fatal."""
    imgs: list["Image.Image"] = []
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            img = load_image(path)
        except ImageDecodeError as exc:
            skipped.append(f"{path}: {exc.reason}")
            continue
        imgs.append(img)
        rows.append(image_statistics(img))
    return imgs, rows


def _add_predictions(rows: list[dict[str, Any]], logits: np.ndarray, classes: Sequence[str], version: str,
                     calibration: Calibration, pca: dict[str, np.ndarray] | None) -> None:
    """Fill each row's ``confidence``, ``label``, ``model_version`` and ``emb_pca_*`` from the logits."""
    probs = calibration.probabilities(logits)
    top = probs.argmax(axis=1)
    proj = project_pca(logits, pca) if pca is not None else None
    for i, row in enumerate(rows):
        row["confidence"] = float(probs[i, top[i]])
        row["label"] = classes[int(top[i])]
        row["model_version"] = version
        if proj is not None:
            for j in range(proj.shape[1]):
                row[f"{EMBEDDING_PREFIX}{j}"] = float(proj[i, j])


def images_table(
    paths: Sequence[Path], bundle: "Bundle", *, batch_size: int = 32, threads: int = 1
) -> tuple["pd.DataFrame", list[str]]:
    """Image statistics plus the bundle's ONNX FP32 prediction for each readable image.

    Returns:
        ``(table, skipped)``: one row per decoded image (``model_version`` = the bundle's
        version), and ``"path: reason"`` for each file that could not be decoded.
    """
    import pandas as pd

    spec, classes = bundle.input_spec, bundle.classes
    calibration = Calibration.of(bundle)
    # Scored as the service scores (plantml.runtime): ONNX Runtime FP32 is in every bundle.
    session = open_session(bundle.model_path("onnxruntime", "fp32"), "onnxruntime", SessionOptions(threads=threads))
    pca = bundle_logit_pca(bundle, len(classes))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="current images", unit="batch", leave=False):
        imgs, batch_rows = _decode(paths[start:start + batch_size], skipped)
        if not imgs:
            continue
        logits = session.run(preprocess_batch(imgs, spec))[0]
        _add_predictions(batch_rows, logits, classes, bundle.version, calibration, pca)
        rows.extend(batch_rows)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    return pd.DataFrame(rows), skipped
