"""One latency measurement for every runtime (torch, ONNX Runtime, OpenVINO). Torch-free."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np


def latency_stats(fn: Callable[[Any], Any], x: Any, runs: int = 30, warmup: int = 3) -> dict[str, float]:
    """Call ``fn(x)`` ``warmup`` times untimed, then ``runs`` times timed.

    Returns:
        ``{"median_ms", "p95_ms", "mean_ms", "min_ms", "runs"}`` (wall clock, milliseconds).
    """
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "median_ms": float(np.median(times)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": float(np.mean(times)),
        "min_ms": float(np.min(times)),
        "runs": runs,
    }
