"""Scale-out: the training flow compiles to an Argo Workflows ``WorkflowTemplate``.

``argo-workflows create --only-json`` does everything but submit: it uploads the code
package to the S3 datastore and prints the template, so no cluster is needed. The S3
datastore here is moto's S3 server on a loopback port (dummy credentials). The test
checks what a cluster would run: every step of the flow, on the configured image,
namespace, service account and secret, with each step's ``@resources``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.moto import moto_s3_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
FLOW = REPO / "flows" / "train_flow.py"
BUCKET = "plantml-ci"
SETTINGS = {
    "METAFLOW_KUBERNETES_NAMESPACE": "plantml-train",
    "METAFLOW_KUBERNETES_CONTAINER_IMAGE": "ghcr.io/plantml/plantml-train:test",
    "METAFLOW_KUBERNETES_SERVICE_ACCOUNT": "plantml-train",
    "METAFLOW_KUBERNETES_SECRETS": "plantml-train-env",
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback with one bucket; yields (endpoint, boto3 client)."""
    with moto_s3_server(tmp_path_factory.mktemp("moto"), BUCKET) as server:
        yield server


def _env(tmp: Path, endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_", "MLFLOW_"))}
    env.update(SETTINGS)
    env.update({
        "METAFLOW_HOME": str(tmp),  # no user ~/.metaflowconfig
        "METAFLOW_USER": "ci",
        "USER": env.get("USER", "ci"),
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
    })
    if endpoint:
        env["METAFLOW_S3_ENDPOINT_URL"] = endpoint
    return env


def _compile(tmp: Path, endpoint: str | None, datastore: str = "s3") -> subprocess.CompletedProcess:
    if not FLOW.exists():
        pytest.skip("flows/train_flow.py not written yet")
    pytest.importorskip("kubernetes", reason="the kubernetes package (<35) is needed by argo-workflows create")
    # cwd=tmp: Metaflow writes its local .metaflow folder into the working directory.
    return subprocess.run([sys.executable, str(FLOW), f"--datastore={datastore}", "argo-workflows", "create",
                           "--only-json"], cwd=tmp, env=_env(tmp, endpoint), capture_output=True, text=True,
                          timeout=180)


@pytest.fixture(scope="module")
def template(s3, tmp_path_factory) -> dict:
    endpoint, _ = s3
    out = _compile(tmp_path_factory.mktemp("argo"), endpoint)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout[out.stdout.index("{"):])


def _flow_decorators() -> dict[str, str]:
    """Each step of the flow and the decorator lines above it (parsed from its source)."""
    src = FLOW.read_text()
    steps = {}
    for m in re.finditer(r"((?:^[ \t]*@.*\n)+)[ \t]*def (\w+)\(self", src, flags=re.M):
        decorators, name = m.group(1), m.group(2)
        if re.search(r"^\s*@step\b", decorators, flags=re.M):
            steps[name] = decorators
    return steps


def flow_steps() -> dict[str, dict[str, float]]:
    """Step names of the flow and the ``@resources`` of each (parsed from its source)."""
    steps = {}
    for name, decorators in _flow_decorators().items():
        res = re.search(r"@resources\(([^)]*)\)", decorators)
        kwargs = dict(re.findall(r"(\w+)\s*=\s*([0-9.]+)", res.group(1))) if res else {}
        steps[name] = {k: float(v) for k, v in kwargs.items()}
    return steps


def parallel_steps() -> set[str]:
    """Steps with ``@parallel`` (a gang: Argo runs them as a JobSet, not as one pod)."""
    return {name for name, decorators in _flow_decorators().items()
            if re.search(r"^\s*@parallel\b", decorators, flags=re.M)}


def _tpl(step: str) -> str:
    """Argo template name of a step (Metaflow writes ``_`` as ``-``)."""
    return step.replace("_", "-")


def _containers(template: dict) -> dict[str, dict]:
    return {t["name"]: t for t in template["spec"]["templates"] if "container" in t}


def _jobsets(template: dict) -> dict[str, str]:
    """JobSet manifests (text: Argo expressions inside make it invalid YAML) by template name."""
    return {t["name"]: t["resource"]["manifest"] for t in template["spec"]["templates"]
            if "resource" in t and "kind: JobSet" in t["resource"].get("manifest", "")}


def _memory_mb(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(M|Mi|G|Gi)", value)
    assert m, value
    factor = {"M": 1, "Mi": 1.048576, "G": 1000, "Gi": 1073.741824}[m.group(2)]
    return float(m.group(1)) * factor


def test_flow_compiles_to_a_workflow_template(template):
    assert template["apiVersion"] == "argoproj.io/v1alpha1"
    assert template["kind"] == "WorkflowTemplate"
    assert template["metadata"]["namespace"] == SETTINGS["METAFLOW_KUBERNETES_NAMESPACE"]
    assert template["metadata"]["name"] == "plantdiseaseflow"


def test_every_step_is_a_task_on_the_configured_image_and_identity(template):
    steps = flow_steps()
    assert {"start", "prepare", "train", "evaluate", "export", "end"} <= set(steps)
    containers = _containers(template)
    pods = {_tpl(n) for n in steps} - {_tpl(n) for n in parallel_steps()}
    assert pods <= set(containers), f"steps without a pod template: {pods - set(containers)}"
    dag_tasks = {t["template"] for tpl in template["spec"]["templates"] if "dag" in tpl for t in tpl["dag"]["tasks"]}
    assert {_tpl(n) for n in steps} <= dag_tasks  # the branch steps run inside the foreach sub-DAG
    for name in sorted(pods):
        tpl = containers[name]
        c = tpl["container"]
        assert c["image"] == SETTINGS["METAFLOW_KUBERNETES_CONTAINER_IMAGE"], name
        assert tpl["serviceAccountName"] == SETTINGS["METAFLOW_KUBERNETES_SERVICE_ACCOUNT"], name
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["METAFLOW_DEFAULT_DATASTORE"] == "s3"
        assert env["METAFLOW_DATASTORE_SYSROOT_S3"] == f"s3://{BUCKET}/metaflow"
        secrets = [e["secretRef"]["name"] for e in c.get("envFrom") or [] if e.get("secretRef")]
        assert SETTINGS["METAFLOW_KUBERNETES_SECRETS"] in secrets, f"{name}: secret not mounted"


def test_resources_from_params_become_pod_requests(template):
    """Every heavy step's ``@resources`` come from params.yaml's ``resources`` section."""
    from plantml.config import load_params

    containers = _containers(template)
    declared = load_params().resources
    for name in ("prepare", "train", "evaluate", "export"):
        res = getattr(declared, name)
        assert "@resources(**RESOURCES." + name in FLOW.read_text(), f"{name} does not declare @resources"
        requests = containers[_tpl(name)]["container"]["resources"]["requests"]
        assert float(requests["cpu"]) == res.cpu, name
        assert _memory_mb(requests["memory"]) == pytest.approx(res.memory), name
        assert _memory_mb(requests["ephemeral-storage"]) == pytest.approx(res.disk), name


def test_multi_node_training_is_a_jobset_gang_sized_at_run_time(template):
    """``train_node`` (``@parallel``) compiles to a JobSet: node 0 (control) plus N - 1 workers, N read at run time.

    Each node is a pod with the train step's requests from params.yaml, on the configured
    image and identity, and gets the rendezvous (``MF_MASTER_ADDR``/``MF_MASTER_PORT``).
    """
    from plantml.config import load_params

    assert parallel_steps() == {"train_node"}
    assert "@resources(**RESOURCES.train" in _flow_decorators()["train_node"]
    jobsets = _jobsets(template)
    assert set(jobsets) == {"train-node"}
    manifest = jobsets["train-node"]
    assert "- name: control" in manifest and "- name: worker" in manifest
    assert re.search(r"name: worker\n\s+replicas: \{\{=asInt\(inputs\.parameters\.workerCount\)\}\}", manifest)
    res = load_params().resources.train
    for role in manifest.split("- name: worker"):  # control, then worker
        assert f"image: {SETTINGS['METAFLOW_KUBERNETES_CONTAINER_IMAGE']}" in role
        assert f"serviceAccountName: {SETTINGS['METAFLOW_KUBERNETES_SERVICE_ACCOUNT']}" in role
        assert f"name: {SETTINGS['METAFLOW_KUBERNETES_SECRETS']}" in role
        assert f"cpu: '{float(res.cpu)}'" in role and f"memory: {float(res.memory)}M" in role
        assert "name: MF_MASTER_ADDR" in role and "name: MF_MASTER_PORT" in role
    # The gang's size comes from the fan-out step at run time (train.distributed.nodes), not from the template.
    fanout = next(t for t in template["spec"]["templates"] if t["name"] == "prepare-foreach-model-names")
    when = {t["name"]: t.get("when", "") for t in fanout["dag"]["tasks"]}
    assert "switch-step" in when["train-fanout-foreach-parallel"]  # only runs when branch chose the gang


def test_code_package_is_in_the_s3_datastore(template, s3):
    _, client = s3
    env = {e["name"]: e.get("value") for e in _containers(template)["start"]["container"]["env"]}
    url = env["METAFLOW_CODE_URL"]
    bucket, key = url.removeprefix("s3://").split("/", 1)
    assert bucket == BUCKET
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    names = set(tarfile.open(fileobj=io.BytesIO(body)).getnames())
    assert {"train_flow.py", "cards.py"} <= names


def test_a_local_datastore_is_refused_with_a_clear_message(tmp_path):
    out = _compile(tmp_path, None, datastore="local")
    assert out.returncode != 0
    assert "requires --datastore=s3" in out.stdout + out.stderr
