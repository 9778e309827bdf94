"""The drift feed: per-prediction image statistics appended to a rotating JSON-lines log.

Each record holds :data:`plantml.imagestats.STAT_COLUMNS` plus ``confidence``,
``label``, ``abstained``, ``timestamp`` (ISO 8601, UTC), ``model_version`` and
``model_name``; ``plantml drift --current PATH`` reads the file.

Off the request's critical path: the request thread only puts ``(image, prediction)``
on a bounded queue (a full queue drops the record and counts it, it never blocks a
request); a daemon thread computes the statistics and appends them in small batches.

Safe with several gunicorn workers writing one file: each batch is appended under an
exclusive ``fcntl.flock`` on ``PATH.lock``, and rotation (``PATH`` -> ``PATH.1`` -> ...)
happens under the same lock, so lines never interleave and two workers never rotate at
once. Every batch reopens ``PATH``, so a worker never keeps writing into a rotated file.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import queue
import random
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from plantml import imagestats
from plantml.imagestats import image_statistics

log = logging.getLogger(__name__)

_STOP = object()
#: Side of the thumbnail image_statistics computes on; a test pins that statistics of
#: this thumbnail (with the original size) equal those of the full image.
STATS_THUMBNAIL: int = getattr(imagestats, "_THUMB", 128)


class DriftFeed:
    """Background writer of drift records (one per worker process)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_name: str,
        model_version: str,
        max_bytes: int = 50 * 1024 * 1024,
        backups: int = 5,
        queue_size: int = 1024,
        on_drop: Callable[[], None] | None = None,
        sample_rate: float = 1.0,
    ) -> None:
        """Open (create) the feed and start its writer thread.

        Args:
            path: the JSON-lines file; its folder is created.
            model_name / model_version: stamped on every record.
            max_bytes: rotate when the file is larger than this.
            backups: rotated files kept (``PATH.1`` newest).
            queue_size: records buffered before new ones are dropped.
            on_drop: called for each dropped record (a metrics counter).
            sample_rate: share of predictions that get a record (:meth:`sampled`); 1 = all.
        """
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.model_name = model_name
        self.model_version = model_version
        self.max_bytes = max(1, int(max_bytes))
        self.backups = max(0, int(backups))
        self.on_drop = on_drop
        self.sample_rate = min(1.0, float(sample_rate))
        self.written = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="drift-feed", daemon=True)
        self._closed = False
        self._thread.start()
        atexit.register(self.close)

    def sampled(self) -> bool:
        """Whether the next prediction goes to the feed (a uniform random draw at ``sample_rate``).

        Asked *before* the image is decoded, so that an unsampled prediction costs neither
        the thumbnail nor the statistics. A uniform sample keeps every column's
        distribution what it would be with all records, which is what the drift job compares.
        """
        return self.sample_rate >= 1.0 or random.random() < self.sample_rate

    def submit(self, image: Image.Image, label: str, confidence: float, abstained: bool,
               size: tuple[int, int] | None = None) -> bool:
        """Queue one prediction for the feed; never blocks. Returns False if dropped.

        The image is shrunk *in place* to the 128-px thumbnail that
        :func:`~plantml.imagestats.image_statistics` works on anyway (identical result,
        the original size is kept aside), so the queue holds kilobytes per record
        however large the upload was. Call this after the image has been preprocessed,
        or pass a thumbnail made by :func:`shrink_for_stats` with the decoded ``size``.
        """
        if self._closed:
            return False
        size = image.size if size is None else size
        shrink_for_stats(image)
        try:
            self._queue.put_nowait((image, size, label, float(confidence), bool(abstained), _now_iso()))
            return True
        except queue.Full:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop()
            return False

    def record(self, image: Image.Image, size: tuple[int, int], label: str, confidence: float, abstained: bool,
               timestamp: str) -> dict:
        """Build one record (statistics are computed here, in the writer thread)."""
        rec: dict[str, Any] = dict(image_statistics(image))
        width, height = size
        rec.update(width=float(width), height=float(height), aspect=float(width) / float(height))
        rec.update(
            confidence=confidence, label=label, abstained=abstained, timestamp=timestamp,
            model_version=self.model_version, model_name=self.model_name,
        )
        return rec

    def _loop(self) -> None:
        stop = False
        while not stop:
            taken = [self._queue.get()]
            # Gather what else is waiting, so one flock covers many lines. At most
            # queue_size records: a writer stuck on the lock must not hold more than the
            # queue's bound in memory (beyond it, submit drops, as documented).
            limit = min(256, self._queue.maxsize or 256)
            while len(taken) < limit and taken[-1] is not _STOP:
                try:
                    taken.append(self._queue.get(timeout=0.05))
                except queue.Empty:
                    break
            stop = taken[-1] is _STOP
            batch = [item for item in taken if item is not _STOP]
            try:
                if batch:
                    self._write(batch)
            finally:
                for _ in taken:
                    self._queue.task_done()

    def _write(self, batch: list[tuple]) -> None:
        lines = []
        for image, size, label, conf, abst, ts in batch:
            try:
                rec = self.record(image, size, label, conf, abst, ts)
                lines.append(json.dumps(rec, separators=(",", ":")) + "\n")
            except Exception as exc:  # noqa: BLE001 - one odd image must not stop the feed
                log.warning("drift record skipped: %s", exc)
        if not lines:
            return
        data = "".join(lines).encode()
        try:
            with open(self.lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    self._rotate_if_needed()
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                    try:
                        # a torn line left by a failed write (full disk, killed writer) is
                        # closed first, so that it costs one bad line, not the next record too
                        write_all(fd, (b"\n" if _ends_torn(fd) else b"") + data)
                    finally:
                        os.close(fd)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            self.written += len(lines)
        except OSError as exc:
            log.error("drift feed %s not writable: %s (%d records lost)", self.path, exc, len(lines))

    def _rotate_if_needed(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self.max_bytes:
            return
        if self.backups == 0:
            self.path.unlink()
            return
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the thread (called at worker exit)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.warning("drift feed queue full at shutdown; some records are lost")
            return
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until every record queued so far is written; False on timeout."""
        with self._queue.all_tasks_done:
            return self._queue.all_tasks_done.wait_for(lambda: self._queue.unfinished_tasks == 0, timeout)


def shrink_for_stats(image: Image.Image) -> Image.Image:
    """Shrink ``image`` in place to the thumbnail the drift statistics use; returns it."""
    image.thumbnail((STATS_THUMBNAIL, STATS_THUMBNAIL), Image.Resampling.BILINEAR)
    return image


def _ends_torn(fd: int) -> bool:
    """Whether the file behind ``fd`` is non-empty and does not end with a newline."""
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short: full disk, signal).

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``); what was written stays, so a reader
            may see a torn last line, which :func:`plantml.drift.read_drift_log` skips.
    """
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(f"os.write wrote {written} bytes")
        view = view[written:]


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
