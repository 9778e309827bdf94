"""The one inference runtime over an exported model: ONNX Runtime or OpenVINO, CPU. Torch-free.

Every consumer of a bundle runs its model through this module: the service
(:mod:`serving.predictor`), the edge CLI (:mod:`edge.runtime`), the export parity check
(:mod:`plantml.export`), the INT8 gate (:mod:`plantml.quantize`), drift scoring
(:mod:`plantml.drift`) and the benchmarks. So the parity check and the INT8 gate measure
the session the service runs, not a look-alike.

Four jobs, one small function or class each:

* **choose** a runtime for a bundle and precision (:func:`choose_runtime`): the one asked
  for, else the first installed one in :data:`AUTO_PREFERENCE` order for that precision that
  the bundle has a model for;
* **open** a session with the service's settings (:class:`SessionOptions`,
  :func:`open_session`): ONNX Runtime sequential, full graph optimisation, no spinning
  worker threads; OpenVINO one stream, latency hint, ``INFERENCE_PRECISION_HINT=f32``;
* **run** a batch returning every output (:meth:`Session.run`: logits first, then the OOD
  score when the model has one);
* **decide**: temperature-scaled softmax plus the abstention rule of
  :func:`plantml.ood.decide` (:class:`Calibration`).

``onnxruntime`` and ``openvino`` are imported inside the functions that open a session,
so importing this module costs numpy and Pillow only (it is bundled into the edge binary).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from plantml.ood import decide
from plantml.preprocess import softmax

if TYPE_CHECKING:  # type hints only: the bundle module needs no runtime
    from plantml.bundle import Bundle

log = logging.getLogger(__name__)

RUNTIMES = ("openvino", "onnxruntime")
PRECISIONS = ("fp32", "int8")
#: The order ``auto`` tries the runtimes in, per precision, chosen by measurement
#: (docs/benchmarks.md sections 3 and 4, docs/serving.md): for FP32, ONNX Runtime was faster on
#: both CPUs measured (AVX2 edge 7.4 vs 10.3 ms, service 113-130 vs 90-96 req/s; on an AVX-512
#: VNNI machine the service's OpenVINO FP32 peaked at 125 req/s against ~230 for the rest);
#: for INT8, OpenVINO was the faster edge runtime (6.2-6.5 vs 6.8 ms).
AUTO_PREFERENCE = {"fp32": ("onnxruntime", "openvino"), "int8": ("openvino", "onnxruntime")}

Outputs = list[np.ndarray]


class InferenceError(ValueError):
    """A runtime, precision, setting or input batch that cannot be used (the message says which)."""


# --------------------------------------------------------------------------- choose


def runtime_installed(runtime: str) -> bool:
    """Whether the Python package of ``runtime`` can be imported (without importing it)."""
    if runtime in sys.modules:
        return sys.modules[runtime] is not None
    try:
        return importlib.util.find_spec(runtime) is not None
    except (ImportError, ValueError):
        return False


def installed_runtimes() -> list[str]:
    """Runtimes importable in this environment, in preference order."""
    return [r for r in RUNTIMES if runtime_installed(r)]


def _fmt(pairs: Iterable[tuple[str, str]]) -> str:
    return ", ".join(f"{r}/{p}" for r, p in pairs) or "none"


def check_precision(precision: str) -> str:
    """Return ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        InferenceError: naming the valid precisions.
    """
    if precision not in PRECISIONS:
        raise InferenceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def choose_runtime(bundle: "Bundle", precision: str, runtime: str | None = None) -> str:
    """Pick the runtime: the one asked for, else the first installed one that has a model.

    Args:
        bundle: the loaded bundle (its ``available()`` pairs say what it holds).
        precision: ``"fp32"`` or ``"int8"``.
        runtime: ``"openvino"``, ``"onnxruntime"``, or ``None``/``"auto"`` for the first installed one
            in :data:`AUTO_PREFERENCE` order for ``precision`` that the bundle has.

    Raises:
        InferenceError: unknown runtime, runtime not installed, or no model at that precision.
    """
    have = bundle.available()
    if runtime not in (None, "auto"):
        if runtime not in RUNTIMES:
            raise InferenceError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        if not runtime_installed(runtime):
            raise InferenceError(
                f"runtime {runtime} is not installed here (installed: {', '.join(installed_runtimes()) or 'none'})")
        if (runtime, precision) not in have:
            raise InferenceError(f"bundle has no {runtime} {precision} model (available: {_fmt(have)})")
        return runtime
    for candidate in AUTO_PREFERENCE.get(precision, RUNTIMES):
        if (candidate, precision) in have and runtime_installed(candidate):
            return candidate
    raise InferenceError(
        f"no usable {precision} model: bundle has {_fmt(have)}; installed runtimes: "
        f"{', '.join(installed_runtimes()) or 'none'}"
    )


def runtime_for_file(path: str | Path) -> str:
    """The runtime that reads a model file: ``.xml`` (OpenVINO IR) or else ONNX Runtime."""
    return "openvino" if Path(path).suffix == ".xml" else "onnxruntime"


# --------------------------------------------------------------------------- open


@dataclass(frozen=True)
class SessionOptions:
    """How a session is opened. The defaults are the service's settings.

    Attributes:
        threads: intra-op inference threads; ``None`` leaves the runtime's default (all cores).
        openvino_f32: OpenVINO ``INFERENCE_PRECISION_HINT=f32``. On CPUs with AVX-512 BF16
            the plugin's default runs the float parts in bfloat16, which is not the model
            that passed the accuracy gates.
        allow_spinning: ONNX Runtime worker threads spinning for work between calls. Off:
            a spinning idle thread steals the CPU other gunicorn workers need.
        num_streams: OpenVINO streams; one, because callers run one batch at a time.
    """

    threads: int | None = 1
    openvino_f32: bool = True
    allow_spinning: bool = False
    num_streams: int = 1

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise InferenceError(f"threads must be >= 1, got {self.threads}")


@dataclass
class Session:
    """An open model: :meth:`run` takes an ``NCHW`` float32 batch and returns every output.

    Attributes:
        runtime: ``"onnxruntime"`` or ``"openvino"``.
        native: the runtime's own object (``onnxruntime.InferenceSession`` or
            ``openvino.CompiledModel``), for reading back its settings.
        options: the settings it was opened with.
    """

    runtime: str
    native: Any
    options: SessionOptions
    _run: Callable[[np.ndarray], Outputs] = field(repr=False)

    def run(self, batch: np.ndarray) -> Outputs:
        """Every output of the model for ``batch`` (logits first), as fresh arrays."""
        return self._run(np.ascontiguousarray(batch, dtype=np.float32))

    __call__ = run


def _open_onnxruntime(model: str | bytes, options: SessionOptions) -> Session:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if options.threads:
        opts.intra_op_num_threads = options.threads
        opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.allow_spinning else "0")
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return Session("onnxruntime", sess, options, lambda x: sess.run(None, {name: x}))


def _open_openvino(model: str | bytes, weights: bytes | None, options: SessionOptions) -> Session:
    import openvino as ov

    config: dict[str, Any] = {"NUM_STREAMS": options.num_streams, "PERFORMANCE_HINT": "LATENCY"}
    if options.threads:
        config["INFERENCE_NUM_THREADS"] = options.threads
    if options.openvino_f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    core = ov.Core()
    source = core.read_model(model, weights) if isinstance(model, bytes) else model
    compiled = core.compile_model(source, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> Outputs:
        # The request reuses its output buffers: copy before the next call overwrites them.
        res = request.infer({0: x})
        return [np.array(res[out], copy=True) for out in compiled.outputs]

    return Session("openvino", compiled, options, run)


def open_session(model: str | Path | bytes, runtime: str | None = None, options: SessionOptions | None = None,
                 weights: bytes | None = None) -> Session:
    """Open a model file (or its already verified bytes) on the CPU.

    Args:
        model: an ``.onnx`` file or OpenVINO ``.xml``, or the file's bytes.
        runtime: ``"onnxruntime"`` or ``"openvino"``; ``None`` infers it from the file suffix.
        options: session settings (default: the service's, one thread).
        weights: the OpenVINO ``.bin`` bytes when ``model`` is the ``.xml``'s bytes.

    Raises:
        InferenceError: an unknown runtime, or bytes without a runtime named.
        Exception: whatever the runtime raises for a model it refuses (callers map it).
    """
    options = options or SessionOptions()
    if runtime is None:
        if isinstance(model, bytes):
            raise InferenceError("name the runtime when opening a model from bytes")
        runtime = runtime_for_file(model)
    source = model if isinstance(model, bytes) else str(model)
    if runtime == "onnxruntime":
        return _open_onnxruntime(source, options)
    if runtime == "openvino":
        return _open_openvino(source, weights, options)
    raise InferenceError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def batch_runner(model: str | Path, runtime: str | None = None, threads: int = 1, output: int | None = 0,
                 openvino_f32: bool = True) -> Callable[[np.ndarray], Any]:
    """A ``batch -> output`` function over :func:`open_session` (the service's settings).

    Args:
        output: which output to return (0: logits); ``None`` returns the list of all outputs.
    """
    session = open_session(model, runtime, SessionOptions(threads=max(1, threads), openvino_f32=openvino_f32))

    def run(x: np.ndarray) -> Any:
        outs = session.run(x)
        return outs if output is None else outs[output]

    return run


def onnxruntime_runner(path: str | Path, threads: int = 1, output: int | None = 0) -> Callable[[np.ndarray], Any]:
    """:func:`batch_runner` over ONNX Runtime (the name the export and INT8 code have always used)."""
    return batch_runner(path, "onnxruntime", threads, output)


def openvino_runner(xml_path: str | Path, threads: int = 1, f32: bool = True,
                    output: int | None = 0) -> Callable[[np.ndarray], Any]:
    """:func:`batch_runner` over OpenVINO (``f32`` forces FP32 inference)."""
    return batch_runner(xml_path, "openvino", threads, output, openvino_f32=f32)


def check_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """Return ``batch`` as contiguous float32 if it is ``(N>=1, 3, size, size)``.

    Raises:
        InferenceError: naming the shape received and the one expected.
    """
    expected = (3, size, size)
    if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.shape[0] < 1:
        raise InferenceError(
            f"input shape {list(batch.shape)} does not match [N, {', '.join(map(str, expected))}]")
    return np.ascontiguousarray(batch, dtype=np.float32)


# --------------------------------------------------------------------------- decide


@dataclass(frozen=True)
class Decisions:
    """Calibrated probabilities of one batch and what to abstain on.

    Attributes:
        probabilities: ``(N, C)`` float32, temperature-scaled softmax.
        abstained: ``(N,)`` bool, by :func:`plantml.ood.decide` (OOD score, then confidence).
        reasons: ``"out_of_distribution"``, ``"low_confidence"`` or ``None`` per input.
        ood_scores: ``(N,)`` float32 when the model has an ``ood_score`` output and the
            bundle a threshold for it, else ``None``.
    """

    probabilities: np.ndarray
    abstained: np.ndarray
    reasons: list[str | None]
    ood_scores: np.ndarray | None = None


@dataclass(frozen=True)
class Calibration:
    """The bundle's temperature and abstention thresholds, applied to a model's outputs."""

    temperature: float = 1.0
    abstain_threshold: float = 0.0
    ood_threshold: float | None = None

    @classmethod
    def of(cls, bundle: "Bundle") -> "Calibration":
        """The calibration stored in ``bundle``'s metadata."""
        return cls(bundle.temperature, bundle.abstain_threshold, bundle.ood_threshold)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax of ``(N, C)`` logits."""
        return softmax(logits, self.temperature)

    def apply(self, outputs: Sequence[np.ndarray]) -> Decisions:
        """Probabilities and abstentions for a model's outputs (logits, then the OOD score if any)."""
        probs = self.probabilities(outputs[0])
        scores = None
        if self.ood_threshold is not None and len(outputs) > 1:
            scores = np.asarray(outputs[1]).reshape(-1).astype(np.float32)
        abstained, reasons = decide(probs, scores, self.abstain_threshold, self.ood_threshold)
        return Decisions(probs, abstained, reasons, scores)
