"""Multi-node data-parallel training through Metaflow's ``@parallel``, proved on CPU.

The real PlantDiseaseFlow runs with ``train.distributed.nodes=2`` (gloo, one process per
node, tiny data, one model): the ``cnn`` branch fans out to a gang of two ``train_node``
tasks (Metaflow's local runtime starts node 1 as a subprocess of node 0's task, both on
127.0.0.1), they train one model together, node 0 publishes the result, and evaluate and
export consume it. The test checks that both nodes trained (world size 2, each node about
half of the training images per epoch), that node 0 kept the live card, the MLflow epoch
metrics and the per-epoch checkpoint, and that the loss curve has the shape of one
process training at the same global batch.

Every process group lives in the flow's own processes (as in production); this pytest
process only trains the single-process reference, which starts no process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, card_text

pytestmark = pytest.mark.integration

EPOCHS = 4
PER_NODE_BATCH = 4
NODES = 2

CHECK = r"""
import json, sys
from metaflow import Flow, namespace
from metaflow.cards import get_cards
from mlflow.tracking import MlflowClient
namespace(None)
run = Flow("PlantDiseaseFlow")[sys.argv[1]]
nodes = sorted(run["train_node"].tasks(), key=lambda t: t.id)
join = list(run["train_nodes_join"].tasks())[0]
evaluate = run["evaluate"].task
mlflow_run = evaluate.data.mlflow_run_ids["cnn"]
out = {
  "successful": run.successful,
  "steps": sorted(s.id for s in run),
  "node_tasks": [t.id for t in nodes],
  "node_indexes": sorted(t.data.node_index for t in nodes),
  "node_world": [t.data.node_result["world_size"] for t in nodes],
  "images": {str(k): v for k, v in join.data.node_images_per_epoch.items()},
  "losses": {str(k): v for k, v in join.data.node_train_loss.items()},
  "train_result": evaluate.data.train_results["cnn"],
  "shards": run["prepare"].task.data.shards,
  "bundle_path": run.data.bundle_path,
  "cards": {t.id: [c.get() for c in get_cards(t)] for t in nodes},
  "mlflow_epochs": [m.step for m in MlflowClient().get_metric_history(mlflow_run, "epoch_train_loss")],
}
print(json.dumps(out))
"""


def _params_file(tmp_path: Path) -> Path:
    """The repository's parameters with one tiny model (one branch keeps the test within budget)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"]["models"] = {"cnn": {"arch": "tiny_cnn", "lr": 0.03}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_two_parallel_nodes_train_one_branch_and_node_zero_publishes(tiny_dataset, tmp_path):
    from plantml.config import load_params
    from plantml.distributed import images_per_epoch
    from plantml.shards import ShardIndex
    from plantml.training import train_model

    overrides = [
        f"train.epochs={EPOCHS}", "train.patience=10", "train.image_size=32", f"train.batch_size={PER_NODE_BATCH}",
        "train.device=cpu", "train.num_threads=1", "train.loader_workers=0",
        "train.distributed.world_size=1", "train.distributed.backend=gloo", f"train.distributed.nodes={NODES}",
        "evaluate.min_macro_f1=0.0", "evaluate.min_accuracy=0.0", "robustness.max_images=12",
        "robustness.severities=[1]", "export.int8.enabled=false", "calibration.ood_enabled=false",
        f"data.prepared_dir={tmp_path / 'prepared'}", f"train.out_dir={tmp_path / 'train'}",
        f"evaluate.out_dir={tmp_path / 'eval'}", f"export.out_dir={tmp_path / 'bundles'}",
        "registry.model_name=paralleltest-model",
    ]
    env = {**os.environ, "METAFLOW_USER": "paralleltest", "PYTHONWARNINGS": "ignore",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           # Metaflow's local runtime starts the other nodes as `python`: this environment's.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "flows" / "train_flow.py"), "run", "--data-dir", str(tiny_dataset),
         "--params-file", str(_params_file(tmp_path)), "--set", " ".join(overrides),
         "--run-id-file", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    check = subprocess.run([sys.executable, "-c", CHECK, (tmp_path / "run").read_text().strip()], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    info = json.loads(check.stdout.strip().splitlines()[-1])

    assert info["successful"]
    # The gang route was taken, not the single-task one; the gang had two tasks, node 0 and node 1.
    assert {"branch", "train_fanout", "train_node", "train_nodes_join", "trained"} <= set(info["steps"])
    assert "train" not in info["steps"]
    assert info["node_indexes"] == [0, 1] and info["node_world"] == [NODES, NODES]
    assert info["train_result"]["world_size"] == NODES and len(info["train_result"]["history"]) == EPOCHS

    # Each node trained on its own half of the training split in every epoch.
    index = ShardIndex.from_dict(info["shards"])
    n_train = sum(index.splits["train"].counts)
    images = info["images"]
    assert images["0"] == images_per_epoch(info["train_result"]["history"])
    for epoch in range(EPOCHS):
        per_node = [images[str(k)][epoch] for k in range(NODES)]
        assert per_node[0] == per_node[1], per_node  # ranks step together
        assert 0.35 * n_train <= per_node[0] <= 0.55 * n_train, (per_node, n_train)
        assert sum(per_node) <= n_train

    # Node 0 alone keeps the live card, MLflow epoch metrics, checkpoint and the weights (exported).
    cards = {task: [card_text(html) for html in htmls] for task, htmls in info["cards"].items()}
    main_id, worker_id = info["node_tasks"][0], info["node_tasks"][1]
    assert "_node_" not in main_id and worker_id.endswith("_node_1")
    assert any("Training `cnn`" in html for html in cards[main_id])
    assert any("node 1 of 2" in html for html in cards[worker_id])
    assert info["mlflow_epochs"] == list(range(1, EPOCHS + 1))
    store = tmp_path / ".metaflow" / ".plantml" / "PlantDiseaseFlow" / (tmp_path / "run").read_text().strip()
    assert (store / "checkpoints" / "cnn" / "last.pt").is_file()
    assert (Path(info["bundle_path"]) / "metadata.json").is_file()

    # Loss curve: both nodes' curves fall, and node 0's follows one process at the same global batch.
    params = load_params(_params_file(tmp_path), overrides={
        "train.epochs": EPOCHS, "train.patience": 10, "train.image_size": 32, "train.device": "cpu",
        "train.batch_size": PER_NODE_BATCH * NODES})
    single = train_model("cnn", params.train.models["cnn"], params.train, index,
                         tmp_path / "single", progress=False, threads=1)
    one = [h["train_loss"] for h in single.history]
    gang = [h["train_loss"] for h in info["train_result"]["history"]]
    print("train loss, 1 process x batch 8:", one, "2 nodes x batch 4:", gang, "node 1:", info["losses"]["1"])
    for curve in (one, gang, info["losses"]["1"]):
        assert curve[-1] < curve[0], curve
    # Node 0's epoch loss is over its own half of the images (batch 4), so on this tiny set a
    # single epoch can spike (seen: 0.76 vs 0.36 at epoch 3); where training ends is what must
    # agree. Epoch-by-epoch closeness of DDP to one process is checked on the same data by
    # tests/test_training_resume.py (2 ranks in one process group, tolerance 0.15).
    assert abs(one[-1] - gang[-1]) < 0.15, (one, gang)
