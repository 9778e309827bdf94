#!/usr/bin/env python3
"""Render a kustomization of this folder and validate it offline, without kubectl.

Usage::

    python k8s/render.py k8s/overlays/prod              # rendered YAML on stdout
    python k8s/render.py --validate k8s/overlays/*      # schema-check every overlay

``kubectl kustomize`` (kustomize v5) is the reference renderer and the one to deploy
with. This module exists because kubectl/kustomize are not on PyPI, so CI and the tests
cannot count on them; it implements exactly the kustomize features the manifests here
use — ``resources`` (files and directories), ``namespace``, ``images`` and inline or
file ``patches`` in JSON 6902 form with a kind/name target — and refuses anything else
with an error, so it never silently renders something kustomize would render
differently. ``tests/test_ops_k8s.py`` compares both renderers whenever kubectl exists.

Validation uses ``kubernetes-validate`` (bundled OpenAPI schemas, strict: unknown
fields are errors) for each Kubernetes version in :data:`K8S_VERSIONS`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

log = logging.getLogger(__name__)

#: Oldest and newest Kubernetes minor versions the manifests must be valid for. The
#: oldest is 1.30: ``lifecycle.preStop.sleep`` needs it.
K8S_VERSIONS = ("1.30.0", "1.37.0")
KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
#: Cluster-scoped kinds keep no namespace (only those we might plausibly add).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"}

Resource = dict[str, Any]


class RenderError(ValueError):
    """A kustomization uses something this renderer does not implement, or is malformed."""


def _kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise RenderError(f"{directory}: no kustomization.yaml")


def load_documents(path: Path) -> list[Resource]:
    """All non-empty YAML documents of a file."""
    with open(path, encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: a document is not a Kubernetes object (no kind/metadata)")
    return docs


def _decode_pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], where: str) -> Any:
    node = doc
    for part in parts:
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError) as exc:
                raise RenderError(f"{where}: no list index {part!r}") from exc
        elif isinstance(node, dict):
            if part not in node:
                raise RenderError(f"{where}: no key {part!r}")
            node = node[part]
        else:
            raise RenderError(f"{where}: cannot descend into a scalar at {part!r}")
    return node


def apply_json6902(doc: Resource, ops: Iterable[dict[str, Any]], where: str = "patch") -> Resource:
    """Apply RFC 6902 ``add``/``replace``/``remove``/``test`` operations to a copy of *doc*.

    Raises:
        RenderError: on an unsupported operation or a path that does not exist.
    """
    out = copy.deepcopy(doc)
    for op in ops:
        kind, path = op.get("op"), op.get("path", "")
        parts = _decode_pointer(path)
        parent = _walk(out, parts[:-1], f"{where} {path}")
        key = parts[-1]
        if kind == "test":
            if _walk(out, parts, f"{where} {path}") != op.get("value"):
                raise RenderError(f"{where}: test failed at {path}")
        elif kind in ("add", "replace"):
            value = copy.deepcopy(op["value"])
            if isinstance(parent, list):
                if key == "-" and kind == "add":
                    parent.append(value)
                else:
                    idx = int(key)
                    if kind == "add":
                        parent.insert(idx, value)
                    else:
                        _walk(out, parts, f"{where} {path}")  # must exist
                        parent[idx] = value
            elif isinstance(parent, dict):
                if kind == "replace" and key not in parent:
                    raise RenderError(f"{where}: replace of a missing key at {path}")
                parent[key] = value
            else:
                raise RenderError(f"{where}: parent of {path} is a scalar")
        elif kind == "remove":
            _walk(out, parts, f"{where} {path}")
            del parent[int(key) if isinstance(parent, list) else key]
        else:
            raise RenderError(f"{where}: unsupported op {kind!r} (add, replace, remove, test)")
    return out


def _pod_spec(res: Resource) -> dict[str, Any] | None:
    spec = res.get("spec", {})
    if res["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return spec.get("template", {}).get("spec")
    if res["kind"] == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if res["kind"] == "Pod":
        return spec
    return None


def _split_image(image: str) -> tuple[str, str]:
    """``name[:tag|@digest]`` -> (name, suffix including its separator)."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def apply_images(res: Resource, images: list[dict[str, str]]) -> None:
    """Rewrite container images the way kustomize's ``images`` field does (in place)."""
    pod = _pod_spec(res)
    if not pod:
        return
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        name, suffix = _split_image(container["image"])
        for img in images:
            if img["name"] != name:
                continue
            new_name = img.get("newName", name)
            if "digest" in img:
                suffix = "@" + img["digest"]
            elif "newTag" in img:
                suffix = ":" + str(img["newTag"])
            container["image"] = new_name + suffix


def _matches(res: Resource, target: dict[str, str]) -> bool:
    unsupported = set(target) - {"kind", "name", "group", "version"}
    if unsupported:
        raise RenderError(f"patch target fields not supported here: {sorted(unsupported)}")
    if "kind" in target and res["kind"] != target["kind"]:
        return False
    if "name" in target and res["metadata"].get("name") != target["name"]:
        return False
    return True


def render(directory: str | Path) -> list[Resource]:
    """Render the kustomization in *directory* (recursively through its bases).

    Raises:
        RenderError: on an unsupported kustomization feature or a malformed file.
    """
    directory = Path(directory)
    kfile = _kustomization_file(directory)
    with open(kfile, encoding="utf-8") as fh:
        kust = yaml.safe_load(fh) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported kustomization field(s) {sorted(unknown)}; use kubectl kustomize")
    resources: list[Resource] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        resources.extend(render(path) if path.is_dir() else load_documents(path))
    for i, patch in enumerate(kust.get("patches", [])):
        where = f"{kfile} patches[{i}]"
        if "patch" in patch:
            ops = yaml.safe_load(patch["patch"])
        elif "path" in patch:
            with open(directory / patch["path"], encoding="utf-8") as fh:
                ops = yaml.safe_load(fh)
        else:
            raise RenderError(f"{where}: needs 'patch' or 'path'")
        if not isinstance(ops, list):
            raise RenderError(f"{where}: only JSON 6902 patches (a list of ops) are supported here")
        target = patch.get("target")
        if not target:
            raise RenderError(f"{where}: a JSON 6902 patch needs a target")
        hits = [n for n, r in enumerate(resources) if _matches(r, target)]
        if not hits:
            raise RenderError(f"{where}: target {target} matches no resource")
        for n in hits:
            resources[n] = apply_json6902(resources[n], ops, where)
    for res in resources:
        apply_images(res, kust.get("images", []))
        if "namespace" in kust and res["kind"] not in CLUSTER_SCOPED:
            res["metadata"]["namespace"] = kust["namespace"]
    return resources


def validate(resources: list[Resource], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Strict schema validation of each resource against each Kubernetes version.

    Returns:
        One message per error (empty when everything is valid).
    """
    import kubernetes_validate  # light, but only needed here

    errors = []
    for version in versions:
        for res in resources:
            label = f"{res['kind']}/{res['metadata'].get('name')} (k8s {version})"
            try:
                kubernetes_validate.validate(res, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                errors.append(f"{label}: {path}: {exc.message}")
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as exc:
                errors.append(f"{label}: {exc}")
    return errors


def main(argv: list[str] | None = None) -> int:
    """CLI: print the rendered YAML, or with ``--validate`` check each kustomization."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="kustomization directories (e.g. k8s/overlays/prod)")
    parser.add_argument("--validate", action="store_true", help="schema-check instead of printing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = 0
    for d in args.dirs:
        try:
            resources = render(d)
        except (RenderError, OSError, yaml.YAMLError) as exc:
            log.error("%s: %s", d, exc)
            status = 1
            continue
        if not args.validate:
            sys.stdout.write(yaml.safe_dump_all(resources, sort_keys=False))
            continue
        errors = validate(resources)
        for e in errors:
            log.error("%s: %s", d, e)
        if errors:
            status = 1
        else:
            log.info("%s: %d resources valid for Kubernetes %s", d, len(resources), ", ".join(K8S_VERSIONS))
    return status


if __name__ == "__main__":
    sys.exit(main())
