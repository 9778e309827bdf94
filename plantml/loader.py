"""Streaming input: a torch ``IterableDataset`` over the prepared shards, and its DataLoader.

Every pass over data — training, validation, test metrics, calibration, OOD fit and
scoring, INT8 calibration and gates — reads the shards of :mod:`plantml.shards` through
:func:`make_loader`, so no step holds a whole split in memory: a worker keeps one
shuffle buffer, the loop keeps one batch.

* **Work split.** With at least 4 shards per (rank × worker) slot, each slot reads its
  own shards (no byte is read twice; shares differ by at most a shard, and the smallest
  share sets the rank's steps, so an epoch may skip up to one shard per rank — a
  different one each epoch, as the shard order is reshuffled). With fewer shards (small
  data sets) every slot reads the split and keeps every ``slots``-th sample: exact, and
  cheap at that size.
* **Shuffling.** Shard order is permuted per epoch and samples pass through a
  bounded shuffle buffer; the training split is also written in random order, so the
  buffer mixes classes from the first batch on.
* **Domain weights.** In training, a sample of a domain with weight ``w``
  (``data.sources[].weight``) is yielded ``floor(w)`` times plus once more with
  probability ``w - floor(w)`` (so ``0.5`` halves a domain, ``3`` triples it); repeats
  pass through the shuffle buffer and get their own augmentation.
* **Augmentation** runs inside the loader workers (Albumentations on ``uint8``).
* **Batches are uint8** ``[B,H,W,3]``; :func:`to_model_input` converts and normalises on
  the training device (4x less host-to-device traffic than float32).
* **Torch at the top** (unlike the rest of the package): loader workers are separate
  processes that unpickle the dataset, which needs a module-level class. Only training
  and evaluation import this module; serving and edge never do.
* **Equal steps per rank.** Data-parallel ranks must take the same number of steps, so
  :func:`steps_per_epoch` is computed from the shard counts and every rank stops there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from plantml import shards as sh
from plantml.preprocess import InputSpec

log = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 512
#: Below this many shards per (rank x worker) slot, slots stride over samples instead.
SHARDS_PER_SLOT = 4


@dataclass(frozen=True)
class StreamPlan:
    """Which shards one (rank, worker) slot reads and whether it strides over samples."""

    shard_ids: tuple[int, ...]
    stride: int        # keep every ``stride``-th sample (1: all of the slot's shards)
    offset: int


def _shard_order(n_shards: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    if not shuffle:
        return list(range(n_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_shards)]


def plan_slot(n_shards: int, slot: int, n_slots: int, shuffle: bool, seed: int, epoch: int) -> StreamPlan:
    """The shards and stride of ``slot`` out of ``n_slots`` (ranks × workers)."""
    order = _shard_order(n_shards, shuffle, seed, epoch)
    if _by_shard(n_shards, n_slots):
        return StreamPlan(tuple(order[slot::n_slots]), 1, 0)
    return StreamPlan(tuple(order), n_slots, slot)


def _by_shard(n_shards: int, n_slots: int) -> bool:
    """Whole shards per slot only when each slot gets several (else the shares are too uneven)."""
    return n_shards >= SHARDS_PER_SLOT * n_slots


def samples_for_rank(counts: Sequence[int], rank: int, world: int, shuffle: bool, seed: int, epoch: int) -> int:
    """How many samples ``rank`` sees in ``epoch`` (all its workers together)."""
    n_shards = len(counts)
    if _by_shard(n_shards, world):
        order = _shard_order(n_shards, shuffle, seed, epoch)
        return int(sum(counts[i] for i in order[rank::world]))
    total = int(sum(counts))
    return total // world + (1 if rank < total % world else 0)


def steps_per_epoch(counts: Sequence[int], batch_size: int, world: int = 1, shuffle: bool = True, seed: int = 0,
                    epoch: int = 0) -> int:
    """Optimiser steps every rank takes in ``epoch``: equal across ranks (the smallest share).

    A lone process keeps a last partial batch of two or more images (BatchNorm cannot
    train on one); data-parallel ranks drop it so that every rank steps together.
    """
    per_rank = min(samples_for_rank(counts, r, world, shuffle, seed, epoch) for r in range(world))
    if world == 1:
        return per_rank // batch_size + (1 if per_rank % batch_size > 1 else 0)
    return per_rank // batch_size


class ShardStream(IterableDataset):
    """Samples of one split as ``(uint8 HWC array, label)``; see the module docstring."""

    def __init__(self, shard_uris: Sequence[str], shuffle: bool, seed: int,
                 augment_factory: Callable[[int], Any] | None, rank: int = 0, world: int = 1,
                 buffer_size: int = DEFAULT_SHUFFLE_BUFFER, epoch: int = 0, with_key: bool = False,
                 domain_weights: dict[str, float] | None = None) -> None:
        super().__init__()
        self.shard_uris = list(shard_uris)
        self.shuffle = shuffle
        self.seed = seed
        self.augment_factory = augment_factory
        self.rank, self.world = rank, world
        self.buffer_size = buffer_size if shuffle else 0
        self.epoch = epoch
        self.with_key = with_key
        # Only a non-trivial weighting changes the stream (evaluation never reweights).
        self.domain_weights = {k: float(v) for k, v in (domain_weights or {}).items() if v != 1.0}

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slot, n_slots = self.rank * n_workers + worker, self.world * n_workers
        plan = plan_slot(len(self.shard_uris), slot, n_slots, self.shuffle, self.seed, self.epoch)
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        augment = self.augment_factory(int(rng.integers(2**31))) if self.augment_factory else None
        stream = self._samples(plan)
        if self.domain_weights:
            stream = _reweighted(stream, self.domain_weights, rng)
        if self.buffer_size > 1:
            stream = _shuffled(stream, self.buffer_size, rng)
        for s in stream:
            pixels = augment(image=s.pixels)["image"] if augment is not None else s.pixels
            yield (pixels, s.label, s.key) if self.with_key else (pixels, s.label)

    def _samples(self, plan: StreamPlan) -> Iterator[sh.Sample]:
        pos = 0
        for i in plan.shard_ids:
            for s in sh.iter_shard(self.shard_uris[i]):
                if pos % plan.stride == plan.offset:
                    yield s
                pos += 1


def _reweighted(stream: Iterator[sh.Sample], weights: dict[str, float],
                rng: np.random.Generator) -> Iterator[sh.Sample]:
    """Each sample ``floor(w)`` times, plus once with probability ``w - floor(w)`` (``w``: its domain's weight)."""
    for s in stream:
        w = weights.get(s.meta.get("domain", ""), 1.0)
        n = int(w) + int(rng.random() < w - int(w))
        for _ in range(n):
            yield s


def _shuffled(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """A bounded shuffle buffer (memory: ``size`` samples)."""
    buf: list[Any] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


def _collate(batch: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    images = torch.from_numpy(np.stack([b[0] for b in batch]))
    labels = torch.as_tensor([b[1] for b in batch], dtype=torch.int64)
    if len(batch[0]) > 2:
        return images, labels, [b[2] for b in batch]
    return images, labels


def make_loader(index: sh.ShardIndex, split: str, batch_size: int, *, train: bool = False, seed: int = 0,
                epoch: int = 0, workers: int = 0, augment_factory: Callable[[int], Any] | None = None,
                rank: int = 0, world: int = 1, pin_memory: bool = False, with_key: bool = False,
                buffer_size: int = DEFAULT_SHUFFLE_BUFFER, domain_weights: dict[str, float] | None = None) -> Any:
    """A ``DataLoader`` streaming ``split`` of the shard set.

    Args:
        index: the shard set (:func:`plantml.shards.load_index`).
        split: ``train``, ``val`` or ``test``.
        batch_size: images per batch.
        train: shuffle (shard order + buffer) and apply ``augment_factory``.
        seed: with ``epoch``, fixes the shuffle and the augmentation of every worker.
        workers: loader processes (0: decode in the calling process).
        augment_factory: ``seed -> albumentations transform`` (built inside each worker).
        rank: this process's data-parallel rank, of ``world``.
        pin_memory: page-locked batches for fast copies to a GPU.
        with_key: also yield each sample's key (to match manifest rows).
        domain_weights: training sampling weight per domain (see the module docstring).

    Returns:
        A ``torch.utils.data.DataLoader`` yielding ``(uint8 [B,H,W,3], int64 [B])`` (plus keys).
    """
    dataset = ShardStream(index.shard_uris(split), shuffle=train, seed=seed,
                          augment_factory=augment_factory if train else None, rank=rank, world=world,
                          buffer_size=buffer_size, epoch=epoch, with_key=with_key,
                          domain_weights=domain_weights if train else None)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        # forkserver: workers start from a clean process, not a fork of a threaded torch
        # process (which can deadlock); the server is started once per run.
        kwargs.update(multiprocessing_context="forkserver", prefetch_factor=2)
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                      pin_memory=pin_memory, **kwargs)


def to_model_input(images: Any, spec: InputSpec, device: str = "cpu", channels_last: bool = True) -> Any:
    """``uint8 [B,H,W,3]`` tensor -> normalised ``float32 [B,3,S,S]`` on ``device``, ``S = spec.size``.

    The same maths as :func:`plantml.preprocess.normalize` (``(x/255 - mean) / std``),
    done after the copy so that only bytes cross to a GPU. Images of another side (the
    edge student fed the champion's shards) are resized after normalising (linear, so the
    same as resizing the pixels first) with antialiased bilinear interpolation — the
    downscale the student is exported behind (``plantml.pipeline.student_export.downscaled``).
    """
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[-2:] != (spec.size, spec.size):
        x = torch.nn.functional.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def iterate_split(index: sh.ShardIndex, split: str, spec: InputSpec, batch_size: int = 64, workers: int = 0,
                  device: str = "cpu", with_key: bool = False) -> Iterator[tuple[Any, ...]]:
    """Model-ready batches of a split in stored order: ``(x float32 NCHW, labels[, keys])``."""
    for batch in make_loader(index, split, batch_size, workers=workers, with_key=with_key,
                             pin_memory=device == "cuda"):
        yield (to_model_input(batch[0], spec, device), *batch[1:])
