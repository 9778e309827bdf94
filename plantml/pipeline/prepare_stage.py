"""The prepare stage: resolve the data sources, split them, decode them once into shards."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from plantml import shards as sh
from plantml import storage
from plantml.config import Params
from plantml.data import (DEFAULT_DOMAIN, DatasetSummary, DataSource, PixelStaging, format_sources, parse_data_dir,
                          prepare_dataset, save_prepared, write_shards)
from plantml.demo_data import ensure_demo_dataset
from plantml.pipeline.paths import repo_path

log = logging.getLogger(__name__)


def resolve_sources(params: Params) -> tuple[list[DataSource], bool]:
    """The run's data sources, and whether they are the generated demo set.

    ``data.data_dir`` (also what ``--data-dir`` sets) wins: a plain path is one ``lab``
    source, ``lab=PATH,field=PATH`` several (:func:`plantml.data.parse_data_dir`). Else
    ``data.sources``; else the synthetic DEMO set. Relative local paths are relative to
    the repository root, as every path in params.yaml.

    Args:
        params: the run's parameters.

    Returns:
        ``(sources, is_demo)``.
    """
    d = params.data
    if d.data_dir:
        sources = parse_data_dir(d.data_dir)
        if d.sources:
            log.info("data.data_dir is set: it replaces the %d source(s) of data.sources", len(d.sources))
    elif d.sources:
        sources = [DataSource(s.domain, s.path if storage.is_s3(s.path) else str(repo_path(s.path)),
                              s.weight, s.split) for s in d.sources]
    else:
        root = ensure_demo_dataset(repo_path(d.demo_dir), d.demo_classes, d.demo_images_per_class, d.demo_image_size,
                                   d.seed)
        return [DataSource(DEFAULT_DOMAIN, str(root))], True
    return [_with_domain_defaults(params, s) for s in sources], False


def _with_domain_defaults(params: Params, src: DataSource) -> DataSource:
    """A source with its weight and split filled from ``data.domains`` (the source's own win) and its path resolved."""
    dom = params.data.domains.get(src.domain)
    weight = src.weight if src.weight is not None else (dom.weight if dom else 1.0)
    split = src.split or (dom.split if dom else None)
    root = src.root if storage.is_s3(src.root) else str(Path(src.root).expanduser().resolve())
    return DataSource(src.domain, root, weight, split)


def resolve_data_root(params: Params) -> tuple[str, bool]:
    """The sources as one ``--data-dir`` text (a plain path for one lab source), and whether it is the demo set.

    Args:
        params: the run's parameters.

    Returns:
        ``(data_dir text, is_demo)``.
    """
    sources, is_demo = resolve_sources(params)
    return format_sources(sources), is_demo


def prepare(params: Params, store: str | None = None, out_dir: str | os.PathLike[str] | None = None,
            progress: bool = True) -> tuple[DatasetSummary, sh.ShardIndex]:
    """Find and check the data, split it, decode it once into shards in ``store``.

    Args:
        params: the run's parameters.
        store: where the shards go (a folder or ``s3://`` prefix every later step can
            reach); default: ``data.prepared_dir``.
        out_dir: local copy of ``manifest.csv`` + ``summary.json`` (default
            ``data.prepared_dir``; for DVC and people).
        progress: show progress bars.

    Returns:
        ``(summary, shard index)``.
    """
    sources, is_demo = resolve_sources(params)
    if is_demo:
        log.warning("no data.data_dir given: using the SYNTHETIC DEMO dataset in %s (not real leaves)",
                    sources[0].root)
    store = store or str(repo_path(params.data.prepared_dir))
    staging = PixelStaging(params.train.image_size)
    try:
        rows, summary = prepare_dataset(sources, params.data.split, params.data.seed, params.data.max_images_per_class,
                                        is_demo=is_demo, progress=progress, staging=staging)
        rows, index = write_shards(rows, summary, staging, store, params.data.samples_per_shard, params.data.seed,
                                   progress)
    finally:
        staging.close()
    manifest = save_prepared(rows, summary, repo_path(out_dir or params.data.prepared_dir))
    log.info("prepared %d images in %d classes (%d skipped) -> %s (shards: %s)", summary.n_images,
             len(summary.classes), summary.n_skipped, manifest, store)
    return summary, index
