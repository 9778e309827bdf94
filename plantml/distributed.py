"""Data-parallel training (PyTorch DDP) of one branch across several processes.

``train.distributed.world_size: N`` makes a training branch start N processes (one per
GPU on a GPU node; gloo on CPU, which is how CI proves the path on 2 cores). Each
process trains the same model on its own share of the shards
(:func:`plantml.loader.plan_slot`), DDP averages the gradients, every rank takes the
same number of steps (:func:`plantml.loader.steps_per_epoch`), validation is scored in
shares and gathered, and rank 0 writes the epoch checkpoints and the result.

Across several nodes (``train.distributed.nodes``) the flow fans a branch out to a gang
of Metaflow ``@parallel`` tasks; each runs :func:`train_on_node` with its
:class:`NodeGroup` (from ``current.parallel``: ``num_nodes``, ``node_index``, ``main_ip``;
the port from ``MF_MASTER_PORT``, which Metaflow's Kubernetes/Argo JobSets set, else
:func:`rendezvous_port`). Global rank ``node_index x world_size + local rank``; the
process group is one rendezvous (``env://``) at node 0 — see docs/operations.md.

The effective batch is ``world_size x train.batch_size``; the learning rate is not
scaled automatically (set ``lr`` for the global batch).
"""

from __future__ import annotations

import json
import logging
import os
import queue as queue_mod
import socket
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from plantml.config import ModelParams, Params, TrainParams
from plantml.resources import available_cores, resolve_loader_workers, resolve_threads
from plantml.training import DistributedContext, EpochCallback, LoaderSettings, TrainResult, train_model

log = logging.getLogger(__name__)

RESULT_FILE = "distributed_result.json"
#: Set by Metaflow's Kubernetes/Argo JobSets for ``@parallel`` steps (the control pod's port).
MASTER_PORT_ENV = "MF_MASTER_PORT"
#: Until ``train.distributed.nodes`` is a parameter (plantml.config), this variable sets it.
#: Ports :func:`rendezvous_port` derives from a key (above the usual ephemeral range's start).
PORT_BASE, PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class NodeGroup:
    """Where this node sits in a multi-node gang (one node: the defaults)."""

    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    @property
    def is_main(self) -> bool:
        return self.node_rank == 0


def configured_nodes(params: Params) -> int:
    """Nodes per training branch: ``train.distributed.nodes`` (1: the branch trains in one task).

    Raises:
        ValueError: below 1.
    """
    nodes = params.train.distributed.nodes
    if nodes < 1:
        raise ValueError(f"train.distributed.nodes must be >= 1, got {nodes}")
    return int(nodes)


def rendezvous_port(key: str, env: dict[str, str] | None = None) -> int:
    """The TCP port every node of a gang agrees on without talking to each other.

    ``MF_MASTER_PORT`` when the orchestrator sets it (Metaflow's JobSets on
    Kubernetes/Argo); otherwise a port derived from ``key`` (e.g. ``<run id>/<branch>``),
    so gangs of different branches or runs on one machine (a local ``@parallel`` run
    starts every node on 127.0.0.1) do not collide.

    Args:
        key: the same string on every node of the gang, different between gangs.
        env: environment to read (default: ``os.environ``).
    """
    env = os.environ if env is None else env
    if env.get(MASTER_PORT_ENV):
        return int(env[MASTER_PORT_ENV])
    return PORT_BASE + zlib.crc32(key.encode()) % PORT_SPAN


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
        if local_rank == 0:  # every node reports its own leader's result (node 0: the global rank 0's)
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
        This node's local rank 0's :class:`TrainResult`: on node 0 the global rank 0's
        (the one with the checkpoint); on another node its own history (its share's
        train loss and images) and no checkpoint file.

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
    if world_size == 1:  # one process on this node (a gang of CPU nodes): no child to spawn, no torch re-import
        _worker(0, spec, _DirectEvents(on_epoch_end))
        return TrainResult(**json.loads((Path(out_dir) / RESULT_FILE).read_text()))
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


class _DirectEvents:
    """The event queue's ``put`` for a worker running in this process: calls ``on_epoch_end`` at once."""

    def __init__(self, on_epoch_end: EpochCallback | None) -> None:
        self.on_epoch_end = on_epoch_end

    def put(self, event: tuple[str, dict[str, float], dict[str, Any]]) -> None:
        kind, row, result = event
        if kind == "epoch" and self.on_epoch_end is not None:
            self.on_epoch_end(row, TrainResult(**result))


def _drain(events: Any, on_epoch_end: EpochCallback | None) -> None:
    while True:
        try:
            kind, row, result = events.get_nowait()
        except queue_mod.Empty:
            return
        if kind == "epoch" and on_epoch_end is not None:
            on_epoch_end(row, TrainResult(**result))


def train_on_node(params: Params, name: str, index: Any, out_dir: str | os.PathLike[str], group: NodeGroup,
                  parallel_branches: int = 1, progress: bool = True, checkpoint_uri: str | None = None,
                  resume_uris: Sequence[str] = (), on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train model ``name`` as one node of a multi-node gang (a Metaflow ``@parallel`` task).

    ``train.distributed.world_size`` processes start on this node (GPUs; CPU processes with
    gloo); the gang has ``group.nnodes x world_size`` ranks. Threads and loader workers
    follow this node's CPU quota as :func:`plantml.pipeline.train_branch` does. Only node
    0 writes checkpoints and calls ``on_epoch_end``; every node resumes from the same
    ``checkpoint_uri`` / ``resume_uris`` (a shared store: S3 on a cluster).

    Args:
        params: the run's parameters.
        name: a key of ``train.models``.
        index: the shard index (every node streams its share of the same shards).
        out_dir: this node's local output folder.
        group: this node's place in the gang.
        parallel_branches: training branches sharing this node's CPUs.
        progress, checkpoint_uri, resume_uris, on_epoch_end: as :func:`train_distributed`.

    Returns:
        This node's result (see :func:`train_distributed`).
    """
    from plantml.training import resolve_device

    if name not in params.train.models:
        raise ValueError(f"unknown model {name!r}: train.models has {', '.join(params.train.models)}")
    t = params.train
    nproc = t.distributed.world_size
    device = resolve_device(t.device)
    share = max(1, available_cores() // max(1, parallel_branches))
    threads = resolve_threads(t.num_threads, parallel_branches)
    loader = LoaderSettings(workers=resolve_loader_workers(t.loader_workers, share, device),
                            shuffle_buffer=t.shuffle_buffer)
    return train_distributed(
        name, t.models[name], t, index, out_dir=out_dir, world_size=nproc, backend=t.distributed.backend,
        threads=max(1, threads // nproc) if device == "cpu" else threads, progress=progress and group.is_main,
        loader=loader, checkpoint_uri=checkpoint_uri, resume_uris=resume_uris, on_epoch_end=on_epoch_end,
        nnodes=group.nnodes, node_rank=group.node_rank, master_addr=group.master_addr,
        master_port=group.master_port)


def images_per_epoch(history: Sequence[dict[str, float]]) -> list[int]:
    """Training images one process saw in each epoch, from its history rows."""
    return [round(r["images_per_second"] * r["seconds"]) for r in history]
