"""MLflow tracking and registry against a real sqlite store: registration, idempotency, runs, datasets."""

import json
import shutil
import time

import pytest

from plantml.bundle import load_bundle

pytest.importorskip("mlflow")

SHA = "ab" * 32


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store, also as ``$MLFLOW_TRACKING_URI`` (as the flow and CLI use it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def _other_bundle(bundle, tmp_path):
    """A copy of ``bundle`` with another version in its metadata: another export, other identity."""
    copy = tmp_path / "other-bundle"
    shutil.copytree(bundle, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["version"] = "2"
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


def test_register_is_idempotent_alias_and_fetch(tiny_bundle, store, tmp_path):
    """Registering the same bundle again (a retried export) returns its version and moves no alias elsewhere."""
    from mlflow import MlflowClient

    from plantml.registry import fetch_bundle, register_bundle, start_parent_run

    parent = start_parent_run({"train": {"epochs": 1}}, {"metaflow_run_id": "42"})
    first = register_bundle(tiny_bundle, model_name="leaf", run_id=parent, tags={"metaflow_run_id": "42"})
    again = register_bundle(tiny_bundle, model_name="leaf", run_id=parent, tags={"metaflow_run_id": "42"})
    assert (first["version"], first["reused"]) == ("1", False)
    assert (again["version"], again["reused"]) == ("1", True)
    client = MlflowClient()
    assert len(client.search_model_versions("name = 'leaf'")) == 1
    assert len(client.search_logged_models(experiment_ids=[client.get_run(parent).info.experiment_id])) == 1

    # a retried export step re-exports: a new bundle, but the same flow run -> the same version
    other_bundle = _other_bundle(tiny_bundle, tmp_path)
    retried = register_bundle(other_bundle, model_name="leaf", run_id=parent, tags={"metaflow_run_id": "42"})
    assert (retried["version"], retried["reused"]) == ("1", True)
    assert retried["bundle_sha256"] == first["bundle_sha256"]

    other = register_bundle(other_bundle, model_name="leaf", tags={"metaflow_run_id": "43"})
    assert (other["version"], other["reused"]) == ("2", False)
    assert str(client.get_model_version_by_alias("leaf", "champion").version) == "2"
    assert register_bundle(other_bundle, model_name="leaf", tags={"metaflow_run_id": "44"})["version"] == "2"
    mv = client.get_model_version_by_alias("leaf", "champion")
    assert str(mv.version) == "2" and mv.tags["metaflow_run_id"] == "43"
    local = fetch_bundle("models:/leaf@champion", tmp_path / "dl")
    assert load_bundle(local).version == "2" and load_bundle(local).classes == load_bundle(tiny_bundle).classes
    assert client.get_run(parent).data.params["train.epochs"] == "1"


def test_branch_runs_are_reused_and_metrics_not_duplicated(store):
    """start_branch_run + live epochs + log_branch_run (twice, as a resumed evaluate does) = one child run."""
    from mlflow import MlflowClient

    from plantml.registry import log_branch_run, log_epoch_metrics, start_branch_run, start_parent_run

    parent = start_parent_run({"train": {"epochs": 2}}, {"metaflow_run_id": "9"})
    child = start_branch_run(parent, "cnn", params={"arch": "tiny_cnn", "lr": 0.01}, tags={"metaflow_run_id": "9"})
    assert start_branch_run(parent, "cnn", params={"arch": "tiny_cnn"}) == child  # a retried branch
    client = MlflowClient()
    assert client.get_run(child).info.status == "RUNNING"
    history = [{"epoch": 1, "loss": 0.9, "val_accuracy": 0.5}, {"epoch": 2, "loss": 0.4, "val_accuracy": 0.8}]
    started = time.perf_counter()
    for row in history:
        assert log_epoch_metrics(child, row, step=row["epoch"])
    per_epoch = (time.perf_counter() - started) / len(history)
    assert per_epoch < 1.0, f"log_epoch_metrics took {per_epoch:.2f} s per call"
    assert [m.step for m in client.get_metric_history(child, "epoch_loss")] == [1, 2]

    kwargs = dict(params={"arch": "tiny_cnn", "lr": 0.01, "num_params": 123}, history=history,
                  metrics={"test_accuracy": 0.75, "latency_ms": None}, artifacts=[], checkpoint_path=None,
                  tags={"metaflow_run_id": "9", "champion": "True"})
    for _ in range(2):  # evaluate, then the same evaluate after `resume`
        assert log_branch_run(parent, "cnn", **kwargs) == child
    vit = [log_branch_run(parent, "vit", **kwargs) for _ in range(2)]
    assert vit[0] == vit[1] != child

    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.data.tags["plantml.branch"] for r in children) == ["cnn", "vit"]
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["champion"] == "True"
    assert run.data.params["num_params"] == "123" and run.data.metrics["test_accuracy"] == 0.75
    assert [m.step for m in client.get_metric_history(child, "epoch_loss")] == [1, 2]
    assert len(client.get_metric_history(child, "test_accuracy")) == 1
    assert not log_epoch_metrics("no-such-run", {"loss": 1.0}, step=1)  # best effort: warns, never raises


def test_log_dataset_input(store):
    """The data set on the parent run: digest = manifest hash, counts as rows, extra keys tolerated, logged once."""
    from mlflow import MlflowClient

    from plantml.registry import log_dataset_input, start_parent_run

    parent = start_parent_run({}, {})
    summary = {"manifest_sha256": SHA, "root": "/data/PlantVillage", "n_images": 14,
               "counts": {"Tomato___healthy": {"train": 5, "val": 1, "test": 1},
                          "Apple___scab": {"train": 5, "val": 1, "test": 1}},
               "layout": "flat", "skipped": [{"path": "x", "reason": "not_image"}], "is_demo": False}
    log_dataset_input(parent, summary)
    log_dataset_input(parent, summary)  # a resumed flow
    run = MlflowClient().get_run(parent)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    assert dataset.name == "PlantVillage" and dataset.digest == SHA[:36]
    assert tags["manifest_sha256"] == SHA and tags["mlflow.data.context"] == "training" and tags["n_images"] == "14"
    assert json.loads(dataset.profile)["num_rows"] == 6
    assert run.data.tags["data.manifest_sha256"] == SHA

    by_domain = {**summary, "manifest_sha256": "cd" * 32,
                 "counts": {"Tomato___healthy": {"train": {"lab": 4, "field": 1}, "test": {"lab": 1}}}}
    log_dataset_input(parent, by_domain, context="eval")
    assert len(MlflowClient().get_run(parent).inputs.dataset_inputs) == 2


def test_counts_frame_shapes():
    from plantml.registry import counts_frame

    flat = counts_frame({"b": {"train": 2}, "a": {"train": 1, "test": 1}})
    assert flat.to_dict("records") == [{"class": "a", "split": "test", "n": 1},
                                       {"class": "a", "split": "train", "n": 1},
                                       {"class": "b", "split": "train", "n": 2}]
    nested = counts_frame({"a": {"train": {"lab": 3, "field": 1}}})
    assert list(nested.columns) == ["class", "split", "domain", "n"] and nested["n"].sum() == 4
    assert counts_frame({}).empty
