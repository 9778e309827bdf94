"""Training: :func:`train_model`, used by the Metaflow flow and the CLI.

The data streams from the prepared shards (:mod:`plantml.loader`): an epoch is
:func:`train_one_epoch` over a DataLoader, then :func:`validate`. CPU by default, CUDA
when present (``train.device: auto``; bf16 autocast, pinned-memory batches). Seeded
(python, numpy, torch; the loader's shuffle and augmentation from ``(seed, epoch)``).
AdamW with a linear warm-up and cosine decay per step, label smoothing, early stopping
on validation macro-F1 (the best epoch's weights are kept).

After every epoch a checkpoint (weights, optimiser, scheduler, RNG, best-so-far,
history) goes to ``checkpoint_uri`` in the run's store; a retried or resumed branch
continues from the next epoch and gives the same numbers as an uninterrupted run.
Parallel branches share the CPU quota: each gets ``cores // branches`` torch threads so
two branches on two cores do not oversubscribe. Data-parallel ranks
(:mod:`plantml.distributed`) pass a :class:`DistributedContext`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml import storage
from plantml.config import ModelParams, TrainParams
from plantml.models import create_model, freeze_stages, input_normalization, keep_frozen_in_eval
from plantml.metrics import macro_f1
from plantml.preprocess import InputSpec
from plantml.resources import available_cores, resolve_threads  # noqa: F401 - re-exported for callers

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"


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
        return asdict(self)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=self.image_size, mean=tuple(self.mean), std=tuple(self.std))


def resolve_device(setting: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: Any, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on norms/biases; a pretrained patch embedding learns 4x slower."""
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


def _warmup_cosine(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


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
        return self.rank == 0


EpochCallback = Callable[[dict[str, float], "TrainResult"], None]

#: Test-only fault injection: ``PLANTML_FAIL_AT_EPOCH=3`` plus ``PLANTML_FAIL_MARKER=<file>``
#: makes the first attempt raise at the start of epoch 3 (and create the marker), so a
#: test can prove that a retried branch continues from its last checkpoint.
FAIL_AT_EPOCH_ENV = "PLANTML_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "PLANTML_FAIL_MARKER"


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault injection hook."""


def _maybe_inject_failure(epoch: int) -> None:
    at, marker = os.environ.get(FAIL_AT_EPOCH_ENV), os.environ.get(FAIL_MARKER_ENV)
    if at and marker and int(at) == epoch and not Path(marker).exists():
        Path(marker).write_text(str(epoch))
        raise InjectedFailure(f"injected failure at the start of epoch {epoch} ({FAIL_AT_EPOCH_ENV})")


@dataclass
class TrainState:
    """Everything that changes during training; what an epoch checkpoint holds."""

    epoch: int = 0                       # last finished epoch
    best_key: tuple[float, float] = (-1.0, -math.inf)
    best_state: dict[str, Any] | None = None
    bad_epochs: int = 0


def build_model(name: str, model_params: ModelParams, train_params: TrainParams, n_classes: int,
                device: str) -> tuple[Any, int, InputSpec]:
    """The branch's model (pretrained, early stages frozen, channels_last on ``device``)."""
    import torch

    size = train_params.image_size
    norm = input_normalization(model_params.arch)
    spec = InputSpec(size=size, mean=norm["mean"], std=norm["std"])
    model = create_model(model_params.arch, num_classes=n_classes, pretrained=True, image_size=size)
    frozen = freeze_stages(model, model_params.frozen_blocks)
    # channels_last roughly halves a CPU training step of these depthwise-conv trunks (oneDNN kernels).
    return model.to(device=device, memory_format=torch.channels_last), frozen, spec


def train_one_epoch(model: Any, loader: Any, steps: int, optimizer: Any, scheduler: Any, spec: InputSpec,
                    train_params: TrainParams, device: str, progress_desc: str | None = None) -> dict[str, float]:
    """One pass of at most ``steps`` optimiser steps over a streaming loader.

    Returns:
        ``{"train_loss", "train_accuracy", "images"}`` for this process's share.
    """
    import torch
    import torch.nn.functional as F

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
        x = to_model_input(images, spec, device)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=train_params.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(labels)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(labels)
        taken += 1
        bar.update(1)
    bar.close()
    return {"train_loss": loss_sum / max(1, seen), "train_accuracy": correct / max(1, seen), "images": seen}


def validate(model: Any, index: Any, spec: InputSpec, device: str, batch_size: int,
             dist: DistributedContext = DistributedContext(), workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits and labels, streamed; data-parallel ranks each score a share and gather.

    Returns:
        ``(logits float32 [N, C], labels int64 [N])`` over the whole validation split.
    """
    import torch

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


def _validation_row(epoch: int, fit: dict[str, float], val_logits: np.ndarray, val_labels: np.ndarray,
                    n_classes: int, lr: float, seconds: float) -> dict[str, float]:
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


def _checkpoint_payload(model: Any, optimizer: Any, scheduler: Any, state: TrainState,
                        result: "TrainResult") -> dict[str, Any]:
    """A ``torch.save``-able dict that ``torch.load(weights_only=True)`` reads back."""
    import torch

    return {
        "epoch": state.epoch, "best_key": list(state.best_key), "bad_epochs": state.bad_epochs,
        "model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "best_state": state.best_state,
        "torch_rng": torch.get_rng_state(), "python_rng": list(random.getstate()[1]),
        "result": {k: v for k, v in result.to_dict().items()},
    }


def save_epoch_checkpoint(uri: str, payload: dict[str, Any]) -> None:
    """Write an epoch checkpoint to the store (atomic: a crash leaves the previous one)."""
    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_epoch_checkpoint(uris: Sequence[str]) -> dict[str, Any] | None:
    """The first epoch checkpoint found among ``uris`` (this attempt's, then an origin run's)."""
    import torch

    for uri in uris:
        if uri and storage.exists(uri):
            log.info("resuming from epoch checkpoint %s", uri)
            return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    return None


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


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
    import torch

    from plantml.data import augmentation_factory
    from plantml.loader import make_loader, steps_per_epoch

    if index.image_size != train_params.image_size:
        raise ValueError(f"the shards hold {index.image_size} px images but train.image_size is "
                         f"{train_params.image_size}: prepare again with this size")
    torch.set_num_threads(max(1, threads))
    seed_everything(train_params.seed)
    device = resolve_device(train_params.device)
    if device == "cuda" and dist.world > 1:
        torch.cuda.set_device(dist.local_rank)
        device = f"cuda:{dist.local_rank}"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    classes = index.classes
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, frozen, spec = build_model(name, model_params, train_params, len(classes), device)
    epochs = model_params.epochs or train_params.epochs
    bs = train_params.batch_size
    counts = _weighted_counts(index, dist.world)
    steps = [steps_per_epoch(counts, bs, dist.world, True, train_params.seed, e) for e in range(1, epochs + 1)]
    optimizer = torch.optim.AdamW(_param_groups(model, model_params.lr, train_params.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(sum(steps), train_params.warmup_epochs * max(1, steps[0])))
    result = TrainResult(
        name=name, arch=model_params.arch, classes=list(classes), image_size=index.image_size, mean=list(spec.mean),
        std=list(spec.std), threads=threads, device=device, num_params=sum(p.numel() for p in model.parameters()),
        frozen_params=frozen, started_at=time.time(), world_size=dist.world,
    )
    state = TrainState()
    saved = load_epoch_checkpoint([checkpoint_uri or "", *resume_uris])
    if saved is not None:
        state = _restore(saved, model, optimizer, scheduler, result)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dist.local_rank] if dev_type == "cuda" else None)
    augment = augmentation_factory(index.image_size, train_params.background_replace)
    bar = tqdm(range(state.epoch + 1, epochs + 1), desc=f"train {name} ({model_params.arch})", unit="epoch",
               disable=not (progress and dist.is_main), initial=state.epoch, total=epochs)
    for epoch in bar:
        if state.bad_epochs >= train_params.patience:
            break
        _maybe_inject_failure(epoch)
        t0 = time.time()
        batches = make_loader(index, "train", bs, train=True, seed=train_params.seed, epoch=epoch,
                              workers=loader.workers, augment_factory=augment, rank=dist.rank, world=dist.world,
                              pin_memory=dev_type == "cuda", buffer_size=loader.shuffle_buffer,
                              domain_weights=index.domain_weights)
        fit = train_one_epoch(model, batches, steps[epoch - 1], optimizer, scheduler, spec, train_params, device,
                              f"{name} epoch {epoch}" if progress and dist.is_main else None)
        val_logits, val_labels = validate(model, index, spec, device, bs * 2, dist)
        row = _validation_row(epoch, fit, val_logits, val_labels, len(classes),
                              float(optimizer.param_groups[0]["lr"]), time.time() - t0)
        result.history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}",
                        val_f1=f"{row['val_macro_f1']:.3f}")
        log.info("%s epoch %d: %s", name, epoch, {k: round(v, 4) for k, v in row.items()})
        _update_best(state, row, model, result, epoch)
        state.epoch = epoch
        if dist.is_main and checkpoint_uri:
            save_epoch_checkpoint(checkpoint_uri, _checkpoint_payload(model, optimizer, scheduler, state, result))
        if dist.is_main and on_epoch_end is not None:
            on_epoch_end(row, result)
        if state.bad_epochs >= train_params.patience:
            result.stopped_early = epoch < epochs
            log.info("%s: early stop after epoch %d (best epoch %d)", name, epoch, result.best_epoch)
            break
    bar.close()
    result.epochs_run = len(result.history)
    result.finished_at = time.time()
    result.train_seconds = sum(r["seconds"] for r in result.history)
    assert state.best_state is not None
    ckpt = out / CHECKPOINT_FILE
    if dist.is_main:
        save_checkpoint(state.best_state, result, ckpt)
        (out / "history.json").write_text(json.dumps(result.history, indent=2))
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    result.checkpoint_path = str(ckpt.resolve())
    return result


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


def _update_best(state: TrainState, row: dict[str, float], model: Any, result: TrainResult, epoch: int) -> None:
    key = (row["val_macro_f1"], -row["val_loss"])
    if key > state.best_key:
        state.best_key, state.bad_epochs = key, 0
        state.best_state = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
        result.best_epoch = epoch
        result.best_val_macro_f1 = row["val_macro_f1"]
        result.best_val_accuracy = row["val_accuracy"]
    else:
        state.bad_epochs += 1


def _restore(saved: dict[str, Any], model: Any, optimizer: Any, scheduler: Any, result: TrainResult) -> TrainState:
    """Load an epoch checkpoint into the model, optimiser, scheduler, RNG and result."""
    import torch

    model.load_state_dict(saved["model"])
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
    """Write weights plus what is needed to rebuild the model, atomically."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": state_dict, "arch": result.arch, "classes": result.classes,
                "image_size": result.image_size, "mean": result.mean, "std": result.std}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """Rebuild a trained model from :func:`save_checkpoint` output (eval mode, CPU)."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(ckpt["arch"], num_classes=len(ckpt["classes"]), pretrained=False,
                         image_size=ckpt["image_size"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), {k: v for k, v in ckpt.items() if k != "state_dict"}


def measure_latency_ms(model: Any, image_size: int, threads: int = 1, runs: int = 20, warmup: int = 3) -> float:
    """Median torch-eager latency (batch 1, CPU) in milliseconds."""
    import torch

    from plantml.timing import latency_stats

    torch.set_num_threads(max(1, threads))
    model = model.eval().cpu()
    with torch.inference_mode():
        return latency_stats(model, torch.randn(1, 3, image_size, image_size), runs, warmup)["median_ms"]
