"""This process's torch settings for a branch: threads, seeds and device."""

from __future__ import annotations

import random

import numpy as np

from plantml.training.records import DistributedContext


def resolve_device(setting: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``.

    Args:
        setting: ``train.device`` (``auto``, ``cpu`` or ``cuda``).

    Returns:
        The torch device name to train on.

    Raises:
        RuntimeError: ``cuda`` was asked for but no CUDA device is visible.
    """
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global random generators.

    Args:
        seed: ``train.seed``.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_process(setting: str, seed: int, threads: int, dist: DistributedContext) -> str:
    """Set torch's threads, seed every generator and pick this rank's device.

    Args:
        setting: ``train.device``.
        seed: ``train.seed``.
        threads: torch intra-op threads for this process.
        dist: this process's data-parallel rank (a CUDA rank gets ``cuda:<local_rank>``).

    Returns:
        The device this process trains on.
    """
    import torch

    torch.set_num_threads(max(1, threads))
    seed_everything(seed)
    device = resolve_device(setting)
    if device == "cuda" and dist.world > 1:
        torch.cuda.set_device(dist.local_rank)
        device = f"cuda:{dist.local_rank}"
    return device


def device_type(device: str) -> str:
    """``cuda`` for any CUDA device (``cuda:1``), else ``cpu``: what autocast and pinning ask."""
    return "cuda" if device.startswith("cuda") else "cpu"
