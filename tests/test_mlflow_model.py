"""The bundle as an MLflow pyfunc model: load, predict, serve with ``mlflow models serve``.

Everything runs against a real sqlite MLflow store in a temporary folder. The labels,
confidences and abstentions must equal what the edge runtime and the service's predictor
give for the same images (one inference path, three adapters).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from tests.conftest import SHARED_SAMPLE, TINY_CLASSES, jpeg_bytes, make_leaf_image, noise_image
from tests.support.real_sample import held_out_photos, real_sample_bundle

pytest.importorskip("mlflow")
pytest.importorskip("onnxruntime")

MODEL_NAME = "plantml-pyfunc-test"


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_images() -> list[bytes]:
    """Leaves of every tiny class, pixel noise (OOD) and, where the shared sample exists, real photos."""
    images = [jpeg_bytes(make_leaf_image(rgb, seed=123 + i)) for i, rgb in enumerate(TINY_CLASSES.values())]
    images += [_png(noise_image(seed=5))]
    if SHARED_SAMPLE.is_dir():
        photos = sorted(p for p in SHARED_SAMPLE.rglob("*.jpg"))[::97][:20]
        images += [p.read_bytes() for p in photos]
    return images


test_images.__test__ = False  # a helper, not a test


def register(bundle: Path, tmp: Path) -> dict:
    """``bundle`` registered as a pyfunc model (alias champion) in a fresh sqlite store under ``tmp``."""
    from plantml.registry import register_bundle, start_parent_run

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        parent = start_parent_run({"train": {"epochs": 1}}, {"metaflow_run_id": "7"}, tracking_uri=uri)
        info = register_bundle(bundle, model_name=MODEL_NAME, run_id=parent, tracking_uri=uri,
                               tags={"metaflow_run_id": "7"})
    finally:
        os.chdir(cwd)
    return {"uri": uri, "tmp": tmp, "info": info, "bundle": bundle}


@pytest.fixture(scope="module")
def registered(scored_bundle, tmp_path_factory):
    """The scored tiny bundle registered as a pyfunc model (alias champion) in a fresh sqlite store."""
    return register(scored_bundle, tmp_path_factory.mktemp("mlflow_pyfunc"))


def expected_rows(bundle: Path, images: list[bytes]) -> tuple[list[dict], list]:
    """What the edge runtime and the service's predictor answer for the same images."""
    from edge.runtime import EdgeModel
    from plantml.bundle import load_bundle
    from plantml.preprocess import decode_image
    from serving.predictor import Predictor

    decoded = [decode_image(b) for b in images]
    edge_rows = EdgeModel(bundle, runtime="onnxruntime").predict_images(decoded)
    served = Predictor(load_bundle(bundle), runtime="onnxruntime").predict_images(decoded)
    classes = load_bundle(bundle).classes
    serving_rows = [(classes[int(np.argmax(p))], bool(a)) for p, a in zip(served.probabilities, served.abstained)]
    return edge_rows, serving_rows


def _assert_same(answer, edge_rows, serving_rows) -> None:
    assert [r["label"] for r in answer] == [r["label"] for r in edge_rows]
    assert [(r["label"], bool(r["abstained"])) for r in answer] == serving_rows
    assert [r["abstain_reason"] for r in answer] == [r["abstain_reason"] for r in edge_rows]
    np.testing.assert_allclose([r["confidence"] for r in answer], [r["confidence"] for r in edge_rows], atol=1e-5)


def test_pyfunc_load_and_predict(registered):
    """``pyfunc.load_model(models:/NAME@champion).predict`` == edge == serving; bad bytes give a row, not a crash."""
    import mlflow
    import mlflow.onnx
    import pandas as pd

    from plantml.bundle import load_bundle

    mlflow.set_tracking_uri(registered["uri"])
    mlflow.set_registry_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    meta = model.metadata
    assert meta.signature is not None and meta.signature.inputs.input_names() == ["image"]
    assert "probabilities" in meta.signature.outputs.input_names()
    assert meta.saved_input_example_info is not None
    classes = load_bundle(registered["bundle"]).classes
    assert meta.metadata["classes"] == classes

    images = test_images()
    out = model.predict(pd.DataFrame({"image": images + [b"not an image"]}))
    rows = out.to_dict("records")
    edge_rows, serving_rows = expected_rows(registered["bundle"], images)
    _assert_same(rows[:-1], edge_rows, serving_rows)
    # the tiny model knows its classes; the noise image is out of distribution
    assert [r["label"] for r in rows[:3]] == list(TINY_CLASSES)
    assert rows[3]["abstained"] and rows[3]["abstain_reason"] == "out_of_distribution"
    assert rows[0]["ood_score"] is not None
    np.testing.assert_allclose([sum(r["probabilities"]) for r in rows[:-1]], 1.0, atol=1e-5)
    assert rows[-1]["abstained"] and rows[-1]["abstain_reason"] == "invalid_image" and rows[-1]["label"] is None

    graph = mlflow.onnx.load_model(f"models:/{MODEL_NAME}@champion")
    assert [o.name for o in graph.graph.output] == ["logits", "ood_score"]


def test_registered_version_and_fetch(registered, tmp_path):
    """The alias points at the pyfunc version (MLmodel, flavors, requirements); fetch_bundle still gets a bundle."""
    from mlflow import MlflowClient

    from plantml.bundle import load_bundle
    from plantml.registry import fetch_bundle

    client = MlflowClient(tracking_uri=registered["uri"], registry_uri=registered["uri"])
    mv = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(mv.version) == registered["info"]["version"] and mv.source.startswith("models:/m-")
    assert mv.tags["bundle_sha256"] == registered["info"]["bundle_sha256"]
    local = fetch_bundle(f"models:/{MODEL_NAME}@champion", tmp_path / "dl", tracking_uri=registered["uri"])
    assert load_bundle(local).metadata == load_bundle(registered["bundle"]).metadata
    model_dir = local.parent.parent
    mlmodel = (model_dir / "MLmodel").read_text()
    assert "python_function" in mlmodel and "onnx:" in mlmodel
    reqs = (model_dir / "requirements.txt").read_text()
    assert "onnxruntime==" in reqs and "pillow==" in reqs and "torch" not in reqs
    assert (model_dir / "code" / "plantml" / "mlflow_model.py").is_file()
    assert (model_dir / "code" / "edge" / "runtime.py").is_file()


def test_pyfunc_never_imports_torch(registered):
    """Load and predict in a fresh interpreter where ``import torch`` fails."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import base64, json, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({registered['uri']!r}); mlflow.set_registry_uri({registered['uri']!r})\n"
        f"m = mlflow.pyfunc.load_model('models:/{MODEL_NAME}@champion')\n"
        "img = base64.b64decode(sys.argv[1])\n"
        "print(json.dumps(m.predict(pd.DataFrame({'image': [img]}))['label'].tolist()))\n"
    )
    img = base64.b64encode(jpeg_bytes(make_leaf_image(TINY_CLASSES["Apple___scab"], seed=3))).decode()
    proc = subprocess.run([sys.executable, "-c", code, img], capture_output=True, text=True, timeout=120,
                          cwd=registered["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["Apple___scab"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_models_serve(registered: dict, log_path: Path) -> Iterator[str]:
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` as a real process; yields its URL."""
    import requests

    port = _free_port()
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "MLFLOW_REGISTRY_URI": registered["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [str(mlflow_cli), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=registered["tmp"], start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(5)


@pytest.fixture
def served(registered, tmp_path):
    """The tiny bundle's pyfunc model behind ``mlflow models serve``."""
    with mlflow_models_serve(registered, tmp_path / "serve.log") as url:
        yield url


def _invocations(url: str, images: list[bytes]) -> list[dict]:
    """POST ``images`` as base64 in MLflow's ``dataframe_split`` payload; the ``predictions`` rows."""
    import requests

    payload_b64 = [base64.b64encode(b).decode() for b in images]
    payload = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in payload_b64]}}
    reply = requests.post(f"{url}/invocations", json=payload, timeout=120)
    assert reply.status_code == 200, reply.text[:2000]
    answer = reply.json()["predictions"]
    assert len(answer) == len(images)
    return answer


@pytest.mark.integration
def test_mlflow_models_serve_invocations(served, registered):
    """POST base64 images to /invocations: the answers equal the edge runtime's and the service's."""
    import requests

    images = test_images()
    payload_b64 = [base64.b64encode(b).decode() for b in images]
    answer = _invocations(served, images)
    edge_rows, serving_rows = expected_rows(registered["bundle"], images)
    _assert_same(answer, edge_rows, serving_rows)
    assert [r["label"] for r in answer[:3]] == list(TINY_CLASSES)
    assert answer[3]["abstained"] and answer[3]["abstain_reason"] == "out_of_distribution"
    # the tensor-style payload (MLflow passes its base64 text through as bytes)
    reply = requests.post(f"{served}/invocations", json={"inputs": {"image": payload_b64[:4]}}, timeout=60)
    assert reply.status_code == 200, reply.text[:2000]
    assert [r["label"] for r in reply.json()["predictions"]] == [r["label"] for r in edge_rows[:4]]


#: Top-1 floor for the 20 held-out real photos through ``mlflow models serve`` (the CI bundle of
#: ``make real-sample-bundle``; the measured value and its command are in docs/mlflow.md).
REAL_PHOTOS_TOP1_FLOOR = 16


@pytest.mark.integration
def test_mlflow_models_serve_real_photos(tmp_path):
    """The real-sample bundle behind ``mlflow models serve``: 20 held-out photos of 20 classes.

    The answers equal the edge runtime's and the service's for the same bytes, and the top-1
    label is the photo's class for at least ``REAL_PHOTOS_TOP1_FLOOR`` of them.
    """
    sample, bundle = real_sample_bundle()
    photos = held_out_photos(sample, bundle, 20)
    assert len({cls for _, cls in photos}) == 20
    images = [path.read_bytes() for path, _ in photos]
    with mlflow_models_serve(register(bundle, tmp_path), tmp_path / "serve.log") as url:
        answer = _invocations(url, images)
    edge_rows, serving_rows = expected_rows(bundle, images)
    _assert_same(answer, edge_rows, serving_rows)
    correct = sum(row["label"] == cls for row, (_, cls) in zip(answer, photos))
    answered = [row["label"] == cls for row, (_, cls) in zip(answer, photos) if not row["abstained"]]
    print(f"measured: top-1 correct {correct}/20 held-out photos; answered {len(answered)}, "
          f"of which correct {sum(answered)}")
    assert correct >= REAL_PHOTOS_TOP1_FLOOR, f"top-1 correct on only {correct} of 20 held-out photos"
