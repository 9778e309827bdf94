"""Current data for the analysis: the service's drift log, or a folder of images.

:func:`load_current` decides which one a path names and returns one table in the
reference's layout. Rows logged by another model version are dropped: their
``confidence`` and ``label`` are not comparable with this bundle's reference.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantml.drift.feed import is_log_file, read_drift_log
from plantml.drift.schema import DriftError, ReferenceMismatchError
from plantml.drift.scoring import images_table, list_images
from plantml.preprocess import IMAGE_EXTENSIONS

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from plantml.bundle import Bundle

log = logging.getLogger(__name__)


def _image_paths(path: Path) -> list[Path]:
    """The images ``path`` names: a folder without drift logs, or one image file; else ``[]``.

    Raises:
        DriftError: a folder that holds neither a drift log nor images.
    """
    if path.is_dir() and not any(is_log_file(p) for p in path.rglob("*.jsonl*")):
        images = list_images(path)
        if not images:
            raise DriftError(f"{path} holds neither a drift log (*.jsonl*) nor images")
        return images
    if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        return [path]
    return []


def _keep_bundle_version(table: "pd.DataFrame", version: str) -> tuple["pd.DataFrame", int]:
    """Rows logged by model ``version`` and how many others were dropped.

    Raises:
        ReferenceMismatchError: every row comes from another model version.
    """
    versions = table["model_version"].dropna().astype(str)
    other = versions[versions != version]
    if not len(other):
        return table, 0
    found = sorted(set(other))
    if len(other) == len(table):
        raise ReferenceMismatchError(
            f"every drift-log row was logged by model version(s) {', '.join(found[:5])}, "
            f"but the reference is from bundle version {version}: use that version's bundle"
        )
    log.warning(
        "ignoring %d of %d drift-log rows logged by other model version(s): %s",
        len(other), len(table), ", ".join(found[:5]),
    )
    return table[table["model_version"].astype(str) == version].reset_index(drop=True), int(len(other))


def load_current(spec: str | os.PathLike[str], bundle: "Bundle") -> tuple["pd.DataFrame", dict[str, Any]]:
    """Current data from a drift log (file, glob, directory) or a folder of images.

    Rows logged by another model version are dropped (their ``confidence`` and ``label``
    are not comparable with this bundle's reference).

    Returns:
        ``(table, info)`` with ``info = {"source", "kind", "n_rows_read", "n_other_version",
        "n_skipped"}``.

    Raises:
        DriftError: empty or malformed input.
        ReferenceMismatchError: every logged row comes from another model version.
    """
    path = Path(str(spec))
    info: dict[str, Any] = {"source": str(spec), "n_other_version": 0, "n_skipped": 0}
    images = _image_paths(path)
    if images:
        table, skipped = images_table(images, bundle)
        info.update(kind="images", n_rows_read=len(images), n_skipped=len(skipped))
        if table.empty:
            raise DriftError(f"none of the {len(images)} image(s) in {path} could be decoded")
        return table, info
    table = read_drift_log(spec)
    info.update(kind="drift_log", n_rows_read=len(table))
    table, info["n_other_version"] = _keep_bundle_version(table, bundle.version)
    return table, info
