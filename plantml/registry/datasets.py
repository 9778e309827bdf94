"""The data set of a run, recorded as an MLflow dataset input (counts per class, split and domain)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

from plantml.registry.store import client_for, resolve_tracking_uri, setup_mlflow
from plantml.registry.values import is_number, jsonable

log = logging.getLogger(__name__)


def log_dataset_input(
    run_id: str,
    summary: Mapping[str, Any],
    tracking_uri: str | None = None,
    *,
    context: str = "training",
    name: str | None = None,
) -> None:
    """Record the data set on a run with ``mlflow.log_input`` semantics (shown under the run's Datasets).

    The dataset's digest is the manifest's sha256 (cut to the 36 characters MLflow stores;
    the full hash is the input tag ``manifest_sha256``), its source is ``root``, and its
    rows are the counts: one row per class and split (and per domain where the counts go
    one level deeper, ``{class: {split: {domain: n}}}``). Keys other than
    ``manifest_sha256``, ``counts``, ``root`` and ``n_images`` are ignored here; the whole
    summary (JSON-serialisable values) is also stored as the artifact ``dataset/summary.json``.
    Logging the same data set twice on a run records it once.

    Args:
        run_id: the run (the flow's parent run).
        summary: ``{"manifest_sha256", "counts": {class: {split: n}}, "root", "n_images", ...}``.
        tracking_uri: overrides the default store.
        context: the input's ``mlflow.data.context`` tag.
        name: dataset name (default: the last part of ``root``).
    """
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = client_for(uri)
    digest = str(summary.get("manifest_sha256") or "")
    root = str(summary.get("root") or "")
    frame = counts_frame(summary.get("counts") or {})
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice and warns that the path is ambiguous,
        # and warns that integer counts cannot hold missing values: neither applies here.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        dataset = mlflow.data.from_pandas(frame, source=root or "unknown", name=name or (Path(root).name or "dataset"),
                                          digest=digest[:36] or None)
        entity = dataset._to_mlflow_entity()  # infers the schema (and warns) here
    input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    if digest:
        input_tags.append(InputTag("manifest_sha256", digest))
    if "n_images" in summary:
        input_tags.append(InputTag("n_images", str(summary["n_images"])))
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=input_tags)])
    client.log_dict(run_id, jsonable(summary), "dataset/summary.json")
    client.set_tag(run_id, "data.manifest_sha256", digest)
    log.info("logged dataset %s (%s, %d rows of counts) on run %s", dataset.name, digest[:12], len(frame), run_id)


def counts_frame(counts: Mapping[str, Any]) -> Any:
    """``{class: {split: n}}`` (or ``{class: {split: {domain: n}}}``) as a long DataFrame.

    Columns ``class``, ``split``, (``domain``,) ``n``; sorted, so equal counts give equal frames.
    """
    import pandas as pd

    rows = []
    for cls, per_split in counts.items():
        if is_number(per_split):
            rows.append({"class": cls, "split": "all", "n": int(per_split)})
            continue
        for split, value in (per_split or {}).items():
            if isinstance(value, Mapping):
                rows.extend({"class": cls, "split": split, "domain": d, "n": int(n)} for d, n in value.items())
            else:
                rows.append({"class": cls, "split": split, "n": int(value)})
    columns = ["class", "split", "domain", "n"] if any("domain" in r for r in rows) else ["class", "split", "n"]
    frame = pd.DataFrame(rows, columns=columns)
    return frame.sort_values(columns[:-1]).reset_index(drop=True) if rows else frame
