"""The exported bundle as an MLflow ``pyfunc`` model. Torch-free.

:class:`BundlePyfunc` is a thin adapter: it loads the bundle that is logged as the model's
``bundle`` artifact with :class:`edge.runtime.EdgeModel` (ONNX Runtime; the same
preprocessing, temperature scaling and abstention rule — :func:`plantml.ood.decide` —
that ``plantml-edge`` and the service use) and turns a DataFrame of encoded images into a
DataFrame of answers. There is no second copy of the inference code here.

Layering: this module is an *adapter* over the torch-free edge runtime, like ``serving/``;
it lives in ``plantml`` because :func:`plantml.registry.register_bundle` builds it. It is
the only ``plantml`` module that imports ``edge``, and nothing torch-free imports it.
mlflow is imported at the top: the class must subclass ``mlflow.pyfunc.PythonModel``, and
nobody imports this module without MLflow installed.

Input (the model signature): a DataFrame with one column ``image`` of type ``binary`` —
the encoded file (JPEG, PNG, ...), one image per row. In Python pass raw ``bytes``;
over HTTP (``mlflow models serve``) send the bytes **base64-encoded** in JSON, which MLflow
decodes for binary columns of the signature::

    {"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}

Output: one row per image with ``label`` (top-1 class), ``confidence`` (its calibrated
probability), ``abstained`` (bool), ``abstain_reason`` (``out_of_distribution``,
``low_confidence``, ``invalid_image`` or null), ``ood_score`` (null when the model has
none), ``probabilities`` (calibrated, in the order of the model's ``classes``, which the
MLmodel's ``metadata`` lists) and ``error`` (null, or why the image could not be decoded;
such a row is abstained with reason ``invalid_image`` and no label).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from typing import Any, Iterable, Sequence

import mlflow.pyfunc
import numpy as np
import pandas as pd
from PIL import Image

from edge.runtime import EdgeModel
from plantml.bundle import Bundle
from plantml.preprocess import ImageDecodeError, decode_image
from plantml.registry import BUNDLE_ARTIFACT

log = logging.getLogger(__name__)

#: Name of the input column.
INPUT_COLUMN = "image"
#: Abstain reason of a row whose bytes are not a decodable image.
REASON_INVALID = "invalid_image"
OUTPUT_COLUMNS = ("label", "confidence", "abstained", "abstain_reason", "ood_score", "probabilities", "error")
#: ``model_config`` keys the model reads at load time (``mlflow.pyfunc.load_model(..., model_config=...)``).
DEFAULT_CONFIG: dict[str, Any] = {"precision": "fp32", "threads": None}


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    """A plantml bundle behind MLflow's ``pyfunc`` interface (ONNX Runtime, no torch)."""

    def __init__(self) -> None:
        self.model: EdgeModel | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load and verify (sha256) the bundle artifact and build the ONNX Runtime session.

        ``model_config`` may set ``precision`` (``fp32``/``int8``, if the bundle has it) and
        ``threads`` (ONNX Runtime intra-op threads; default: the runtime's choice).
        """
        config = {**DEFAULT_CONFIG, **(context.model_config or {})}
        threads = int(config["threads"]) if config.get("threads") else None
        self.model = EdgeModel(context.artifacts[BUNDLE_ARTIFACT], runtime="onnxruntime",
                               precision=str(config["precision"]), threads=threads)
        log.info("pyfunc loaded bundle %s %s", self.model.bundle.name, self.model.bundle.version)

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Classify encoded images (see the module docstring for the schema).

        ``model_input`` is annotated ``pd.DataFrame`` on purpose: MLflow infers no schema from
        that hint, so the explicit signature (binary ``image`` column) applies.
        """
        if self.model is None:
            raise RuntimeError("model not loaded: load it with mlflow.pyfunc.load_model")
        return predict_encoded(self.model, image_column(model_input))


def image_column(model_input: Any) -> list[Any]:
    """The encoded images of a pyfunc input: a DataFrame column ``image``, a dict, or a list.

    Raises:
        ValueError: a DataFrame/dict without an ``image`` column.
    """
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN in model_input.columns:
            return list(model_input[INPUT_COLUMN])
        if model_input.shape[1] == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(f"input needs a column {INPUT_COLUMN!r}; got {list(model_input.columns)}")
    if isinstance(model_input, dict):
        if INPUT_COLUMN not in model_input:
            raise ValueError(f"input needs a key {INPUT_COLUMN!r}; got {sorted(model_input)}")
        value = model_input[INPUT_COLUMN]
        return list(value) if isinstance(value, (list, tuple, np.ndarray, pd.Series)) else [value]
    if isinstance(model_input, (bytes, str)):
        return [model_input]
    return list(model_input)


def to_bytes(value: Any) -> bytes:
    """Raw bytes of one input cell: ``bytes`` as they are, ``str`` as base64.

    Raises:
        ImageDecodeError: neither bytes nor valid base64 (reason ``not_image``).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError("not_image", f"string input is not base64: {exc}") from exc
    raise ImageDecodeError("not_image", f"expected bytes or a base64 string, got {type(value).__name__}")


def decode_cell(value: Any) -> Image.Image:
    """Decode one input cell into an RGB image.

    Bytes that are not an image but are base64 text are decoded once more: MLflow's scoring
    server base64-decodes binary columns for ``dataframe_split``/``dataframe_records``
    payloads but hands the base64 text over as bytes for ``inputs``/``instances``.

    Raises:
        ImageDecodeError: not an image (see :func:`plantml.preprocess.decode_image`).
    """
    data = to_bytes(value)
    try:
        return decode_image(data)
    except ImageDecodeError as exc:
        if exc.reason != "not_image":
            raise
        try:
            inner = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise exc from None
        return decode_image(inner)


def predict_encoded(model: EdgeModel, encoded: Sequence[Any], batch_size: int = 16) -> pd.DataFrame:
    """Decode and classify encoded images with an :class:`EdgeModel`, in chunks of ``batch_size``.

    Returns:
        One row per input with the columns of :data:`OUTPUT_COLUMNS`, in input order.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(encoded), batch_size):
        rows.extend(_predict_chunk(model, encoded[start:start + batch_size]))
    return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _predict_chunk(model: EdgeModel, encoded: Iterable[Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    images, where = [], []
    for i, value in enumerate(encoded):
        try:
            images.append(decode_cell(value))
            where.append(i)
            rows.append({})
        except ImageDecodeError as exc:
            rows.append({"label": None, "confidence": None, "abstained": True, "abstain_reason": REASON_INVALID,
                         "ood_score": None, "probabilities": None, "error": f"{exc.reason}: {exc}"})
    if images:
        preds = model.predict_images(images, k=len(model.classes))
        for i, pred in zip(where, preds):
            by_label = {t["label"]: t["confidence"] for t in pred["top_k"]}
            rows[i] = {
                "label": pred["label"], "confidence": pred["confidence"], "abstained": pred["abstained"],
                "abstain_reason": pred["abstain_reason"], "ood_score": pred.get("ood_score"),
                "probabilities": [float(by_label[c]) for c in model.classes], "error": None,
            }
    return rows


def model_signature() -> Any:
    """The ``ModelSignature``: ``image`` (binary) in; the answer columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(DataType.binary, INPUT_COLUMN)])
    outputs = Schema([
        ColSpec(DataType.string, "label", required=False),
        ColSpec(DataType.double, "confidence", required=False),
        ColSpec(DataType.boolean, "abstained"),
        ColSpec(DataType.string, "abstain_reason", required=False),
        ColSpec(DataType.double, "ood_score", required=False),
        ColSpec(Array(DataType.double), "probabilities", required=False),
        ColSpec(DataType.string, "error", required=False),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(bundle: Bundle) -> pd.DataFrame:
    """A one-row input example: a plain PNG at the bundle's input size (documents the format)."""
    size = bundle.input_spec.size
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (90, 140, 60)).save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [buf.getvalue()]})


def pip_requirements() -> list[str]:
    """What the torch-free runtime needs, pinned to the versions installed here.

    The ``plantml`` and ``edge`` packages travel with the model as ``code_paths``.
    """
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("onnxruntime", "numpy", "pillow", "pandas"):
        try:
            reqs.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs
