"""The serving feed reader: the service's drift log as a table.

The log is JSON lines, one per image: the :mod:`plantml.imagestats` columns, the
response's ``confidence`` and ``label``, ``timestamp`` and ``model_version``. It may be
a file, a glob or a directory of ``*.jsonl*`` files, rotated and ``.gz`` ones included
(written by :mod:`serving.drift_feed`). Torch-free; pandas is imported inside
:func:`read_drift_log`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plantml.drift.schema import LOG_REQUIRED_KEYS, NUMERIC_COLUMNS, DriftError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

#: Share of malformed lines a drift log may hold before :func:`read_drift_log` gives up.
#: A torn line (a worker killed mid-write, a full disk) costs one record; a file that is
#: mostly garbage is not a drift log.
MAX_BAD_LINE_SHARE = 0.01


def is_log_file(path: Path) -> bool:
    """Whether ``path`` is named like a drift log (``*.jsonl``, rotated or gzipped)."""
    return ".jsonl" in path.name


def resolve_log_files(spec: str | os.PathLike[str]) -> list[Path]:
    """Files named by a drift-log spec: a file, a glob, or a directory of ``*.jsonl*``.

    Returns:
        Sorted file paths (possibly empty for a directory without logs).

    Raises:
        DriftError: if a plain path does not exist or a glob matches nothing.
    """
    text = str(spec)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*.jsonl*") if p.is_file())
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DriftError(f"no drift log matches {text!r}")
        return files
    raise DriftError(f"current data not found: {text}")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _parse_log_line(line: str, where: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DriftError(f"malformed drift log line {where}: not JSON ({exc.msg})") from exc
    if not isinstance(rec, dict):
        raise DriftError(f"malformed drift log line {where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in LOG_REQUIRED_KEYS if k not in rec]
    if missing:
        raise DriftError(f"malformed drift log line {where}: missing key(s) {', '.join(missing)}")
    row: dict[str, Any] = {}
    for key in NUMERIC_COLUMNS:
        value = rec[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DriftError(f"malformed drift log line {where}: {key} must be a finite number, got {value!r}")
        row[key] = float(value)
    if not isinstance(rec["label"], str) or not rec["label"]:
        raise DriftError(f"malformed drift log line {where}: label must be a non-empty string")
    row["label"] = rec["label"]
    row["model_version"] = None if rec.get("model_version") is None else str(rec["model_version"])
    row["timestamp"] = rec.get("timestamp")
    return row


def _read_log_file(path: Path, rows: list[dict[str, Any]], bad: list[str]) -> None:
    """Append the records of one log file to ``rows`` and its malformed lines' errors to ``bad``.

    Raises:
        DriftError: if the file cannot be read at all.
    """
    try:
        with _open_text(path) as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DriftError(f"cannot read drift log {path}: {exc}") from exc
    lines = text.split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(_parse_log_line(line, f"{path}:{lineno}"))
        except DriftError as exc:
            if lineno == len(lines):  # no newline yet: a record a live worker is still writing
                log.warning("skipping an incomplete last line (a write in progress?): %s", exc)
            else:
                bad.append(str(exc))


def read_drift_log(spec: str | os.PathLike[str], max_bad_share: float = MAX_BAD_LINE_SHARE) -> "pd.DataFrame":
    """Read the service's drift log into a table.

    A last line without its newline is a record a live worker is still writing: it is
    skipped. Other malformed lines (a record torn by a killed writer or a full disk) are
    skipped, counted and logged with file and line; the table's
    ``attrs["bad_lines"]`` holds the count. Only when more than ``max_bad_share`` of the
    non-empty lines are bad is the log refused.

    Raises:
        DriftError: no files, no records, or too many malformed lines.
    """
    import pandas as pd

    files = resolve_log_files(spec)
    if not files:
        raise DriftError(f"no drift log files (*.jsonl*) in {spec}")
    rows: list[dict[str, Any]] = []
    bad: list[str] = []
    for path in files:
        _read_log_file(path, rows, bad)
    total = len(rows) + len(bad)
    if bad:
        log.warning("drift log: skipped %d malformed line(s) of %d; first: %s", len(bad), total, bad[0])
        if len(bad) > max_bad_share * total:
            raise DriftError(
                f"{len(bad)} of {total} drift log lines are malformed (more than {max_bad_share:.1%}); "
                f"first: {bad[0]}"
            )
    if not rows:
        raise DriftError(f"the drift log is empty: {', '.join(str(f) for f in files[:3])}")
    log.info("drift log: %d records from %d file(s)", len(rows), len(files))
    table = pd.DataFrame(rows)
    table.attrs["bad_lines"] = len(bad)
    return table
