"""The whole flow against S3 only: data, datastore and store in a local S3 server; steps share nothing else.

One run of ``PlantDiseaseFlow --datastore s3 run --data-dir s3://…`` on tiny data, with
a test-only fault injected at the start of training epoch 3 (``PLANTML_FAIL_AT_EPOCH``):
the branch that hits it fails once, Metaflow's ``@retry`` runs it again, and the retry
continues from the epoch-2 checkpoint in the store. Then, for each step boundary
(prepare|train, train|evaluate, evaluate|export), every local output folder is deleted
and ``resume <step>`` must finish from the datastore and store alone.

The S3 server is moto's, on a loopback port (dummy credentials).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.support.moto import moto_s3_server

pytestmark = pytest.mark.integration

BUCKET = "plantml-flow"
FLOW = REPO_ROOT / "flows" / "train_flow.py"

CHECK = r"""
import json, sys
from metaflow import Flow, namespace
namespace(None)
run = Flow("PlantDiseaseFlow")[sys.argv[1]]
tasks = list(run["train"].tasks())
out = {"successful": run.successful, "store_root": run["prepare"].task.data.shards["root"],
       "attempts": {t.data.model_name: t.current_attempt for t in tasks},
       "resumed_from": {t.data.model_name: t.data.train_result["resumed_from_epoch"] for t in tasks},
       "epochs": {t.data.model_name: [h["epoch"] for h in t.data.train_result["history"]] for t in tasks},
       "detector": run["evaluate"].task.data.report["ood"]["detector_uri"]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on loopback with one bucket; yields (endpoint, boto3 client)."""
    with moto_s3_server(tmp_path_factory.mktemp("moto-flow"), BUCKET) as server:
        yield server


def _env(tmp: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("METAFLOW_", "AWS_", "MLFLOW_", "PLANTML_"))}
    env.update({
        "METAFLOW_HOME": str(tmp), "METAFLOW_USER": "s3flow", "USER": env.get("USER", "ci"),
        "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
        "METAFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PYTHONWARNINGS": "ignore",
        "PLANTML_FAIL_AT_EPOCH": "3", "PLANTML_FAIL_MARKER": str(tmp / "failed-once"),
    })
    return env


def _flow(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FLOW), "--datastore=s3", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check(run_id: str, env: dict[str, str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHECK, run_id], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_flow_on_s3_only_retries_from_checkpoint_and_resumes_at_every_boundary(s3_server, tiny_dataset, tmp_path):
    endpoint, client = s3_server
    for f in sorted(tiny_dataset.rglob("*.jpg")):
        client.upload_file(str(f), BUCKET, f"raw/{f.relative_to(tiny_dataset).as_posix()}")
    work = tmp_path / "work"
    work.mkdir()
    local_outputs = [tmp_path / d for d in ("prepared", "train", "eval", "bundles")]
    overrides = " ".join([
        "train.epochs=3", "train.patience=5", "train.image_size=32", "train.batch_size=8",
        "train.models.cnn.arch=tiny_cnn", "train.models.cnn.lr=0.03", "train.models.vit.arch=tiny_cnn",
        "train.models.vit.lr=0.02", "robustness.severities=[1]",
        "evaluate.min_macro_f1=0.0", "evaluate.min_accuracy=0.0", "robustness.max_images=12",
        "export.int8.enabled=false", "data.samples_per_shard=8",
        f"data.prepared_dir={local_outputs[0]}", f"train.out_dir={local_outputs[1]}",
        f"evaluate.out_dir={local_outputs[2]}", f"export.out_dir={local_outputs[3]}",
        "registry.model_name=s3flow-model",
    ])
    env = _env(tmp_path, endpoint)
    first = _flow(["run", "--data-dir", f"s3://{BUCKET}/raw", "--set", overrides,
                   "--run-id-file", str(tmp_path / "run1")], env, work)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-4000:]
    run1 = (tmp_path / "run1").read_text().strip()
    info = _check(run1, env, work)
    assert info["successful"]
    assert info["store_root"].startswith(f"s3://{BUCKET}/metaflow/.plantml/PlantDiseaseFlow/{run1}/")
    assert info["detector"].startswith(f"s3://{BUCKET}/metaflow/.plantml/")
    # The injected failure hit at least one branch once; its retry continued after epoch 2.
    retried = [m for m, attempt in info["attempts"].items() if attempt == 1]
    assert retried, info
    for m in retried:
        assert info["resumed_from"][m] == 2 and info["epochs"][m] == [1, 2, 3]
    assert "injected failure at the start of epoch 3" in first.stdout + first.stderr

    # Steps share nothing but the datastore: wipe every local output, resume at each boundary.
    for i, step in enumerate(("train", "evaluate", "export")):
        for d in local_outputs:
            shutil.rmtree(d, ignore_errors=True)
        resumed = _flow(["resume", step, "--origin-run-id", run1, "--run-id-file", str(tmp_path / f"r{i}")],
                        env, work)
        assert resumed.returncode == 0, f"resume {step}:\n" + resumed.stdout[-3000:] + resumed.stderr[-4000:]
        assert "bundle:" in resumed.stdout + resumed.stderr
        assert _check((tmp_path / f"r{i}").read_text().strip(), env, work)["successful"]
    # Metaflow keeps only its local *metadata* in .metaflow here (no metadata service); no data landed locally.
    assert not list(work.rglob(".plantml")) and not list(work.rglob("*.tar"))
