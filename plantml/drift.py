"""Data drift: the bundle's reference statistics against what the service sees.

Three pieces, one module (torch-free; pandas, onnxruntime and evidently are imported
inside the functions that need them):

* **Reference** — :func:`reference_stats_step` is an ``extra_steps`` callable for
  :func:`plantml.export.export_bundle`. It writes ``reference_stats.csv`` into the
  bundle: one row per test-split image with the :mod:`plantml.imagestats` columns, the
  champion's ``confidence`` and predicted ``label``, and optionally ``emb_pca_0..k``
  (PCA of an embedding; the projection is stored in ``reference_pca.npz``).
* **Current** — :func:`load_current` reads the service's drift log (JSON lines, one per
  image: the same columns plus ``timestamp`` and ``model_version``; a file, a glob or a
  directory of ``*.jsonl*`` files, rotated and ``.gz`` ones included) or a folder of
  images, for which the statistics are computed here and the bundle's ONNX model gives
  ``confidence`` and ``label``.
* **Analysis** — :func:`analyse` runs an Evidently 0.7 ``DataDriftPreset`` (current vs
  reference), writes the HTML and JSON report, and returns a JSON-ready summary:
  ``drift_detected``, ``drift_share``, ``n_current``, per-column scores and
  ``retrain_recommended`` (the share of drifted columns reached ``drift.threshold_share``).

Statistical tests: Evidently's defaults. While the reference has at most 1000 rows they
are p-value tests (Kolmogorov-Smirnov for numeric columns, chi-square / Z-test for the
label), and a column drifts when ``p < drift.stattest_threshold``. Beyond 1000 reference
rows Evidently switches to distances (normed Wasserstein, Jensen-Shannon) with their own
0.1 threshold, because p-values on thousands of rows flag differences too small to matter.

Never a false "no drift": too few rows on either side give ``status: "not_enough_data"``
(exit code 2) and bad input raises :class:`DriftError` naming the problem. Only a
conclusive result is written to ``--summary-out``, the file serving exports as the
``plantml_drift_share`` / ``plantml_drift_detected`` gauges, so a failed run never
overwrites the last real answer (its ``created_at`` shows how old it is).

CLI (registered by :mod:`plantml.cli` as ``plantml drift``)::

    plantml drift --bundle artifacts/bundle --current /var/log/plantml/drift \\
        --report reports/drift.html --json reports/drift.json --summary-out reports/drift_summary.json

Exit codes: 0 no drift, 1 drift (retrain recommended), 2 error or not enough data.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import logging
import math
import os
import sys
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from plantml.imagestats import STAT_COLUMNS, image_statistics
from plantml.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, load_image, preprocess_batch
from plantml.runtime import Calibration, SessionOptions, open_session

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from PIL import Image

    from plantml.bundle import Bundle, BundleWriter
    from plantml.config import DriftParams

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_stats.csv"
REFERENCE_PCA_FILE = "reference_pca.npz"
REFERENCE_ROLE = "drift_reference"
#: Numeric columns every drift table has (the image statistics and the model's confidence).
NUMERIC_COLUMNS: tuple[str, ...] = (*STAT_COLUMNS, "confidence")
#: Categorical columns every drift table has.
CATEGORICAL_COLUMNS: tuple[str, ...] = ("label",)
#: Keys every drift-log line must carry.
LOG_REQUIRED_KEYS: tuple[str, ...] = (*NUMERIC_COLUMNS, *CATEGORICAL_COLUMNS)
EMBEDDING_PREFIX = "emb_pca_"
DEFAULT_PCA_COMPONENTS = 4
#: Evidently picks p-value tests up to this many reference rows, distances beyond.
PVALUE_MAX_REFERENCE_ROWS = 1000

EXIT_NO_DRIFT, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


class DriftError(ValueError):
    """Drift analysis cannot run on this input; the message names the problem."""


class ReferenceMismatchError(DriftError):
    """Reference and current data come from different bundle versions."""


# --------------------------------------------------------------------------------------
# Reference statistics (export time)
# --------------------------------------------------------------------------------------


def fit_pca(embeddings: np.ndarray, n_components: int = DEFAULT_PCA_COMPONENTS) -> dict[str, np.ndarray]:
    """Principal components of an ``(n, d)`` embedding matrix (numpy SVD, no sklearn).

    Returns:
        ``{"mean": (d,), "components": (k, d), "explained_variance_ratio": (k,)}`` with
        ``k = min(n_components, n - 1, d)``.

    Raises:
        DriftError: for a non-2-D matrix, fewer than 2 rows or non-finite values.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise DriftError(f"embeddings must be an (n, d) matrix with n >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DriftError("embeddings contain NaN or infinite values")
    k = max(1, min(n_components, x.shape[0] - 1, x.shape[1]))
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s ** 2
    ratio = var[:k] / var.sum() if var.sum() > 0 else np.zeros(k)
    return {"mean": mean, "components": vt[:k], "explained_variance_ratio": ratio}


def project_pca(embeddings: np.ndarray, pca: Mapping[str, np.ndarray]) -> np.ndarray:
    """Project embeddings onto stored principal components; ``(n, k)``."""
    x = np.asarray(embeddings, dtype=np.float64)
    comps = np.asarray(pca["components"], dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != comps.shape[1]:
        raise DriftError(f"embeddings have shape {x.shape}, the stored PCA expects (n, {comps.shape[1]})")
    return (x - np.asarray(pca["mean"], dtype=np.float64)) @ comps.T


def _as_image(item: "Image.Image | str | os.PathLike[str]") -> "Image.Image":
    """A PIL image, or a path decoded now (so a large test split is never held in memory)."""
    if isinstance(item, (str, os.PathLike)):
        try:
            return load_image(item)
        except ImageDecodeError as exc:
            raise DriftError(f"reference image {item} cannot be read: {exc}") from exc
    return item


def build_reference_table(
    images: Sequence["Image.Image | str | os.PathLike[str]"],
    predicted_labels: Sequence[str],
    confidences: np.ndarray,
    embeddings: np.ndarray | None = None,
    *,
    classes: Sequence[str] | None = None,
    n_components: int = DEFAULT_PCA_COMPONENTS,
) -> tuple["pd.DataFrame", dict[str, np.ndarray] | None]:
    """One row per image: image statistics, ``confidence``, ``label``, optional PCA columns.

    Args:
        images: the test split as the service would see it: the original decoded images
            (RGB PIL) or their file paths — not the model-size resized arrays, or the
            size and sharpness columns would differ from the service's log by construction.
        predicted_labels: the model's predicted class name per image.
        confidences: the model's (calibrated) top-1 probability per image, in [0, 1].
        embeddings: optional ``(n, d)`` embeddings (penultimate features or logits).
        classes: if given, every label must be one of them.
        n_components: PCA components kept from the embeddings.

    Returns:
        ``(table, pca)``; ``pca`` is ``None`` without embeddings.

    Raises:
        DriftError: on empty input, mismatched lengths, unknown labels or bad confidences.
    """
    import pandas as pd

    n = len(images)
    if n == 0:
        raise DriftError("no reference images: the drift reference needs the test split's images")
    conf = np.asarray(confidences, dtype=np.float64).reshape(-1)
    if len(predicted_labels) != n or len(conf) != n:
        raise DriftError(
            f"reference inputs differ in length: {n} images, {len(predicted_labels)} labels, {len(conf)} confidences"
        )
    if not np.isfinite(conf).all() or (conf < 0).any() or (conf > 1).any():
        raise DriftError("reference confidences must be finite probabilities in [0, 1]")
    labels = [str(lbl) for lbl in predicted_labels]
    if classes is not None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise DriftError(f"reference labels not among the bundle's classes: {', '.join(unknown[:5])}")
    rows = [image_statistics(_as_image(img)) for img in tqdm(images, desc="reference stats", unit="img", leave=False)]
    table = pd.DataFrame(rows, columns=list(STAT_COLUMNS))
    table["confidence"] = conf
    table["label"] = labels
    pca = None
    if embeddings is not None:
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise DriftError(f"embeddings must have one row per image: shape {emb.shape}, {n} images")
        pca = fit_pca(emb, n_components)
        proj = project_pca(emb, pca)
        for i in range(proj.shape[1]):
            table[f"{EMBEDDING_PREFIX}{i}"] = proj[:, i]
    return table, pca


def reference_stats_step(
    images: Sequence["Image.Image | str | os.PathLike[str]"],
    predicted_labels: list[str],
    confidences: np.ndarray,
    embeddings: np.ndarray | None = None,
    *,
    embedding_source: str = "penultimate",
    n_components: int = DEFAULT_PCA_COMPONENTS,
) -> Callable[["BundleWriter", dict], None]:
    """An ``extra_steps`` callable for :func:`plantml.export.export_bundle`.

    The step writes ``reference_stats.csv`` (and ``reference_pca.npz`` with embeddings)
    into the bundle, registers it with role ``drift_reference`` (so ``Bundle.available()``
    and ``model_path`` ignore it) and records ``metadata["drift_reference"]``.

    Args:
        images: the test split's original images (RGB PIL) or their paths (read one at a
            time). Not the resized model inputs: the service computes its statistics on the
            uploaded image, so width, height and sharpness must be comparable.
        predicted_labels: the champion's predicted class names.
        confidences: the champion's top-1 probabilities, with the same temperature the
            service applies (the service logs its response's ``confidence``).
        embeddings: optional ``(n, d)`` features; pass the logits (``embedding_source=
            "logits"``) to let ``plantml drift`` on an image folder project the current
            images too (the exported models output logits only).
        embedding_source: ``"penultimate"`` or ``"logits"`` (recorded in the metadata).
        n_components: PCA components kept.

    Returns:
        ``step(writer, metadata) -> None``.
    """

    def step(writer: "BundleWriter", metadata: dict) -> None:
        table, pca = build_reference_table(
            images, predicted_labels, confidences, embeddings,
            classes=metadata.get("classes"), n_components=n_components,
        )
        table.to_csv(writer.dir / REFERENCE_FILE, index=False, float_format="%.6g")
        writer.add_file(REFERENCE_FILE, fmt="csv", runtime="none", precision="none", role=REFERENCE_ROLE)
        embedding_info = None
        if pca is not None:
            np.savez(writer.dir / REFERENCE_PCA_FILE, **pca)
            writer.add_file(REFERENCE_PCA_FILE, fmt="npz", runtime="none", precision="none", role=REFERENCE_ROLE)
            embedding_info = {
                "path": REFERENCE_PCA_FILE,
                "source": embedding_source,
                "dim": int(pca["components"].shape[1]),
                "n_components": int(pca["components"].shape[0]),
                "explained_variance_ratio": [round(float(v), 6) for v in pca["explained_variance_ratio"]],
            }
        metadata["drift_reference"] = {
            "path": REFERENCE_FILE,
            "n_rows": int(len(table)),
            "columns": list(table.columns),
            "numeric_columns": [c for c in table.columns if c != "label"],
            "categorical_columns": list(CATEGORICAL_COLUMNS),
            "bundle_version": metadata.get("version"),
            "embedding": embedding_info,
            "created_at": datetime.now(timezone.utc).isoformat(),
        }
        log.info("drift reference: %d rows, %d columns", len(table), len(table.columns))

    return step


def load_reference(bundle: "Bundle") -> tuple["pd.DataFrame", dict[str, Any]]:
    """The bundle's reference table and its metadata entry.

    Raises:
        DriftError: if the bundle has no drift reference or the file is unusable.
        ReferenceMismatchError: if the reference was recorded for another bundle version.
    """
    import pandas as pd

    info = bundle.metadata.get("drift_reference")
    if not info:
        raise DriftError(
            f"bundle {bundle.root} has no drift reference (metadata.drift_reference); "
            "re-export it with plantml.drift.reference_stats_step"
        )
    ref_version = str(info.get("bundle_version"))
    if ref_version != bundle.version:
        raise ReferenceMismatchError(
            f"the drift reference in {bundle.root} was computed for bundle version {ref_version}, "
            f"but the bundle is version {bundle.version}; re-export the reference with this model"
        )
    path = bundle.root / info.get("path", REFERENCE_FILE)
    if not path.is_file():
        raise DriftError(f"drift reference file missing: {path}")
    try:
        table = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad reference
        raise DriftError(f"drift reference {path} cannot be read: {exc}") from exc
    missing = [c for c in LOG_REQUIRED_KEYS if c not in table.columns]
    if missing:
        raise DriftError(f"drift reference {path} lacks column(s): {', '.join(missing)}")
    table["label"] = table["label"].astype(str)
    return table, info


# --------------------------------------------------------------------------------------
# Current data: the service's drift log, or a folder of images
# --------------------------------------------------------------------------------------


def _is_log_file(path: Path) -> bool:
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


#: Share of malformed lines a drift log may hold before :func:`read_drift_log` gives up.
#: A torn line (a worker killed mid-write, a full disk) costs one record; a file that is
#: mostly garbage is not a drift log.
MAX_BAD_LINE_SHARE = 0.01


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


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def images_table(
    paths: Sequence[Path], bundle: "Bundle", *, batch_size: int = 32, threads: int = 1
) -> tuple["pd.DataFrame", list[str]]:
    """Image statistics plus the bundle's ONNX FP32 prediction for each readable image.

    Returns:
        ``(table, skipped)``: one row per decoded image (``model_version`` = the bundle's
        version), and ``"path: reason"`` for each file that could not be decoded.
    """
    import pandas as pd

    spec = bundle.input_spec
    classes = bundle.classes
    calibration = Calibration.of(bundle)
    # Scored as the service scores (plantml.runtime): ONNX Runtime FP32 is in every bundle.
    session = open_session(bundle.model_path("onnxruntime", "fp32"), "onnxruntime", SessionOptions(threads=threads))
    pca = _bundle_logit_pca(bundle, len(classes))
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start in tqdm(range(0, len(paths), batch_size), desc="current images", unit="batch", leave=False):
        imgs, batch_rows = [], []
        for path in paths[start:start + batch_size]:
            try:
                img = load_image(path)
            except ImageDecodeError as exc:
                skipped.append(f"{path}: {exc.reason}")
                continue
            imgs.append(img)
            batch_rows.append(image_statistics(img))
        if not imgs:
            continue
        logits = session.run(preprocess_batch(imgs, spec))[0]
        probs = calibration.probabilities(logits)
        top = probs.argmax(axis=1)
        proj = project_pca(logits, pca) if pca is not None else None
        for i, row in enumerate(batch_rows):
            row["confidence"] = float(probs[i, top[i]])
            row["label"] = classes[int(top[i])]
            row["model_version"] = bundle.version
            if proj is not None:
                for j in range(proj.shape[1]):
                    row[f"{EMBEDDING_PREFIX}{j}"] = float(proj[i, j])
            rows.append(row)
    if skipped:
        log.warning("skipped %d unreadable image(s), e.g. %s", len(skipped), skipped[0])
    return pd.DataFrame(rows), skipped


def _bundle_logit_pca(bundle: "Bundle", n_classes: int) -> dict[str, np.ndarray] | None:
    """The reference PCA if it was fitted on logits (so current images can be projected)."""
    info = (bundle.metadata.get("drift_reference") or {}).get("embedding")
    if not info or info.get("source") != "logits" or int(info.get("dim", -1)) != n_classes:
        return None
    with np.load(bundle.root / info["path"]) as npz:
        return {k: npz[k] for k in npz.files}


def load_current(spec: str | os.PathLike[str], bundle: "Bundle") -> tuple["pd.DataFrame", dict[str, Any]]:
    """Current data from a drift log (file, glob, directory) or a folder of images.

    Rows logged by another model version are dropped (their ``confidence`` and ``label``
    are not comparable with this bundle's reference).

    Returns:
        ``(table, info)`` with ``info = {"source", "kind", "n_rows_read", "n_other_version",
        "n_skipped"}``.

    Raises:
        DriftError: empty or malformed input.
        ReferenceMismatchError: every logged row comes from another model version.
    """
    path = Path(str(spec))
    info: dict[str, Any] = {"source": str(spec), "n_other_version": 0, "n_skipped": 0}
    images: list[Path] = []
    if path.is_dir() and not any(_is_log_file(p) for p in path.rglob("*.jsonl*")):
        images = list_images(path)
        if not images:
            raise DriftError(f"{path} holds neither a drift log (*.jsonl*) nor images")
    elif path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        images = [path]
    if images:
        table, skipped = images_table(images, bundle)
        info.update(kind="images", n_rows_read=len(images), n_skipped=len(skipped))
        if table.empty:
            raise DriftError(f"none of the {len(images)} image(s) in {path} could be decoded")
        return table, info
    table = read_drift_log(spec)
    info.update(kind="drift_log", n_rows_read=len(table))
    versions = table["model_version"].dropna().astype(str)
    other = versions[versions != bundle.version]
    if len(other):
        found = sorted(set(other))
        if len(other) == len(table):
            raise ReferenceMismatchError(
                f"every drift-log row was logged by model version(s) {', '.join(found[:5])}, "
                f"but the reference is from bundle version {bundle.version}: use that version's bundle"
            )
        log.warning(
            "ignoring %d of %d drift-log rows logged by other model version(s): %s",
            len(other), len(table), ", ".join(found[:5]),
        )
        table = table[table["model_version"].astype(str) == bundle.version].reset_index(drop=True)
        info["n_other_version"] = int(len(other))
    return table, info


# --------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------


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
    created_at = datetime.now(timezone.utc).isoformat()
    emb = sorted(c for c in reference.columns if c.startswith(EMBEDDING_PREFIX) and c in current.columns)
    numeric = [*NUMERIC_COLUMNS, *emb]
    categorical = list(CATEGORICAL_COLUMNS)
    base: dict[str, Any] = {
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
        "created_at": created_at,
    }
    short = [name for name, n in (("current", len(current)), ("reference", len(reference))) if n < params.min_rows]
    if short:
        base.update(
            status="not_enough_data",
            message=(
                f"not enough data for a drift test: {len(current)} current and {len(reference)} reference rows, "
                f"need at least {params.min_rows} on each side (drift.min_rows); no verdict"
            ),
        )
        return base
    # p-value threshold applies while Evidently uses p-value tests; distances keep their defaults
    stattest_threshold = params.stattest_threshold if len(reference) <= PVALUE_MAX_REFERENCE_ROWS else None
    snapshot = _evidently_snapshot(reference, current, numeric, categorical, params.threshold_share,
                                   stattest_threshold)
    snap = snapshot.dict()
    columns, count = _column_results(snap)
    undecided = [c for c, r in columns.items() if r["drifted"] is None]
    if undecided or len(columns) != len(numeric) + len(categorical):
        raise DriftError(f"the Evidently report gave no verdict for column(s): {', '.join(undecided) or 'some'}")
    n_drifted = sum(1 for r in columns.values() if r["drifted"])
    share = n_drifted / len(columns)
    if count and abs(float(count.get("share", share)) - share) > 1e-9:
        log.warning("Evidently's drifted share %.3f differs from the per-column count %.3f", count["share"], share)
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
        message=(
            f"drift in {n_drifted} of {len(columns)} columns (share {share:.2f} >= {params.threshold_share}): "
            "retrain recommended" if detected else
            f"no dataset drift: {n_drifted} of {len(columns)} columns drifted (share {share:.2f} "
            f"< {params.threshold_share})"
        ),
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
    from plantml.bundle import BundleError, load_bundle

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


# --------------------------------------------------------------------------------------
# CLI (``plantml drift``)
# --------------------------------------------------------------------------------------


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``plantml drift`` arguments to a (sub)parser."""
    parser.add_argument("--bundle", required=True, help="exported bundle directory (holds reference_stats.csv)")
    parser.add_argument(
        "--current", required=True,
        help="the service's drift log: a .jsonl file, a glob, or a directory of *.jsonl*; or a folder of images",
    )
    parser.add_argument("--report", default=None, help="write the Evidently HTML report here")
    parser.add_argument("--json", dest="json_out", default=None, help="write the Evidently JSON report here")
    parser.add_argument(
        "--summary-out", default=None,
        help="write the summary here (serving exports it via PLANTML_DRIFT_SUMMARY); only conclusive results",
    )
    if not any(a.dest == "params" for a in parser._actions):
        parser.add_argument("--params", default=None, help="params.yaml (default: $PLANTML_PARAMS or the repo's)")
    if not any(a.dest == "set" for a in parser._actions):
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a parameter, e.g. --set drift.threshold_share=0.3")


def run_drift_cli(args: argparse.Namespace) -> int:
    """Run ``plantml drift``: print the JSON summary, write reports, return the exit code."""
    from plantml.config import ParamsError, load_params, parse_override

    try:
        overrides = dict(parse_override(s) for s in (getattr(args, "set", None) or []))
        params = load_params(getattr(args, "params", None), overrides).drift
        summary = analyse(
            args.bundle, args.current, params,
            report_html=getattr(args, "report", None), report_json=getattr(args, "json_out", None),
        )
    except (DriftError, ParamsError) as exc:
        summary = {
            "status": "error", "error": str(exc), "drift_detected": None, "drift_share": None,
            "retrain_recommended": False, "created_at": datetime.now(timezone.utc).isoformat(),
        }
        log.error("%s", exc)
    print(json.dumps(summary, indent=1, default=str))
    sys.stdout.flush()
    code = exit_code(summary)
    summary_out = getattr(args, "summary_out", None)
    if summary_out and code != EXIT_ERROR:
        write_summary(summary, summary_out)
    elif summary_out:
        log.warning("no verdict: %s left unchanged", summary_out)
    return code


def main(argv: Iterable[str] | None = None) -> int:
    """Stand-alone entry point (``python -m plantml.drift``), same as ``plantml drift``."""
    parser = argparse.ArgumentParser(prog="plantml drift", description=__doc__.split("\n\n")[0])
    add_drift_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_drift_cli(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
