"""Tracking runs: one parent run per flow run, one child run per branch (architecture), all idempotent.

A child run is created when its training starts (:func:`start_branch_run`, epochs logged
live with :func:`log_epoch_metrics`) and completed by evaluation (:func:`log_branch_run`).
Everything that a retried or resumed step calls again is idempotent: the child run for
(parent, name) is reused, and metrics and params already logged are not logged twice.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

from plantml.registry.store import client_for, resolve_tracking_uri, setup_mlflow
from plantml.registry.values import flatten, is_number, now_ms, quote

log = logging.getLogger(__name__)

#: Child-run tag naming the branch (architecture); with ``mlflow.parentRunId`` it identifies a child run.
BRANCH_TAG = "plantml.branch"
PARENT_TAG = "mlflow.parentRunId"


def start_parent_run(params: Mapping[str, Any], tags: Mapping[str, str], tracking_uri: str | None = None,
                     run_name: str | None = None) -> str:
    """Create the flow-level MLflow run (children are nested under it).

    Args:
        params: the resolved parameters (logged flat, ``train.epochs``).
        tags: run tags (e.g. ``metaflow_run_id``).
        tracking_uri: overrides the default store.
        run_name: the run's display name.

    Returns:
        The run id.
    """
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()}) as run:
        mlflow.log_params(flatten(params))
        return run.info.run_id


def find_branch_run(parent_run_id: str, name: str, tracking_uri: str | None = None) -> str | None:
    """The child run of ``parent_run_id`` for branch ``name`` (the oldest, if several), or ``None``.

    Args:
        parent_run_id: the flow's run.
        name: the branch (model) name.
        tracking_uri: overrides the default store.
    """
    return _find_branch_run(client_for(resolve_tracking_uri(tracking_uri)), parent_run_id, name)


def _find_branch_run(client: Any, parent_run_id: str, name: str) -> str | None:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{quote(parent_run_id)}' and tags.`{BRANCH_TAG}` = '{quote(name)}'",
        order_by=["attributes.start_time ASC"], max_results=1,
    )
    return runs[0].info.run_id if runs else None


def start_branch_run(
    parent_run_id: str,
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Create (or reuse) the child run of branch ``name`` at the start of its training.

    The run is left ``RUNNING``: log epochs into it with :func:`log_epoch_metrics`, and
    complete it with :func:`log_branch_run` (``run_id=`` this id, or found again by name).
    A retried branch gets the same run back (set ``RUNNING`` again).

    Args:
        parent_run_id: the flow's run.
        name: the branch (model) name.
        params: params to log (those the run lacks).
        tags: run tags.
        tracking_uri: overrides the default store.

    Returns:
        The child run id.
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = client_for(uri)
    run_id = get_or_create_branch_run(client, parent_run_id, name, tags or {})
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    log_params_once(client, run_id, params or {})
    return run_id


def log_epoch_metrics(run_id: str, row: Mapping[str, Any], step: int, tracking_uri: str | None = None) -> bool:
    """Log one epoch's metrics (``epoch_<key>``) to an existing run, at ``step``. Cheap; never raises.

    Meant for a training loop: one batched write per call. Non-numeric values and the
    ``epoch`` key are skipped. A failure (e.g. the store is briefly locked) is logged as a
    warning and reported as ``False``: live metrics must not stop training, and
    :func:`log_branch_run` logs the whole history again (skipping steps already there).

    Returns:
        Whether the metrics were written.
    """
    try:
        from mlflow.entities import Metric

        client = client_for(resolve_tracking_uri(tracking_uri))
        now = now_ms()
        metrics = [Metric(f"epoch_{k}", float(v), now, int(step)) for k, v in row.items()
                   if k != "epoch" and is_number(v)]
        if metrics:
            client.log_batch(run_id, metrics=metrics, synchronous=True)
        return True
    except Exception as exc:  # noqa: BLE001 - live metrics are best effort
        log.warning("could not log epoch %s metrics to MLflow run %s: %s", step, run_id, exc)
        return False


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
    run_id: str | None = None,
) -> str:
    """Complete the nested run of one architecture: params, per-epoch metrics, test metrics, images, weights.

    Idempotent: the child run for (``parent_run_id``, ``name``) is reused — the one given as
    ``run_id``, or the one :func:`start_branch_run` or an earlier call created — so a
    resumed evaluation does not duplicate it. Params already set are not set again, epoch
    steps already logged (e.g. live, by :func:`log_epoch_metrics`) are skipped, a metric
    whose latest value is unchanged is not logged again, artifacts overwrite their earlier
    copies. The run ends ``FINISHED``.

    Args:
        parent_run_id: the flow's run.
        name: the branch (model) name.
        params: params to log (nested dicts are flattened).
        history: per-epoch rows (``epoch`` plus metrics).
        metrics: test metrics (non-numbers are skipped).
        artifacts: PNGs logged under ``plots/``.
        checkpoint_path: the weights, logged under ``model/`` (``None``: not logged).
        tags: run tags.
        tracking_uri: overrides the default store.
        run_id: the branch's run, when known (else found by name, or created).

    Returns:
        The child run id.
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = client_for(uri)
    tags = {k: str(v) for k, v in tags.items()}
    if run_id is None:
        run_id = get_or_create_branch_run(client, parent_run_id, name, tags)
    else:
        client.set_tag(run_id, BRANCH_TAG, name)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    log_params_once(client, run_id, params)
    log_history_once(client, run_id, history)
    log_metrics_once(client, run_id, {k: v for k, v in metrics.items() if is_number(v)})
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="plots")
    if checkpoint_path:
        client.log_artifact(run_id, str(checkpoint_path), artifact_path="model")
    client.set_terminated(run_id, "FINISHED")
    return run_id


def finish_parent_run(parent_run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                      tracking_uri: str | None = None) -> None:
    """Record the flow's outcome on its parent run.

    Args:
        parent_run_id: the flow's run.
        metrics: numbers to log (``None`` values are skipped).
        tags: tags to set.
        tracking_uri: overrides the default store.
    """
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def get_or_create_branch_run(client: Any, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
    """The child run of branch ``name`` under ``parent_run_id``: the existing one, or a new one with ``tags``."""
    existing = _find_branch_run(client, parent_run_id, name)
    if existing is not None:
        log.info("reusing MLflow child run %s for %s", existing, name)
        return existing
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent_run_id, BRANCH_TAG: name})
    return run.info.run_id


def log_params_once(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks; a param already set to another value is kept (MLflow params are immutable)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    flat = flatten(params)
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:
        log.warning("run %s keeps its earlier value of param(s) %s", run_id, ", ".join(changed))
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for start in range(0, len(new), 100):  # MLflow's per-batch limit on params
        client.log_batch(run_id, params=new[start:start + 100])


def log_history_once(client: Any, run_id: str, history: list[Mapping[str, Any]]) -> None:
    """Per-epoch rows as ``epoch_<key>`` at step ``epoch``, skipping (key, step) pairs already logged."""
    from mlflow.entities import Metric

    now = now_ms()
    logged: dict[str, set[int]] = {}
    metrics = []
    for row in history:
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or not is_number(value):
                continue
            name = f"epoch_{key}"
            if name not in logged:
                logged[name] = {m.step for m in client.get_metric_history(run_id, name)}
            if step not in logged[name]:
                metrics.append(Metric(name, float(value), now, step))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def log_metrics_once(client: Any, run_id: str, metrics: Mapping[str, Any]) -> None:
    """Summary metrics at step 0, skipping those whose latest value is already the same."""
    from mlflow.entities import Metric

    have = client.get_run(run_id).data.metrics
    now = now_ms()
    new = [Metric(k, float(v), now, 0) for k, v in metrics.items() if have.get(k) != float(v)]
    if new:
        client.log_batch(run_id, metrics=new)
