"""Knowledge distillation of an edge student from a trained teacher (the champion).

The loss is Hinton et al.'s (2015)::

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * CE(student, labels)

The teacher's logits are computed on the fly, at the teacher's resolution, from the same
augmented batch the student trains on; the student sees that batch resized on the device
(bilinear, antialiased) to its own, smaller side. So one decode and one augmentation serve
both networks, the teacher sees exactly what it was trained on, and the soft targets follow
the augmentation (precomputed logits could not: every epoch's crops differ). The teacher's
forward pass costs about a third of a student training step at 160 vs 112 px (measured:
docs/edge-student.md).

Everything else follows :mod:`plantml.training.loop`: the streamed, domain-weighted shards
(:mod:`plantml.loader`), AdamW with warm-up and cosine decay (:mod:`~plantml.training.optim`),
early stopping on validation macro-F1 with the best epoch's weights kept (those of the moving average of
the weights when ``ema_decay`` > 0, :mod:`~plantml.training.ema`). torch is imported
inside the functions (``import plantml.training`` stays torch-free).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from plantml.metrics import macro_f1
from plantml.models import keep_frozen_in_eval
from plantml.preprocess import InputSpec
from plantml.training.ema import evaluated_model, weight_average
from plantml.training.optim import build_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """What one distillation run needs beyond the two models (``student`` and ``train`` params)."""

    epochs: int
    lr: float
    temperature: float
    alpha: float
    batch_size: int
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    patience: int = 3
    seed: int = 42
    background_replace: float = 0.0
    ema_decay: float = 0.0  # validate and keep a moving average of the student's weights (train.ema_decay)


@dataclass
class DistillOutcome:
    """The best epoch's weights and the per-epoch history of a distillation run."""

    best_state: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_macro_f1: float = -1.0
    seconds: float = 0.0


def distillation_loss(student_logits: Any, teacher_logits: Any, labels: Any, temperature: float,
                      alpha: float) -> Any:
    """``alpha * KL(teacher/T || student/T) * T^2 + (1 - alpha) * CE(student, labels)`` (a scalar tensor).

    Args:
        student_logits: ``[B, C]`` student logits (with gradient).
        teacher_logits: ``[B, C]`` teacher logits (no gradient needed).
        labels: ``[B]`` class indices.
        temperature: ``T`` (> 0); ``T^2`` keeps the soft term's gradient scale independent of ``T``.
        alpha: weight of the soft (teacher) term, in ``[0, 1]``.
    """
    import torch.nn.functional as F

    t = float(temperature)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1.0 - alpha) * hard


def resized_input(images: Any, spec: InputSpec, device: str = "cpu") -> Any:
    """``uint8 [B,H,W,3]`` -> the normalised ``float32 [B,3,S,S]`` input of a model of side ``spec.size``.

    :func:`plantml.loader.to_model_input` resizes when the images' side differs.
    """
    from plantml.loader import to_model_input  # torch at import: see the module docstring

    return to_model_input(images, spec, device)


def distill_epoch(student: Any, teacher: Any, batches: Any, steps: int, optimizer: Any, scheduler: Any,
                  teacher_spec: InputSpec, student_spec: InputSpec, cfg: DistillConfig,
                  device: str = "cpu", average: Any = None) -> dict[str, float]:
    """One pass of at most ``steps`` optimiser steps of the student against the teacher.

    ``average`` (:func:`plantml.training.ema.weight_average` of the student, or ``None``) is
    updated after every optimiser step.

    Returns:
        ``{"train_loss", "train_accuracy", "teacher_agreement", "images", "teacher_seconds"}`` (the time
        spent in the teacher's forward passes: what precomputing its logits could save at most).
    """
    import torch

    student.train()
    keep_frozen_in_eval(student)
    teacher.eval()
    loss_sum, correct, agree, seen, taken, teacher_s = 0.0, 0, 0, 0, 0, 0.0
    for images, labels in batches:
        if taken >= steps:
            break
        if len(labels) < 2:  # BatchNorm cannot train on a batch of one
            continue
        y = labels.to(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(resized_input(images, teacher_spec, device)).float()
        teacher_s += time.perf_counter() - t0
        s_logits = student(resized_input(images, student_spec, device)).float()
        loss = distillation_loss(s_logits, t_logits, y, cfg.temperature, cfg.alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        if average is not None:
            average.update(student, step=scheduler.last_epoch)
        pred = s_logits.detach().argmax(1)
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((pred == y).sum())
        agree += int((pred == t_logits.argmax(1)).sum())
        seen += len(labels)
        taken += 1
    n = max(1, seen)
    return {"train_loss": loss_sum / n, "train_accuracy": correct / n, "teacher_agreement": agree / n,
            "images": seen, "teacher_seconds": teacher_s}


def split_logits(model: Any, index: Any, split: str, spec: InputSpec, device: str = "cpu",
                 batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(logits, labels, keys)`` of ``model`` over a split, each image resized to ``spec.size``."""
    import torch

    from plantml.loader import make_loader  # torch at import: see the module docstring

    model.eval()
    logits, labels, keys = [], [], []
    with torch.inference_mode():
        for images, y, k in make_loader(index, split, batch_size, with_key=True):
            logits.append(model(resized_input(images, spec, device)).float().cpu().numpy())
            labels.append(y.numpy())
            keys += list(k)
    n_classes = len(index.classes)
    return (np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
            np.concatenate(labels) if labels else np.zeros(0, np.int64), keys)


def _steps_per_epoch(index: Any, cfg: DistillConfig) -> list[int]:
    """Optimiser steps of each epoch over the domain-weighted training stream (as the training loop counts)."""
    from plantml.loader import steps_per_epoch  # torch at import: see the module docstring

    factor = index.weighted_train_factor() if hasattr(index, "weighted_train_factor") else 1.0
    counts = [max(1, int(c * factor)) for c in index.splits["train"].counts]
    return [steps_per_epoch(counts, cfg.batch_size, 1, True, cfg.seed, e) for e in range(1, cfg.epochs + 1)]


def distill(student: Any, teacher: Any, index: Any, teacher_spec: InputSpec, student_spec: InputSpec,
            cfg: DistillConfig, device: str = "cpu", progress: bool = True,
            on_epoch_end: Callable[[dict[str, float]], None] | None = None) -> DistillOutcome:
    """Train ``student`` to match ``teacher`` on the streamed shards; keep the best validation epoch.

    Args:
        student: the student (trainable parameters as wanted; frozen stages marked).
        teacher: the trained teacher (kept in eval mode, never updated).
        index: the prepared shards (at the teacher's resolution).
        teacher_spec: the teacher's input (size = the shards').
        student_spec: the student's input (its smaller side, its normalisation).
        cfg: epochs, learning rate, temperature, alpha, batch size, patience, seed.
        device: torch device.
        progress: log each epoch.
        on_epoch_end: called with each epoch's metrics row (live MLflow metrics, cards).

    Returns:
        The :class:`DistillOutcome` (best weights, history, best epoch, seconds).
    """
    import torch

    from plantml.data import augmentation_factory
    from plantml.loader import make_loader  # torch at import: see the module docstring

    torch.manual_seed(cfg.seed)
    steps = _steps_per_epoch(index, cfg)
    optimizer, scheduler = build_optimizer(student, cfg.lr, cfg.weight_decay, steps, cfg.warmup_epochs)
    augment = augmentation_factory(index.image_size, cfg.background_replace)
    average = weight_average(student, cfg.ema_decay)
    outcome = DistillOutcome(best_state=copy.deepcopy(student.state_dict()))
    t_start, bad = time.time(), 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.time()
        batches = make_loader(index, "train", cfg.batch_size, train=True, seed=cfg.seed, epoch=epoch,
                              augment_factory=augment, domain_weights=index.domain_weights)
        fit = distill_epoch(student, teacher, batches, steps[epoch - 1], optimizer, scheduler, teacher_spec,
                            student_spec, cfg, device, average)
        kept = evaluated_model(student, average)
        val_logits, val_labels, _ = split_logits(kept, index, "val", student_spec, device)
        pred = val_logits.argmax(1)
        row = {"epoch": epoch, **{k: float(v) for k, v in fit.items()},
               "val_accuracy": float((pred == val_labels).mean()) if len(pred) else 0.0,
               "val_macro_f1": macro_f1(val_labels, pred, labels=range(len(index.classes))),
               "lr": float(optimizer.param_groups[0]["lr"]), "seconds": time.time() - t0}
        outcome.history.append(row)
        if progress:
            log.info("student epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
        if row["val_macro_f1"] > outcome.best_val_macro_f1:
            outcome.best_val_macro_f1, outcome.best_epoch, bad = row["val_macro_f1"], epoch, 0
            outcome.best_state = copy.deepcopy(kept.state_dict())
        else:
            bad += 1
        if on_epoch_end is not None:
            on_epoch_end(row)
        if bad >= cfg.patience:
            log.info("student: early stop after epoch %d (best epoch %d)", epoch, outcome.best_epoch)
            break
    outcome.seconds = time.time() - t_start
    student.load_state_dict(outcome.best_state)
    return outcome
