"""Data: find the images, write a manifest, split it, load it, augment it.

Accepted layouts (``root`` is what the user passes as ``--data-dir``):

* ``root/<Class>/*.jpg`` — PlantVillage as distributed;
* ``root/color/<Class>/*.jpg`` — the raw PlantVillage repository (``color``, ``grayscale``
  and ``segmented`` variants side by side; only ``color`` is used);
* ``root/train/<Class>/…`` + ``root/valid/<Class>/…`` (or ``val``/``test``) — the common
  pre-split Kaggle variant: ``train`` stays train, the held-out folders are split
  (stratified) into validation and test.

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

Torch-free (albumentations and numpy only).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml import shards as sh
from plantml import storage
from plantml.backdrop import replace_background
from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, resize_center_crop
from plantml.resources import available_cores

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_PRESPLIT_TRAIN = ("train", "training")
_PRESPLIT_HELDOUT = ("valid", "val", "validation", "test")
MIN_IMAGES_PER_CLASS = 3
MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "width", "height", "key", "domain")
#: The domain of a source given as a plain path (PlantVillage: lab photos on a plain backdrop).
DEFAULT_DOMAIN = "lab"
_DOMAIN_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)=(.*)$")


class DataError(ValueError):
    """The dataset cannot be used; the message names the problem and the path."""


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    split: str
    sha256: str
    width: int
    height: int
    key: str = ""  # the sample's key in the shards ("" until the shards are written)
    domain: str = DEFAULT_DOMAIN


@dataclass(frozen=True)
class DataSource:
    """One source of images: a folder (or ``s3://`` prefix) of class folders, from one domain.

    Attributes:
        domain: the kind of photo (``lab``, ``field``, ...); every metric is also reported per domain.
        root: the folder or prefix.
        weight: training sampling weight of each image (:mod:`plantml.loader` repeats
            samples); ``None``: not set here (1, or ``data.domains`` in a run).
        split: train/val/test fractions of its own (``None``: the run's).
    """

    domain: str
    root: str
    weight: float | None = None
    split: tuple[float, float, float] | None = None


def parse_data_dir(text: str, default_domain: str = DEFAULT_DOMAIN) -> list[DataSource]:
    """Parse ``--data-dir``: a plain path (one source) or ``DOMAIN=PATH,DOMAIN=PATH``.

    A comma starts a new source only when ``DOMAIN=`` follows it, so paths that contain
    commas (PlantVillage's ``Pepper,_bell`` class folders sit below the root, but a root
    may have one too) stay whole.

    Raises:
        DataError: an empty text, an empty path or a domain named twice.
    """
    text = text.strip()
    if not text:
        raise DataError("empty data directory")
    if not _DOMAIN_PREFIX.match(text):
        return [DataSource(default_domain, text)]
    parts = re.split(r",(?=[A-Za-z][A-Za-z0-9_-]*=)", text)
    sources = []
    for part in parts:
        m = _DOMAIN_PREFIX.match(part.strip())
        if m is None or not m.group(2).strip():
            raise DataError(f"--data-dir part {part!r} must look like DOMAIN=PATH")
        sources.append(DataSource(m.group(1), m.group(2).strip()))
    domains = [s.domain for s in sources]
    if len(set(domains)) != len(domains):
        raise DataError(f"--data-dir names a domain twice: {domains}")
    return sources


def format_sources(sources: Sequence[DataSource]) -> str:
    """The sources as ``--data-dir`` text (a single default-domain source: its plain path)."""
    if len(sources) == 1 and sources[0].domain == DEFAULT_DOMAIN:
        return sources[0].root
    return ",".join(f"{s.domain}={s.root}" for s in sources)


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
        return asdict(self)


# --------------------------------------------------------------------------- layout


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """Find the class folders under a local ``root``.

    Returns:
        ``(layout, {source: folder})`` where layout is ``flat``, ``color`` or ``presplit``
        and each folder holds class sub-folders. For ``presplit`` the sources are
        ``train`` and ``heldout<i>``.

    Raises:
        DataError: if ``root`` is missing or is not a folder.
    """
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data directory is not a folder: {root}")
    layout, prefixes = layout_of(f"{d.name}/{c.name}/x" for d in _class_dirs(root) for c in _class_dirs(d)[:1])
    return layout, {source: root / prefix for source, prefix in prefixes.items()}


def layout_of(rel_paths: Iterable[str]) -> tuple[str, dict[str, str]]:
    """The layout of a dataset from its files' paths relative to the root.

    Returns:
        ``(layout, {source: prefix})``: each prefix (``""`` for the root itself) holds
        ``<Class>/...`` files.
    """
    top: dict[str, str] = {}
    for rel in rel_paths:
        parts = rel.split("/")
        if len(parts) >= 3:  # <folder>/<Class>/<file>: the folder may be a layout marker
            top.setdefault(parts[0].lower(), parts[0])
    if "color" in top:
        return "color", {"all": top["color"]}
    train = next((top[n] for n in _PRESPLIT_TRAIN if n in top), None)
    held = [top[n] for n in _PRESPLIT_HELDOUT if n in top]
    if train is not None and held:
        return "presplit", {"train": train, **{f"heldout{i}": h for i, h in enumerate(held)}}
    return "flat", {"all": ""}


def list_candidates(root: str) -> tuple[str, list[tuple[str, str, str]], set[str]]:
    """Every candidate file of a local folder or ``s3://`` prefix.

    Returns:
        ``(layout, [(source, class, path relative to root)], class names)``. Local class
        folders with no files at all still count as class names (reported as empty).

    Raises:
        DataError: a missing folder, a file given as the root, or an empty S3 prefix.
    """
    if storage.is_s3(root):
        files = [rel for rel, _ in storage.list_files(root)]
        if not files:
            raise DataError(f"data directory not found: no files under {root}")
        local_dirs: set[str] = set()
    else:
        path = Path(root)
        if not path.exists():
            raise DataError(f"data directory not found: {root}")
        if not path.is_dir():
            raise DataError(f"data directory is not a folder: {root}")
        files = [rel for rel, _ in storage.list_files(path)]
        local_dirs = {p.name for p in _class_dirs(path)}
    layout, prefixes = layout_of(files)
    candidates: list[tuple[str, str, str]] = []
    class_names: set[str] = set()
    for source, prefix in prefixes.items():
        lead = f"{prefix}/" if prefix else ""
        if not prefix:
            class_names |= local_dirs
        elif not storage.is_s3(root) and (Path(root) / prefix).is_dir():
            class_names |= {p.name for p in _class_dirs(Path(root) / prefix)}
        for rel in files:
            if not rel.startswith(lead):
                continue
            parts = rel[len(lead):].split("/")
            if len(parts) < 2:  # a file beside the class folders, not in one
                continue
            class_names.add(parts[0])
            candidates.append((source, parts[0], rel))
    return layout, candidates, class_names


# --------------------------------------------------------------------------- scanning


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class PixelStaging:
    """Scratch space for ``prepare``: each image's resized pixels and original bytes, by slot.

    The scan decodes every image exactly once and parks the result here (a sparse file of
    fixed-size pixel records plus an append-only blob of originals) until the split is
    known; the shard writer then reads it back in split order. Plain ``pread``/``pwrite``,
    not ``mmap``: file pages then stay in the page cache instead of counting as the
    process's resident memory.
    """

    def __init__(self, size: int, keep_originals: bool = True) -> None:
        self.size = int(size)
        self.record = self.size * self.size * 3
        self._dir = tempfile.TemporaryDirectory(prefix="plantml-staging-")
        self._pixels = os.open(Path(self._dir.name) / "pixels.u8", os.O_RDWR | os.O_CREAT, 0o600)
        self._blob = open(Path(self._dir.name) / "originals.bin", "a+b") if keep_originals else None
        self._where: dict[int, tuple[int, int]] = {}
        self.slot_of: dict[str, int] = {}  # manifest path -> slot, filled by prepare_dataset
        self._lock = threading.Lock()

    def put(self, slot: int, pixels: np.ndarray, original: bytes | None) -> None:
        os.pwrite(self._pixels, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), slot * self.record)
        if self._blob is not None and original is not None:
            with self._lock:
                self._blob.seek(0, os.SEEK_END)
                offset = self._blob.tell()
                self._blob.write(original)
                self._where[slot] = (offset, len(original))

    def get(self, slot: int, with_original: bool = True) -> tuple[np.ndarray, bytes | None]:
        raw = os.pread(self._pixels, self.record, slot * self.record)
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(self.size, self.size, 3)
        original = None
        if with_original and self._blob is not None and slot in self._where:
            offset, length = self._where[slot]
            self._blob.flush()
            original = os.pread(self._blob.fileno(), length, offset)
        return pixels, original

    def close(self) -> None:
        os.close(self._pixels)
        if self._blob is not None:
            self._blob.close()
        self._dir.cleanup()


def _decode_one(root: str, rel: str, size: int | None) -> tuple[dict[str, Any] | None, str | None, Any]:
    """Read and decode one candidate: ``(item, None, (pixels, bytes))`` or ``(None, reason, None)``."""
    uri = storage.join(root, rel)
    if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
        return None, f"not an image file (extension {Path(rel).suffix or 'none'})", None
    try:
        data = storage.read_bytes(uri)
        img = decode_image(data)
        w, h = img.size
        pixels = resize_center_crop(img, size) if size else None
    except ImageDecodeError as exc:
        return None, str(exc), None
    except OSError as exc:
        return None, f"unreadable: {exc}", None
    return {"sha256": _sha256_bytes(data), "width": w, "height": h}, None, (pixels, data)


def scan_images(
    root: str, candidates: Sequence[tuple[str, str, str]], max_per_class: int | None = None,
    progress: bool = True, staging: PixelStaging | None = None, threads: int | None = None,
    domain: str = DEFAULT_DOMAIN, slot_offset: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode every candidate file once; keep the readable ones.

    Decoding runs on a thread pool (Pillow releases the GIL while decoding and resizing,
    and S3 reads wait on the network). With ``staging``, each image's resized pixels and
    original bytes are parked there under the item's ``slot``.

    Args:
        domain: recorded on every item.
        slot_offset: first staging slot (sources of one run share the staging file).

    Returns:
        ``(items, skipped)``: items have path (relative to the root), label, source,
        domain, sha256, width, height and slot; skipped have path and reason.
    """
    chosen: list[tuple[str, str, str]] = []
    per_class: Counter[str] = Counter()
    for cand in candidates:
        if max_per_class is not None and per_class[cand[1]] >= max_per_class:
            continue
        if Path(cand[2]).suffix.lower() in IMAGE_EXTENSIONS:
            per_class[cand[1]] += 1
        chosen.append(cand)
    size = staging.size if staging is not None else None
    workers = threads or (16 if storage.is_s3(root) else max(2, 2 * available_cores()))
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda c: _decode_one(root, c[2], size), chosen)
        for slot, ((source, label, rel), (item, reason, payload)) in enumerate(
                tqdm(zip(chosen, results), total=len(chosen), desc=f"scan {domain} images", unit="img",
                     disable=not progress, mininterval=2), start=slot_offset):
            if item is None:
                skipped.append({"path": rel, "reason": str(reason), "domain": domain})
                continue
            if staging is not None:
                staging.put(slot, payload[0], payload[1])
            items.append({"path": rel, "label": label, "source": source, "domain": domain, "slot": slot, **item})
    return items, skipped


# --------------------------------------------------------------------------- splitting


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` groups; each non-empty fraction gets >= 1 when n >= 3."""
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"cannot split {n} images into train/val/test")
    return n_train, n_val, n_test


def assign_splits(items: list[dict[str, Any]], fractions: Sequence[float], seed: int,
                  domain_fractions: Mapping[str, Sequence[float]] | None = None) -> list[ManifestRow]:
    """Stratified, deterministic split that keeps exact duplicates together.

    Files sharing a sha256 form one group; a group goes wholly into one split, whatever
    source or domain its copies come from. Within a (domain, class), groups are ordered by
    ``sha256(seed|hash)`` and cut at the fractions (``domain_fractions[domain]`` where
    given). For a pre-split dataset, ``train`` items stay in train and held-out items are
    divided between val and test in the ratio of those fractions.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        groups[it["sha256"]].append(it)
    # A byte-identical file under two class names is ambiguous: keep the first label.
    by_class: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for sha, members in groups.items():
        labels = sorted({m["label"] for m in members})
        if len(labels) > 1:
            log.warning("identical file under several classes %s (%s); using %s", labels, members[0]["path"], labels[0])
        label_of[sha] = labels[0]
        # A file in two domains is stratified with the first domain's images (its copies follow it).
        domain = min(m.get("domain", DEFAULT_DOMAIN) for m in members)
        pool = "train" if all(m["source"] == "train" for m in members) and members[0]["source"] == "train" else (
            "heldout" if all(m["source"].startswith("heldout") for m in members) else "all"
        )
        by_class[(domain, labels[0], pool)].append(sha)
    split_of: dict[str, str] = {}
    for (domain, label, pool), shas in sorted(by_class.items()):
        fractions_here = (domain_fractions or {}).get(domain) or fractions
        ordered = sorted(shas, key=lambda s: _rank(seed, s))
        if pool == "train":
            for s in ordered:
                split_of[s] = "train"
            continue
        if pool == "heldout":
            total = fractions_here[1] + fractions_here[2]
            n_val = int(round(len(ordered) * fractions_here[1] / total)) if total else 0
            for i, s in enumerate(ordered):
                split_of[s] = "val" if i < n_val else "test"
            continue
        n_train, n_val, _ = _split_counts(len(ordered), fractions_here)
        for i, s in enumerate(ordered):
            split_of[s] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    rows = [
        ManifestRow(m["path"], label_of[sha], split_of[sha], sha, m["width"], m["height"],
                    domain=m.get("domain", DEFAULT_DOMAIN))
        for sha, members in groups.items() for m in members
    ]
    return sorted(rows, key=_row_order)


def _row_order(r: ManifestRow) -> tuple[str, str, str, str]:
    """Manifest order: by class, split, domain, path (one domain: the order it always had)."""
    return (r.label, r.split, r.domain, r.path)


# --------------------------------------------------------------------------- manifest I/O


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


# --------------------------------------------------------------------------- prepare


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
        max_per_class: cap per (domain, class).
        staging: when given, every readable image's resized pixels and original bytes
            are parked there (see :func:`write_shards`), so each image is decoded once.

    Raises:
        DataError: missing folder, fewer than two usable classes, or a class too small
            to split — each with a one-line message naming the problem.
    """
    sources = [DataSource(DEFAULT_DOMAIN, str(root))] if isinstance(root, (str, os.PathLike)) else list(root)
    if not sources:
        raise DataError("no data source given")
    sources = [DataSource(s.domain, _resolve_root(s.root), s.weight, s.split) for s in sources]
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    class_names: set[str] = set()
    layouts: dict[str, str] = {}
    offset = 0
    for src in sources:
        layout, candidates, names = list_candidates(src.root)
        found, bad = scan_images(src.root, candidates, max_per_class=max_per_class, progress=progress,
                                 staging=staging, domain=src.domain, slot_offset=offset)
        offset += len(candidates)  # slots of skipped files stay unused (the staging file is sparse)
        items += found
        skipped += bad
        class_names |= names
        layouts[src.domain] = layout
        log.info("source %s (%s, %s layout): %d images, %d skipped", src.domain, src.root, layout, len(found),
                 len(bad))
    if staging is not None:
        staging.slot_of = {(it["domain"], it["path"]): it["slot"] for it in items}
    root_text = format_sources(sources)
    layout = next(iter(layouts.values())) if len(set(layouts.values())) == 1 else "mixed"
    classes = sorted({it["label"] for it in items})
    empty = sorted(class_names - set(classes))
    for c in empty:
        log.warning("class folder %r has no readable images: skipped", c)
    if len(classes) < 2:
        found = f"{len(classes)} usable class folder{'s' if len(classes) != 1 else ''}"
        raise DataError(
            f"{root_text}: found {found} ({', '.join(classes) or 'none'}); need at least 2 class folders of images "
            f"(<root>/<Class>/*.jpg){'; empty: ' + ', '.join(empty) if empty else ''}"
        )
    counts = Counter(it["label"] for it in items)
    small = sorted(c for c in classes if counts[c] < MIN_IMAGES_PER_CLASS)
    if small and layout != "presplit":
        raise DataError(
            f"class {small[0]!r} has only {counts[small[0]]} readable image(s); need at least {MIN_IMAGES_PER_CLASS} "
            "to split into train/val/test"
        )
    rows = assign_splits(items, fractions, seed, {s.domain: s.split for s in sources if s.split})
    split_counts: dict[str, dict[str, int]] = {c: {s: 0 for s in SPLITS} for c in classes}
    for r in rows:
        split_counts[r.label][r.split] += 1
    n_dupes = len(rows) - len({r.sha256 for r in rows})
    if skipped:
        log.warning("skipped %d unreadable or non-image file(s), e.g. %s: %s",
                    len(skipped), skipped[0]["path"], skipped[0]["reason"])
    summary = DatasetSummary(
        root=root_text, layout=layout, classes=classes, counts=split_counts, n_images=len(rows),
        n_skipped=len(skipped), skipped=skipped[:200], skipped_empty_classes=empty, n_duplicate_files=n_dupes,
        manifest_sha256=manifest_digest(rows), is_demo=is_demo, domains=domain_summary(rows, sources, layouts),
    )
    return rows, summary


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


def save_prepared(rows: Sequence[ManifestRow], summary: DatasetSummary, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.csv`` and ``summary.json`` into ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    write_manifest(rows, manifest)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2))
    os.replace(tmp, out / "summary.json")
    return manifest


# --------------------------------------------------------------------------- shards


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
    keyed.sort(key=_row_order)
    weights = {d: float(v.get("weight", 1.0)) for d, v in summary.domains.items()}
    per_domain = {s: dict(Counter(r.domain for r in keyed if r.split == s)) for s in SPLITS}
    index = writer.close(manifest_bytes(keyed), summary.manifest_sha256, domain_weights=weights,
                         domain_counts=per_domain)
    log.info("wrote %s shards to %s", {s: len(v.shards) for s, v in index.splits.items()}, store)
    return keyed, index


def rows_for(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    """The rows of one split, in manifest order."""
    return [r for r in rows if r.split == split]


def augmentation_factory(size: int, background_p: float = 0.0) -> Any:
    """``seed -> train_augmentation(size, seed, background_p)``, picklable for loader worker processes."""
    return functools.partial(train_augmentation, size, background_p=background_p)


def _background_transform(p: float) -> Any:
    """An Albumentations transform putting plain-backdrop leaves on random backgrounds (:mod:`plantml.backdrop`)."""
    import albumentations as A

    class ReplaceBackground(A.ImageOnlyTransform):
        def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
            return replace_background(img, self.random_generator)

    return ReplaceBackground(p=p)


def train_augmentation(size: int, seed: int | None = None, background_p: float = 0.0) -> Any:
    """Albumentations pipeline for training (uint8 HWC in, uint8 HWC out).

    Leaves have no canonical orientation, so all flips and 90° turns are label-preserving;
    mild crops, colour jitter and blur mimic framing, lighting and focus differences.
    With ``background_p > 0``, that share of plain-backdrop (lab) photos first get their
    backdrop replaced by a random cluttered one, so "plain backdrop" stops being a cue
    (field photos have no plain backdrop and pass unchanged).
    """
    import albumentations as A

    first = [_background_transform(background_p)] if background_p > 0 else []
    return A.Compose([
        *first,
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.02, p=0.7),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
    ], seed=seed)
