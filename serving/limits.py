"""Memory admission for decoding: at most so many decoded pixels in flight per worker.

A worker runs ``PLANTML_HTTP_THREADS`` requests at once, and each request decodes its
images one at a time (``serving.app``). :class:`PixelGate` bounds what those threads hold
together: before a thread decodes an image it reserves the image's pixel count (known
from the header, before any pixel is decoded) and gives it back when the decoded image
has been reduced to the model input. Small images pass side by side; two images near the
per-image limit take turns. With the gate's capacity equal to the per-image limit, a
worker's decode memory is bounded by one maximal image whatever the clients send.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class PixelGate:
    """A counting gate over decoded pixels (thread-safe)."""

    def __init__(self, capacity: int) -> None:
        """Args:
            capacity: pixels that may be decoded at once in this process (>= the per-image limit,
                so that any single accepted image can always pass).
        """
        self.capacity = max(1, int(capacity))
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        """Hold ``pixels`` (capped at the capacity) for the duration of the ``with`` block.

        Waits while other threads hold too much. The wait is bounded by their decode time:
        every holder releases in ``finally``.
        """
        need = min(max(0, int(pixels)), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self.in_use + need <= self.capacity)
            self.in_use += need
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= need
                self._cond.notify_all()


def _libc() -> "object | None":
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        lib.malloc_trim  # noqa: B018 - glibc only; musl has none
        lib.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return lib


_LIBC = _libc()
#: glibc ``mallopt`` parameters (malloc.h).
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    After a large image, glibc keeps the freed pages in its arenas; a worker that once
    decoded 16 MP would otherwise keep that resident for the rest of its life.
    """
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))  # type: ignore[attr-defined]


def tune_malloc(arena_max: int = 2, mmap_threshold: int = 1 << 20) -> bool:
    """Bound glibc's per-thread arenas and serve large blocks from ``mmap`` (returned on free).

    ``MALLOC_ARENA_MAX`` in the environment does the first for a process started with it
    (the Dockerfile and the Deployment set it); this does both at run time for a server
    started any other way. A fixed ``M_MMAP_THRESHOLD`` also stops glibc's dynamic
    threshold from creeping up to 32 MB after the first large free, which is what made
    decoded images stay resident. Returns False where glibc is not there (musl, macOS).
    """
    if _LIBC is None:
        return False
    ok = bool(_LIBC.mallopt(M_ARENA_MAX, int(arena_max)))  # type: ignore[attr-defined]
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold))) and ok  # type: ignore[attr-defined]
