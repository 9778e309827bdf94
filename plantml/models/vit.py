"""Vision Transformers from timm.

``hybrid_vit_tiny`` is timm's :class:`~timm.models.vision_transformer.VisionTransformer`
with a :class:`~timm.layers.HybridEmbed` patch embedding: the "patches" are the cells of
the stride-16 feature map of a pretrained EfficientNet-Lite0 stem (Dosovitskiy et al.,
2020, §3.1). Trained from scratch, a ViT needs far more than the few thousand images of
PlantVillage-sized tasks; with ImageNet-pretrained convolutional embeddings it learns
from them in a few epochs on a CPU.
"""

from __future__ import annotations

from typing import Any

from plantml.models import register

#: EfficientNet-Lite0 stages 0-4 end at stride 16 with 112 channels.
_STEM_STAGES = 5


def lite0_stride16_backbone(pretrained: bool) -> Any:
    """EfficientNet-Lite0 stem + blocks 0-4 (stride 16, 112 channels) as one module."""
    from torch import nn

    from plantml.models.cnn import build_efficientnet_lite0

    full = build_efficientnet_lite0(pretrained)
    return nn.Sequential(full.conv_stem, full.bn1, *list(full.blocks.children())[:_STEM_STAGES])


@register("hybrid_vit_tiny")
def hybrid_vit_tiny(num_classes: int, pretrained: bool = True, image_size: int = 224) -> Any:
    """Hybrid ViT-Tiny-ish: 192-dim tokens, 4 blocks, 3 heads over Lite0 stride-16 features."""
    from functools import partial

    from timm.layers import HybridEmbed
    from timm.models.vision_transformer import VisionTransformer

    backbone = lite0_stride16_backbone(pretrained)
    embed = partial(HybridEmbed, backbone=backbone, feature_size=None, feature_ratio=16)
    model = VisionTransformer(
        img_size=image_size, patch_size=1, num_classes=num_classes, embed_dim=192, depth=4,
        num_heads=3, mlp_ratio=4.0, embed_layer=embed, drop_path_rate=0.1, class_token=True,
        global_pool="token",
    )
    # Tells training to give the pretrained embedding a smaller learning rate.
    model.pretrained_prefixes = ("patch_embed.backbone.",)
    return model
