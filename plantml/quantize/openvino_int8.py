"""OpenVINO INT8: NNCF post-training quantization of the bundle's FP32 IR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from plantml.quantize.inputs import check_calibration_images
from plantml.quantize.ood_head import openvino_ood_head_nodes


def import_nncf() -> Any:
    """Import nncf, first undoing a known clash with Metaflow in the same process.

    Metaflow vendors an older ``typing_extensions`` that replaces ``typing._collect_parameters``
    for the whole process once it is imported (a flow's client, ``Runner`` or cards). With
    it, nncf's ``Protocol[P, R]`` (a ParamSpec with a default) fails to import with
    "Type parameter +R without a default follows type parameter with a default".
    Re-installing the installed ``typing_extensions``' own function is exactly what importing
    it did in the first place, so nothing else changes.
    """
    import typing

    import typing_extensions

    current = getattr(typing_extensions, "_collect_parameters", None)
    if current is not None and getattr(typing, "_collect_parameters", current) is not current:
        typing._collect_parameters = current  # type: ignore[attr-defined]
    import nncf

    return nncf


def is_transformer(architecture: str | None) -> bool:
    """Whether an architecture name denotes a (hybrid) vision transformer.

    Args:
        architecture: the bundle's ``architecture`` (may be missing).
    """
    name = (architecture or "").lower()
    return "vit" in name or "deit" in name or "transformer" in name


def input_resize_nodes(model: Any) -> list[str]:
    """MatMul nodes applied to the image itself (the edge student's in-model downscale,
    :func:`plantml.pipeline.student_export.downscaled`): quantizing them would quantize the
    pixels (measured: the student's NNCF INT8 lost 32 points with them quantized)."""
    frontier = {p.get_friendly_name() for p in model.get_parameters()}
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() == "MatMul" and any(
                i.get_source_output().get_node().get_friendly_name() in frontier for i in op.inputs()):
            names.append(op.get_friendly_name())
            frontier.add(op.get_friendly_name())
    return names


def quantize_openvino(
    fp32_xml: Path, out_xml: Path, calibration_images: np.ndarray, *, transformer: bool = False
) -> Path:
    """NNCF post-training INT8 quantization of an OpenVINO IR.

    Args:
        fp32_xml: the FP32 ``model.xml`` (its ``.bin`` beside it).
        out_xml: where to write the INT8 ``model.xml`` (+ ``.bin``).
        calibration_images: preprocessed ``NCHW`` float32 images (each is one calibration sample).
        transformer: use NNCF's transformer scheme (``ModelType.TRANSFORMER``, mixed preset).

    Returns:
        ``out_xml``.
    """
    import openvino as ov

    nncf = import_nncf()
    images = check_calibration_images(calibration_images)
    model = ov.Core().read_model(str(fp32_xml))
    # One image per sample: the IR has a dynamic batch and NNCF collects statistics per sample.
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    kwargs: dict[str, Any] = {"subset_size": len(images)}
    # the OOD score output's head, and an in-model input downscale (the edge student's): FP32
    head = openvino_ood_head_nodes(model) + input_resize_nodes(model)
    if head:
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=head, validate=False)
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
    quantized = nncf.quantize(model, dataset, **kwargs)
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml
