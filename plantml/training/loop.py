"""The epoch loop of one training branch: :func:`train_model`.

An epoch is :func:`~plantml.training.epoch.train_one_epoch` over a streaming DataLoader,
then :func:`~plantml.training.epoch.validate`; after it, the best weights are kept
(:mod:`~plantml.training.early_stopping`), rank 0 writes the resumable epoch checkpoint
(:mod:`~plantml.training.checkpoints`) and calls ``on_epoch_end``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from plantml.config import ModelParams, TrainParams
from plantml.data import augmentation_factory
from plantml.preprocess import InputSpec
from plantml.training.checkpoints import (
    CHECKPOINT_FILE, checkpoint_payload, load_epoch_checkpoint, restore, save_checkpoint, save_epoch_checkpoint,
)
from plantml.training.early_stopping import patience_spent, update_best
from plantml.training.ema import evaluated_model, weight_average
from plantml.training.epoch import train_one_epoch, validate, validation_row
from plantml.training.faults import maybe_inject_failure
from plantml.training.model import build_model, wrap_data_parallel
from plantml.training.optim import build_optimizer
from plantml.training.outliers import outlier_source
from plantml.training.process import device_type, prepare_process
from plantml.training.records import DistributedContext, EpochCallback, LoaderSettings, TrainResult, TrainState

log = logging.getLogger(__name__)


@dataclass
class _Branch:
    """What every epoch of one branch's run works on."""

    name: str
    index: Any
    train_params: TrainParams
    loader: LoaderSettings
    dist: DistributedContext
    device: str
    model: Any
    optimizer: Any
    scheduler: Any
    spec: InputSpec
    steps: list[int]  # optimiser steps of each epoch, in order
    result: TrainResult
    augment: Any = None
    average: Any = None  # the weights' moving average (train.ema_decay > 0)


def train_model(
    name: str,
    model_params: ModelParams,
    train_params: TrainParams,
    index: Any,
    out_dir: str | os.PathLike[str],
    threads: int = 1,
    progress: bool = True,
    loader: LoaderSettings = LoaderSettings(),
    checkpoint_uri: str | None = None,
    resume_uris: Sequence[str] = (),
    on_epoch_end: EpochCallback | None = None,
    dist: DistributedContext = DistributedContext(),
) -> TrainResult:
    """Fine-tune one architecture on the streamed shards, with early stopping and epoch checkpoints.

    Args:
        name: branch name (``cnn``, ``vit``); used in logs and file names.
        model_params: architecture and learning rate (``train.models.<name>``).
        train_params: shared training settings (``train``).
        index: the prepared shard set (:class:`plantml.shards.ShardIndex`); its image size
            must equal ``train.image_size``.
        out_dir: receives ``model.pt`` (best weights), ``history.json`` and ``result.json``.
        threads: torch intra-op threads for this process.
        progress: show progress bars (rank 0 only).
        loader: loader worker processes and shuffle buffer.
        checkpoint_uri: where to write a checkpoint after every epoch (local path or
            ``s3://``); a retry of this branch continues from it.
        resume_uris: further checkpoints to continue from if ``checkpoint_uri`` has none
            (e.g. the origin run's, for ``resume``).
        on_epoch_end: called with each epoch's metrics row (live MLflow metrics, cards).
        dist: this process's data-parallel rank (see :func:`train_distributed`).

    Returns:
        A :class:`TrainResult` (the best epoch's metrics and the checkpoint path).
    """
    _check_image_size(index.image_size, train_params.image_size)
    device = prepare_process(train_params.device, train_params.seed, threads, dist)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    branch = _start_branch(name, model_params, train_params, index, threads, device, dist, loader)
    branch.average = weight_average(branch.model, train_params.ema_decay)
    state = _resume(branch, [checkpoint_uri or "", *resume_uris])
    branch.model = wrap_data_parallel(branch.model, dist.world, dist.local_rank, device)
    branch.augment = augmentation_factory(index.image_size, train_params.background_replace)
    _run_epochs(branch, state, progress, checkpoint_uri, on_epoch_end)
    return _finish(branch, state, out)


def _check_image_size(shards_size: int, train_size: int) -> None:
    if shards_size != train_size:
        raise ValueError(f"the shards hold {shards_size} px images but train.image_size is "
                         f"{train_size}: prepare again with this size")


def _start_branch(name: str, model_params: ModelParams, train_params: TrainParams, index: Any, threads: int,
                  device: str, dist: DistributedContext, loader: LoaderSettings) -> _Branch:
    """Build the model, plan every epoch's steps, and create the optimiser, scheduler and result."""
    # plantml.loader imports torch at module level; importing it here keeps `import plantml.training` torch-free.
    from plantml.loader import steps_per_epoch

    classes = index.classes
    model, frozen, spec = build_model(name, model_params, train_params, len(classes), device)
    # train.epochs caps every model (so `--set train.epochs=2` means two epochs for all); a model's own
    # epochs can only lower it (a slower branch trained less to keep the parallel branches even).
    epochs = min(model_params.epochs or train_params.epochs, train_params.epochs)
    counts = _weighted_counts(index, dist.world)
    steps = [steps_per_epoch(counts, train_params.batch_size, dist.world, True, train_params.seed, e)
             for e in range(1, epochs + 1)]
    optimizer, scheduler = build_optimizer(model, model_params.lr, train_params.weight_decay, steps,
                                           train_params.warmup_epochs)
    result = TrainResult(
        name=name, arch=model_params.arch, classes=list(classes), image_size=index.image_size, mean=list(spec.mean),
        std=list(spec.std), threads=threads, device=device, num_params=sum(p.numel() for p in model.parameters()),
        frozen_params=frozen, started_at=time.time(), world_size=dist.world,
    )
    return _Branch(name=name, index=index, train_params=train_params, loader=loader, dist=dist, device=device,
                   model=model, optimizer=optimizer, scheduler=scheduler, spec=spec, steps=steps, result=result)


def _weighted_counts(index: Any, world: int) -> list[int]:
    """Training samples per shard as the domain-weighted loader yields them (what an epoch's steps follow).

    The weighted stream's length is random (a fractional weight repeats a sample with a
    probability), so data-parallel ranks, which must step together, count 3 % fewer than
    expected and never fewer than the stored count allows; a lone process may run out a
    batch early, which only shortens its epoch.
    """
    counts = list(index.splits["train"].counts)
    factor = index.weighted_train_factor() if hasattr(index, "weighted_train_factor") else 1.0
    if world > 1:
        factor = min(factor, 1.0) * 0.97 if factor < 1.0 else 1.0
    return [max(1, int(c * factor)) for c in counts]


def _resume(branch: _Branch, uris: Sequence[str]) -> TrainState:
    """The state after the last checkpointed epoch (restored into the branch), or a fresh one."""
    saved = load_epoch_checkpoint(uris)
    if saved is None:
        return TrainState()
    return restore(saved, branch.model, branch.optimizer, branch.scheduler, branch.result, branch.average)


def _run_epochs(branch: _Branch, state: TrainState, progress: bool, checkpoint_uri: str | None,
                on_epoch_end: EpochCallback | None) -> None:
    """Run the epochs after ``state.epoch`` until the last one or until patience is spent."""
    epochs = len(branch.steps)
    bar = tqdm(range(state.epoch + 1, epochs + 1), desc=f"train {branch.name} ({branch.result.arch})", unit="epoch",
               disable=not (progress and branch.dist.is_main), initial=state.epoch, total=epochs)
    for epoch in bar:
        if patience_spent(state, branch.train_params.patience):
            break
        maybe_inject_failure(epoch)
        row = _run_epoch(branch, epoch, progress)
        _show_epoch(bar, branch.name, epoch, row)
        update_best(state, row, evaluated_model(branch.model, branch.average), branch.result, epoch)
        state.epoch = epoch
        _publish_epoch(branch, state, row, checkpoint_uri, on_epoch_end)
        if patience_spent(state, branch.train_params.patience):
            branch.result.stopped_early = epoch < epochs
            log.info("%s: early stop after epoch %d (best epoch %d)", branch.name, epoch, branch.result.best_epoch)
            break
    bar.close()


def _run_epoch(branch: _Branch, epoch: int, progress: bool) -> dict[str, float]:
    """Train one epoch, validate, and append the epoch's metrics row to the history."""
    t0 = time.time()
    desc = f"{branch.name} epoch {epoch}" if progress and branch.dist.is_main else None
    params = branch.train_params
    # Seeded per epoch and rank: a resumed epoch sees the same outliers, ranks different ones.
    outliers = outlier_source(params.outlier_exposure, branch.index.image_size,
                              params.seed * 100_003 + epoch * 1_009 + branch.dist.rank)
    fit = train_one_epoch(branch.model, _epoch_batches(branch, epoch), branch.steps[epoch - 1], branch.optimizer,
                          branch.scheduler, branch.spec, params, branch.device, desc, outliers, branch.average)
    val_logits, val_labels = validate(evaluated_model(branch.model, branch.average), branch.index, branch.spec,
                                      branch.device, params.batch_size * 2, branch.dist)
    row = validation_row(epoch, fit, val_logits, val_labels, len(branch.index.classes),
                         float(branch.optimizer.param_groups[0]["lr"]), time.time() - t0)
    branch.result.history.append(row)
    return row


def _epoch_batches(branch: _Branch, epoch: int) -> Any:
    """This rank's shuffled, augmented, domain-weighted training batches of ``epoch``."""
    # plantml.loader imports torch at module level; importing it here keeps `import plantml.training` torch-free.
    from plantml.loader import make_loader

    params = branch.train_params
    return make_loader(branch.index, "train", params.batch_size, train=True, seed=params.seed, epoch=epoch,
                       workers=branch.loader.workers, augment_factory=branch.augment, rank=branch.dist.rank,
                       world=branch.dist.world, pin_memory=device_type(branch.device) == "cuda",
                       buffer_size=branch.loader.shuffle_buffer, domain_weights=branch.index.domain_weights)


def _show_epoch(bar: Any, name: str, epoch: int, row: dict[str, float]) -> None:
    bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}",
                    val_f1=f"{row['val_macro_f1']:.3f}")
    log.info("%s epoch %d: %s", name, epoch, {k: round(v, 4) for k, v in row.items()})


def _publish_epoch(branch: _Branch, state: TrainState, row: dict[str, float], checkpoint_uri: str | None,
                   on_epoch_end: EpochCallback | None) -> None:
    """Rank 0 writes the resumable epoch checkpoint, then reports the row (MLflow, live card)."""
    if not branch.dist.is_main:
        return
    if checkpoint_uri:
        save_epoch_checkpoint(checkpoint_uri, checkpoint_payload(branch.model, branch.optimizer, branch.scheduler,
                                                                 state, branch.result, branch.average))
    if on_epoch_end is not None:
        on_epoch_end(row, branch.result)


def _finish(branch: _Branch, state: TrainState, out: Path) -> TrainResult:
    """Complete the result; rank 0 writes the best weights, ``history.json`` and ``result.json``."""
    result = branch.result
    result.epochs_run = len(result.history)
    result.finished_at = time.time()
    result.train_seconds = sum(r["seconds"] for r in result.history)
    assert state.best_state is not None
    ckpt = out / CHECKPOINT_FILE
    if branch.dist.is_main:
        save_checkpoint(state.best_state, result, ckpt)
        (out / "history.json").write_text(json.dumps(result.history, indent=2))
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    result.checkpoint_path = str(ckpt.resolve())
    return result
