"""The prepared dataset as WebDataset tar shards in the run's store.

``prepare`` decodes every image once, resizes it to the training size and writes the
splits as shards that every later step — on this machine or another — streams back:

``<store>/index.json``
    classes, image size, and per split the shard names and sample counts. Written
    last, so its presence means the shard set is complete.
``<store>/<split>-00000.tar`` …
    `WebDataset <https://github.com/webdataset/webdataset>`_ format: a plain tar in
    which the files of one sample share a key. Per sample: ``<key>.npy`` (``uint8
    [S,S,3]`` pixels, resized + centre-cropped as by
    :func:`plantml.preprocess.resize_center_crop`), ``<key>.cls`` (class index) and
    ``<key>.json`` (label, sha256, source path, domain). Validation and test samples also
    carry the original file (``<key>.orig.jpg`` …): the drift reference and the
    corruption sweep need the photo as a client would upload it.
``<store>/manifest.csv``
    every image with its split and sha256 (see :mod:`plantml.data`).

Why pixels and not JPEG: decoding is paid once, in ``prepare``; every training epoch
and evaluation pass then costs only I/O and augmentation, and pixels are lossless, so
evaluation sees exactly what the earlier in-memory arrays held. At 160 px a sample is
77 KB (PlantVillage, 54k images: 4.2 GB of shards), cheap next to GPU hours.

Shards are ~``samples_per_shard`` samples each so that loader workers and data-parallel
ranks get whole shards, and the training split is written in a seeded random order so
that a shuffle buffer mixes classes from the first batch on. Torch-free.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from plantml import storage

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.csv"
FORMAT = "webdataset"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Sample:
    """One decoded sample read back from a shard."""

    key: str
    pixels: np.ndarray           # uint8 [S, S, 3]
    label: int
    meta: dict[str, Any]
    original: bytes | None = None


@dataclass
class SplitIndex:
    shards: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(sum(self.counts))


@dataclass
class ShardIndex:
    """What ``index.json`` holds: enough for any step to stream a split from ``root``."""

    root: str
    classes: list[str]
    image_size: int
    splits: dict[str, SplitIndex]
    originals: list[str]
    manifest_sha256: str = ""
    created_at: float = 0.0
    format: str = FORMAT
    version: int = FORMAT_VERSION
    #: training sampling weight per domain (``data.sources[].weight``); every sample's
    #: ``.json`` names its domain. Empty for shard sets written before domains existed.
    domain_weights: dict[str, float] = field(default_factory=dict)
    #: samples per split and domain, e.g. ``{"train": {"lab": 1428, "field": 168}}``
    domain_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def weighted_train_factor(self) -> float:
        """Expected training samples per epoch under the domain weights, over the stored count (1: unweighted)."""
        counts = self.domain_counts.get("train", {})
        total = sum(counts.values())
        if not total or not self.domain_weights:
            return 1.0
        return sum(n * self.domain_weights.get(d, 1.0) for d, n in counts.items()) / total

    @property
    def domains(self) -> list[str]:
        """The domains of this shard set (``["lab"]`` for one written before domains existed)."""
        return list(self.domain_weights) or ["lab"]

    def count(self, split: str) -> int:
        return self.splits[split].n if split in self.splits else 0

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.root, name) for name in self.splits[split].shards] if split in self.splits else []

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s, v in self.splits.items():
            d["splits"][s]["n"] = v.n
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], root: str | None = None) -> "ShardIndex":
        splits = {s: SplitIndex(list(v["shards"]), [int(c) for c in v["counts"]]) for s, v in d["splits"].items()}
        return cls(root=root or d["root"], classes=list(d["classes"]), image_size=int(d["image_size"]),
                   splits=splits, originals=list(d.get("originals", [])),
                   manifest_sha256=d.get("manifest_sha256", ""), created_at=float(d.get("created_at", 0.0)),
                   format=d.get("format", FORMAT), version=int(d.get("version", FORMAT_VERSION)),
                   domain_weights={k: float(v) for k, v in d.get("domain_weights", {}).items()},
                   domain_counts={s: {k: int(n) for k, n in v.items()} for s, v in d.get("domain_counts", {}).items()})


def load_index(root: str | os.PathLike[str]) -> ShardIndex:
    """Read ``<root>/index.json``.

    Raises:
        storage.StorageError: if the shard set is missing or incomplete (no index).
    """
    uri = storage.join(root, INDEX_FILE)
    try:
        raw = json.loads(storage.read_bytes(uri))
    except storage.StorageError as exc:
        raise storage.StorageError(
            f"no prepared shards at {root} ({INDEX_FILE} missing): run the prepare step first") from exc
    return ShardIndex.from_dict(raw, root=str(root))


# --------------------------------------------------------------------------- writing


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


class ShardSetWriter:
    """Write the splits of one dataset as shards, then publish ``index.json``.

    A shard is built in a local temporary folder and then moved (local store) or uploaded
    (S3) as soon as it is full, so local disk holds at most one shard per open split.
    Nothing is visible as a complete set until :meth:`close` writes the index.

    Args:
        root: the store folder or ``s3://`` prefix.
        classes: class names; a sample's label is its index here.
        image_size: the pixel size every sample has.
        samples_per_shard: samples per tar file.
        originals: splits whose samples also keep their original file bytes.
    """

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str], image_size: int,
                 samples_per_shard: int = 1000, originals: Sequence[str] = ("val", "test")) -> None:
        self.root = str(root)
        self.classes = list(classes)
        self.image_size = int(image_size)
        self.samples_per_shard = max(1, int(samples_per_shard))
        self.originals = list(originals)
        self._tmp = tempfile.TemporaryDirectory(prefix="plantml-shards-")
        self._open: dict[str, tuple[tarfile.TarFile, Path, int]] = {}
        self._splits: dict[str, SplitIndex] = {}
        self._now = time.time()

    def write(self, split: str, key: str, pixels: np.ndarray, label: int, meta: dict[str, Any],
              original: bytes | None = None, original_ext: str = "jpg") -> None:
        """Append one sample to ``split``'s current shard."""
        if pixels.shape != (self.image_size, self.image_size, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"sample {key}: pixels must be uint8 {self.image_size}x{self.image_size}x3, "
                             f"got {pixels.dtype} {pixels.shape}")
        tar, path, n = self._open.get(split) or self._new_shard(split)
        _add(tar, f"{key}.npy", _npy_bytes(pixels), self._now)
        _add(tar, f"{key}.cls", str(int(label)).encode(), self._now)
        _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode(), self._now)
        if original is not None and split in self.originals:
            _add(tar, f"{key}.orig.{original_ext.lstrip('.').lower() or 'bin'}", original, self._now)
        self._open[split] = (tar, path, n + 1)
        if n + 1 >= self.samples_per_shard:
            self._finish(split)

    def _new_shard(self, split: str) -> tuple[tarfile.TarFile, Path, int]:
        idx = self._splits.setdefault(split, SplitIndex())
        name = f"{split}-{len(idx.shards):05d}.tar"
        path = Path(self._tmp.name) / name
        entry = (tarfile.open(path, "w", format=tarfile.USTAR_FORMAT), path, 0)
        self._open[split] = entry
        return entry

    def _finish(self, split: str) -> None:
        tar, path, n = self._open.pop(split)
        tar.close()
        storage.upload_file(path, storage.join(self.root, path.name))
        path.unlink()
        idx = self._splits[split]
        idx.shards.append(path.name)
        idx.counts.append(n)

    def close(self, manifest_csv: bytes | None = None, manifest_sha256: str = "",
              domain_weights: dict[str, float] | None = None,
              domain_counts: dict[str, dict[str, int]] | None = None) -> ShardIndex:
        """Flush open shards, write the manifest and the index (with each domain's sampling weight)."""
        for split in list(self._open):
            self._finish(split)
        if manifest_csv is not None:
            storage.write_bytes(storage.join(self.root, MANIFEST_FILE), manifest_csv)
        index = ShardIndex(root=self.root, classes=self.classes, image_size=self.image_size,
                           splits=self._splits, originals=self.originals, manifest_sha256=manifest_sha256,
                           created_at=time.time(), domain_weights=dict(domain_weights or {}),
                           domain_counts=dict(domain_counts or {}))
        storage.write_bytes(storage.join(self.root, INDEX_FILE), json.dumps(index.to_dict(), indent=2).encode())
        self._tmp.cleanup()
        return index


# --------------------------------------------------------------------------- reading


def iter_shard(uri: str, with_originals: bool = False) -> Iterator[Sample]:
    """Stream the samples of one shard in stored order (no whole-file download)."""
    current: dict[str, Any] = {}
    key = None
    with storage.open_read(uri) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, _, ext = member.name.partition(".")
            if k != key:
                if key is not None:
                    yield _sample(key, current)
                key, current = k, {}
            if ext.startswith("orig.") and not with_originals:
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            current[ext] = data
        if key is not None:
            yield _sample(key, current)


def _sample(key: str, parts: dict[str, bytes]) -> Sample:
    original = next((v for k, v in parts.items() if k.startswith("orig.")), None)
    return Sample(key=key, pixels=np.load(io.BytesIO(parts["npy"]), allow_pickle=False),
                  label=int(parts["cls"]), meta=json.loads(parts["json"]), original=original)


def iter_split(index: ShardIndex, split: str, with_originals: bool = False,
               shards: Iterable[int] | None = None) -> Iterator[Sample]:
    """Every sample of ``split`` (or of the given shard numbers), in stored order."""
    uris = index.shard_uris(split)
    for i in (range(len(uris)) if shards is None else shards):
        yield from iter_shard(uris[i], with_originals=with_originals)


def select_keys(index: ShardIndex, split: str, keys: set[str], with_originals: bool = True) -> list[Sample]:
    """The samples of ``split`` whose key is in ``keys`` (one streaming pass; bounded by ``len(keys)``)."""
    return [s for s in iter_split(index, split, with_originals=with_originals) if s.key in keys]
