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
registered again.

mlflow is imported inside functions: it is heavy, and serving only needs it when told to
fetch from the registry.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

from plantml.bundle import METADATA_FILE, BundleError, load_bundle, sha256_file

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT_NAME = "plantml"
#: Name of the pyfunc artifact that holds the bundle directory.
BUNDLE_ARTIFACT = "bundle"
#: Model-version tag that identifies the registered bundle (sha256 of its metadata.json).
BUNDLE_TAG = "bundle_sha256"
#: Model-version tag: "one registration per key" (by default the Metaflow run id), see :func:`register_bundle`.
KEY_TAG = "plantml.registration_key"
#: Child-run tag naming the branch (architecture); with ``mlflow.parentRunId`` it identifies a child run.
BRANCH_TAG = "plantml.branch"
PARENT_TAG = "mlflow.parentRunId"


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


def bundle_sha256(bundle_path: str | os.PathLike[str]) -> str:
    """The bundle's identity: sha256 of its ``metadata.json``.

    The metadata lists the sha256 of every model file and the bundle's lineage (run ids,
    ``created_at``), so two bundles share this digest only if they are the same export.
    """
    return sha256_file(Path(bundle_path) / METADATA_FILE)


def register_bundle(
    bundle_path: str | os.PathLike[str],
    *,
    model_name: str,
    alias: str = "champion",
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    registration_key: str | None = None,
) -> dict[str, Any]:
    """Log the bundle as an MLflow ``pyfunc`` model and register it as a model version. Idempotent.

    The logged model (MLflow 3 ``LoggedModel``, linked to ``run_id``) has a signature, an
    input example, the ``python_function`` flavor (:class:`plantml.mlflow_model.BundlePyfunc`:
    the bundle with its preprocessing, calibration and abstention, on ONNX Runtime, no torch;
    the ``plantml`` and ``edge`` packages travel as ``code_paths``) and an ``onnx`` flavor that
    points at the bundle's FP32 ONNX graph (``mlflow.onnx.load_model``). The whole bundle is
    the model's ``bundle`` artifact, so :func:`fetch_bundle` still returns a bundle directory.

    Registering is idempotent. A version of ``model_name`` is returned instead of a new one
    (and the alias re-pointed at it) when it already carries

    * this bundle's identity (tag ``bundle_sha256``, see :func:`bundle_sha256`): the same
      export registered twice; or
    * the same ``registration_key`` (tag ``plantml.registration_key``): by default
      ``metaflow:<tags["metaflow_run_id"]>`` when that tag is given, so a retried ``export``
      step of one flow run, which writes a *new* bundle (new version string and
      ``created_at``), neither adds a version nor moves the alias. (``resume`` starts a new
      Metaflow run id, so it registers its own version, as it should.)

    Args:
        bundle_path: the exported bundle directory.
        model_name: registered model name.
        alias: alias moved to the version (e.g. ``champion``); empty: no alias.
        run_id: link the logged model to this existing run; otherwise a new run is started.
        tags: version tags (e.g. ``metaflow_run_id``).
        tracking_uri: overrides the default store.
        registration_key: "one registration per this key" (see above); ``""`` turns the
            default off.

    Returns:
        ``{"name", "version", "alias", "run_id", "model_id", "source", "model_uri",
        "bundle_sha256", "reused"}`` (``source``: the logged model, ``models:/m-...``;
        ``bundle_sha256``: of the registered version, which after a retry is the bundle
        the first attempt registered).
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = _client(uri)
    bundle_path = Path(bundle_path).resolve()
    digest = bundle_sha256(bundle_path)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    if registration_key is None and tags.get("metaflow_run_id"):
        registration_key = f"metaflow:{tags['metaflow_run_id']}"
    _ensure_registered_model(client, model_name)
    version = find_registered_version(model_name, digest, tracking_uri=uri)
    if version is None and registration_key:
        version = find_registered_version(model_name, tracking_uri=uri, registration_key=registration_key)
    reused = version is not None
    if version is None:
        if run_id is None:
            run_id = client.create_run(_experiment_id(client), run_name=f"register-{bundle_path.name}",
                                       tags={"plantml.bundle_sha256": digest}).info.run_id
            client.set_terminated(run_id)
        info = log_bundle_model(bundle_path, run_id=run_id, tracking_uri=uri)
        # Per-domain test metrics on the model's run: the flow logs the overall ones, the bundle knows both.
        _log_metrics_once(client, run_id, domain_metric_items(_bundle_metrics(bundle_path)))
        version_tags = {**tags, BUNDLE_TAG: digest, **({KEY_TAG: registration_key} if registration_key else {})}
        version = client.create_model_version(model_name, source=info.model_uri, run_id=run_id,
                                              tags=version_tags, model_id=info.model_id)
    else:
        log.info("%s version %s already registered for bundle %s / key %s: not registering it again",
                 model_name, version.version, digest[:12], registration_key)
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (alias %s) from run %s", model_name, version.version, alias, version.run_id)
    return {
        "name": model_name, "version": str(version.version), "alias": alias, "run_id": version.run_id,
        "model_id": getattr(version, "model_id", None), "source": version.source,
        "model_uri": f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version.version}",
        "bundle_sha256": version.tags.get(BUNDLE_TAG, digest), "reused": reused,
    }


def find_registered_version(model_name: str, digest: str | None = None, tracking_uri: str | None = None,
                            registration_key: str | None = None) -> Any:
    """The oldest version of ``model_name`` tagged ``bundle_sha256=digest`` (or else with that key), or ``None``."""
    client = _client(resolve_tracking_uri(tracking_uri))
    tag, value = (BUNDLE_TAG, digest) if digest else (KEY_TAG, registration_key)
    if not value:
        raise ValueError("give a bundle digest or a registration key")
    found = client.search_model_versions(f"name = '{_quote(model_name)}' and tags.`{tag}` = '{_quote(value)}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def log_bundle_model(bundle_path: str | os.PathLike[str], *, run_id: str | None, tracking_uri: str | None = None,
                     name: str = "model") -> Any:
    """Log a bundle as an MLflow model (``python_function`` + ``onnx`` flavors); no registration.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri`` is ``models:/m-...``, ``model_id``).
    """
    import mlflow
    from mlflow.models import Model

    # Imported here, not at the top: plantml.mlflow_model imports mlflow (heavy) at import
    # time, and edge is needed only to locate the package that travels with the model.
    import edge
    import plantml
    from plantml import mlflow_model

    setup_mlflow(tracking_uri)
    bundle_path = Path(bundle_path).resolve()
    bundle = load_bundle(bundle_path)
    onnx_path = bundle.model_path("onnxruntime", "fp32") if ("onnxruntime", "fp32") in bundle.available() else None
    metadata = {"plantml_bundle": {"name": bundle.name, "version": bundle.version,
                                   "architecture": bundle.metadata.get("architecture"),
                                   "bundle_sha256": bundle_sha256(bundle_path)},
                "classes": list(bundle.classes), "input_column": mlflow_model.INPUT_COLUMN,
                "input_encoding": "binary (raw bytes in Python; base64 in JSON over HTTP)"}
    return Model.log(
        artifact_path=None, name=name, flavor=_PyfuncWithOnnxFlavor, flavor_name="python_function", run_id=run_id,
        python_model=mlflow_model.BundlePyfunc(),
        artifacts={BUNDLE_ARTIFACT: str(bundle_path)},
        code_paths=[str(Path(plantml.__file__).parent), str(Path(edge.__file__).parent)],
        signature=mlflow_model.model_signature(), input_example=mlflow_model.input_example(bundle),
        pip_requirements=mlflow_model.pip_requirements(), metadata=metadata,
        onnx_relpath=str(onnx_path.relative_to(bundle_path)) if onnx_path else None,
        tags={"bundle_name": bundle.name, "bundle_version": bundle.version, "mlflow_version": mlflow.__version__},
    )


class _PyfuncWithOnnxFlavor:
    """A flavor for ``mlflow.models.Model.log``: the pyfunc model, plus an ``onnx`` flavor.

    The ``onnx`` flavor's data is the bundle's own FP32 ONNX file inside the pyfunc's
    ``bundle`` artifact (no second copy): ``mlflow.onnx.load_model(uri)`` returns the raw graph.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: Any, onnx_relpath: str | None = None, **kwargs: Any) -> None:
        import mlflow.pyfunc
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.pyfunc.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        if onnx_relpath is None:
            log.warning("the bundle has no ONNX FP32 file: the model gets no onnx flavor")
            return
        from importlib.metadata import PackageNotFoundError, version

        artifact = mlflow_model.flavors["python_function"]["artifacts"][BUNDLE_ARTIFACT]["path"]
        data = (Path(artifact) / onnx_relpath).as_posix()
        try:
            onnx_version = version("onnx")
        except PackageNotFoundError:
            onnx_version = None
        mlflow_model.add_flavor("onnx", onnx_version=onnx_version, data=data, providers=["CPUExecutionProvider"],
                                onnx_session_options=None, code=None)
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def fetch_bundle(model_uri: str, dst_dir: str | os.PathLike[str], tracking_uri: str | None = None) -> Path:
    """Download a registered bundle (``models:/NAME@alias`` or ``models:/NAME/3``).

    Works for pyfunc versions (the bundle is the model's ``bundle`` artifact) and for older
    versions registered as a bare bundle directory.

    Returns:
        The local bundle directory (verify it with :func:`plantml.bundle.load_bundle`).

    Raises:
        BundleError: the download holds no bundle.
    """
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=uri))
    return bundle_dir_in(local)


def bundle_dir_in(model_dir: str | os.PathLike[str]) -> Path:
    """The bundle directory inside a downloaded MLflow model (or the directory itself if it is one).

    Raises:
        BundleError: neither a bundle nor an MLflow model with a ``bundle`` artifact.
    """
    import yaml

    root = Path(model_dir)
    if (root / METADATA_FILE).is_file():
        return root
    mlmodel = root / "MLmodel"
    if mlmodel.is_file():
        flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
        artifact = flavor.get("artifacts", {}).get(BUNDLE_ARTIFACT, {})
        if artifact.get("path") and (root / artifact["path"] / METADATA_FILE).is_file():
            return root / artifact["path"]
    raise BundleError(f"{root} holds neither a bundle nor an MLflow model with a bundle artifact")


def start_parent_run(params: Mapping[str, Any], tags: Mapping[str, str], tracking_uri: str | None = None,
                     run_name: str | None = None) -> str:
    """Create the flow-level MLflow run (children are nested under it); returns its id."""
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_name=run_name, tags={k: str(v) for k, v in tags.items()}) as run:
        mlflow.log_params(_flatten(params))
        return run.info.run_id


def find_branch_run(parent_run_id: str, name: str, tracking_uri: str | None = None) -> str | None:
    """The child run of ``parent_run_id`` for branch ``name`` (the oldest, if several), or ``None``."""
    return _find_branch_run(_client(resolve_tracking_uri(tracking_uri)), parent_run_id, name)


def _find_branch_run(client: Any, parent_run_id: str, name: str) -> str | None:
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}' and tags.`{BRANCH_TAG}` = '{_quote(name)}'",
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

    Returns:
        The child run id.
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = _client(uri)
    run_id = _get_or_create_branch_run(client, parent_run_id, name, tags or {})
    if client.get_run(run_id).info.status != "RUNNING":
        client.update_run(run_id, status="RUNNING")
    _log_params_once(client, run_id, params or {})
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

        client = _client(resolve_tracking_uri(tracking_uri))
        now = _now_ms()
        metrics = [Metric(f"epoch_{k}", float(v), now, int(step)) for k, v in row.items()
                   if k != "epoch" and _is_number(v)]
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

    Returns:
        The child run id.
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = _client(uri)
    tags = {k: str(v) for k, v in tags.items()}
    if run_id is None:
        run_id = _get_or_create_branch_run(client, parent_run_id, name, tags)
    else:
        client.set_tag(run_id, BRANCH_TAG, name)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    _log_params_once(client, run_id, params)
    _log_history_once(client, run_id, history)
    _log_metrics_once(client, run_id, {k: v for k, v in metrics.items() if _is_number(v)})
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="plots")
    if checkpoint_path:
        client.log_artifact(run_id, str(checkpoint_path), artifact_path="model")
    client.set_terminated(run_id, "FINISHED")
    return run_id


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
    client = _client(uri)
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
    client.log_dict(run_id, _jsonable(summary), "dataset/summary.json")
    client.set_tag(run_id, "data.manifest_sha256", digest)
    log.info("logged dataset %s (%s, %d rows of counts) on run %s", dataset.name, digest[:12], len(frame), run_id)


def counts_frame(counts: Mapping[str, Any]) -> Any:
    """``{class: {split: n}}`` (or ``{class: {split: {domain: n}}}``) as a long DataFrame.

    Columns ``class``, ``split``, (``domain``,) ``n``; sorted, so equal counts give equal frames.
    """
    import pandas as pd

    rows = []
    for cls, per_split in counts.items():
        if _is_number(per_split):
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


def finish_parent_run(parent_run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str],
                      tracking_uri: str | None = None) -> None:
    """Record the flow's outcome on its parent run."""
    import mlflow

    setup_mlflow(tracking_uri)
    with mlflow.start_run(run_id=parent_run_id):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def domain_metric_items(metrics: Mapping[str, Any], prefix: str = "test_") -> dict[str, float]:
    """Flat MLflow metrics from a bundle's ``metrics``: ``test_<domain>_<metric>`` per domain, and the shortcut rate.

    e.g. ``test_field_accuracy``, ``test_field_coverage``, ``test_lab_ece``,
    ``shortcut_target_rate``. NaN values (nothing answered) are left out.
    """
    out: dict[str, float] = {}
    for domain, m in (metrics.get("by_domain") or {}).items():
        for key in ("accuracy", "macro_f1", "ece", "coverage", "accuracy_on_answered", "n"):
            value = m.get(key)
            if _is_number(value) and value == value:
                out[f"{prefix}{domain}_{key}"] = float(value)
    shortcut = metrics.get("shortcut") or {}
    if _is_number(shortcut.get("target_rate")) and shortcut["target_rate"] == shortcut["target_rate"]:
        out["shortcut_target_rate"] = float(shortcut["target_rate"])
    return out


def _bundle_metrics(bundle_path: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(bundle_path) / "metadata.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = str(value)[:500]
    return out


def _client(uri: str) -> Any:
    """An ``MlflowClient`` for one store (tracking and registry), cached per URI."""
    if uri not in _CLIENTS:
        from mlflow import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]


_CLIENTS: dict[str, Any] = {}


def _experiment_id(client: Any, experiment: str = EXPERIMENT_NAME) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RuntimeError(f"experiment {experiment!r} does not exist (call setup_mlflow first)")
    return exp.experiment_id


def _ensure_registered_model(client: Any, model_name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name, description="plantml leaf-disease classifier bundles")
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(model_name)


def _get_or_create_branch_run(client: Any, parent_run_id: str, name: str, tags: Mapping[str, str]) -> str:
    existing = _find_branch_run(client, parent_run_id, name)
    if existing is not None:
        log.info("reusing MLflow child run %s for %s", existing, name)
        return existing
    parent = client.get_run(parent_run_id)
    run = client.create_run(parent.info.experiment_id, run_name=name,
                            tags={**{k: str(v) for k, v in tags.items()}, PARENT_TAG: parent_run_id, BRANCH_TAG: name})
    return run.info.run_id


def _log_params_once(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Log the params the run lacks; a param already set to another value is kept (MLflow params are immutable)."""
    from mlflow.entities import Param

    have = client.get_run(run_id).data.params
    flat = _flatten(params)
    changed = sorted(k for k, v in flat.items() if k in have and have[k] != v)
    if changed:
        log.warning("run %s keeps its earlier value of param(s) %s", run_id, ", ".join(changed))
    new = [Param(k, v) for k, v in flat.items() if k not in have]
    for start in range(0, len(new), 100):  # MLflow's per-batch limit on params
        client.log_batch(run_id, params=new[start:start + 100])


def _log_history_once(client: Any, run_id: str, history: list[Mapping[str, Any]]) -> None:
    """Per-epoch rows as ``epoch_<key>`` at step ``epoch``, skipping (key, step) pairs already logged."""
    from mlflow.entities import Metric

    now = _now_ms()
    logged: dict[str, set[int]] = {}
    metrics = []
    for row in history:
        step = int(row["epoch"])
        for key, value in row.items():
            if key == "epoch" or not _is_number(value):
                continue
            name = f"epoch_{key}"
            if name not in logged:
                logged[name] = {m.step for m in client.get_metric_history(run_id, name)}
            if step not in logged[name]:
                metrics.append(Metric(name, float(value), now, step))
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def _log_metrics_once(client: Any, run_id: str, metrics: Mapping[str, Any]) -> None:
    """Summary metrics at step 0, skipping those whose latest value is already the same."""
    from mlflow.entities import Metric

    have = client.get_run(run_id).data.metrics
    now = _now_ms()
    new = [Metric(k, float(v), now, 0) for k, v in metrics.items() if have.get(k) != float(v)]
    if new:
        client.log_batch(run_id, metrics=new)


def _is_number(value: Any) -> bool:
    """A Python int/float (not bool) or a numpy scalar."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (hasattr(value, "dtype") and getattr(value, "shape", None) == ())


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _quote(value: str) -> str:
    """Escape a value for an MLflow search filter string literal."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _jsonable(tree: Any) -> Any:
    """``tree`` with values JSON cannot hold turned into strings."""
    import json

    return json.loads(json.dumps(tree, default=str))
