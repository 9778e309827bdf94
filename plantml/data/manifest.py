"""The manifest: one row per readable image (path, class, split, sha256, size, shard key, domain).

Written as CSV beside the shards (:func:`write_manifest`, :func:`manifest_bytes`), read
back by training and evaluation (:func:`read_manifest`, :func:`read_manifest_bytes`);
:func:`manifest_digest` is its content hash, stored with every run and bundle.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "width", "height", "key", "domain")
#: The domain of a source given as a plain path (PlantVillage: lab photos on a plain backdrop).
DEFAULT_DOMAIN = "lab"


class DataError(ValueError):
    """The dataset cannot be used; the message names the problem and the path."""


@dataclass(frozen=True)
class ManifestRow:
    """One image of the dataset: where it is, its class and split, its hash, size, shard key and domain."""

    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    key: str = ""  # the sample's key in the shards ("" until the shards are written)
    domain: str = DEFAULT_DOMAIN


def row_order(r: ManifestRow) -> tuple[str, str, str, str]:
    """Manifest order: by class, split, domain, path (one domain: the order it always had)."""
    return (r.label, r.split, r.domain, r.path)


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> str:
    """Write the manifest CSV atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        _write_rows(fh, rows)
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_rows(fh: Any, rows: Sequence[ManifestRow]) -> None:
    writer = csv.writer(fh)
    writer.writerow(MANIFEST_COLUMNS)
    for r in rows:
        writer.writerow([r.path, r.label, r.split, r.sha256, r.width, r.height, r.key, r.domain])


def manifest_bytes(rows: Sequence[ManifestRow]) -> bytes:
    """The manifest CSV as bytes (for the shard store)."""
    buf = io.StringIO(newline="")
    _write_rows(buf, rows)
    return buf.getvalue().encode()


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest CSV written by :func:`write_manifest`."""
    if not Path(path).is_file():
        raise DataError(f"manifest not found: {path} (run `plantml prepare` first)")
    return read_manifest_bytes(Path(path).read_bytes())


def read_manifest_bytes(data: bytes) -> list[ManifestRow]:
    """Parse manifest CSV bytes (as stored beside the shards)."""
    return [
        ManifestRow(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]),
                    r.get("key") or "", r.get("domain") or DEFAULT_DOMAIN)  # manifests before domains: one lab source
        for r in csv.DictReader(io.StringIO(data.decode()))
    ]


def manifest_digest(rows: Sequence[ManifestRow]) -> str:
    """Content hash of a manifest (independent of where it is written)."""
    h = hashlib.sha256()
    for r in rows:
        # The default domain adds nothing, so a one-source manifest keeps the digest it always had.
        extra = "" if r.domain == DEFAULT_DOMAIN else f"|{r.domain}"
        h.update(f"{r.label}|{r.split}|{r.sha256}{extra}\n".encode())
    return h.hexdigest()


def rows_for(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """The rows of one split, in manifest order."""
    return [r for r in rows if r.split == split]
