"""``prepare``: scan every source, check the classes, split, and summarise what was found.

:func:`prepare_dataset` is the whole data step short of writing: the sources are
scanned in turn (:mod:`~plantml.data.scanning`), their class lists joined, the items
split (:mod:`~plantml.data.splitting`) and a :class:`DatasetSummary` built, per domain
too. Writing the manifest and the shards is :mod:`~plantml.data.writing`'s job.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from plantml import storage
from plantml.data.manifest import DEFAULT_DOMAIN, SPLITS, DataError, ManifestRow, manifest_digest
from plantml.data.scanning import PixelStaging, scan_images
from plantml.data.sources import DataSource, format_sources, list_candidates
from plantml.data.splitting import assign_splits

log = logging.getLogger(__name__)

MIN_IMAGES_PER_CLASS = 3


@dataclass
class _Scan:
    """What the scan of every source found, before the split."""

    items: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    class_names: set[str] = field(default_factory=set)
    layouts: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        """The sources' common layout, or ``mixed``."""
        return next(iter(self.layouts.values())) if len(set(self.layouts.values())) == 1 else "mixed"


@dataclass
class DatasetSummary:
    """What :func:`prepare_dataset` found (stored in the run and shown in the card)."""

    root: str
    layout: str
    classes: list[str]
    counts: dict[str, dict[str, int]]
    n_images: int
    n_skipped: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    skipped_empty_classes: list[str] = field(default_factory=list)
    n_duplicate_files: int = 0
    manifest_sha256: str = ""
    is_demo: bool = False
    #: per domain: root, layout, weight, n_images and {class: {split: n}}
    domains: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable view (``summary.json``)."""
        return asdict(self)


def prepare_dataset(
    root: str | os.PathLike[str] | Sequence[DataSource],
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 42,
    max_per_class: int | None = None,
    is_demo: bool = False,
    progress: bool = True,
    staging: PixelStaging | None = None,
) -> tuple[list[ManifestRow], DatasetSummary]:
    """Scan the sources (local folders or ``s3://`` prefixes), skip unreadable files, split, and summarise.

    Args:
        root: one folder/prefix (one source of domain ``lab``) or a list of :class:`DataSource`.
        fractions: train / val / test fractions (a source's own ``split`` wins for its domain).
        seed: seed of the split.
        max_per_class: cap per (domain, class).
        is_demo: recorded in the summary (the synthetic DEMO set).
        progress: show a progress bar per source.
        staging: when given, every readable image's resized pixels and original bytes
            are parked there (see :func:`~plantml.data.writing.write_shards`), so each image is decoded once.

    Returns:
        ``(manifest rows, summary)``.

    Raises:
        DataError: missing folder, fewer than two usable classes, or a class too small
            to split — each with a one-line message naming the problem.
    """
    sources = _resolved_sources(root)
    scan = _scan_sources(sources, max_per_class, progress, staging)
    root_text = format_sources(sources)
    classes, empty = _usable_classes(scan, root_text)
    rows = assign_splits(scan.items, fractions, seed, {s.domain: s.split for s in sources if s.split})
    if scan.skipped:
        log.warning("skipped %d unreadable or non-image file(s), e.g. %s: %s",
                    len(scan.skipped), scan.skipped[0]["path"], scan.skipped[0]["reason"])
    summary = DatasetSummary(
        root=root_text, layout=scan.layout, classes=classes, counts=_split_counts_per_class(rows, classes),
        n_images=len(rows), n_skipped=len(scan.skipped), skipped=scan.skipped[:200], skipped_empty_classes=empty,
        n_duplicate_files=len(rows) - len({r.sha256 for r in rows}), manifest_sha256=manifest_digest(rows),
        is_demo=is_demo, domains=domain_summary(rows, sources, scan.layouts),
    )
    return rows, summary


def _resolved_sources(root: str | os.PathLike[str] | Sequence[DataSource]) -> list[DataSource]:
    """The sources with absolute local roots (a plain path: one source of the default domain)."""
    sources = [DataSource(DEFAULT_DOMAIN, str(root))] if isinstance(root, (str, os.PathLike)) else list(root)
    if not sources:
        raise DataError("no data source given")
    return [DataSource(s.domain, _resolve_root(s.root), s.weight, s.split) for s in sources]


def _scan_sources(sources: Sequence[DataSource], max_per_class: int | None, progress: bool,
                  staging: PixelStaging | None) -> _Scan:
    """Scan every source in turn; the sources of one run share the staging file's slots."""
    scan = _Scan()
    offset = 0
    for src in sources:
        layout, candidates, names = list_candidates(src.root)
        found, bad = scan_images(src.root, candidates, max_per_class=max_per_class, progress=progress,
                                 staging=staging, domain=src.domain, slot_offset=offset)
        offset += len(candidates)  # slots of skipped files stay unused (the staging file is sparse)
        scan.items += found
        scan.skipped += bad
        scan.class_names |= names
        scan.layouts[src.domain] = layout
        log.info("source %s (%s, %s layout): %d images, %d skipped", src.domain, src.root, layout, len(found),
                 len(bad))
    if staging is not None:
        staging.slot_of = {(it["domain"], it["path"]): it["slot"] for it in scan.items}
    return scan


def _usable_classes(scan: _Scan, root_text: str) -> tuple[list[str], list[str]]:
    """``(classes with readable images, empty class folders)``.

    Raises:
        DataError: fewer than two usable classes, or (unless pre-split) a class too small to split.
    """
    classes = sorted({it["label"] for it in scan.items})
    empty = sorted(scan.class_names - set(classes))
    for c in empty:
        log.warning("class folder %r has no readable images: skipped", c)
    if len(classes) < 2:
        found = f"{len(classes)} usable class folder{'s' if len(classes) != 1 else ''}"
        raise DataError(
            f"{root_text}: found {found} ({', '.join(classes) or 'none'}); need at least 2 class folders of images "
            f"(<root>/<Class>/*.jpg){'; empty: ' + ', '.join(empty) if empty else ''}"
        )
    counts = Counter(it["label"] for it in scan.items)
    small = sorted(c for c in classes if counts[c] < MIN_IMAGES_PER_CLASS)
    if small and scan.layout != "presplit":
        raise DataError(
            f"class {small[0]!r} has only {counts[small[0]]} readable image(s); need at least {MIN_IMAGES_PER_CLASS} "
            "to split into train/val/test"
        )
    return classes, empty


def _split_counts_per_class(rows: Sequence[ManifestRow], classes: Sequence[str]) -> dict[str, dict[str, int]]:
    """``{class: {split: images}}`` over every domain."""
    split_counts: dict[str, dict[str, int]] = {c: {s: 0 for s in SPLITS} for c in classes}
    for r in rows:
        split_counts[r.label][r.split] += 1
    return split_counts


def _resolve_root(root: str) -> str:
    return str(root) if storage.is_s3(root) else str(Path(root).expanduser().resolve())


def domain_summary(rows: Sequence[ManifestRow], sources: Sequence[DataSource],
                   layouts: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per domain: where it came from, its weight and split, and its counts per class and split."""
    out: dict[str, dict[str, Any]] = {}
    for src in sources:
        mine = [r for r in rows if r.domain == src.domain]
        counts: dict[str, dict[str, int]] = {}
        for r in mine:
            counts.setdefault(r.label, {s: 0 for s in SPLITS})[r.split] += 1
        out[src.domain] = {"root": src.root, "layout": layouts.get(src.domain, ""),
                           "weight": 1.0 if src.weight is None else src.weight,
                           "split": list(src.split) if src.split else None, "n_images": len(mine),
                           "splits": {s: sum(1 for r in mine if r.split == s) for s in SPLITS},
                           "counts": dict(sorted(counts.items()))}
    return out
