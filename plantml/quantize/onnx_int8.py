"""ONNX Runtime INT8: static QDQ quantization (per-channel weights, MinMax calibration)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from plantml.quantize.inputs import check_calibration_images
from plantml.quantize.ood_head import onnx_ood_head_nodes

log = logging.getLogger(__name__)


class _ArrayReader:
    """ONNX Runtime ``CalibrationDataReader`` over an in-memory batch."""

    def __init__(self, input_name: str, images: np.ndarray, batch_size: int) -> None:
        self.input_name = input_name
        self.images = images
        self.batch_size = batch_size
        self._it: Iterator[np.ndarray] = self._batches()

    def _batches(self) -> Iterator[np.ndarray]:
        for i in range(0, len(self.images), self.batch_size):
            yield self.images[i:i + self.batch_size]

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._it = self._batches()


def quantize_onnx(
    fp32_onnx: Path, out_onnx: Path, calibration_images: np.ndarray, *, per_channel: bool = True,
    batch_size: int = 8, signed_activations: bool = False,
) -> Path:
    """ONNX Runtime static QDQ INT8 quantization (per-channel weights, MinMax calibration).

    The model is first pre-processed (shape inference + graph optimisation), which is
    what ONNX Runtime recommends before static quantization. Activations are unsigned and
    weights signed (U8S8) with ``reduce_range`` (7-bit weights): on x86 CPUs without VNNI,
    ONNX Runtime fuses U8S8 QDQ into ``QLinearConv`` everywhere, while with signed
    activations (S8S8) it leaves the 1x1 convolutions as float ``Conv`` between
    Quantize/Dequantize pairs; ``reduce_range`` avoids the 16-bit accumulator saturation
    of ``vpmaddubsw`` on AVX2 (without it U8S8 agreed less often with FP32). The
    comparison with S8S8 is in docs/benchmarks.md (``benchmarks/edge_bench.py --compare-s8s8``).

    Args:
        fp32_onnx: the FP32 model.
        out_onnx: destination of the QDQ model (a single file).
        calibration_images: preprocessed ``NCHW`` float32 images.
        per_channel: per-output-channel weight scales (needed for depthwise convolutions).
        batch_size: calibration batch (the model has a dynamic batch dimension).
        signed_activations: S8S8 (no ``reduce_range``) instead of U8S8 + ``reduce_range``;
            kept for the benchmark that compares the two.

    Returns:
        ``out_onnx``.
    """
    import onnxruntime as ort

    images = check_calibration_images(calibration_images)
    input_name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plantml-qdq-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        _pre_process(Path(fp32_onnx), prepped)
        _quantize_static_qdq(prepped, out_onnx, _ArrayReader(input_name, images, batch_size),
                             per_channel=per_channel, signed_activations=signed_activations)
    return out_onnx


def _pre_process(fp32_onnx: Path, prepped: Path) -> None:
    """Shape inference + graph optimisation into ``prepped``; a plain copy if both attempts fail."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(fp32_onnx), str(prepped), skip_symbolic_shape=skip_symbolic)
            return
        except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
            # Symbolic shape inference trips over some graphs (the OOD head's
            # broadcasting); ONNX's own shape inference is then enough.
            log.info("ONNX quantization pre-processing (skip_symbolic_shape=%s) failed: %s", skip_symbolic, exc)
    log.warning("ONNX quantization pre-processing failed; quantizing the model as exported")
    shutil.copyfile(fp32_onnx, prepped)


def _quantize_static_qdq(prepped: Path, out_onnx: Path, reader: _ArrayReader, *, per_channel: bool,
                         signed_activations: bool) -> None:
    """``quantize_static`` in QDQ format, the OOD head left in FP32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = onnx_ood_head_nodes(onnx.load(str(prepped), load_external_data=False).graph)
    quantize_static(
        str(prepped), str(out_onnx), reader,
        nodes_to_exclude=exclude or None,
        quant_format=QuantFormat.QDQ, per_channel=per_channel,
        activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8,
        weight_type=QuantType.QInt8, reduce_range=not signed_activations,
        calibrate_method=CalibrationMethod.MinMax,
        # Bound calibration memory: merge ranges every few batches instead of keeping
        # every intermediate tensor of every calibration image.
        extra_options={"CalibMaxIntermediateOutputs": 8},
    )
