"""Where the images are: the data sources of a run and the folder layout of each.

Accepted layouts (``root`` is what the user passes as ``--data-dir``):

* ``root/<Class>/*.jpg`` — PlantVillage as distributed;
* ``root/color/<Class>/*.jpg`` — the raw PlantVillage repository (``color``, ``grayscale``
  and ``segmented`` variants side by side; only ``color`` is used);
* ``root/train/<Class>/…`` + ``root/valid/<Class>/…`` (or ``val``/``test``) — the common
  pre-split Kaggle variant: ``train`` stays train, the held-out folders are split
  (stratified) into validation and test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from plantml import storage
from plantml.data.manifest import DEFAULT_DOMAIN, DataError

_PRESPLIT_TRAIN = ("train", "training")
_PRESPLIT_HELDOUT = ("valid", "val", "validation", "test")
_DOMAIN_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)=(.*)$")


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
