"""Data: find the images, write a manifest, split it, load it, augment it.

Accepted layouts (``root`` is what the user passes as ``--data-dir``):

* ``root/<Class>/*.jpg`` — PlantVillage as distributed;
* ``root/color/<Class>/*.jpg`` — the raw PlantVillage repository (``color``, ``grayscale``
  and ``segmented`` variants side by side; only ``color`` is used);
* ``root/train/<Class>/…`` + ``root/valid/<Class>/…`` (or ``val``/``test``) — the common
  pre-split Kaggle variant: ``train`` stays train, the held-out folders are split
  (stratified) into validation and test.

The manifest lists every readable image with its class, split and sha256. Exact
duplicates (same sha256) are grouped so that they always land in the same split.
Unreadable or non-image files are reported and skipped, and counted; they never stop a
run. The split is stratified per class and deterministic for the seed.

Torch-free (albumentations and numpy only).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, load_image, resize_center_crop

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_PRESPLIT_TRAIN = ("train", "training")
_PRESPLIT_HELDOUT = ("valid", "val", "validation", "test")
MIN_IMAGES_PER_CLASS = 3
MANIFEST_COLUMNS = ("path", "label", "split", "sha256", "width", "height")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- layout


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def detect_layout(root: Path) -> tuple[str, dict[str, Path]]:
    """Find the class folders under ``root``.

    Returns:
        ``(layout, {source: folder})`` where layout is ``flat``, ``color`` or ``presplit``
        and each folder holds class sub-folders. For ``presplit`` the sources are
        ``train`` and ``heldout``.

    Raises:
        DataError: if ``root`` is missing or is not a folder.
    """
    if not root.exists():
        raise DataError(f"data directory not found: {root}")
    if not root.is_dir():
        raise DataError(f"data directory is not a folder: {root}")
    names = {p.name.lower(): p for p in _class_dirs(root)}
    if "color" in names and _class_dirs(names["color"]):
        return "color", {"all": names["color"]}
    train = next((names[n] for n in _PRESPLIT_TRAIN if n in names), None)
    held = [names[n] for n in _PRESPLIT_HELDOUT if n in names]
    if train is not None and held:
        return "presplit", {"train": train, **{f"heldout{i}": h for i, h in enumerate(held)}}
    return "flat", {"all": root}


def _iter_files(class_dir: Path) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(class_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


# --------------------------------------------------------------------------- scanning


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scan_images(
    sources: dict[str, Path], max_per_class: int | None = None, progress: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, str]], list[str]]:
    """Decode every candidate file once; keep the readable ones.

    Returns:
        ``(items, skipped, empty_classes)``: items have path, label, source, sha256,
        width, height; skipped have path and reason; empty_classes lists class folders
        with no readable image.
    """
    candidates: list[tuple[str, str, Path]] = []
    class_names: set[str] = set()
    for source, folder in sources.items():
        for class_dir in _class_dirs(folder):
            class_names.add(class_dir.name)
            files = list(_iter_files(class_dir))
            for f in files:
                candidates.append((source, class_dir.name, f))
    items: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    per_class: Counter[str] = Counter()
    for source, label, path in tqdm(candidates, desc="scan images", unit="img", disable=not progress, mininterval=2):
        if max_per_class is not None and per_class[label] >= max_per_class:
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": str(path), "reason": f"not an image file (extension {path.suffix or 'none'})"})
            continue
        try:
            data = path.read_bytes()
            img = decode_image(data)
        except ImageDecodeError as exc:
            skipped.append({"path": str(path), "reason": str(exc)})
            continue
        except OSError as exc:
            skipped.append({"path": str(path), "reason": f"unreadable: {exc}"})
            continue
        per_class[label] += 1
        items.append({
            "path": str(path.resolve()), "label": label, "source": source,
            "sha256": _sha256_bytes(data), "width": img.size[0], "height": img.size[1],
        })
    empty = sorted(c for c in class_names if per_class[c] == 0)
    return items, skipped, empty


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


def assign_splits(items: list[dict[str, Any]], fractions: Sequence[float], seed: int) -> list[ManifestRow]:
    """Stratified, deterministic split that keeps exact duplicates together.

    Files sharing a sha256 form one group; a group goes wholly into one split. Within a
    class, groups are ordered by ``sha256(seed|hash)`` and cut at the fractions. For a
    pre-split dataset, ``train`` items stay in train and held-out items are divided
    between val and test in the ratio of those fractions.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        groups[it["sha256"]].append(it)
    # A byte-identical file under two class names is ambiguous: keep the first label.
    by_class: dict[tuple[str, str], list[str]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for sha, members in groups.items():
        labels = sorted({m["label"] for m in members})
        if len(labels) > 1:
            log.warning("identical file under several classes %s (%s); using %s", labels, members[0]["path"], labels[0])
        label_of[sha] = labels[0]
        pool = "train" if all(m["source"] == "train" for m in members) and members[0]["source"] == "train" else (
            "heldout" if all(m["source"].startswith("heldout") for m in members) else "all"
        )
        by_class[(labels[0], pool)].append(sha)
    split_of: dict[str, str] = {}
    for (label, pool), shas in sorted(by_class.items()):
        ordered = sorted(shas, key=lambda s: _rank(seed, s))
        if pool == "train":
            for s in ordered:
                split_of[s] = "train"
            continue
        if pool == "heldout":
            total = fractions[1] + fractions[2]
            n_val = int(round(len(ordered) * fractions[1] / total)) if total else 0
            for i, s in enumerate(ordered):
                split_of[s] = "val" if i < n_val else "test"
            continue
        n_train, n_val, _ = _split_counts(len(ordered), fractions)
        for i, s in enumerate(ordered):
            split_of[s] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    rows = [
        ManifestRow(m["path"], label_of[sha], split_of[sha], sha, m["width"], m["height"])
        for sha, members in groups.items() for m in members
    ]
    return sorted(rows, key=lambda r: (r.label, r.split, r.path))


# --------------------------------------------------------------------------- manifest I/O


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> str:
    """Write the manifest CSV atomically; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow([r.path, r.label, r.split, r.sha256, r.width, r.height])
    os.replace(tmp, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest CSV written by :func:`write_manifest`."""
    if not Path(path).is_file():
        raise DataError(f"manifest not found: {path} (run `plantml prepare` first)")
    with open(path, newline="") as fh:
        return [
            ManifestRow(r["path"], r["label"], r["split"], r["sha256"], int(r["width"]), int(r["height"]))
            for r in csv.DictReader(fh)
        ]


def manifest_digest(rows: Sequence[ManifestRow]) -> str:
    """Content hash of a manifest (independent of where it is written)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.label}|{r.split}|{r.sha256}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- prepare


def prepare_dataset(
    root: str | os.PathLike[str],
    fractions: Sequence[float] = (0.7, 0.2, 0.1),
    seed: int = 42,
    max_per_class: int | None = None,
    is_demo: bool = False,
    progress: bool = True,
) -> tuple[list[ManifestRow], DatasetSummary]:
    """Scan ``root``, skip unreadable files, split, and summarise.

    Raises:
        DataError: missing folder, fewer than two usable classes, or a class too small
            to split — each with a one-line message naming the problem.
    """
    root = Path(root).expanduser()
    layout, sources = detect_layout(root)
    items, skipped, empty = scan_images(sources, max_per_class=max_per_class, progress=progress)
    for c in empty:
        log.warning("class folder %r has no readable images: skipped", c)
    classes = sorted({it["label"] for it in items})
    if len(classes) < 2:
        found = f"{len(classes)} usable class folder{'s' if len(classes) != 1 else ''}"
        raise DataError(
            f"{root}: found {found} ({', '.join(classes) or 'none'}); need at least 2 class folders of images "
            f"(<root>/<Class>/*.jpg){'; empty: ' + ', '.join(empty) if empty else ''}"
        )
    counts = Counter(it["label"] for it in items)
    small = sorted(c for c in classes if counts[c] < MIN_IMAGES_PER_CLASS)
    if small and layout != "presplit":
        raise DataError(
            f"class {small[0]!r} has only {counts[small[0]]} readable image(s); need at least {MIN_IMAGES_PER_CLASS} "
            "to split into train/val/test"
        )
    rows = assign_splits(items, fractions, seed)
    split_counts: dict[str, dict[str, int]] = {c: {s: 0 for s in SPLITS} for c in classes}
    for r in rows:
        split_counts[r.label][r.split] += 1
    n_dupes = len(rows) - len({r.sha256 for r in rows})
    if skipped:
        log.warning("skipped %d unreadable or non-image file(s), e.g. %s: %s",
                    len(skipped), skipped[0]["path"], skipped[0]["reason"])
    summary = DatasetSummary(
        root=str(root.resolve()), layout=layout, classes=classes, counts=split_counts, n_images=len(rows),
        n_skipped=len(skipped), skipped=skipped[:200], skipped_empty_classes=empty, n_duplicate_files=n_dupes,
        manifest_sha256=manifest_digest(rows), is_demo=is_demo,
    )
    return rows, summary


def save_prepared(rows: Sequence[ManifestRow], summary: DatasetSummary, out_dir: str | os.PathLike[str]) -> Path:
    """Write ``manifest.csv`` and ``summary.json`` into ``out_dir``; returns the manifest path."""
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    write_manifest(rows, manifest)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary.to_dict(), indent=2))
    os.replace(tmp, out / "summary.json")
    return manifest


# --------------------------------------------------------------------------- loading


def load_images(
    rows: Sequence[ManifestRow], classes: Sequence[str], size: int, progress: bool = True, desc: str = "load"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode and resize (shorter side + centre crop) rows into memory.

    Holding the split as ``uint8`` arrays (a 1,000-image set at 160 px is 77 MB) makes
    each CPU epoch cost only augmentation and the forward/backward pass, not JPEG
    decoding.

    Returns:
        ``(images uint8 [N,H,W,3], labels int64 [N])``.
    """
    index = {c: i for i, c in enumerate(classes)}
    x = np.empty((len(rows), size, size, 3), dtype=np.uint8)
    y = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(tqdm(rows, desc=desc, unit="img", disable=not progress, mininterval=2)):
        x[i] = resize_center_crop(load_image(r.path), size)
        y[i] = index[r.label]
    return x, y


def rows_for(rows: Sequence[ManifestRow], split: str) -> list[ManifestRow]:
    return [r for r in rows if r.split == split]


def train_augmentation(size: int, seed: int | None = None) -> Any:
    """Albumentations pipeline for training (uint8 HWC in, uint8 HWC out).

    Leaves have no canonical orientation, so all flips and 90° turns are label-preserving;
    mild crops, colour jitter and blur mimic framing, lighting and focus differences.
    """
    import albumentations as A

    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.6, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.02, p=0.7),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
    ], seed=seed)
