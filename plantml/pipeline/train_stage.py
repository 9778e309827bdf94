"""The train stage: one model (one branch of the flow) on the streamed shards."""

from __future__ import annotations

import os
from typing import Any, Sequence

from plantml import shards as sh
from plantml.config import Params
from plantml.distributed import train_distributed
from plantml.resources import available_cores, resolve_loader_workers, resolve_threads
from plantml.training import LoaderSettings, resolve_device, train_model


def train_branch(params: Params, name: str, index: sh.ShardIndex, out_dir: str | os.PathLike[str],
                 parallel_branches: int = 1, progress: bool = True, checkpoint_uri: str | None = None,
                 resume_uris: Sequence[str] = (), on_epoch_end: Any = None) -> Any:
    """Train model ``name`` (a key of ``train.models``) on the streamed shards.

    Threads and loader workers follow this process's CPU quota shared among
    ``parallel_branches``; ``train.distributed.world_size > 1`` trains data-parallel
    (:func:`plantml.distributed.train_distributed`).

    Args:
        params: the run's parameters.
        name: the model's key in ``train.models``.
        index: the prepared shards.
        out_dir: receives the checkpoint and ``result.json``.
        parallel_branches: how many branches train at once on this machine.
        progress: show progress bars.
        checkpoint_uri: where the per-epoch checkpoint goes (retries continue from it).
        resume_uris: earlier runs' checkpoints to continue from.
        on_epoch_end: ``callback(row, result)`` after every epoch.

    Returns:
        The :class:`plantml.training.TrainResult`.
    """
    if name not in params.train.models:
        raise ValueError(f"unknown model {name!r}: train.models has {', '.join(params.train.models)}")
    t = params.train
    share = max(1, available_cores() // max(1, parallel_branches))
    threads = resolve_threads(t.num_threads, parallel_branches)
    device = resolve_device(t.device)
    loader = LoaderSettings(workers=resolve_loader_workers(t.loader_workers, share, device),
                            shuffle_buffer=t.shuffle_buffer)
    kwargs = dict(out_dir=out_dir, progress=progress, loader=loader, checkpoint_uri=checkpoint_uri,
                  resume_uris=resume_uris, on_epoch_end=on_epoch_end)
    if t.distributed.world_size > 1:
        # On CPU the DDP processes share this branch's threads; on a GPU each keeps them.
        per_rank = max(1, threads // t.distributed.world_size) if device == "cpu" else threads
        return train_distributed(name, t.models[name], t, index, threads=per_rank, backend=t.distributed.backend,
                                 world_size=t.distributed.world_size, **kwargs)
    return train_model(name, t.models[name], t, index, threads=threads, **kwargs)
