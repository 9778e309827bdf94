"""How much of the machine this process may use: CPU quota, threads, loader workers.

``os.cpu_count()`` and even ``sched_getaffinity`` report the *node's* cores inside a
Kubernetes pod; the pod's real share is its cgroup CPU quota (``resources.limits.cpu``).
Sizing torch threads or DataLoader workers from the node's 64 cores in a 4-CPU pod
makes every step thrash, so everything here starts from :func:`available_cores`.

Torch-free.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in cores, or ``None`` when unlimited.

    Reads cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) and
    falls back to cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota_us = int((root / folder / "cpu.cfs_quota_us").read_text())
            period_us = int((root / folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cores(root: Path = CGROUP_ROOT) -> int:
    """Cores this process may use: affinity, capped by the cgroup quota (rounded up, >= 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores, max(1, math.ceil(limit - 1e-9)))
    return max(1, cores)


def resolve_threads(configured: int, parallel_branches: int = 1, cores: int | None = None) -> int:
    """Torch intra-op threads for one branch: the configured number, or an equal share of the cores."""
    if configured > 0:
        return configured
    return max(1, (cores or available_cores()) // max(1, parallel_branches))


def resolve_loader_workers(configured: int, share: int, device: str) -> int:
    """DataLoader worker processes for a branch that owns ``share`` cores.

    ``configured >= 0`` wins. Automatic (``-1``): on a GPU the model waits for the CPU,
    so decoding and augmentation get every core but one (at most 8); on a CPU the same
    cores run the model, and decoding ``uint8`` shards plus augmentation costs a few
    percent of a training step, so below 4 cores the loader runs in-process and above
    it gets a quarter of them.
    """
    if configured >= 0:
        return configured
    if device == "cuda":
        return max(1, min(8, share - 1))
    return 0 if share < 4 else share // 4
