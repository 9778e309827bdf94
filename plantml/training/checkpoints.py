"""Checkpoints: the resumable one written after every epoch, and the best weights at the end.

An epoch checkpoint (weights, optimiser, scheduler, RNG, best-so-far, history) goes to
the run's store; a retried or resumed branch continues from the next epoch and gives the
same numbers as an uninterrupted run. The final ``model.pt`` holds the best epoch's
weights plus what is needed to rebuild the model.
"""

from __future__ import annotations

import io
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

from plantml import storage
from plantml.models import create_model
from plantml.training.model import unwrap
from plantml.training.records import TrainResult, TrainState

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


def checkpoint_payload(model: Any, optimizer: Any, scheduler: Any, state: TrainState,
                       result: TrainResult, average: Any = None) -> dict[str, Any]:
    """A ``torch.save``-able dict that ``torch.load(weights_only=True)`` reads back.

    Args:
        model: the model (DDP-wrapped or not).
        optimizer: its optimiser.
        scheduler: its learning-rate scheduler.
        state: the loop's state after the epoch.
        result: the branch's result so far (history, best epoch).
        average: the weights' moving average, if training keeps one.
    """
    import torch

    return {
        "epoch": state.epoch, "best_key": list(state.best_key), "bad_epochs": state.bad_epochs,
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "best_state": state.best_state,
        "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
        "result": {k: v for k, v in result.to_dict().items()},
        "average": None if average is None else average.module.state_dict(),
    }


def save_epoch_checkpoint(uri: str, payload: dict[str, Any]) -> None:
    """Write an epoch checkpoint to the store (atomic: a crash leaves the previous one).

    Args:
        uri: local path or ``s3://`` URI.
        payload: :func:`checkpoint_payload`'s dict.
    """
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_epoch_checkpoint(uris: Sequence[str]) -> dict[str, Any] | None:
    """The first epoch checkpoint found among ``uris`` (this attempt's, then an origin run's).

    Args:
        uris: candidate locations in order; empty strings are skipped.

    Returns:
        The checkpoint's dict, or ``None`` when none exists.
    """
    import torch

    for uri in uris:
        if uri and storage.exists(uri):
            log.info("resuming from epoch checkpoint %s", uri)
            return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    return None


def restore(saved: dict[str, Any], model: Any, optimizer: Any, scheduler: Any, result: TrainResult,
            average: Any = None) -> TrainState:
    """Load an epoch checkpoint into the model, optimiser, scheduler, RNG and result.

    Args:
        saved: :func:`load_epoch_checkpoint`'s dict.
        model: the (not yet DDP-wrapped) model.
        optimizer: its optimiser.
        scheduler: its scheduler.
        result: the branch's result; gets the saved history and best epoch.
        average: the weights' moving average, if training keeps one; gets the saved average
            (a checkpoint written without one starts it from the restored weights).

    Returns:
        The loop's state after the saved epoch.
    """
    import torch

    model.load_state_dict(saved["model"])
    if average is not None:
        average.module.load_state_dict(saved.get("average") or saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    state = random.getstate()
    random.setstate((state[0], tuple(saved["python_rng"]), state[2]))
    previous = saved["result"]
    result.history = list(previous["history"])
    result.best_epoch = previous["best_epoch"]
    result.best_val_macro_f1 = previous["best_val_macro_f1"]
    result.best_val_accuracy = previous["best_val_accuracy"]
    result.resumed_from_epoch = int(saved["epoch"])
    log.info("%s: continuing after epoch %d (best epoch %d)", result.name, saved["epoch"], result.best_epoch)
    return TrainState(epoch=int(saved["epoch"]), best_key=tuple(saved["best_key"]),  # type: ignore[arg-type]
                      best_state=saved["best_state"], bad_epochs=int(saved["bad_epochs"]))


def save_checkpoint(state_dict: dict[str, Any], result: TrainResult, path: Path) -> None:
    """Write weights plus what is needed to rebuild the model, atomically.

    Args:
        state_dict: the weights (the best epoch's).
        result: the branch's result (architecture, classes, input spec).
        path: destination ``model.pt``.
    """
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state_dict, "arch": result.arch, "classes": result.classes,
                "image_size": result.image_size, "mean": result.mean, "std": result.std}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Rebuild a trained model from :func:`save_checkpoint` output (eval mode, CPU).

    Args:
        path: a ``model.pt``.

    Returns:
        ``(model, everything saved beside the weights)``.
    """
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(ckpt["arch"], num_classes=len(ckpt["classes"]), pretrained=False,
                         image_size=ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}
