"""The whole PlantDiseaseFlow on tiny data, as a user runs it (subprocess), including `resume`.

The first run fails in `export` (its output folder is blocked by a file, as when a disk
or mount is broken); after the cause is removed, `resume` re-runs only `export` and `end`
and finishes. Everything (Metaflow datastore, MLflow store, artefacts) lives in tmp_path.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, card_text

pytestmark = pytest.mark.integration

CHECK = r"""
import json, sys
from metaflow import Flow, namespace
from metaflow.cards import get_cards
namespace(None)
run = Flow("PlantDiseaseFlow")[sys.argv[1]]
origin = Flow("PlantDiseaseFlow")[sys.argv[2]]  # resume clones finished steps; their cards stay with the origin run
train = list(run["train"].tasks())
first = {s.id: [t.successful for t in s.tasks()] for s in origin}
cloned = {s.id: all("origin-task-id" in t.metadata_dict for t in s.tasks()) for s in run}
out = {
  "first_run_steps": first, "cloned": cloned,
  "live_epochs": {t.data.model_name: len(t.data.train_result["history"]) for t in train},
  "successful": run.successful,
  "bundle_path": run.data.bundle_path,
  "registered": run.data.registered,
  "champion": run.data.champion,
  # the first run's tasks: in the resumed run they are clones, whose times are the cloning's
  "train_windows": [[t.created_at.timestamp(), t.finished_at.timestamp()] for t in origin["train"].tasks()],
  "cards": {**{s: len(get_cards(list(origin[s].tasks())[0])) for s in ("prepare", "train", "evaluate", "distill")},
            "export": len(get_cards(list(run["export"].tasks())[0]))},
  "eval_card_html": get_cards(list(origin["evaluate"].tasks())[0])[0].get()[:2000000],
  "train_card_html": get_cards(list(origin["train"].tasks())[0])[0].get()[:2000000],
  "distill_card_html": get_cards(list(origin["distill"].tasks())[0])[0].get()[:2000000],
  "export_card_html": get_cards(list(run["export"].tasks())[0])[0].get()[:2000000],
  "student": run.data.student, "student_mlflow_run_id": run.data.student_mlflow_run_id,
  "mlflow_parent_run_id": run.data.mlflow_parent_run_id,
}
print(json.dumps(out))
"""


def _run(args, env, cwd, timeout=900):
    return subprocess.run([sys.executable, str(REPO_ROOT / "flows" / "train_flow.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_flow_end_to_end_and_resume(tiny_dataset, tmp_path):
    # Run from tmp_path: Metaflow's local datastore and its cards (.metaflow/) land there, not in the checkout.
    env = {**os.environ, "METAFLOW_USER": "flowtest",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONWARNINGS": "ignore"}
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the bundle folder should go")
    overrides = " ".join([
        "train.epochs=2", "train.image_size=32", "train.batch_size=8",
        "train.models.cnn.arch=tiny_cnn", "train.models.cnn.lr=0.03", "train.models.vit.arch=hybrid_vit_tiny",
        "evaluate.min_macro_f1=0.0", "evaluate.min_accuracy=0.0", "robustness.max_images=12",
        "export.int8.calibration_images=12",
        # the edge student: the tiny CNN at 16 px, one epoch (its own step, card and MLflow run)
        "student.arch=tiny_cnn", "student.image_size=16", "student.epochs=1", "student.frozen_blocks=0",
        "student.lr=0.03", "student.min_speedup=0.001", "student.max_accuracy_drop=1.0",
        f"student.out_dir={tmp_path / 'student'}",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"train.out_dir={tmp_path / 'train'}",
        f"evaluate.out_dir={tmp_path / 'eval'}", f"export.out_dir={blocker / 'bundles'}",
        "registry.model_name=flowtest-model",
    ])
    first = _run(["run", "--data-dir", str(tiny_dataset), "--set", overrides,
                  "--run-id-file", str(tmp_path / "run1")], env, tmp_path)
    assert first.returncode != 0, first.stdout[-3000:] + first.stderr[-3000:]
    run1 = (tmp_path / "run1").read_text().strip()

    blocker.unlink()  # the broken mount is fixed
    second = _run(["resume", "--origin-run-id", run1, "--run-id-file", str(tmp_path / "run2")], env, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "bundle:" in second.stdout + second.stderr
    run2 = (tmp_path / "run2").read_text().strip()

    check = subprocess.run([sys.executable, "-c", CHECK, run2, run1], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    info = json.loads(check.stdout.strip().splitlines()[-1])
    assert info["successful"]
    # The first run got through evaluate and failed in export (its one task never succeeded) ...
    steps = info["first_run_steps"]
    assert all(all(ok) for name, ok in steps.items()
               if name in ("start", "prepare", "train", "evaluate", "distill")), steps
    assert steps.get("export") == [False] and "end" not in steps, steps
    # ... and resume re-ran only export and end: every earlier task is a clone of the first run's.
    assert info["cloned"] == {"start": True, "prepare": True, "branch": True, "train": True, "trained": True,
                              "evaluate": True, "distill": True,
                              "export": False, "end": False}, info["cloned"]
    # The CNN and ViT branches overlap in time (they run in parallel).
    (s1, f1), (s2, f2) = info["train_windows"]
    assert max(s1, s2) < min(f1, f2)
    assert all(n >= 1 for n in info["cards"].values())
    # The train card was refreshed after every epoch (live progress table) before its final content.
    assert "epoch 2 done" in card_text(info["train_card_html"])
    evaluate_card = card_text(info["eval_card_html"])
    for text in ("Champion", "confusion matrix", "ROC", "reliability diagram", "Background-only baseline",
                 "Out-of-distribution score", "OOD score histogram"):
        assert text in evaluate_card, text

    # The edge student: distilled in its own step (card, MLflow child run), then shipped or explained.
    student = info["student"]
    assert student["status"] == "trained" and len(student["history"]) == 1, student
    assert "Edge student" in card_text(info["distill_card_html"])
    assert "Edge student" in card_text(info["export_card_html"])

    from plantml.bundle import load_bundle, load_student_bundle

    bundle = load_bundle(info["bundle_path"])
    block = bundle.metadata["student"]
    assert block["reason"] and block["gate"]["champion_fp32"]["all"]["n"] > 0, block
    # the gate here asks for no speed-up and allows any drop: the student is shipped
    assert block["kept"], block
    assert load_student_bundle(info["bundle_path"]).metadata["model_resolution"] == 16
    assert bundle.metadata["lineage"]["metaflow_run_id"] == run2
    assert bundle.metadata["lineage"]["data_manifest_sha256"]
    assert ("onnxruntime", "fp32") in bundle.available() and ("openvino", "fp32") in bundle.available()
    assert bundle.metadata["parity"]["max_abs_diff"]["onnxruntime_fp32"]["max"] <= 1e-4
    assert 0 < bundle.temperature and 0 <= bundle.abstain_threshold <= 1
    assert bundle.outputs == ["logits", "ood_score"] and bundle.ood_threshold > 0
    assert bundle.metadata["parity"]["ood_score_max_rel_diff"]["openvino_fp32"]["max"] <= 1e-4

    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        mv = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias("flowtest-model", "champion")
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert mv.tags["metaflow_run_id"] == run2
    student_run = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(info["student_mlflow_run_id"])
    assert student_run.data.tags["mlflow.parentRunId"] == info["mlflow_parent_run_id"]
    assert student_run.data.tags["status"] == "trained" and "test_accuracy" in student_run.data.metrics
    children = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [mv.run_id and MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(mv.run_id).info.experiment_id],
        filter_string="tags.mlflow.parentRunId != ''")
    assert {r.info.run_name for r in children} >= {"cnn", "vit"}
