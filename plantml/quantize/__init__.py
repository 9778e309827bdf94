"""Post-training INT8 quantization of an exported model, with an accuracy gate. Torch-free.

Two INT8 models are built from the FP32 files already in a bundle being written:

* **OpenVINO** — NNCF post-training quantization of the OpenVINO IR
  (``openvino_int8/model.xml|bin``). Transformers get ``ModelType.TRANSFORMER`` (keeps
  LayerNorm/Softmax/GELU in float, the scheme NNCF recommends for them).
* **ONNX Runtime** — static QDQ quantization, per-channel INT8 weights, INT8 activations,
  MinMax calibration (``model.int8.onnx``). *Dynamic* quantization is avoided on purpose:
  it has collapsed depthwise-convolution CNNs to chance accuracy.

Both are calibrated on the same preprocessed training images (NCHW float32, produced by
:mod:`plantml.preprocess`, i.e. exactly what the deployed model sees). Each INT8 model is
then evaluated on the test split next to the FP32 model *of the same runtime*; it is kept
in the bundle only if ``fp32_accuracy - int8_accuracy <= max_accuracy_drop``. Latency
(1 thread, batch 1, median) is recorded for both precisions, because INT8 is not always
faster on CPU (transformers, and ONNX Runtime QDQ on CPUs without VNNI, can be slower):
``metadata["int8"]["recommended"]`` says, per runtime, which precision to deploy.

Usage (what the export step of the training flow does)::

    step = int8_export_step(calib_x, test_x, test_y, max_accuracy_drop=0.01)
    export_bundle(model, ..., extra_steps=[step])

OpenVINO is run with ``INFERENCE_PRECISION_HINT=f32`` for every accuracy figure here: on
CPUs with AVX-512 BF16 its default would run the float parts in bfloat16, and the gate
must measure quantization error only. :class:`edge.runtime.EdgeModel` uses the same hint
by default; both open their sessions through :mod:`plantml.runtime`, as this gate does.

One job per module: ``inputs`` (checking the image batches), ``measure`` (accuracy,
macro-F1, latency), ``ood_head`` (the OOD head kept in FP32), ``openvino_int8`` (NNCF),
``onnx_int8`` (static QDQ), ``gate`` (one runtime's schemes against its FP32 model) and
``step`` (the export step and its report). This package re-exports every public name.
"""

from plantml.metrics import macro_f1
from plantml.quantize.gate import RuntimeJob, ood_agreement, quantize_and_gate
from plantml.quantize.inputs import QuantizationError, check_calibration_images
from plantml.quantize.measure import Runner, evaluate, median_latency_ms, predict_labels
from plantml.quantize.onnx_int8 import quantize_onnx
from plantml.quantize.ood_head import ood_head_nodes, onnx_ood_head_nodes, openvino_ood_head_nodes
from plantml.quantize.openvino_int8 import import_nncf, is_transformer, quantize_openvino
from plantml.quantize.step import (
    ONNX_FP32_PATH, ONNX_INT8_PATH, OPENVINO_FP32_XML, OPENVINO_INT8_DIR, int8_export_step,
)
# The gate measures the session the service runs: the runners of plantml.runtime.
from plantml.runtime import onnxruntime_runner, openvino_runner

__all__ = [
    "ONNX_FP32_PATH", "ONNX_INT8_PATH", "OPENVINO_FP32_XML", "OPENVINO_INT8_DIR", "QuantizationError", "Runner",
    "RuntimeJob", "check_calibration_images", "evaluate", "import_nncf", "int8_export_step", "is_transformer",
    "macro_f1", "median_latency_ms", "onnx_ood_head_nodes", "onnxruntime_runner", "ood_agreement",
    "ood_head_nodes", "openvino_ood_head_nodes", "openvino_runner", "predict_labels", "quantize_and_gate",
    "quantize_onnx", "quantize_openvino",
]
