"""What ``prepare`` writes: the manifest and summary files, and the WebDataset shards."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml import shards as sh
from plantml.data.manifest import SPLITS, ManifestRow, manifest_bytes, row_order, rows_for, write_manifest
from plantml.data.prepare import DatasetSummary
from plantml.data.scanning import PixelStaging

log = logging.getLogger(__name__)


def save_prepared(rows: Sequence[ManifestRow], summary: DatasetSummary, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.csv`` and ``summary.json`` into ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    write_manifest(rows, manifest)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2))
    os.replace(tmp, out / "summary.json")
    return manifest


def write_shards(rows: Sequence[ManifestRow], summary: DatasetSummary, staging: PixelStaging,
                 store: str | os.PathLike[str], samples_per_shard: int = 1000, seed: int = 42,
                 progress: bool = True) -> tuple[list[ManifestRow], sh.ShardIndex]:
    """Write the split as WebDataset shards into ``store`` from the staged pixels.

    The training split is written in a seeded random order (a streaming shuffle buffer
    then mixes classes at once); validation and test keep manifest order and carry the
    original files. The manifest (with each row's shard key) and the index are written
    last.

    Returns:
        ``(rows with their keys, the shard index)``.
    """
    index_of = {c: i for i, c in enumerate(summary.classes)}
    writer = sh.ShardSetWriter(store, summary.classes, staging.size, samples_per_shard)
    keyed: list[ManifestRow] = []
    for split in SPLITS:
        members = rows_for(rows, split)
        if split == "train":
            members = [members[i] for i in np.random.default_rng(seed).permutation(len(members))]
        for i, r in enumerate(tqdm(members, desc=f"write {split} shards", unit="img", disable=not progress,
                                   mininterval=2)):
            key = f"{split}{i:07d}"
            pixels, original = staging.get(staging.slot_of[(r.domain, r.path)],
                                           with_original=split in writer.originals)
            writer.write(split, key, pixels, index_of[r.label],
                         {"label": r.label, "path": r.path, "sha256": r.sha256, "domain": r.domain},
                         original=original, original_ext=Path(r.path).suffix)
            keyed.append(ManifestRow(r.path, r.label, r.split, r.sha256, r.width, r.height, key, r.domain))
    keyed.sort(key=row_order)
    weights = {d: float(v.get("weight", 1.0)) for d, v in summary.domains.items()}
    per_domain = {s: dict(Counter(r.domain for r in keyed if r.split == s)) for s in SPLITS}
    index = writer.close(manifest_bytes(keyed), summary.manifest_sha256, domain_weights=weights,
                         domain_counts=per_domain)
    log.info("wrote %s shards to %s", {s: len(v.shards) for s, v in index.splits.items()}, store)
    return keyed, index
