import pytest

from plantml.bundle import load_bundle

pytest.importorskip("mlflow")


def test_register_alias_and_fetch(tiny_bundle, tmp_path, monkeypatch):
    """A real MLflow sqlite store: log, register with alias, resolve models:/NAME@champion, verify hashes."""
    from mlflow import MlflowClient

    from plantml.registry import fetch_bundle, register_bundle, start_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    parent = start_parent_run({"train": {"epochs": 1}}, {"metaflow_run_id": "42"})
    first = register_bundle(tiny_bundle, model_name="leaf", tags={"metaflow_run_id": "42"})
    second = register_bundle(tiny_bundle, model_name="leaf", tags={"metaflow_run_id": "43"})
    assert (first["version"], second["version"]) == ("1", "2")
    client = MlflowClient()
    mv = client.get_model_version_by_alias("leaf", "champion")
    assert str(mv.version) == "2" and mv.tags["metaflow_run_id"] == "43"
    local = fetch_bundle("models:/leaf@champion", tmp_path / "dl")
    assert load_bundle(local).classes == load_bundle(tiny_bundle).classes
    assert client.get_run(parent).data.params["train.epochs"] == "1"
