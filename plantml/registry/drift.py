"""A drift analysis recorded as an MLflow run (experiment ``plantml-drift``)."""

from __future__ import annotations

import os
from typing import Any, Mapping

from plantml.registry.store import setup_mlflow

#: The experiment drift runs go to (apart from training runs: one run per analysis).
DRIFT_EXPERIMENT = "plantml-drift"


def log_drift_run(summary: Mapping[str, Any], *, current: str, tracking_uri: str | None = None,
                  report_files: tuple[str | os.PathLike[str], ...] = (),
                  tags: Mapping[str, str] | None = None) -> str:
    """Log one drift analysis: status tags, counts, the share and per-column scores, the reports.

    Metrics: ``n_current``, ``n_reference`` and, for a conclusive result, ``drift_share``,
    ``drift_detected``, ``n_drifted_columns`` and one ``drift_score.<column>`` per column
    with a score. Artifacts under ``drift/``: the summary (always) and ``report_files``
    (only for a conclusive result, as the reports are written only then).

    Args:
        summary: :func:`plantml.drift.analyse`'s summary.
        current: what was analysed (drift log or image folder), as given.
        tracking_uri: overrides the default store.
        report_files: the Evidently HTML and JSON reports.
        tags: more run tags (e.g. ``metaflow_run_id``).

    Returns:
        The MLflow run id.
    """
    import mlflow

    setup_mlflow(tracking_uri, experiment=DRIFT_EXPERIMENT)
    s = summary
    with mlflow.start_run(run_name=f"drift-{s.get('bundle_version')}") as run:
        mlflow.set_tags({
            "bundle_version": str(s.get("bundle_version")), "bundle_name": str(s.get("bundle_name")),
            "status": s["status"], "current": str(current), **{k: str(v) for k, v in (tags or {}).items()},
            "retrain_recommended": str(s.get("retrain_recommended")),
        })
        if s["status"] == "ok":
            for path in report_files:
                mlflow.log_artifact(str(path), artifact_path="drift")
        mlflow.log_metrics(drift_metrics(s))
        mlflow.log_dict(dict(s), "drift/summary.json")
        return run.info.run_id


def drift_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The drift run's metrics: counts always; share, verdict, drifted columns and scores when conclusive.

    Args:
        summary: :func:`plantml.drift.analyse`'s summary.

    Returns:
        ``{metric name: value}``.
    """
    s = summary
    metrics = {"n_current": s["n_current"], "n_reference": s["n_reference"]}
    if s["status"] == "ok":
        metrics.update(drift_share=s["drift_share"], drift_detected=float(s["drift_detected"]),
                       n_drifted_columns=s["n_drifted_columns"])
        metrics.update({f"drift_score.{col}": r["score"] for col, r in s["columns"].items() if r["score"] is not None})
    return metrics
