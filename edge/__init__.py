"""Offline edge inference: :class:`edge.runtime.EdgeModel` and the ``plantml-edge`` CLI.

Reads an exported bundle only; never imports torch, torchvision, timm or metaflow.
"""
