"""The optimiser and learning-rate schedule: AdamW with a linear warm-up and cosine decay per step."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence


def param_groups(model: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms/biases; a pretrained patch embedding learns 4x slower.

    Args:
        model: the model; its ``pretrained_prefixes`` (if any) name the slow parameters.
        lr: the base learning rate.
        weight_decay: AdamW weight decay for the weights that get it.

    Returns:
        AdamW parameter groups (trainable parameters only).
    """
    slow_prefixes = tuple(getattr(model, "pretrained_prefixes", ()))
    groups: dict[tuple[bool, bool], list[Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (bool(slow_prefixes) and name.startswith(slow_prefixes), p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": lr * (0.25 if slow else 1.0), "weight_decay": 0.0 if no_decay else weight_decay}
        for (slow, no_decay), ps in groups.items()
    ]


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The learning-rate factor per step: linear warm-up, then cosine decay to zero.

    Args:
        total_steps: optimiser steps over the whole run.
        warmup_steps: steps of the linear warm-up.
    """
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: Any, lr: float, weight_decay: float, steps: Sequence[int],
                    warmup_epochs: int) -> tuple[Any, Any]:
    """AdamW over :func:`param_groups` and its per-step :func:`warmup_cosine` scheduler.

    Args:
        model: the model to optimise.
        lr: ``train.models.<name>.lr``.
        weight_decay: ``train.weight_decay``.
        steps: optimiser steps of each epoch, in order.
        warmup_epochs: ``train.warmup_epochs`` (counted in first-epoch steps).

    Returns:
        ``(optimizer, scheduler)``.
    """
    import torch

    optimizer = torch.optim.AdamW(param_groups(model, lr, weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(sum(steps), warmup_epochs * max(1, steps[0])))
    return optimizer, scheduler
