"""Data drift: the bundle's reference statistics against what the service sees.

One job per module (all torch-free; pandas, onnxruntime and evidently are imported
inside the functions that need them):

* :mod:`~plantml.drift.reference` — export time: :func:`reference_stats_step` writes
  ``reference_stats.csv`` (and ``reference_pca.npz``) into the bundle;
  :func:`load_reference` reads it back.
* :mod:`~plantml.drift.feed` — :func:`read_drift_log` reads the service's drift log
  (JSON lines; a file, a glob or a directory of ``*.jsonl*``, rotated and ``.gz`` ones
  included).
* :mod:`~plantml.drift.scoring` — :func:`images_table` scores a folder of images as the
  service would (statistics plus the bundle's ONNX prediction, via :mod:`plantml.runtime`).
* :mod:`~plantml.drift.current` — :func:`load_current` picks the log or the images.
* :mod:`~plantml.drift.analysis` — :func:`analyse` / :func:`drift_summary`: the Evidently
  0.7 ``DataDriftPreset`` and its summary (``drift_detected``, ``drift_share``,
  ``retrain_recommended``, per-column scores).
* :mod:`~plantml.drift.cli` — ``plantml drift`` / ``python -m plantml.drift``; exit codes
  0 no drift, 1 drift (retrain recommended), 2 error or not enough data.
* :mod:`~plantml.drift.schema` — the shared columns, exit codes and errors.

Every public name is re-exported here, so ``from plantml.drift import X`` keeps working.
"""

from __future__ import annotations

from typing import Any

from plantml.drift.analysis import PVALUE_MAX_REFERENCE_ROWS, analyse, drift_summary, exit_code, write_summary
from plantml.drift.current import load_current
from plantml.drift.feed import MAX_BAD_LINE_SHARE, read_drift_log, resolve_log_files
from plantml.drift.reference import (DEFAULT_PCA_COMPONENTS, REFERENCE_FILE, REFERENCE_PCA_FILE, REFERENCE_ROLE,
                                     build_reference_table, fit_pca, load_reference, project_pca,
                                     reference_stats_step)
from plantml.drift.schema import (CATEGORICAL_COLUMNS, EMBEDDING_PREFIX, EXIT_DRIFT, EXIT_ERROR, EXIT_NO_DRIFT,
                                  LOG_REQUIRED_KEYS, NUMERIC_COLUMNS, DriftError, ReferenceMismatchError)
from plantml.drift.scoring import images_table, list_images

#: Names served by :mod:`plantml.drift.cli`, loaded on first use: the command line is the
#: only part that reads params.yaml (plantml.config), and the feed reader, scoring and
#: analysis must stay importable without it (serving and the torch-free core import them).
_CLI_NAMES = frozenset({"add_drift_arguments", "run_drift_cli", "main"})

__all__ = [
    "CATEGORICAL_COLUMNS", "DEFAULT_PCA_COMPONENTS", "EMBEDDING_PREFIX", "EXIT_DRIFT", "EXIT_ERROR",
    "EXIT_NO_DRIFT", "LOG_REQUIRED_KEYS", "MAX_BAD_LINE_SHARE", "NUMERIC_COLUMNS", "PVALUE_MAX_REFERENCE_ROWS",
    "REFERENCE_FILE", "REFERENCE_PCA_FILE", "REFERENCE_ROLE", "DriftError", "ReferenceMismatchError",
    "add_drift_arguments", "analyse", "build_reference_table", "drift_summary", "exit_code", "fit_pca",
    "images_table", "list_images", "load_current", "load_reference", "main", "project_pca", "read_drift_log",
    "reference_stats_step", "resolve_log_files", "run_drift_cli", "write_summary",
]


def __getattr__(name: str) -> Any:
    """Load the command-line names from :mod:`plantml.drift.cli` on first access (PEP 562)."""
    if name in _CLI_NAMES:
        from plantml.drift import cli  # lazy on purpose: see _CLI_NAMES

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
