"""Data: find the images, write a manifest, split it, load it, augment it.

A run may read several *sources*, one per **domain** (the kind of photo: ``lab`` for
PlantVillage's plain-backdrop photos, ``field`` for orchard photos, ...): ``data.sources``
in params.yaml, or ``--data-dir lab=PATH,field=PATH`` (:func:`parse_data_dir`; a plain path
is one source of domain ``lab``). The class list is the union of the sources' classes.

The manifest lists every readable image with its domain, class, split and sha256. Exact
duplicates (same sha256) are grouped so that they always land in the same split, even
across sources. Unreadable or non-image files are reported and skipped, and counted;
they never stop a run. The split is stratified per (domain, class) and deterministic for
the seed; a source may have split fractions of its own (e.g. to hold out more field
photos for a tighter interval on field accuracy).

One job per module:

* :mod:`~plantml.data.sources` — the sources of a run (``--data-dir``) and the folder
  layouts (flat, ``color/``, pre-split) of each.
* :mod:`~plantml.data.scanning` — decode every candidate once (:func:`scan_images`) and
  stage its pixels (:class:`PixelStaging`).
* :mod:`~plantml.data.splitting` — the stratified, deterministic split (:func:`assign_splits`).
* :mod:`~plantml.data.manifest` — the manifest rows, their CSV and digest.
* :mod:`~plantml.data.prepare` — :func:`prepare_dataset`: scan, split, summarise.
* :mod:`~plantml.data.writing` — what ``prepare`` writes: manifest + summary files, shards.
* :mod:`~plantml.data.augment` — the training augmentation.

Every public name is re-exported here, so ``from plantml.data import X`` keeps working.
Torch-free (albumentations and numpy only).
"""

from __future__ import annotations

from plantml.data.augment import augmentation_factory, train_augmentation
from plantml.data.manifest import (DEFAULT_DOMAIN, MANIFEST_COLUMNS, SPLITS, DataError, ManifestRow, manifest_bytes,
                                   manifest_digest, read_manifest, read_manifest_bytes, row_order, rows_for,
                                   write_manifest)
from plantml.data.prepare import MIN_IMAGES_PER_CLASS, DatasetSummary, domain_summary, prepare_dataset
from plantml.data.scanning import PixelStaging, scan_images
from plantml.data.sources import DataSource, detect_layout, format_sources, layout_of, list_candidates, parse_data_dir
from plantml.data.splitting import assign_splits
from plantml.data.writing import save_prepared, write_shards

__all__ = [
    "DEFAULT_DOMAIN", "MANIFEST_COLUMNS", "MIN_IMAGES_PER_CLASS", "SPLITS", "DataError", "DataSource",
    "DatasetSummary", "ManifestRow", "PixelStaging", "assign_splits", "augmentation_factory", "detect_layout",
    "domain_summary", "format_sources", "layout_of", "list_candidates", "manifest_bytes", "manifest_digest",
    "parse_data_dir", "prepare_dataset", "read_manifest", "read_manifest_bytes", "row_order", "rows_for",
    "save_prepared", "scan_images", "train_augmentation", "write_manifest", "write_shards",
]
