"""Registering a bundle as a model version, idempotently, with its alias.

A version of the registered model is returned instead of a new one (and the alias
re-pointed at it) when it already carries

* this bundle's identity (tag ``bundle_sha256``, see :func:`plantml.registry.bundle_sha256`):
  the same export registered twice; or
* the same registration key (tag ``plantml.registration_key``): by default
  ``metaflow:<tags["metaflow_run_id"]>`` when that tag is given, so a retried ``export``
  step of one flow run, which writes a *new* bundle (new version string and
  ``created_at``), neither adds a version nor moves the alias. (``resume`` starts a new
  Metaflow run id, so it registers its own version, as it should.)

Registry stages are deprecated in MLflow, so only aliases are used.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from plantml.registry.bundle_model import bundle_sha256, log_bundle_model
from plantml.registry.runs import log_metrics_once
from plantml.registry.store import client_for, experiment_id, resolve_tracking_uri, setup_mlflow
from plantml.registry.values import is_number, quote

log = logging.getLogger(__name__)

#: Model-version tag that identifies the registered bundle (sha256 of its metadata.json).
BUNDLE_TAG = "bundle_sha256"
#: Model-version tag: "one registration per key" (by default the Metaflow run id), see :func:`register_bundle`.
KEY_TAG = "plantml.registration_key"


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

    The model is logged by :func:`plantml.registry.log_bundle_model`; a version already
    registered for this bundle or this key is reused (see the module docstring).

    Args:
        bundle_path: the exported bundle directory.
        model_name: registered model name.
        alias: alias moved to the version (e.g. ``champion``); empty: no alias.
        run_id: link the logged model to this existing run; otherwise a new run is started.
        tags: version tags (e.g. ``metaflow_run_id``).
        tracking_uri: overrides the default store.
        registration_key: "one registration per this key"; ``""`` turns the default off.

    Returns:
        ``{"name", "version", "alias", "run_id", "model_id", "source", "model_uri",
        "bundle_sha256", "reused"}`` (``source``: the logged model, ``models:/m-...``;
        ``bundle_sha256``: of the registered version, which after a retry is the bundle
        the first attempt registered).
    """
    uri = resolve_tracking_uri(tracking_uri)
    setup_mlflow(uri)
    client = client_for(uri)
    bundle_path = Path(bundle_path).resolve()
    digest = bundle_sha256(bundle_path)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    if registration_key is None and tags.get("metaflow_run_id"):
        registration_key = f"metaflow:{tags['metaflow_run_id']}"
    ensure_registered_model(client, model_name)
    version = _registered_before(model_name, digest, registration_key, uri)
    reused = version is not None
    if version is None:
        version = _new_version(client, bundle_path, model_name, digest, run_id, tags, registration_key, uri)
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    log.info("registered %s version %s (alias %s) from run %s", model_name, version.version, alias, version.run_id)
    return {
        "name": model_name, "version": str(version.version), "alias": alias, "run_id": version.run_id,
        "model_id": getattr(version, "model_id", None), "source": version.source,
        "model_uri": f"models:/{model_name}@{alias}" if alias else f"models:/{model_name}/{version.version}",
        "bundle_sha256": version.tags.get(BUNDLE_TAG, digest), "reused": reused,
    }


def _registered_before(model_name: str, digest: str, registration_key: str | None, uri: str) -> Any:
    """The version already registered for this bundle, or else for this key; ``None`` when there is none."""
    version = find_registered_version(model_name, digest, tracking_uri=uri)
    if version is None and registration_key:
        version = find_registered_version(model_name, tracking_uri=uri, registration_key=registration_key)
    if version is not None:
        log.info("%s version %s already registered for bundle %s / key %s: not registering it again",
                 model_name, version.version, digest[:12], registration_key)
    return version


def _new_version(client: Any, bundle_path: Path, model_name: str, digest: str, run_id: str | None,
                 tags: Mapping[str, str], registration_key: str | None, uri: str) -> Any:
    """Log the bundle as a model (on ``run_id``, or a new finished run) and create a model version of it."""
    if run_id is None:
        run_id = client.create_run(experiment_id(client), run_name=f"register-{bundle_path.name}",
                                   tags={"plantml.bundle_sha256": digest}).info.run_id
        client.set_terminated(run_id)
    info = log_bundle_model(bundle_path, run_id=run_id, tracking_uri=uri)
    # Per-domain test metrics on the model's run: the flow logs the overall ones, the bundle knows both.
    log_metrics_once(client, run_id, domain_metric_items(bundle_metrics(bundle_path)))
    version_tags = {**tags, BUNDLE_TAG: digest, **({KEY_TAG: registration_key} if registration_key else {})}
    return client.create_model_version(model_name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                       model_id=info.model_id)


def find_registered_version(model_name: str, digest: str | None = None, tracking_uri: str | None = None,
                            registration_key: str | None = None) -> Any:
    """The oldest version of ``model_name`` tagged ``bundle_sha256=digest`` (or else with that key), or ``None``.

    Args:
        model_name: registered model name.
        digest: the bundle's identity (:func:`plantml.registry.bundle_sha256`); wins over the key.
        tracking_uri: overrides the default store.
        registration_key: the ``plantml.registration_key`` tag to look for when no digest is given.
    """
    client = client_for(resolve_tracking_uri(tracking_uri))
    tag, value = (BUNDLE_TAG, digest) if digest else (KEY_TAG, registration_key)
    if not value:
        raise ValueError("give a bundle digest or a registration key")
    found = client.search_model_versions(f"name = '{quote(model_name)}' and tags.`{tag}` = '{quote(value)}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def domain_metric_items(metrics: Mapping[str, Any], prefix: str = "test_") -> dict[str, float]:
    """Flat MLflow metrics from a bundle's ``metrics``: ``test_<domain>_<metric>`` per domain, and the shortcut rate.

    e.g. ``test_field_accuracy``, ``test_field_coverage``, ``test_lab_ece``,
    ``shortcut_target_rate``. NaN values (nothing answered) are left out.

    Args:
        metrics: the bundle's ``metrics`` (``by_domain``, ``shortcut``).
        prefix: put before each per-domain name.
    """
    out: dict[str, float] = {}
    for domain, m in (metrics.get("by_domain") or {}).items():
        for key in ("accuracy", "macro_f1", "ece", "coverage", "accuracy_on_answered", "n"):
            value = m.get(key)
            if is_number(value) and value == value:
                out[f"{prefix}{domain}_{key}"] = float(value)
    shortcut = metrics.get("shortcut") or {}
    if is_number(shortcut.get("target_rate")) and shortcut["target_rate"] == shortcut["target_rate"]:
        out["shortcut_target_rate"] = float(shortcut["target_rate"])
    return out


def bundle_metrics(bundle_path: Path) -> dict[str, Any]:
    """The ``metrics`` of a bundle's ``metadata.json`` (empty when it cannot be read)."""
    try:
        return json.loads((Path(bundle_path) / "metadata.json").read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


def ensure_registered_model(client: Any, model_name: str) -> None:
    """Create the registered model unless it exists (another process may create it at the same time)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name, description="plantml leaf-disease classifier bundles")
        except MlflowException:  # created meanwhile by another process
            client.get_registered_model(model_name)
