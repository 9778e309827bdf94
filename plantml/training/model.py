"""The branch's model: building it for training, unwrapping DDP, and its eager latency."""

from __future__ import annotations

from typing import Any

from plantml.config import ModelParams, TrainParams
from plantml.models import create_model, freeze_stages, input_normalization
from plantml.preprocess import InputSpec
from plantml.timing import latency_stats


def build_model(name: str, model_params: ModelParams, train_params: TrainParams, n_classes: int,
                device: str) -> tuple[Any, int, InputSpec]:
    """The branch's model (pretrained, early stages frozen, channels_last on ``device``).

    Args:
        name: branch name (unused by the build; kept for callers that pass it).
        model_params: architecture and frozen stages (``train.models.<name>``).
        train_params: shared training settings (the image size).
        n_classes: number of output classes.
        device: torch device to place the model on.

    Returns:
        ``(model, number of frozen parameters, the model's input spec)``.
    """
    import torch

    size = train_params.image_size
    norm = input_normalization(model_params.arch)
    spec = InputSpec(size=size, mean=norm["mean"], std=norm["std"])
    model = create_model(model_params.arch, num_classes=n_classes, pretrained=True, image_size=size)
    frozen = freeze_stages(model, model_params.frozen_blocks)
    # channels_last roughly halves a CPU training step of these depthwise-conv trunks (oneDNN kernels).
    return model.to(device=device, memory_format=torch.channels_last), frozen, spec


def unwrap(model: Any) -> Any:
    """The plain model inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return getattr(model, "module", model)


def wrap_data_parallel(model: Any, world: int, local_rank: int, device: str) -> Any:
    """Wrap ``model`` in ``DistributedDataParallel`` when ``world > 1``; else return it as is.

    Args:
        model: the branch's model, already on its device.
        world: number of data-parallel processes.
        local_rank: this process's GPU index on its node.
        device: this process's device (CPU ranks pass no device ids).
    """
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[local_rank] if device.startswith("cuda") else None)


def measure_latency_ms(model: Any, image_size: int, threads: int = 1, runs: int = 20, warmup: int = 3) -> float:
    """Median torch-eager latency (batch 1, CPU) in milliseconds.

    Args:
        model: the trained model (moved to CPU, eval mode).
        image_size: input side in pixels.
        threads: torch intra-op threads.
        runs: timed runs.
        warmup: untimed runs first.
    """
    import torch

    torch.set_num_threads(max(1, threads))
    model = model.eval().cpu()
    with torch.inference_mode():
        return latency_stats(model, torch.randn(1, 3, image_size, image_size), runs, warmup)["median_ms"]
