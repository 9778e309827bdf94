"""Data-parallel training (PyTorch DDP) of one branch across several processes.

``train.distributed.world_size: N`` makes a training branch start N processes (one per
GPU on a GPU node; gloo on CPU, which is how CI proves the path on 2 cores). Each
process trains the same model on its own share of the shards
(:func:`plantml.loader.plan_slot`), DDP averages the gradients, every rank takes the
same number of steps (:func:`plantml.loader.steps_per_epoch`), validation is scored in
shares and gathered, and rank 0 writes the epoch checkpoints and the result.

Across several nodes the same worker function runs once per node with ``nnodes`` /
``node_rank`` / ``master_addr`` set from the orchestrator — Metaflow's ``@parallel``
(``current.parallel.num_nodes``, ``node_index``, ``main_ip``) or ``torchrun``'s
environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``) — see docs/operations.md.

The effective batch is ``world_size x train.batch_size``; the learning rate is not
scaled automatically (set ``lr`` for the global batch).
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_mod
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from plantml.config import ModelParams, TrainParams
from plantml.training import DistributedContext, EpochCallback, LoaderSettings, TrainResult, train_model

log = logging.getLogger(__name__)

RESULT_FILE = "distributed_result.json"


def free_port() -> int:
    """A free TCP port on loopback (for a single-node process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_backend(backend: str, device: str) -> str:
    """``auto`` -> ``nccl`` for CUDA, ``gloo`` otherwise."""
    if backend != "auto":
        return backend
    return "nccl" if device == "cuda" else "gloo"


def _worker(local_rank: int, spec: dict[str, Any], events: Any) -> None:
    """One DDP process (module-level so that ``spawn`` can pickle it)."""
    import torch.distributed as tdist

    world = spec["nproc"] * spec["nnodes"]
    rank = spec["node_rank"] * spec["nproc"] + local_rank
    os.environ.update(MASTER_ADDR=spec["master_addr"], MASTER_PORT=str(spec["master_port"]),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    tdist.init_process_group(backend=spec["backend"], rank=rank, world_size=world)
    try:
        def forward_epoch(row: dict[str, float], result: TrainResult) -> None:
            events.put(("epoch", row, result.to_dict()))

        result = train_model(
            spec["name"], ModelParams(**spec["model_params"]), spec["train_params"], spec["index"],
            spec["out_dir"], threads=spec["threads"], progress=spec["progress"] and rank == 0,
            loader=LoaderSettings(**spec["loader"]), checkpoint_uri=spec["checkpoint_uri"],
            resume_uris=spec["resume_uris"], on_epoch_end=forward_epoch,
            dist=DistributedContext(rank=rank, world=world, local_rank=local_rank))
        if rank == 0:
            (Path(spec["out_dir"]) / RESULT_FILE).write_text(json.dumps(result.to_dict()))
    finally:
        tdist.destroy_process_group()


def train_distributed(
    name: str, model_params: ModelParams, train_params: TrainParams, index: Any, *, out_dir: str | os.PathLike[str],
    world_size: int, backend: str = "auto", threads: int = 1, progress: bool = True,
    loader: LoaderSettings = LoaderSettings(), checkpoint_uri: str | None = None, resume_uris: Sequence[str] = (),
    on_epoch_end: EpochCallback | None = None, nnodes: int = 1, node_rank: int = 0,
    master_addr: str = "127.0.0.1", master_port: int | None = None,
) -> TrainResult:
    """Train one branch with ``world_size`` DDP processes on this node.

    Args:
        world_size: processes on this node (GPUs, or CPU processes with gloo).
        backend: ``auto``, ``gloo`` or ``nccl``.
        threads: torch threads per process.
        on_epoch_end: called in *this* process with rank 0's epoch rows (live metrics).
        nnodes, node_rank, master_addr, master_port: the multi-node group (defaults: one node).
        Other arguments as :func:`plantml.training.train_model`.

    Returns:
        Rank 0's :class:`TrainResult` (node 0 only; other nodes return theirs without
        the checkpoint).

    Raises:
        RuntimeError: if any process fails (its traceback is in the log).
    """
    import torch.multiprocessing as mp

    from plantml.training import resolve_device

    device = resolve_device(train_params.device)
    spec = {
        "name": name, "model_params": asdict(model_params), "train_params": train_params, "index": index,
        "out_dir": str(out_dir), "threads": threads, "progress": progress, "loader": asdict(loader),
        "checkpoint_uri": checkpoint_uri, "resume_uris": list(resume_uris), "nproc": world_size, "nnodes": nnodes,
        "node_rank": node_rank, "master_addr": master_addr, "master_port": master_port or free_port(),
        "backend": resolve_backend(backend, device),
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / RESULT_FILE).unlink(missing_ok=True)
    log.info("%s: data-parallel training with %d process(es) x %d node(s), backend %s", name, world_size, nnodes,
             spec["backend"])
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    procs = mp.start_processes(_worker, args=(spec, events), nprocs=world_size, join=False, start_method="spawn")
    done = False
    while not done:
        done = procs.join(timeout=2)
        _drain(events, on_epoch_end)
    _drain(events, on_epoch_end)
    data = json.loads((Path(out_dir) / RESULT_FILE).read_text())
    return TrainResult(**data)


def _drain(events: Any, on_epoch_end: EpochCallback | None) -> None:
    while True:
        try:
            kind, row, result = events.get_nowait()
        except queue_mod.Empty:
            return
        if kind == "epoch" and on_epoch_end is not None:
            on_epoch_end(row, TrainResult(**result))
