"""Early stopping on validation macro-F1 (ties broken by validation loss); the best epoch's weights are kept."""

from __future__ import annotations

from typing import Any

from plantml.training.model import unwrap
from plantml.training.records import TrainResult, TrainState


def update_best(state: TrainState, row: dict[str, float], model: Any, result: TrainResult, epoch: int) -> None:
    """Keep the epoch's weights if it is the best so far, else count one more bad epoch.

    Args:
        state: the loop's state (best key, best weights, bad epochs), updated in place.
        row: the epoch's metrics row.
        model: the model (DDP-wrapped or not).
        result: the branch's result; its best-epoch fields are updated.
        epoch: the finished epoch.
    """
    key = (row["val_macro_f1"], -row["val_loss"])
    if key > state.best_key:
        state.best_key, state.bad_epochs = key, 0
        state.best_state = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(model).state_dict().items()}
        result.best_epoch = epoch
        result.best_val_macro_f1 = row["val_macro_f1"]
        result.best_val_accuracy = row["val_accuracy"]
    else:
        state.bad_epochs += 1


def patience_spent(state: TrainState, patience: int) -> bool:
    """Whether ``patience`` epochs in a row failed to improve on the best one.

    Args:
        state: the loop's state.
        patience: ``train.patience``.
    """
    return state.bad_epochs >= patience
