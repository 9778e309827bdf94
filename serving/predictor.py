"""The model behind the service: a bundle run by ONNX Runtime or OpenVINO. No torch.

One :class:`Predictor` lives in each gunicorn worker. It is built *after* the fork (the
``post_fork`` hook in ``gunicorn.conf.py``): inference sessions own thread pools and
native state that must not be shared across a fork, and building per worker lets each
use ``cores // workers`` threads instead of every worker grabbing every core.

The runtime is chosen by setting: ``auto`` takes the measured faster one that the bundle has
and that imports (:data:`plantml.runtime.AUTO_PREFERENCE`: ONNX Runtime for FP32, OpenVINO for INT8).
``int8`` serves the bundle's INT8 file for that runtime (written by :mod:`plantml.quantize`)
and is refused with a clear error if the bundle has none.
OpenVINO always runs with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX-512 BF16
its default would run the float parts in bfloat16, which is not the model that passed
the accuracy gates.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from plantml import runtime as runtime_module
from plantml.bundle import Bundle, BundleError, load_bundle, verify_files
from plantml.preprocess import preprocess_batch
from plantml.runtime import Calibration, InferenceError, SessionOptions, check_batch, open_session

from serving.settings import Settings

log = logging.getLogger(__name__)

#: Environment variable through which the gunicorn master hands a registry bundle it
#: downloaded to the workers (so that N workers do not download it N times).
FETCHED_BUNDLE_ENV = "PLANTML_FETCHED_BUNDLE"

_WORKER_PREDICTOR: "Predictor | None" = None
_WORKER_LOAD_ERROR: str | None = None


def _shared_ints(n: int) -> Any:
    """Integers in anonymous shared memory: made in the gunicorn master, seen by every forked worker."""
    import multiprocessing

    return multiprocessing.RawArray("i", n)


#: ``[0]`` is set once any worker has loaded the model (shared across the fork).
_BOOTED = _shared_ints(1)
#: Pids of the workers that are up without a model (0 = free slot); ``/ready`` is 503 while
#: any is set. Pids, not a counter: the master clears the slot of a worker that died
#: without saying so (``child_exit``), so a killed unready worker cannot leave the server
#: unready forever.
_UNREADY_PIDS = _shared_ints(256)


class ModelLoadError(RuntimeError):
    """The model could not be loaded (bad bundle, missing precision, runtime failure)."""


@dataclass(frozen=True)
class BatchResult:
    """Probabilities of one batch, the abstention decisions and the time the forward pass took."""

    probabilities: np.ndarray  # [N, C] float32, temperature-scaled softmax
    inference_seconds: float
    abstained: np.ndarray  # [N] bool: plantml.ood.decide (OOD score, then confidence)
    abstain_reasons: list  # [N] "out_of_distribution" | "low_confidence" | None
    ood_scores: np.ndarray | None = None  # [N] float32 when the model has an ood_score output


def choose_runtime(bundle: Bundle, runtime: str, precision: str) -> str:
    """Resolve ``auto`` to a concrete runtime the bundle and this environment support.

    Raises:
        ModelLoadError: if the requested runtime/precision is not in the bundle or not installed.
    """
    try:
        return runtime_module.choose_runtime(bundle, precision, runtime)
    except InferenceError as exc:
        raise ModelLoadError(
            f"{bundle.root}: {exc}; set PLANTML_RUNTIME / PLANTML_PRECISION to one of those") from exc


class Predictor:
    """A loaded model: preprocess, forward, calibrated softmax.

    Thread-safe: the forward pass is serialised by a lock (one inference at a time per
    worker uses the worker's share of cores; running two at once would only
    oversubscribe them), while decoding and preprocessing run concurrently in the
    request threads.
    """

    def __init__(self, bundle: Bundle, runtime: str = "auto", precision: str = "fp32", threads: int = 1,
                 source: str | None = None) -> None:
        """Build the inference session.

        Args:
            bundle: a loaded (verified) bundle.
            runtime: ``auto``, ``onnxruntime`` or ``openvino``.
            precision: ``fp32`` or ``int8``.
            threads: intra-op inference threads.
            source: where the bundle came from (a registry URI), for ``/model``.

        Raises:
            ModelLoadError: no such model in the bundle, or the runtime refused it.
        """
        self.bundle = bundle
        self.precision = precision
        self.runtime = choose_runtime(bundle, runtime, precision)
        self.threads = max(1, int(threads))
        self.source = source or str(bundle.root)
        self.model_path = bundle.model_path(self.runtime, precision)
        self.classes = bundle.classes
        self.spec = bundle.input_spec
        self.temperature = bundle.temperature
        self.abstain_threshold = bundle.abstain_threshold
        self.ood_threshold = bundle.ood_threshold
        self._lock = threading.Lock()
        started = time.perf_counter()
        blobs = self._verified_model_bytes()
        try:
            if self.runtime == "openvino" and len(blobs) < 2:
                raise ModelLoadError(f"bundle lists no weights file for {self.model_path.name}")
            self._session = open_session(blobs[0], self.runtime, SessionOptions(threads=self.threads),
                                         weights=blobs[1] if len(blobs) > 1 else None)
            del blobs
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - any runtime failure is a load failure
            raise ModelLoadError(f"{self.runtime} could not load {self.model_path}: {exc}") from exc
        self._warm_up()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "model %s %s loaded: %s %s, %d thread(s), %d classes, %.2fs (pid %d)",
            bundle.name, bundle.version, self.runtime, precision, self.threads, len(self.classes),
            self.load_seconds, os.getpid(),
        )

    def _verified_model_bytes(self) -> list[bytes]:
        """The served model's files, read once and checked against their sha256 (model first).

        The runtime is built from these very bytes, so there is no window between the
        integrity check and the load in which the file on disk could change.

        Raises:
            ModelLoadError: a file is missing, unreadable or does not match its hash.
        """
        try:
            return [self.bundle.read_verified(f["path"]) for f in self.bundle.model_files(self.runtime, self.precision)]
        except BundleError as exc:
            raise ModelLoadError(str(exc)) from exc

    @property
    def calibration(self) -> Calibration:
        """Temperature and abstention thresholds as they are now (tests and operators may adjust them)."""
        return Calibration(self.temperature, self.abstain_threshold, self.ood_threshold)

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    def _warm_up(self) -> None:
        """One forward pass at load: the first call pays for kernel selection, and checks the output shape."""
        x = np.zeros((1, 3, self.spec.size, self.spec.size), dtype=np.float32)
        outs = self._session.run(x)
        out = outs[0]
        if out.ndim != 2 or out.shape != (1, len(self.classes)):
            raise ModelLoadError(
                f"model output shape {tuple(out.shape)} does not match the bundle's {len(self.classes)} classes"
            )
        if self.ood_threshold is not None and len(outs) < 2:
            raise ModelLoadError("the bundle sets calibration.ood_threshold but its model has no ood_score output")

    def forward(self, batch: np.ndarray) -> BatchResult:
        """Run a preprocessed ``NCHW`` float32 batch; returns calibrated probabilities.

        Raises:
            ValueError: if the batch shape does not match the bundle's input spec.
        """
        x = check_batch(batch, self.spec.size)
        with self._lock:
            started = time.perf_counter()
            outs = self._session.run(x)
            elapsed = time.perf_counter() - started
        decided = self.calibration.apply(outs)
        return BatchResult(decided.probabilities, elapsed, decided.abstained, decided.reasons, decided.ood_scores)

    def predict_images(self, images: Sequence[Image.Image]) -> BatchResult:
        """Preprocess decoded RGB images with the bundle's input spec and run them."""
        return self.forward(preprocess_batch(images, self.spec))

    def describe(self) -> dict[str, Any]:
        """Short model description used in every prediction response."""
        return {"name": self.name, "version": self.version, "runtime": self.runtime, "precision": self.precision}


def bundle_dir_for(settings: Settings) -> tuple[Path, str]:
    """The local bundle directory to serve and a description of where it came from.

    A registry URI is resolved to a download: by the gunicorn master (handed over in
    ``PLANTML_FETCHED_BUNDLE``) or, outside gunicorn, here.

    Raises:
        SettingsError: neither a bundle nor a URI is set.
        ModelLoadError: the registry download failed.
    """
    settings.require_model_source()
    if settings.bundle is not None:
        return settings.bundle, str(settings.bundle)
    assert settings.model_uri is not None
    fetched = os.environ.get(FETCHED_BUNDLE_ENV)
    if fetched:
        return Path(fetched), settings.model_uri
    return fetch_model(settings.model_uri, settings.model_cache), settings.model_uri


def fetch_model(model_uri: str, cache_dir: Path) -> Path:
    """Download a registered bundle from MLflow into ``cache_dir/<name of the URI>``.

    Each start downloads into a fresh temporary folder beside it and, once the download
    is a bundle, renames it over the URI's folder; older downloads of the same URI and a
    failed one are removed, so restarts never pile up copies (a 256 MiB ``/tmp`` filled
    after ~7). Servers of other URIs sharing the cache folder are not touched.

    Raises:
        ModelLoadError: if the registry cannot be reached, has no such model, or what it
            returned is not a bundle.
    """
    import shutil
    import tempfile

    from plantml.registry import fetch_bundle

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = _cache_name(model_uri)
    _remove_stale_downloads(cache_dir, name)
    dst = Path(tempfile.mkdtemp(prefix=f".download-{name}-", dir=cache_dir))
    try:
        try:
            path = Path(fetch_bundle(_run_uri_to_logged_model(model_uri), dst))
        except Exception as exc:  # noqa: BLE001 - mlflow raises many types; all mean "cannot fetch"
            raise ModelLoadError(f"could not fetch {model_uri} from the MLflow registry: {exc}") from exc
        path = _bundle_root_in(path, model_uri)
        final = cache_dir / name
        old = cache_dir / f".old-{name}-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(path, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(dst, ignore_errors=True)
    log.info("fetched %s into %s", model_uri, final)
    return final


def _run_uri_to_logged_model(model_uri: str) -> str:
    """``runs:/RUN_ID/bundle`` -> the URI of the bundle that run logged.

    With MLflow 3 ``plantml.registry`` logs the bundle as a logged model linked to the run
    (``models:/m-...``), not as a run artifact, so the run itself has nothing at ``bundle``.
    A run that does hold the artifact keeps its URI; any other URI is returned unchanged.
    """
    if not model_uri.startswith("runs:/"):
        return model_uri
    import mlflow

    from plantml.registry import resolve_tracking_uri

    run_id, _, artifact = model_uri[len("runs:/"):].partition("/")
    mlflow.set_tracking_uri(resolve_tracking_uri(None))
    client = mlflow.MlflowClient()
    if artifact and any(a.path == artifact for a in client.list_artifacts(run_id)):
        return model_uri
    experiment = client.get_run(run_id).info.experiment_id
    models = mlflow.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'",
                                         output_format="list")
    if len(models) != 1:
        raise ModelLoadError(f"run {run_id} has no artifact {artifact!r} and {len(models)} logged models "
                             f"(need exactly one to serve {model_uri})")
    return f"models:/{models[0].model_id}"


def _cache_name(model_uri: str) -> str:
    """A folder name for a registry URI: readable, and unique per URI."""
    import hashlib
    import re

    slug = re.sub(r"[^A-Za-z0-9_.@-]+", "-", model_uri.split(":/", 1)[-1]).strip("-.")[:60]
    return f"{slug}-{hashlib.sha256(model_uri.encode()).hexdigest()[:10]}"


def _remove_stale_downloads(cache_dir: Path, name: str) -> None:
    """Remove what earlier starts for this URI left behind (temporary or superseded downloads)."""
    import shutil

    for pattern in (f".download-{name}-*", f".old-{name}-*"):
        for stale in cache_dir.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _bundle_root_in(path: Path, model_uri: str) -> Path:
    """The bundle directory inside a download (it may be one level down).

    Raises:
        ModelLoadError: the download is empty or holds no ``metadata.json``.
    """
    from plantml.bundle import METADATA_FILE

    if path.is_dir() and (path / METADATA_FILE).is_file():
        return path
    candidates = [p.parent for p in path.glob(f"*/{METADATA_FILE}")] if path.is_dir() else []
    if len(candidates) == 1:
        return candidates[0]
    content = sorted(p.name for p in path.iterdir())[:5] if path.is_dir() else []
    raise ModelLoadError(
        f"{model_uri} downloaded, but it is not a bundle: no {METADATA_FILE} in the download "
        f"({'empty' if not content else 'holds ' + ', '.join(content)})"
    )


def build_predictor(settings: Settings) -> Predictor:
    """Load, verify (sha256) and compile the configured model.

    Raises:
        SettingsError: no model source configured.
        ModelLoadError: bundle missing/corrupt, precision not in bundle, runtime failure.
    """
    path, source = bundle_dir_for(settings)
    try:
        # Each file is hashed once: the model's own files as they are read (Predictor
        # builds the runtime from those very bytes), the others afterwards.
        bundle = load_bundle(path, verify=False, expected_metadata_sha256=settings.bundle_sha256)
        predictor = Predictor(bundle, settings.runtime, settings.precision, settings.threads, source=source)
        verify_files(bundle, skip={f["path"] for f in bundle.model_files(predictor.runtime, predictor.precision)})
    except BundleError as exc:
        raise ModelLoadError(str(exc)) from exc
    return predictor


def set_worker_predictor(predictor: Predictor | None) -> None:
    """Install the predictor built by gunicorn's ``post_fork`` hook for this process."""
    global _WORKER_PREDICTOR
    _WORKER_PREDICTOR = predictor


def worker_predictor() -> Predictor | None:
    """The predictor built for this worker process, if any."""
    return _WORKER_PREDICTOR


def mark_booted() -> None:
    """Record that a worker has loaded the model (from then on, load failures do not stop the server)."""
    _BOOTED[0] = 1


def first_boot_done() -> bool:
    """Whether any worker of this server has loaded the model before."""
    return bool(_BOOTED[0])


def set_worker_load_error(message: str | None) -> None:
    """Record (or clear, with ``None``) that this worker is up without a model, and why."""
    global _WORKER_LOAD_ERROR
    _WORKER_LOAD_ERROR = message
    if message is None:
        forget_unready_worker(os.getpid())
    elif os.getpid() not in _UNREADY_PIDS:
        for i, pid in enumerate(_UNREADY_PIDS):
            if pid == 0:
                _UNREADY_PIDS[i] = os.getpid()
                break


def forget_unready_worker(pid: int) -> None:
    """Clear a worker's unready mark (it loaded the model, or it is gone: gunicorn's ``child_exit``)."""
    for i, value in enumerate(_UNREADY_PIDS):
        if value == pid:
            _UNREADY_PIDS[i] = 0


def worker_load_error() -> str | None:
    """Why this worker has no model, if it has none after a failed load."""
    return _WORKER_LOAD_ERROR


def unready_workers() -> int:
    """How many workers of this server are up without a model."""
    return sum(1 for pid in _UNREADY_PIDS if pid)
