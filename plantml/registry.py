"""MLflow tracking and model registry.

Default store: ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` at the
repository root (both git-ignored), so ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows runs and the registry with no server. ``registry.tracking_uri`` in params, or else
``$MLFLOW_TRACKING_URI``, points everything at a shared server instead.

The registered "model" is the exported bundle directory, logged as run artifacts; a
version's alias (``champion`` by default) is what serving resolves with
``PLANTML_MODEL_URI=models:/NAME@champion``. Registry stages are deprecated in MLflow,
so only aliases are used.

mlflow is imported inside functions: it is heavy, and serving only needs it when told to
fetch from the registry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_NAME = "plantml"


def default_tracking_uri() -> str:
    """The local sqlite store at the repository root."""
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None = None) -> str:
    """An explicit URI (argument, or ``registry.tracking_uri`` in params) > ``$MLFLOW_TRACKING_URI`` > local sqlite.

    The explicit value must win: ``mlflow.set_tracking_uri`` writes ``$MLFLOW_TRACKING_URI``
    into this process's environment, so the variable may name whatever store was used last.
    """
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def setup_mlflow(configured_uri: str | None = None, experiment: str = EXPERIMENT_NAME) -> str:
    """Point mlflow at the store and select (creating if needed) the experiment.

    Returns:
        The experiment id.
    """
    import mlflow

    uri = resolve_tracking_uri(configured_uri)
    mlflow.set_tracking_uri(uri)
    # The registry URI is resolved separately and sticks to the first store a process used:
    # pin it to the same store, or a second store in one process registers into the first.
    mlflow.set_registry_uri(uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database (not in whatever the working directory happens to be).
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    try:
        exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - a parallel branch may have created it first
        exp_id = mlflow.get_experiment_by_name(experiment).experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def register_bundle(
    bundle_path: str | os.PathLike[str],
    *,
    model_name: str,
    alias: str = "champion",
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log a bundle directory as artifacts and register it as a new model version.

    Args:
        bundle_path: the exported bundle directory.
        model_name: registered model name.
        alias: alias moved to the new version (e.g. ``champion``).
        run_id: log into this existing run; otherwise a new run is started.
        tags: version tags (e.g. ``metaflow_run_id``).
        tracking_uri: overrides the default store.

    Returns:
        ``{"name", "version", "alias", "run_id", "source", "model_uri"}``.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    bundle_path = Path(bundle_path)
    if run_id is None:
        with mlflow.start_run(run_name=f"register-{bundle_path.name}") as run:
            run_id = run.info.run_id
    client.log_artifacts(run_id, str(bundle_path), artifact_path="bundle")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/bundle"
    try:
        client.get_registered_model(model_name)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST
        client.create_registered_model(model_name, description="plantml leaf-disease classifier bundles")
    version = client.create_model_version(
        model_name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (alias %s) from run %s", model_name, version.version, alias, run_id)
    return {
        "name": model_name, "version": str(version.version), "alias": alias, "run_id": run_id,
        "source": source,
        "model_uri": f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version.version}",
    }


def fetch_bundle(model_uri: str, dst_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download a registered bundle (``models:/NAME@alias`` or ``models:/NAME/3``).

    Returns:
        The local bundle directory (verify it with :func:`plantml.bundle.load_bundle`).
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri))


def start_parent_run(params: Mapping[str, Any], tags: Mapping[str, str], tracking_uri: str | None = None,
                     run_name: str | None = None) -> str:
    """Create the flow-level MLflow run (children are nested under it); returns its id."""
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()}) as run:
        mlflow.log_params(_flatten(params))
        return run.info.run_id


def log_branch_run(
    parent_run_id: str,
    name: str,
    *,
    params: Mapping[str, Any],
    history: list[Mapping[str, float]],
    metrics: Mapping[str, float],
    artifacts: list[str | os.PathLike[str]],
    checkpoint_path: str | os.PathLike[str] | None,
    tags: Mapping[str, str],
    tracking_uri: str | None = None,
) -> str:
    """One nested run per architecture: params, per-epoch metrics, images, the weights.

    Returns:
        The child run id.
    """
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_id=parent_run_id):
        with mlflow.start_run(run_name=name, nested=True, tags={k: str(v) for k, v in tags.items()}) as run:
            mlflow.log_params(_flatten(params))
            for row in history:
                step = int(row["epoch"])
                mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in row.items() if k != "epoch"}, step=step)
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
            for path in artifacts:
                mlflow.log_artifact(str(path), artifact_path="plots")
            if checkpoint_path:
                mlflow.log_artifact(str(checkpoint_path), artifact_path="model")
            return run.info.run_id


def finish_parent_run(parent_run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                      tracking_uri: str | None = None) -> None:
    """Record the flow's outcome on its parent run."""
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = str(value)[:500]
    return out
