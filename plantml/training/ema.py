"""An exponential moving average (EMA) of the weights, validated and kept instead of the raw weights.

With ~40 training photos per class the weights after any one optimiser step are noisy: the
validation score jumps by points from epoch to epoch and the "best epoch" early stopping keeps
is partly luck. Averaging the weights over the last few hundred steps (Polyak averaging; timm's
``ModelEmaV3``, the EMA timm's own training scripts use) smooths that out at the cost of one
copy of the model and one in-place lerp per step.
"""

from __future__ import annotations

from typing import Any

# The EMA's decay warms up as 1 - (1 + step)^-power (timm's schedule) up to ``train.ema_decay``,
# so the average does not drag the randomly initialised head along in the first epoch: with
# power 3/4 the average spans ~30 steps at step 100 and ~120 at step 600 (an epoch here is
# ~55 steps).
_WARMUP_POWER = 0.75


def weight_average(model: Any, decay: float) -> Any | None:
    """An EMA of ``model``'s weights and buffers, or ``None`` when ``decay`` is 0 (off).

    Args:
        model: the plain (not DDP-wrapped) model, already on its device.
        decay: ``train.ema_decay``, the largest per-step decay.
    """
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay, use_warmup=True, warmup_power=_WARMUP_POWER)


def evaluated_model(model: Any, average: Any | None) -> Any:
    """The weights validation scores and early stopping keeps: the average when there is one."""
    return model if average is None else average.module
