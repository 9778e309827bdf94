"""Reading the images: decode each candidate file once, keep the readable ones, stage their pixels.

Unreadable or non-image files are reported and skipped, and counted; they never stop a run.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml import storage
from plantml.data.manifest import DEFAULT_DOMAIN
from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, decode_image, resize_center_crop
from plantml.resources import available_cores


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
        """Park one image's resized pixels (and, if kept, its original bytes) under ``slot``."""
        os.pwrite(self._pixels, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), slot * self.record)
        if self._blob is not None and original is not None:
            with self._lock:
                self._blob.seek(0, os.SEEK_END)
                offset = self._blob.tell()
                self._blob.write(original)
                self._where[slot] = (offset, len(original))

    def get(self, slot: int, with_original: bool = True) -> tuple[np.ndarray, bytes | None]:
        """``(pixels, original bytes or None)`` of ``slot``."""
        raw = os.pread(self._pixels, self.record, slot * self.record)
        pixels = np.frombuffer(raw, dtype=np.uint8).reshape(self.size, self.size, 3)
        original = None
        if with_original and self._blob is not None and slot in self._where:
            offset, length = self._where[slot]
            self._blob.flush()
            original = os.pread(self._blob.fileno(), length, offset)
        return pixels, original

    def close(self) -> None:
        """Close and delete the scratch files."""
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
