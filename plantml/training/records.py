"""The plain data a training branch carries: its result, its mutable state and its settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from plantml.preprocess import InputSpec


@dataclass
class TrainResult:
    """What one training branch produced (plain data: stored as a flow artifact)."""

    name: str
    arch: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = 0.0
    best_val_accuracy: float = 0.0
    epochs_run: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    threads: int = 1
    device: str = "cpu"
    num_params: int = 0
    frozen_params: int = 0
    checkpoint_path: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    world_size: int = 1
    resumed_from_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict (``dataclasses.asdict``)."""
        return asdict(self)

    @property
    def input_spec(self) -> InputSpec:
        """The model input (size, mean, std) the branch was trained on."""
        return InputSpec(size=self.image_size, mean=tuple(self.mean), std=tuple(self.std))


@dataclass(frozen=True)
class LoaderSettings:
    """How a branch streams its data (see :mod:`plantml.loader`)."""

    workers: int = 0
    shuffle_buffer: int = 512


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel group (``world == 1``: a lone process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0 (the one that writes checkpoints and results)."""
        return self.rank == 0


EpochCallback = Callable[[dict[str, float], "TrainResult"], None]


@dataclass
class TrainState:
    """Everything that changes during training; what an epoch checkpoint holds."""

    epoch: int = 0                       # last finished epoch
    best_key: tuple[float, float] = (-1.0, -math.inf)
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0
