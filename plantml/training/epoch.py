"""One epoch's work: the training pass, the validation pass and the epoch's metrics row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from plantml.config import TrainParams
from plantml.metrics import macro_f1
from plantml.models import keep_frozen_in_eval
from plantml.preprocess import InputSpec
from plantml.training.outliers import classification_loss, with_outliers
from plantml.training.model import unwrap
from plantml.training.records import DistributedContext


def train_one_epoch(model: Any, loader: Any, steps: int, optimizer: Any, scheduler: Any, spec: InputSpec,
                    train_params: TrainParams, device: str, progress_desc: str | None = None,
                    outliers: Callable[[int], Any] | None = None, average: Any = None) -> dict[str, float]:
    """One pass of at most ``steps`` optimiser steps over a streaming loader.

    Args:
        model: the model (DDP-wrapped or not); frozen stages stay in eval mode.
        loader: this rank's training batches ``(images, labels)``.
        steps: the most optimiser steps to take (every rank takes the same number).
        optimizer: the optimiser.
        scheduler: the per-step learning-rate scheduler.
        spec: the model input (size, mean, std).
        train_params: label smoothing.
        device: this process's device (``cuda`` turns on bf16 autocast).
        progress_desc: the progress bar's label; ``None`` hides the bar.
        outliers: Outlier Exposure's leafless images for a batch
            (:func:`plantml.training.outliers.outlier_source`); ``None``: none.
        average: the weights' moving average (:func:`plantml.training.ema.weight_average`),
            updated after every step; ``None``: none.

    Returns:
        ``{"train_loss", "train_accuracy", "images"}`` for this process's share (accuracy and
        images count the labelled rows only).
    """
    import torch

    # plantml.loader imports torch at module level; importing it here keeps `import plantml.training` torch-free.
    from plantml.loader import to_model_input

    model.train()
    keep_frozen_in_eval(model)
    loss_sum, correct, seen, taken = 0.0, 0, 0, 0
    bar = tqdm(total=steps, desc=progress_desc, unit="batch", disable=progress_desc is None, mininterval=5,
               leave=False)
    for images, labels in loader:
        if taken >= steps:
            break
        if len(labels) < 2:  # BatchNorm cannot train on a batch of one
            continue
        n_labelled = len(labels)
        images, labels = with_outliers(images, labels, outliers, seed=train_params.seed + taken)
        x = to_model_input(images, spec, device)
        y = labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        batch_loss, batch_correct = accumulate_gradients(model, x, y, train_params, device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        if average is not None:  # the scheduler's step count survives a resume, so the decay warm-up does too
            average.update(unwrap(model), step=scheduler.last_epoch)
        loss_sum += batch_loss * n_labelled
        correct += batch_correct
        seen += n_labelled
        taken += 1
        bar.update(1)
    bar.close()
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen), "images": seen}


def micro_batches(n: int, micro_batch_size: int) -> list[slice]:
    """Slices that cut a batch of ``n`` into chunks of at most ``micro_batch_size`` (0: one chunk).

    A chunk of one image is merged into the previous one: BatchNorm cannot train on it.
    """
    if micro_batch_size <= 0 or micro_batch_size >= n:
        return [slice(0, n)]
    starts = list(range(0, n, micro_batch_size))
    if n - starts[-1] < 2:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [n])]


def accumulate_gradients(model: Any, x: Any, y: Any, train_params: TrainParams, device: str) -> tuple[float, int]:
    """Forward and backward of one batch in micro-batches; gradients sum to the whole batch's mean loss.

    Splitting bounds the activations held for backward (peak memory) to one micro-batch's: on
    CPU a 32-image batch in two 16-image chunks costs the same time and ~0.3 GB less per branch
    (docs/benchmarks.md section 7). BatchNorm of the trainable layers sees micro-batch statistics
    ("ghost" batches). Under DDP only the last chunk's backward synchronises gradients.

    Returns:
        ``(mean loss over the batch, correct top-1 predictions)``.
    """
    import contextlib

    import torch

    chunks = micro_batches(len(y), train_params.micro_batch_size)
    loss_total, correct = 0.0, 0
    for i, part in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(x[part])
                loss = classification_loss(logits.float(), y[part], train_params.label_smoothing)
            (loss * (len(y[part]) / len(y))).backward()
        loss_total += float(loss.detach()) * len(y[part])
        correct += int((logits.detach().argmax(1) == y[part]).sum())  # NO_CLASS rows never match
    return loss_total / len(y), correct


def validate(model: Any, index: Any, spec: InputSpec, device: str, batch_size: int,
             dist: DistributedContext = DistributedContext(), workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits and labels, streamed; data-parallel ranks each score a share and gather.

    Args:
        model: the model (DDP-wrapped or not).
        index: the prepared shard set.
        spec: the model input (size, mean, std).
        device: this process's device.
        batch_size: validation batch size.
        dist: this process's data-parallel rank.
        workers: loader worker processes.

    Returns:
        ``(logits float32 [N, C], labels int64 [N])`` over the whole validation split.
    """
    import torch

    # plantml.loader imports torch at module level; importing it here keeps `import plantml.training` torch-free.
    from plantml.loader import make_loader, to_model_input

    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        for images, y in make_loader(index, "val", batch_size, workers=workers, rank=dist.rank, world=dist.world,
                                     pin_memory=device == "cuda"):
            logits.append(model(to_model_input(images, spec, device)).float().cpu().numpy())
            labels.append(y.numpy())
    n_classes = len(index.classes)
    lg = np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32)
    lb = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    if dist.world > 1:
        import torch.distributed as tdist

        parts: list[Any] = [None] * dist.world
        tdist.all_gather_object(parts, (lg, lb))
        lg = np.concatenate([p[0] for p in parts])
        lb = np.concatenate([p[1] for p in parts])
    return lg, lb


def validation_row(epoch: int, fit: dict[str, float], val_logits: np.ndarray, val_labels: np.ndarray,
                   n_classes: int, lr: float, seconds: float) -> dict[str, float]:
    """The epoch's metrics row (what the history, the log, MLflow and the cards show).

    Args:
        epoch: the finished epoch.
        fit: :func:`train_one_epoch`'s figures.
        val_logits: :func:`validate`'s logits.
        val_labels: :func:`validate`'s labels.
        n_classes: number of classes (macro-F1 averages over all of them).
        lr: the first parameter group's learning rate at the epoch's end.
        seconds: the epoch's wall time (training and validation).
    """
    import torch
    import torch.nn.functional as F

    pred = val_logits.argmax(1)
    return {
        "epoch": epoch,
        "train_loss": fit["train_loss"],
        "train_accuracy": fit["train_accuracy"],
        "val_loss": float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(val_labels))),
        "val_accuracy": float((pred == val_labels).mean()) if len(pred) else 0.0,
        "val_macro_f1": macro_f1(val_labels, pred, labels=range(n_classes)),
        "lr": lr,
        "seconds": seconds,
        "images_per_second": fit["images"] / max(seconds, 1e-9),
    }
