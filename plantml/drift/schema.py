"""The drift table's columns, the command's exit codes and the errors every part raises.

Shared by the reference (export time), the feed reader, image scoring and the analysis,
so each of them agrees on one table layout without importing the others.
"""

from __future__ import annotations

from plantml.imagestats import STAT_COLUMNS

#: Numeric columns every drift table has (the image statistics and the model's confidence).
NUMERIC_COLUMNS: tuple[str, ...] = (*STAT_COLUMNS, "confidence")
#: Categorical columns every drift table has.
CATEGORICAL_COLUMNS: tuple[str, ...] = ("label",)
#: Keys every drift-log line must carry.
LOG_REQUIRED_KEYS: tuple[str, ...] = (*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS)
#: Prefix of the optional embedding columns (PCA components of logits or features).
EMBEDDING_PREFIX = "emb_pca_"

EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


class DriftError(ValueError):
    """Drift analysis cannot run on this input; the message names the problem."""


class ReferenceMismatchError(DriftError):
    """Reference and current data come from different bundle versions."""
