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
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from plantml.metrics import macro_f1  # one definition; the gate averages over the classes present
# The gate measures the session the service runs: the runners of plantml.runtime (re-exported).
from plantml.runtime import onnxruntime_runner, openvino_runner  # noqa: F401
from plantml.timing import latency_stats

log = logging.getLogger(__name__)

ONNX_INT8_PATH = "model.int8.onnx"
OPENVINO_INT8_DIR = "openvino_int8"
ONNX_FP32_PATH = "model.onnx"
OPENVINO_FP32_XML = "openvino/model.xml"

Runner = Callable[[np.ndarray], np.ndarray]


class QuantizationError(RuntimeError):
    """Quantization could not be run (bad calibration data, a runtime refused the model)."""


# --------------------------------------------------------------------------- predictions


def predict_labels(runner: Runner, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Arg-max class index of each image, run in batches."""
    preds = [np.argmax(runner(images[i:i + batch_size]), axis=-1) for i in range(0, len(images), batch_size)]
    return np.concatenate(preds) if preds else np.zeros((0,), dtype=np.int64)


def evaluate(runner: Runner, images: np.ndarray, labels: np.ndarray, batch_size: int = 16) -> dict[str, float]:
    """Accuracy and macro-F1 of ``runner`` on a labelled, preprocessed set."""
    pred = predict_labels(runner, images, batch_size)
    labels = np.asarray(labels)
    acc = float(np.mean(pred == labels)) if len(labels) else 0.0
    return {
        "accuracy": acc,
        "macro_f1": macro_f1(labels, pred),
        "n": int(len(labels)),
        # binomial standard error: the gate may run on a capped subset of a large test split
        "accuracy_standard_error": float(np.sqrt(acc * (1 - acc) / len(labels))) if len(labels) else float("nan"),
    }


def median_latency_ms(runner: Runner, sample: np.ndarray, runs: int = 30, warmup: int = 3) -> float:
    """Median wall time (ms) of ``runner`` on one batch-1 input."""
    return latency_stats(runner, np.ascontiguousarray(sample[:1], dtype=np.float32), runs, warmup)["median_ms"]


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


def check_calibration_images(images: np.ndarray, what: str = "calibration_images") -> np.ndarray:
    """Validate an ``NCHW`` float batch of preprocessed images; returns it as float32.

    Raises:
        ValueError: naming the problem (wrong rank, no images, not 3 channels, NaN/inf).
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"{what} must be an NCHW batch with 3 channels, got shape {arr.shape}")
    if len(arr) == 0:
        raise ValueError(f"{what} is empty: INT8 calibration needs preprocessed images")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be preprocessed float images (plantml.preprocess), got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


def is_transformer(architecture: str | None) -> bool:
    """Whether an architecture name denotes a (hybrid) vision transformer."""
    name = (architecture or "").lower()
    return "vit" in name or "deit" in name or "transformer" in name


def ood_head_nodes(graph_outputs: Sequence[Any], inputs_of: Callable[[Any], Iterable[Any]],
                   name_of: Callable[[Any], str]) -> list[str]:
    """Names of the nodes that compute only the OOD score of a two-output model.

    Those are the ancestors of the second output (``ood_score``) that are not ancestors of
    the first (``logits``): found structurally, because exporters name nodes differently
    from one model to the next. The OOD score subtracts nearly equal squared distances;
    8-bit activations would destroy it, and it costs little, so it stays FP32.

    Args:
        graph_outputs: the nodes producing ``logits`` and ``ood_score``, in that order.
        inputs_of: ``node -> nodes feeding it``.
        name_of: ``node -> name`` used by the quantizer's exclusion list.
    """
    def ancestors(start: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stack = [start]
        while stack:
            node = stack.pop()
            name = name_of(node)
            if name in seen:
                continue
            seen[name] = node
            stack.extend(inputs_of(node))
        return seen

    logits_side = ancestors(graph_outputs[0])
    return [name for name in ancestors(graph_outputs[1]) if name not in logits_side]


def onnx_ood_head_nodes(graph: Any) -> list[str]:
    """:func:`ood_head_nodes` for an ONNX graph (``[]`` for a single-output model)."""
    if len(graph.output) < 2:
        return []
    producer = {out: node for node in graph.node for out in node.output}
    return ood_head_nodes(
        [producer[o.name] for o in graph.output[:2]],
        lambda node: [producer[i] for i in node.input if i in producer],
        lambda node: node.name,
    )


def openvino_ood_head_nodes(model: Any) -> list[str]:
    """:func:`ood_head_nodes` for an OpenVINO model (``[]`` for a single-output model)."""
    if len(model.outputs) < 2:
        return []
    return [name for name in ood_head_nodes(
        [out.get_node() for out in model.outputs[:2]],
        lambda op: [i.get_source_output().get_node() for i in op.inputs()],
        lambda op: op.get_friendly_name(),
    )]


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
    head = openvino_ood_head_nodes(model)
    if head:  # the OOD score output: keep its head in FP32
        kwargs["ignored_scope"] = nncf.IgnoredScope(names=head, validate=False)
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        kwargs["preset"] = nncf.QuantizationPreset.MIXED
    quantized = nncf.quantize(model, dataset, **kwargs)
    out_xml = Path(out_xml)
    out_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    return out_xml


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
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    images = check_calibration_images(calibration_images)
    input_name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    out_onnx = Path(out_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="plantml-qdq-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        for skip_symbolic in (False, True):
            try:
                quant_pre_process(str(fp32_onnx), str(prepped), skip_symbolic_shape=skip_symbolic)
                break
            except Exception as exc:  # noqa: BLE001 - pre-processing is an optimisation, not a requirement
                # Symbolic shape inference trips over some graphs (the OOD head's
                # broadcasting); ONNX's own shape inference is then enough.
                log.info("ONNX quantization pre-processing (skip_symbolic_shape=%s) failed: %s", skip_symbolic, exc)
        else:
            log.warning("ONNX quantization pre-processing failed; quantizing the model as exported")
            shutil.copyfile(fp32_onnx, prepped)
        import onnx

        exclude = onnx_ood_head_nodes(onnx.load(str(prepped), load_external_data=False).graph)
        quantize_static(
            str(prepped), str(out_onnx), _ArrayReader(input_name, images, batch_size),
            nodes_to_exclude=exclude or None,
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, reduce_range=not signed_activations,
            calibrate_method=CalibrationMethod.MinMax,
            # Bound calibration memory: merge ranges every few batches instead of keeping
            # every intermediate tensor of every calibration image.
            extra_options={"CalibMaxIntermediateOutputs": 8},
        )
    return out_onnx


# --------------------------------------------------------------------------- the export step


def _dir_size(paths: list[Path]) -> int:
    return int(sum(p.stat().st_size for p in paths if p.is_file()))


def int8_export_step(
    calibration_images: np.ndarray,
    eval_images: np.ndarray,
    eval_labels: np.ndarray,
    max_accuracy_drop: float,
    threads: int = 2,
    population: int | None = None,
) -> Callable[[Any, dict[str, Any]], None]:
    """Build the INT8 step for :func:`plantml.export.export_bundle` (``extra_steps``).

    The step quantizes the bundle's ONNX and OpenVINO FP32 models, measures FP32 and INT8
    of each runtime on ``eval_images``/``eval_labels`` (the test split), keeps an INT8
    model only if its accuracy drop is within ``max_accuracy_drop``, registers kept files
    with the writer (sha256) and deletes rejected ones. It writes
    ``metadata["metrics"]["int8_openvino"|"int8_onnxruntime"]`` (``accuracy``,
    ``macro_f1``, ``accuracy_drop``, ``kept``, ``size_bytes``, ``latency_ms``),
    ``metadata["metrics"]["fp32_openvino"|"fp32_onnxruntime"]`` (the same figures for
    FP32) and ``metadata["int8"]`` (the gate, which passed and why, and the recommended
    precision per runtime).

    Args:
        calibration_images: preprocessed ``NCHW`` float32 training images (>= 300 in real runs).
        eval_images: preprocessed test images.
        eval_labels: their class indices (in the bundle's class order).
        max_accuracy_drop: largest tolerated ``fp32 - int8`` accuracy (a fraction, 0.01 = 1 point).
        threads: inference threads for the accuracy runs (latency is always 1 thread).
        population: size of the test split ``eval_images`` were drawn from (recorded with
            the subset size so a reader can judge the gate's precision).

    Raises:
        ValueError: at construction, for malformed inputs (so a flow fails before training
            artefacts are exported, with the problem named).
    """
    calib = check_calibration_images(calibration_images)
    evx = check_calibration_images(eval_images, "eval_images")
    evy = np.asarray(eval_labels)
    if evy.ndim != 1 or len(evy) != len(evx):
        raise ValueError(f"eval_labels must be 1-D with one label per eval image ({len(evx)}), got shape {evy.shape}")
    if not np.issubdtype(evy.dtype, np.integer):
        raise ValueError(f"eval_labels must be integer class indices, got dtype {evy.dtype}")
    if not 0.0 <= float(max_accuracy_drop) <= 1.0:
        raise ValueError(f"max_accuracy_drop must be a fraction in [0, 1], got {max_accuracy_drop}")
    if len(calib) < 300:
        log.warning("INT8 calibration on %d images (>= 300 recommended)", len(calib))

    def step(writer: Any, metadata: dict[str, Any]) -> None:
        _run_int8_step(writer, metadata, calib, evx, evy, float(max_accuracy_drop), threads)
        metadata["int8"]["eval_population"] = int(population if population is not None else len(evx))

    return step


def _run_int8_step(
    writer: Any, metadata: dict[str, Any], calib: np.ndarray, evx: np.ndarray, evy: np.ndarray,
    max_drop: float, threads: int,
) -> None:
    n_classes = len(metadata["classes"])
    if evy.min() < 0 or evy.max() >= n_classes:
        raise ValueError(f"eval_labels must lie in [0, {n_classes}) for this bundle's {n_classes} classes")
    size = int(metadata["input"]["size"])
    if calib.shape[2:] != (size, size) or evx.shape[2:] != (size, size):
        raise ValueError(
            f"INT8 images must be {size}x{size} (the bundle's input size), got calibration "
            f"{calib.shape[2:]} and eval {evx.shape[2:]}"
        )
    root = Path(writer.dir)
    transformer = is_transformer(metadata.get("architecture"))
    metrics = metadata.setdefault("metrics", {})
    report: dict[str, Any] = {
        "gate": {"metric": "accuracy", "max_accuracy_drop": max_drop, "compared_with": "fp32 of the same runtime"},
        "calibration_images": int(len(calib)),
        "eval_images": int(len(evx)),
        "scheme": {
            "openvino": "NNCF post-training quantization"
            + (" (ModelType.TRANSFORMER, mixed preset)" if transformer else " (performance preset)"),
            "onnxruntime": "static QDQ, per-channel, MinMax calibration: U8S8 with reduce_range, else S8S8",
        },
        "openvino_inference_precision_hint": "f32",
        "latency": "1 thread, batch 1, median of 30 runs",
        "passed": [],
        "results": {},
        "recommended": {},
    }

    # Latency runners are 1 thread; accuracy runners use `threads`.
    jobs = {
        "openvino": dict(
            fp32_files=[root / OPENVINO_FP32_XML, (root / OPENVINO_FP32_XML).with_suffix(".bin")],
            fp32_runner=lambda t, output=0: openvino_runner(root / OPENVINO_FP32_XML, t, output=output),
            builds=[("nncf", lambda: _build_ov(root, calib, transformer))],
            int8_runner=lambda t, output=0: openvino_runner(root / OPENVINO_INT8_DIR / "model.xml", t, output=output),
        ),
        "onnxruntime": dict(
            fp32_files=[root / ONNX_FP32_PATH],
            fp32_runner=lambda t, output=0: onnxruntime_runner(root / ONNX_FP32_PATH, t, output=output),
            # U8S8 + reduce_range is the fast scheme on x86 without VNNI; if it misses the
            # gate, S8S8 (slower there, often more accurate) gets its chance.
            builds=[("qdq_u8s8_reduce_range",
                     lambda: [quantize_onnx(root / ONNX_FP32_PATH, root / ONNX_INT8_PATH, calib)]),
                    ("qdq_s8s8", lambda: [quantize_onnx(root / ONNX_FP32_PATH, root / ONNX_INT8_PATH, calib,
                                                        signed_activations=True)])],
            int8_runner=lambda t, output=0: onnxruntime_runner(root / ONNX_INT8_PATH, t, output=output),
        ),
    }
    for runtime, job in jobs.items():
        log.info("INT8 %s: quantizing and evaluating on %d test images", runtime, len(evx))
        int8, fp32, files = _quantize_and_gate(runtime, job, evx, evy, max_drop, threads)
        metrics[f"int8_{runtime}"] = int8
        metrics[f"fp32_{runtime}"] = fp32
        ood_threshold = metadata.get("calibration", {}).get("ood_threshold")
        if int8.get("kept") and ood_threshold is not None:
            # Runners returning every output (output=None): the OOD score is the second.
            int8.update(_ood_agreement(job["fp32_runner"](threads, output=None),
                                       job["int8_runner"](threads, output=None), evx, float(ood_threshold)))
        if int8.get("kept"):
            _register(writer, root, runtime, files)
            report["passed"].append(runtime)
            why = f"{int8['scheme']}: accuracy drop {int8['accuracy_drop'] * 100:.2f} pt <= {max_drop * 100:.2f} pt"
            rejected = [t for t in int8["tried"] if t["scheme"] != int8["scheme"]]
            if rejected:
                why += " (rejected first: " + ", ".join(
                    f"{t['scheme']} " + (f"drop {t['accuracy_drop'] * 100:.2f} pt" if "accuracy_drop" in t
                                         else "failed") for t in rejected) + ")"
            faster = int8["latency_ms"] < fp32["latency_ms"]
            report["recommended"][runtime] = "int8" if faster else "fp32"
        else:
            for f in files:
                _remove(writer, root, f)
            # Also whatever a failed quantizer left half-written (never registered).
            if runtime == "openvino":
                shutil.rmtree(root / OPENVINO_INT8_DIR, ignore_errors=True)
            else:
                (root / ONNX_INT8_PATH).unlink(missing_ok=True)
            why = (
                f"quantization failed: {int8['error']}" if "error" in int8
                else "accuracy drop " + ", ".join(f"{t['scheme']} {t['accuracy_drop'] * 100:.2f} pt"
                                                  for t in int8["tried"] if "accuracy_drop" in t)
                + f" > {max_drop * 100:.2f} pt"
            )
            report["recommended"][runtime] = "fp32"
        speed = (
            fp32["latency_ms"] / int8["latency_ms"] if int8.get("latency_ms") else None
        )
        report["results"][runtime] = {
            "kept": bool(int8.get("kept")), "why": why,
            "speedup_vs_fp32": None if speed is None else round(float(speed), 3),
        }
        log.info("INT8 %s: %s (%s)", runtime, "kept" if int8.get("kept") else "rejected", why)
    metadata["int8"] = report


def _quantize_and_gate(
    runtime: str, job: dict[str, Any], evx: np.ndarray, evy: np.ndarray, max_drop: float, threads: int
) -> tuple[dict[str, Any], dict[str, Any], list[Path]]:
    """Quantize with each of the job's schemes in turn until one passes the gate.

    Returns:
        ``(int8 metrics, fp32 metrics, files of the last scheme tried)``; ``int8["scheme"]``
        names that scheme and ``int8["tried"]`` lists every scheme with its accuracy drop.
    """
    fp32 = evaluate(job["fp32_runner"](threads), evx, evy)
    fp32["latency_ms"] = median_latency_ms(job["fp32_runner"](1), evx)
    fp32["size_bytes"] = _dir_size(job["fp32_files"])
    tried: list[dict[str, Any]] = []
    int8: dict[str, Any] = {}
    files: list[Path] = []
    for scheme, build in job["builds"]:
        try:
            files = build()
            acc_runner = job["int8_runner"](threads)
        except Exception as exc:  # noqa: BLE001 - a failed quantization must not fail the export
            log.warning("%s INT8 quantization (%s) failed: %s", runtime, scheme, exc)
            int8 = {"kept": False, "error": f"{type(exc).__name__}: {exc}", "accuracy_drop": None, "scheme": scheme}
            tried.append({"scheme": scheme, "error": int8["error"]})
            files = []
            continue
        int8 = evaluate(acc_runner, evx, evy)
        drop = fp32["accuracy"] - int8["accuracy"]
        int8.update(
            accuracy_drop=float(drop),
            kept=bool(drop <= max_drop + 1e-9),
            size_bytes=_dir_size(files),
            latency_ms=median_latency_ms(job["int8_runner"](1), evx),
            scheme=scheme,
        )
        tried.append({"scheme": scheme, "accuracy_drop": float(drop), "latency_ms": int8["latency_ms"]})
        log.info("%s INT8 %s: accuracy drop %.2f pt", runtime, scheme, drop * 100)
        if int8["kept"]:
            break
    int8["tried"] = tried
    return int8, fp32, files


def _ood_agreement(fp32_all: Runner, int8_all: Runner, images: np.ndarray, threshold: float,
                   batch_size: int = 16) -> dict[str, float]:
    """How far INT8 moves the OOD score: its features are 8-bit, the head is FP32.

    Returns:
        ``{"ood_score_median_rel_diff", "ood_decision_agreement"}`` over ``images``
        (agreement: same side of ``threshold`` as FP32).
    """
    ref, got = [], []
    for i in range(0, len(images), batch_size):
        ref.append(np.asarray(fp32_all(images[i:i + batch_size])[1]).reshape(-1))
        got.append(np.asarray(int8_all(images[i:i + batch_size])[1]).reshape(-1))
    r, g = np.concatenate(ref), np.concatenate(got)
    return {
        "ood_score_median_rel_diff": float(np.median(np.abs(g - r) / np.maximum(np.abs(r), 1e-6))),
        "ood_decision_agreement": float(np.mean((g > threshold) == (r > threshold))),
    }


def _build_ov(root: Path, calib: np.ndarray, transformer: bool) -> list[Path]:
    xml = quantize_openvino(root / OPENVINO_FP32_XML, root / OPENVINO_INT8_DIR / "model.xml", calib,
                            transformer=transformer)
    return [xml, xml.with_suffix(".bin")]


def _register(writer: Any, root: Path, runtime: str, files: list[Path]) -> None:
    for f in files:
        rel = f.relative_to(root).as_posix()
        fmt = "onnx" if runtime == "onnxruntime" else "openvino"
        role = "weights" if f.suffix == ".bin" else "model"
        writer.add_file(rel, fmt=fmt, runtime=runtime, precision="int8", role=role)


def _remove(writer: Any, root: Path, f: Path) -> None:
    if hasattr(writer, "remove_file"):
        writer.remove_file(f.relative_to(root).as_posix())
    elif f.is_file():
        f.unlink()
