"""Bounded, deterministic subsets of the prepared shards, and the image helpers that go with them.

Every evaluation and export pass that cannot stream a whole split works on a capped,
class-stratified subset chosen here, so memory is bounded by the caps in params.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from plantml import shards as sh
from plantml import storage
from plantml.data import DEFAULT_DOMAIN, ManifestRow, read_manifest_bytes, rows_for
from plantml.preprocess import decode_image


def stratified_subset(rows: Sequence[ManifestRow], limit: int, seed: int) -> list[ManifestRow]:
    """At most ``limit`` rows, each class keeping its share (at least one row), deterministic for ``seed``.

    Args:
        rows: manifest rows to choose from.
        limit: the cap.
        seed: the random seed.

    Returns:
        The chosen rows, grouped by class (classes sorted).
    """
    if len(rows) <= limit:
        return list(rows)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    picked: list[ManifestRow] = []
    for label in sorted(by_label):
        members = by_label[label]
        k = max(1, round(limit * len(members) / len(rows)))
        picked += [members[i] for i in sorted(rng.choice(len(members), size=min(k, len(members)), replace=False))]
    return picked


def load_manifest(index: sh.ShardIndex) -> list[ManifestRow]:
    """The manifest stored beside the shards.

    Args:
        index: the prepared shards.

    Returns:
        One row per image.
    """
    return read_manifest_bytes(storage.read_bytes(storage.join(index.root, sh.MANIFEST_FILE)))


def subset_samples(index: sh.ShardIndex, split: str, limit: int, seed: int,
                   rows: Sequence[ManifestRow] | None = None, with_originals: bool = False) -> list[sh.Sample]:
    """At most ``limit`` samples of ``split``, stratified by class, in one streaming pass.

    The training split is stored in random order, so its first ``limit`` samples are a
    uniform random sample and only the first shards are read; validation and test are
    stored by class, so their subset is chosen per class from the manifest.

    Args:
        index: the prepared shards.
        split: ``train``, ``val`` or ``test``.
        limit: the cap.
        seed: the random seed of the per-class choice.
        rows: the manifest (read from the store when not given).
        with_originals: also load each sample's original file bytes.

    Returns:
        The samples.
    """
    if split == "train":
        out: list[sh.Sample] = []
        for s in sh.iter_split(index, split, with_originals=with_originals):
            if len(out) >= limit:
                break
            out.append(s)
        return out
    rows = rows if rows is not None else load_manifest(index)
    keys = {r.key for r in stratified_subset(rows_for(rows, split), limit, seed)}
    return sh.select_keys(index, split, keys, with_originals=with_originals)


def shrink_original(data: bytes, size: int) -> Any:
    """An original photo decoded and shrunk so its shorter side is at most ``2 * size``.

    The corruption sweep and the background baseline work on this: field photos can be
    12 MP, and a few hundred of them at full size would not fit in a bounded step.

    Args:
        data: the encoded photo.
        size: the model's input size.

    Returns:
        A PIL image.
    """
    img = decode_image(data)
    scale = 2 * size / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


def pil_image(pixels: np.ndarray) -> Any:
    """A shard's decoded pixels (``H x W x 3`` uint8) as a PIL image."""
    return Image.fromarray(pixels)


def sample_image(sample: sh.Sample, size: int) -> Any:
    """A sample as a PIL image: its original photo (shrunk) when the shard kept it, else its pixels.

    Args:
        sample: a shard sample.
        size: the model's input size (originals are shrunk to twice that).
    """
    return shrink_original(sample.original, size) if sample.original else pil_image(sample.pixels)


def domains_of(keys: Sequence[str], rows: Sequence[ManifestRow]) -> np.ndarray:
    """The domain of each shard key (``lab`` for a key the manifest does not know: pre-domain shard sets).

    Args:
        keys: shard keys.
        rows: the manifest.

    Returns:
        An object array of domain names, one per key.
    """
    by_key = {r.key: r.domain for r in rows}
    return np.array([by_key.get(k, DEFAULT_DOMAIN) for k in keys], dtype=object)


def batched(items: Iterable[Any], size: int = 64) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter).

    Args:
        items: any iterable.
        size: the batch size.
    """
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
