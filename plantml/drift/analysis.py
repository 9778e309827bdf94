"""The drift analysis: Evidently 0.7 ``DataDriftPreset``, current vs reference, and its summary.

:func:`analyse` loads the bundle's reference and the current data and runs
:func:`drift_summary`, which writes the HTML and JSON report and returns a JSON-ready
summary: ``drift_detected``, ``drift_share``, ``n_current``, per-column scores and
``retrain_recommended`` (the share of drifted columns reached ``drift.threshold_share``).

Statistical tests: Evidently's defaults. While the reference has at most 1000 rows they
are p-value tests (Kolmogorov-Smirnov for numeric columns, chi-square / Z-test for the
label), and a column drifts when ``p < drift.stattest_threshold``. Beyond 1000 reference
rows Evidently switches to distances (normed Wasserstein, Jensen-Shannon) with their own
0.1 threshold, because p-values on thousands of rows flag differences too small to matter.

Never a false "no drift": too few rows on either side give ``status: "not_enough_data"``
and bad input raises :class:`DriftError` naming the problem. Torch-free and
params-file-free (the caller passes :class:`plantml.config.DriftParams`); evidently and
pandas are imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from plantml.bundle import BundleError, load_bundle
from plantml.drift.current import load_current
from plantml.drift.reference import load_reference
from plantml.drift.schema import (CATEGORICAL_COLUMNS, EMBEDDING_PREFIX, EXIT_DRIFT, EXIT_ERROR, EXIT_NO_DRIFT,
                                  NUMERIC_COLUMNS, DriftError)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from plantml.config import DriftParams

log = logging.getLogger(__name__)

#: Evidently picks p-value tests up to this many reference rows, distances beyond.
PVALUE_MAX_REFERENCE_ROWS = 1000


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a hidden sibling, then rename it onto ``path``: no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


def _evidently_snapshot(reference: "pd.DataFrame", current: "pd.DataFrame", numeric: list[str],
                        categorical: list[str], threshold_share: float, stattest_threshold: float | None) -> Any:
    try:
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset
    except ImportError as exc:  # the serving/edge extras do not carry evidently
        raise DriftError(f"drift analysis needs evidently 0.7 (pip install 'evidently>=0.7,<0.8'): {exc}") from exc

    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    columns = numeric + categorical
    preset = DataDriftPreset(columns=columns, drift_share=threshold_share, threshold=stattest_threshold)
    report = Report([preset], include_tests=True)
    with warnings.catch_warnings():
        # scipy/numpy warn on constant columns (e.g. every image 256x256); the tests still
        # return a valid p-value of 1 for identical constants.
        warnings.simplefilter("ignore")
        return report.run(
            Dataset.from_pandas(current[columns].reset_index(drop=True), data_definition=definition),
            Dataset.from_pandas(reference[columns].reset_index(drop=True), data_definition=definition),
        )


def _column_results(snapshot_dict: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per-column ``{method, score, threshold, drifted}`` and the drifted-columns count."""
    columns: dict[str, dict[str, Any]] = {}
    count: dict[str, Any] = {}
    for metric in snapshot_dict.get("metrics", []):
        cfg = metric.get("config", {})
        kind = str(cfg.get("type", ""))
        if kind.endswith(":ValueDrift"):
            score = metric.get("value")
            columns[cfg["column"]] = {
                "method": cfg.get("method"),
                "score": None if score is None or not math.isfinite(float(score)) else float(score),
                "threshold": cfg.get("threshold"),
                "drifted": None,
            }
        elif kind.endswith(":DriftedColumnsCount"):
            count = dict(metric.get("value") or {})
    for test in snapshot_dict.get("tests", []):
        params = (test.get("metric_config") or {}).get("params") or {}
        col = params.get("column")
        if str(params.get("type", "")).endswith(":ValueDrift") and col in columns:
            columns[col]["drifted"] = test.get("status") == "FAIL"
    return columns, count


def _base_summary(reference: "pd.DataFrame", current: "pd.DataFrame", params: "DriftParams",
                  bundle_version: str, bundle_name: str | None) -> dict[str, Any]:
    """The summary's fields that every outcome carries, with no verdict yet."""
    return {
        "status": "ok",
        "drift_detected": None,
        "drift_share": None,
        "retrain_recommended": False,
        "n_current": int(len(current)),
        "n_reference": int(len(reference)),
        "min_rows": params.min_rows,
        "threshold_share": params.threshold_share,
        "bundle_version": bundle_version,
        "bundle_name": bundle_name,
        "created_at": datetime.now(timezone.utc).isoformat(),
    }


def _not_enough_data_message(n_current: int, n_reference: int, min_rows: int) -> str | None:
    """Why no verdict is possible (too few rows on a side), or ``None`` when there are enough."""
    if n_current >= min_rows and n_reference >= min_rows:
        return None
    return (
        f"not enough data for a drift test: {n_current} current and {n_reference} reference rows, "
        f"need at least {min_rows} on each side (drift.min_rows); no verdict"
    )


def _verdict_message(n_drifted: int, n_columns: int, share: float, threshold_share: float, detected: bool) -> str:
    if detected:
        return (f"drift in {n_drifted} of {n_columns} columns (share {share:.2f} >= {threshold_share}): "
                "retrain recommended")
    return (f"no dataset drift: {n_drifted} of {n_columns} columns drifted (share {share:.2f} "
            f"< {threshold_share})")


def _checked_columns(snap: Mapping[str, Any], n_expected: int) -> tuple[dict[str, dict[str, Any]], int, float]:
    """Per-column results, the drifted count and share; every column must have a verdict.

    Raises:
        DriftError: the Evidently report left a column without a verdict.
    """
    columns, count = _column_results(snap)
    undecided = [c for c, r in columns.items() if r["drifted"] is None]
    if undecided or len(columns) != n_expected:
        raise DriftError(f"the Evidently report gave no verdict for column(s): {', '.join(undecided) or 'some'}")
    n_drifted = sum(1 for r in columns.values() if r["drifted"])
    share = n_drifted / len(columns)
    if count and abs(float(count.get("share", share)) - share) > 1e-9:
        log.warning("Evidently's drifted share %.3f differs from the per-column count %.3f", count["share"], share)
    return columns, n_drifted, share


def drift_summary(
    reference: "pd.DataFrame",
    current: "pd.DataFrame",
    params: "DriftParams",
    *,
    bundle_version: str,
    bundle_name: str | None = None,
    report_html: str | os.PathLike[str] | None = None,
    report_json: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compare ``current`` against ``reference`` with Evidently and summarise.

    Columns compared: the numeric image statistics, ``confidence``, ``label`` and any
    ``emb_pca_*`` columns present on both sides.

    Returns:
        The summary (see the module docstring); ``status`` is ``"ok"`` or
        ``"not_enough_data"`` (then ``drift_detected``/``drift_share`` are ``None`` and no
        report is written).
    """
    base = _base_summary(reference, current, params, bundle_version, bundle_name)
    short = _not_enough_data_message(len(current), len(reference), params.min_rows)
    if short:
        base.update(status="not_enough_data", message=short)
        return base
    emb = sorted(c for c in reference.columns if c.startswith(EMBEDDING_PREFIX) and c in current.columns)
    numeric, categorical = [*NUMERIC_COLUMNS, *emb], list(CATEGORICAL_COLUMNS)
    # p-value threshold applies while Evidently uses p-value tests; distances keep their defaults
    stattest_threshold = params.stattest_threshold if len(reference) <= PVALUE_MAX_REFERENCE_ROWS else None
    snapshot = _evidently_snapshot(reference, current, numeric, categorical, params.threshold_share,
                                   stattest_threshold)
    snap = snapshot.dict()
    columns, n_drifted, share = _checked_columns(snap, len(numeric) + len(categorical))
    detected = share >= params.threshold_share
    if report_html:
        _atomic_write(Path(report_html), lambda tmp: snapshot.save_html(str(tmp)))
    if report_json:
        _atomic_write_text(Path(report_json), json.dumps(snap, indent=1, default=str))
    base.update(
        drift_detected=bool(detected),
        drift_share=float(share),
        retrain_recommended=bool(detected),
        n_drifted_columns=int(n_drifted),
        n_columns=len(columns),
        stattest_threshold=stattest_threshold,
        drifted_columns=sorted(c for c, r in columns.items() if r["drifted"]),
        columns=columns,
        report_html=str(report_html) if report_html else None,
        report_json=str(report_json) if report_json else None,
        message=_verdict_message(n_drifted, len(columns), share, params.threshold_share, detected),
    )
    return base


def analyse(
    bundle_path: str | os.PathLike[str],
    current: str | os.PathLike[str],
    params: "DriftParams",
    *,
    report_html: str | os.PathLike[str] | None = None,
    report_json: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load the bundle's reference and the current data, and run :func:`drift_summary`.

    Raises:
        DriftError: bad bundle, reference or current data (message names the problem).
    """
    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise DriftError(str(exc)) from exc
    reference, _ = load_reference(bundle)
    current_table, info = load_current(current, bundle)
    summary = drift_summary(
        reference, current_table, params, bundle_version=bundle.version, bundle_name=bundle.name,
        report_html=report_html, report_json=report_json,
    )
    summary["current"] = info
    return summary


def write_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Atomically write the summary file serving exports as Prometheus gauges."""
    _atomic_write_text(Path(path), json.dumps(summary, indent=1, sort_keys=True, default=str))


def exit_code(summary: Mapping[str, Any]) -> int:
    """0 no drift, 1 drift (retrain recommended), 2 no verdict."""
    if summary.get("status") != "ok" or summary.get("drift_detected") is None:
        return EXIT_ERROR
    return EXIT_DRIFT if summary["drift_detected"] else EXIT_NO_DRIFT
