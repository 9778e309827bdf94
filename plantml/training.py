"""Training: one function, :func:`train_model`, used by the Metaflow flow and the CLI.

CPU by default, CUDA when present (``train.device: auto``). Seeded (python, numpy,
torch). AdamW with a linear warm-up and cosine decay per step, label smoothing, early
stopping on validation macro-F1 (the best epoch's weights are kept). Parallel branches
share the machine's cores: each gets ``cores // branches`` torch threads so two branches
on two cores do not oversubscribe.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from plantml.config import ModelParams, TrainParams
from plantml.models import create_model, freeze_stages, input_normalization, keep_frozen_in_eval
from plantml.preprocess import InputSpec

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(size=self.image_size, mean=tuple(self.mean), std=tuple(self.std))


def available_cores() -> int:
    """CPU cores this process may use (respects affinity / container limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def resolve_threads(configured: int, parallel_branches: int = 1) -> int:
    """Torch threads for one branch: the configured number, or an equal share of the cores."""
    if configured > 0:
        return configured
    return max(1, available_cores() // max(1, parallel_branches))


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


def normalize_batch(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``uint8 [N,H,W,3]`` -> normalised ``float32 [N,3,H,W]`` (same maths as preprocess.normalize)."""
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std)


def predict_logits(model: Any, images: np.ndarray, spec: InputSpec, batch_size: int = 64, device: str = "cpu"):
    """Logits for ``uint8 [N,H,W,3]`` images already resized to ``spec.size``."""
    import torch

    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(normalize_batch(images[i:i + batch_size], spec)).to(device)
            outs.append(model(x).float().cpu().numpy())
    n_classes = outs[0].shape[1] if outs else 0
    return np.concatenate(outs) if outs else np.zeros((0, n_classes), dtype=np.float32)


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


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def train_model(
    name: str,
    model_params: ModelParams,
    train_params: TrainParams,
    train_data: tuple[np.ndarray, np.ndarray],
    val_data: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    out_dir: str | os.PathLike[str],
    threads: int = 1,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune one architecture with early stopping and save the best weights.

    Args:
        name: branch name (``cnn``, ``vit``); used in logs and file names.
        model_params: architecture and learning rate (``train.models.<name>``).
        train_params: shared training settings (``train``).
        train_data: ``(uint8 [N,H,W,3], int64 [N])`` at ``train_params.image_size``.
        val_data: the validation split, same format.
        classes: class names, index-aligned with the labels.
        out_dir: receives ``model.pt``, ``history.json`` and ``result.json``.
        threads: torch intra-op threads for this process.

    Returns:
        A :class:`TrainResult` (the best epoch's metrics and the checkpoint path).
    """
    import torch
    import torch.nn.functional as F

    from plantml.data import train_augmentation

    torch.set_num_threads(max(1, threads))
    seed_everything(train_params.seed)
    device = resolve_device(train_params.device)
    size = train_params.image_size
    norm = input_normalization(model_params.arch)
    spec = InputSpec(size=size, mean=norm["mean"], std=norm["std"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    model = create_model(model_params.arch, num_classes=len(classes), pretrained=True, image_size=size)
    frozen = freeze_stages(model, model_params.frozen_blocks)
    # channels_last roughly halves a CPU training step of these depthwise-conv trunks (oneDNN kernels).
    model = model.to(device=device, memory_format=torch.channels_last)
    epochs = model_params.epochs or train_params.epochs
    x_train, y_train = train_data
    x_val, y_val = val_data
    bs = train_params.batch_size
    steps_per_epoch = max(1, len(x_train) // bs + (1 if len(x_train) % bs > 1 else 0))
    optimizer = torch.optim.AdamW(_param_groups(model, model_params.lr, train_params.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(epochs * steps_per_epoch, train_params.warmup_epochs * steps_per_epoch)
    )
    augment = train_augmentation(size, seed=train_params.seed)
    rng = np.random.default_rng(train_params.seed)
    result = TrainResult(
        name=name, arch=model_params.arch, classes=list(classes), image_size=size, mean=list(spec.mean),
        std=list(spec.std), threads=threads, device=device, num_params=sum(p.numel() for p in model.parameters()),
        frozen_params=frozen, started_at=time.time(),
    )
    best_state: dict[str, Any] | None = None
    best_key = (-1.0, -math.inf)
    bad_epochs = 0
    bar = tqdm(range(1, epochs + 1), desc=f"train {name} ({model_params.arch})", unit="epoch", disable=not progress)
    for epoch in bar:
        t0 = time.time()
        model.train()
        keep_frozen_in_eval(model)
        order = rng.permutation(len(x_train))
        losses, correct, seen = [], 0, 0
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            if len(idx) < 2:  # BatchNorm cannot train on a batch of one
                continue
            batch = np.stack([augment(image=x_train[i])["image"] for i in idx])
            x = torch.from_numpy(normalize_batch(batch, spec)).to(device, memory_format=torch.channels_last)
            y = torch.from_numpy(y_train[idx]).to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=train_params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        val_logits = predict_logits(model, x_val, spec, device=device)
        val_loss = float(F.cross_entropy(torch.from_numpy(val_logits), torch.from_numpy(y_val)))
        val_pred = val_logits.argmax(1)
        row = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val_loss,
            "val_accuracy": float((val_pred == y_val).mean()),
            "val_macro_f1": _macro_f1(y_val, val_pred, len(classes)),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "seconds": time.time() - t0,
        }
        result.history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row['val_accuracy']:.3f}",
                        val_f1=f"{row['val_macro_f1']:.3f}")
        log.info("%s epoch %d: %s", name, epoch, {k: round(v, 4) for k, v in row.items()})
        key = (row["val_macro_f1"], -val_loss)
        if key > best_key:
            best_key, bad_epochs = key, 0
            best_state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
            result.best_epoch = epoch
            result.best_val_macro_f1 = row["val_macro_f1"]
            result.best_val_accuracy = row["val_accuracy"]
        else:
            bad_epochs += 1
            if bad_epochs >= train_params.patience:
                result.stopped_early = True
                log.info("%s: early stop after epoch %d (best epoch %d)", name, epoch, result.best_epoch)
                break
    bar.close()
    result.epochs_run = len(result.history)
    result.finished_at = time.time()
    result.train_seconds = result.finished_at - result.started_at
    assert best_state is not None
    ckpt = out / CHECKPOINT_FILE
    save_checkpoint(best_state, result, ckpt)
    result.checkpoint_path = str(ckpt.resolve())
    (out / "history.json").write_text(json.dumps(result.history, indent=2))
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


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

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
