"""The split: stratified per (domain, class), deterministic for the seed, exact duplicates kept together."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from typing import Any, Mapping, Sequence

from plantml.data.manifest import DEFAULT_DOMAIN, DataError, ManifestRow, row_order

log = logging.getLogger(__name__)


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Train/val/test sizes for ``n`` groups; each non-empty fraction gets >= 1 when n >= 3."""
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"cannot split {n} images into train/val/test")
    return n_train, n_val, n_test


def assign_splits(items: list[dict[str, Any]], fractions: Sequence[float], seed: int,
                  domain_fractions: Mapping[str, Sequence[float]] | None = None) -> list[ManifestRow]:
    """Stratified, deterministic split that keeps exact duplicates together.

    Files sharing a sha256 form one group; a group goes wholly into one split, whatever
    source or domain its copies come from. Within a (domain, class), groups are ordered by
    ``sha256(seed|hash)`` and cut at the fractions (``domain_fractions[domain]`` where
    given). For a pre-split dataset, ``train`` items stay in train and held-out items are
    divided between val and test in the ratio of those fractions.
    """
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        groups[it["sha256"]].append(it)
    # A byte-identical file under two class names is ambiguous: keep the first label.
    by_class: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    label_of: dict[str, str] = {}
    for sha, members in groups.items():
        labels = sorted({m["label"] for m in members})
        if len(labels) > 1:
            log.warning("identical file under several classes %s (%s); using %s", labels, members[0]["path"], labels[0])
        label_of[sha] = labels[0]
        # A file in two domains is stratified with the first domain's images (its copies follow it).
        domain = min(m.get("domain", DEFAULT_DOMAIN) for m in members)
        pool = "train" if all(m["source"] == "train" for m in members) and members[0]["source"] == "train" else (
            "heldout" if all(m["source"].startswith("heldout") for m in members) else "all"
        )
        by_class[(domain, labels[0], pool)].append(sha)
    split_of: dict[str, str] = {}
    for (domain, label, pool), shas in sorted(by_class.items()):
        fractions_here = (domain_fractions or {}).get(domain) or fractions
        ordered = sorted(shas, key=lambda s: _rank(seed, s))
        if pool == "train":
            for s in ordered:
                split_of[s] = "train"
            continue
        if pool == "heldout":
            total = fractions_here[1] + fractions_here[2]
            n_val = int(round(len(ordered) * fractions_here[1] / total)) if total else 0
            for i, s in enumerate(ordered):
                split_of[s] = "val" if i < n_val else "test"
            continue
        n_train, n_val, _ = _split_counts(len(ordered), fractions_here)
        for i, s in enumerate(ordered):
            split_of[s] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    rows = [
        ManifestRow(m["path"], label_of[sha], split_of[sha], sha, m["width"], m["height"],
                    domain=m.get("domain", DEFAULT_DOMAIN))
        for sha, members in groups.items() for m in members
    ]
    return sorted(rows, key=row_order)
