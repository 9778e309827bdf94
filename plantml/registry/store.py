"""The MLflow store: which one (tracking URI), the experiment, one client per store.

Default store: ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` at the
repository root (both git-ignored). ``registry.tracking_uri`` in params, or else
``$MLFLOW_TRACKING_URI``, points everything at a shared server instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: The checkout (``plantml/registry/store.py`` -> three levels up): the default store lives at its root.
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
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

    Args:
        configured_uri: an explicit store (see :func:`resolve_tracking_uri`).
        experiment: the experiment's name.

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


def client_for(uri: str) -> Any:
    """An ``MlflowClient`` for one store (tracking and registry), cached per URI."""
    if uri not in _CLIENTS:
        from mlflow import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]


_CLIENTS: dict[str, Any] = {}


def experiment_id(client: Any, experiment: str = EXPERIMENT_NAME) -> str:
    """The id of ``experiment`` (it must exist: :func:`setup_mlflow` creates it)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"experiment {experiment!r} does not exist (call setup_mlflow first)")
    return exp.experiment_id
