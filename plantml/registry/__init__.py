"""MLflow tracking and model registry.

Default store: ``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/`` at the
repository root (both git-ignored), so ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows runs and the registry with no server. ``registry.tracking_uri`` in params, or else
``$MLFLOW_TRACKING_URI``, points everything at a shared server instead.

The registered model is the exported bundle as an MLflow ``pyfunc`` model
(:mod:`plantml.mlflow_model`; see docs/mlflow.md) with an extra ``onnx`` flavor; a
version's alias (``champion`` by default) is what ``mlflow models serve``,
``mlflow.pyfunc.load_model`` and the service (``PLANTML_MODEL_URI=models:/NAME@champion``,
through :func:`fetch_bundle`) resolve. Registry stages are deprecated in MLflow, so only
aliases are used.

Runs: one parent run per flow run (:func:`start_parent_run`, the dataset recorded with
:func:`log_dataset_input`), one child run per architecture, created when its training
starts (:func:`start_branch_run`, epochs logged live with :func:`log_epoch_metrics`) and
completed by evaluation (:func:`log_branch_run`). Everything that a retried or resumed
step calls again is idempotent: the child run for (parent, name) is reused, metrics and
params already logged are not logged twice, and a bundle already registered is not
registered again. A drift analysis is one run of its own (:func:`log_drift_run`).

One job per module: ``store`` (which store, the experiment, clients), ``runs``
(parent and branch runs), ``datasets`` (the data set as a run input), ``bundle_model``
(the bundle as an MLflow model: log, fetch), ``registration`` (model versions, aliases),
``drift`` (drift runs), ``values`` (conversions to what MLflow stores). Every public name
is re-exported here.

mlflow is imported inside functions: it is heavy, and serving only needs it when told to
fetch from the registry.
"""

from __future__ import annotations

from plantml.registry.bundle_model import BUNDLE_ARTIFACT, bundle_dir_in, bundle_sha256, fetch_bundle, log_bundle_model
from plantml.registry.datasets import counts_frame, log_dataset_input
from plantml.registry.drift import DRIFT_EXPERIMENT, drift_metrics, log_drift_run
from plantml.registry.registration import (BUNDLE_TAG, KEY_TAG, domain_metric_items, find_registered_version,
                                           register_bundle)
from plantml.registry.runs import (BRANCH_TAG, PARENT_TAG, find_branch_run, finish_parent_run, log_branch_run,
                                   log_epoch_metrics, start_branch_run, start_parent_run)
from plantml.registry.store import (EXPERIMENT_NAME, REPO_ROOT, default_tracking_uri, resolve_tracking_uri,
                                    setup_mlflow)

__all__ = [
    "BUNDLE_ARTIFACT", "BUNDLE_TAG", "KEY_TAG", "BRANCH_TAG", "PARENT_TAG", "EXPERIMENT_NAME", "REPO_ROOT",
    "DRIFT_EXPERIMENT", "default_tracking_uri", "resolve_tracking_uri", "setup_mlflow", "bundle_sha256",
    "register_bundle", "find_registered_version", "log_bundle_model", "fetch_bundle", "bundle_dir_in",
    "start_parent_run", "find_branch_run", "start_branch_run", "log_epoch_metrics", "log_branch_run",
    "log_dataset_input", "counts_frame", "finish_parent_run", "domain_metric_items", "log_drift_run", "drift_metrics",
]
