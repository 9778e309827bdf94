"""The bundle as an MLflow model: logged with a ``pyfunc`` and an ``onnx`` flavor, and fetched back as a bundle.

The logged model (MLflow 3 ``LoggedModel``) has a signature, an input example, the
``python_function`` flavor (:class:`plantml.mlflow_model.BundlePyfunc`: the bundle with its
preprocessing, calibration and abstention, on ONNX Runtime, no torch; the ``plantml`` and
``edge`` packages travel as ``code_paths``) and an ``onnx`` flavor that points at the
bundle's FP32 ONNX graph (``mlflow.onnx.load_model``). The whole bundle is the model's
``bundle`` artifact, so :func:`fetch_bundle` returns a bundle directory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from plantml.bundle import METADATA_FILE, BundleError, load_bundle, sha256_file
from plantml.registry.store import resolve_tracking_uri, setup_mlflow

log = logging.getLogger(__name__)

#: Name of the pyfunc artifact that holds the bundle directory.
BUNDLE_ARTIFACT = "bundle"


def bundle_sha256(bundle_path: str | os.PathLike[str]) -> str:
    """The bundle's identity: sha256 of its ``metadata.json``.

    The metadata lists the sha256 of every model file and the bundle's lineage (run ids,
    ``created_at``), so two bundles share this digest only if they are the same export.
    """
    return sha256_file(Path(bundle_path) / METADATA_FILE)


def log_bundle_model(bundle_path: str | os.PathLike[str], *, run_id: str | None, tracking_uri: str | None = None,
                     name: str = "model") -> Any:
    """Log a bundle as an MLflow model (``python_function`` + ``onnx`` flavors); no registration.

    Args:
        bundle_path: the exported bundle directory.
        run_id: the run the logged model is linked to.
        tracking_uri: overrides the default store.
        name: the logged model's name.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/m-...``, ``model_id``).
    """
    import mlflow
    from mlflow.models import Model

    # Imported here, not at the top: plantml.mlflow_model imports mlflow (heavy) at import
    # time and imports this package back (BUNDLE_ARTIFACT), and edge is needed only to
    # locate the package that travels with the model.
    import edge
    import plantml
    from plantml import mlflow_model

    setup_mlflow(tracking_uri)
    bundle_path = Path(bundle_path).resolve()
    bundle = load_bundle(bundle_path)
    onnx_path = bundle.model_path("onnxruntime", "fp32") if ("onnxruntime", "fp32") in bundle.available() else None
    metadata = {"plantml_bundle": {"name": bundle.name, "version": bundle.version,
                                   "architecture": bundle.metadata.get("architecture"),
                                   "bundle_sha256": bundle_sha256(bundle_path)},
                "classes": list(bundle.classes), "input_column": mlflow_model.INPUT_COLUMN,
                "input_encoding": "binary (raw bytes in Python; base64 in JSON over HTTP)"}
    return Model.log(
        artifact_path=None, name=name, flavor=_PyfuncWithOnnxFlavor, flavor_name="python_function", run_id=run_id,
        python_model=mlflow_model.BundlePyfunc(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_path)},
        code_paths=[str(Path(plantml.__file__).parent), str(Path(edge.__file__).parent)],
        signature=mlflow_model.model_signature(), input_example=mlflow_model.input_example(bundle),
        pip_requirements=mlflow_model.pip_requirements(), metadata=metadata,
        onnx_relpath=str(onnx_path.relative_to(bundle_path)) if onnx_path else None,
        tags={"bundle_name": bundle.name, "bundle_version": bundle.version, "mlflow_version": mlflow.__version__},
    )


class _PyfuncWithOnnxFlavor:
    """A flavor for ``mlflow.models.Model.log``: the pyfunc model, plus an ``onnx`` flavor.

    The ``onnx`` flavor's data is the bundle's own FP32 ONNX file inside the pyfunc's
    ``bundle`` artifact (no second copy): ``mlflow.onnx.load_model(uri)`` returns the raw graph.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: Any, onnx_relpath: str | None = None, **kwargs: Any) -> None:
        import mlflow.pyfunc
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        if onnx_relpath is None:
            log.warning("the bundle has no ONNX FP32 file: the model gets no onnx flavor")
            return
        from importlib.metadata import PackageNotFoundError, version

        artifact = mlflow_model.flavors["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
        data = (Path(artifact) / onnx_relpath).as_posix()
        try:
            onnx_version = version("onnx")
        except PackageNotFoundError:
            onnx_version = None
        mlflow_model.add_flavor("onnx", onnx_version=onnx_version, data=data, providers=["CPUExecutionProvider"],
                                onnx_session_options=None, code=None)
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def fetch_bundle(model_uri: str, dst_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download a registered bundle (``models:/NAME@alias`` or ``models:/NAME/3``).

    Works for pyfunc versions (the bundle is the model's ``bundle`` artifact) and for older
    versions registered as a bare bundle directory.

    Args:
        model_uri: the registry URI.
        dst_dir: where to download it.
        tracking_uri: overrides the default store.

    Returns:
        The local bundle directory (verify it with :func:`plantml.bundle.load_bundle`).

    Raises:
        BundleError: the download holds no bundle.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri))
    return bundle_dir_in(local)


def bundle_dir_in(model_dir: str | os.PathLike[str]) -> Path:
    """The bundle directory inside a downloaded MLflow model (or the directory itself if it is one).

    Raises:
        BundleError: neither a bundle nor an MLflow model with a ``bundle`` artifact.
    """
    import yaml

    root = Path(model_dir)
    if (root / METADATA_FILE).is_file():
        return root
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = flavor.get("artifacts", {}).get(BUNDLE_ARTIFACT, {})
        if artifact.get("path") and (root / artifact["path"] / METADATA_FILE).is_file():
            return root / artifact["path"]
    raise BundleError(f"{root} holds neither a bundle nor an MLflow model with a bundle artifact")
