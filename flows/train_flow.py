"""PlantDiseaseFlow: prepare -> train (CNN and ViT in parallel) -> evaluate -> distill -> export.

Usage (inside the environment; ``make run`` creates it and runs the first line)::

    python flows/train_flow.py run                                  # built-in DEMO data
    python flows/train_flow.py run --data-dir data/raw/PlantVillage # real data
    python flows/train_flow.py run --set "train.epochs=3 train.image_size=128"
    python flows/train_flow.py resume                               # after a failed step
    python flows/train_flow.py card view evaluate                   # the report
    python flows/train_flow.py card view distill                    # the edge student
    mlflow ui --backend-store-uri sqlite:///mlflow.db               # runs + registry

Every parameter comes from ``params.yaml`` (``--params`` picks another file, ``--set``
overrides keys). Steps are thin: they call one function of :mod:`plantml.pipeline`, keep
plain data as artifacts, and build a card.

Steps share nothing but the datastore. ``prepare`` decodes the data once into
WebDataset shards in the run's *store* (beside the Metaflow datastore: a folder of the
local datastore, or S3 with ``--datastore s3``); training streams them and writes a
checkpoint there after every epoch (a retried or resumed branch continues from it);
evaluate publishes the OOD detector there; the trained weights travel as artifacts. ``distill``
trains the edge student (the champion distilled to a lower resolution, ``student`` in
params.yaml); ``export`` ships it in the bundle's ``student/`` only if it passes its gate. So
``resume`` from any step and remote execution (``--with kubernetes``, Argo) work without
a shared disk::

    python flows/train_flow.py --datastore s3 run --data-dir s3://bucket/PlantVillage

Each branch trains where ``train.distributed`` puts it (``branch`` routes; Metaflow graphs
are static, so both routes are in the graph and a run takes one)::

    branch --local--> train ------------------------------------------------> trained
           --nodes--> train_fanout --num_parallel=N--> train_node (x N, @parallel)
                                                       --> train_nodes_join --> trained

``train.distributed.nodes: 1`` (the default) trains in ``train`` as before (one process,
or ``world_size`` DDP processes on this machine); ``nodes: N > 1`` trains each branch on
a gang of N ``@parallel`` tasks (one per node, ``world_size`` processes each, rendezvous
at node 0) — ``--with kubernetes``, Argo Workflows and AWS Batch start the gang on N
machines, a local run on this machine (all on 127.0.0.1; put the environment's ``python``
first on ``PATH``: Metaflow starts the other nodes as ``python``)::

    python flows/train_flow.py --datastore s3 run --with kubernetes \
        --set "train.distributed.nodes=2 train.distributed.world_size=4 train.device=cuda"

``@resources`` (cpu, memory, gpu, disk per step) come from the ``resources`` section of
``params.yaml`` (the repository's, or ``$PLANTML_PARAMS``) when this file is imported; they
only matter when a step runs remotely.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

from metaflow import FlowSpec, Parameter, card, catch, current, parallel, resources, retry, step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from flows import cards  # noqa: E402
from flows.store import checkpoint_uris, run_store  # noqa: E402
from plantml.config import load_params, params_from_dict, parse_override  # noqa: E402
from plantml.distributed import (NodeGroup, configured_nodes, images_per_epoch, rendezvous_port,  # noqa: E402
                                 train_on_node)
from plantml.evaluation import plot_training_curves  # noqa: E402
from plantml.pipeline import (distill_student, enforce_quality_gates, evaluate_models, export_champion,  # noqa: E402
                              prepare, publish_latest_evaluation, repo_path, train_branch)
from plantml.registry import (finish_parent_run, log_branch_run, log_dataset_input, log_epoch_metrics,  # noqa: E402
                              register_bundle, start_branch_run, start_parent_run)
from plantml.shards import ShardIndex  # noqa: E402
from plantml.storage import join  # noqa: E402

# Decorator arguments are fixed at import: read the resources from the default parameter file.
RESOURCES = load_params().resources

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class PlantDiseaseFlow(FlowSpec):
    """Train a CNN and a ViT on leaf photos, pick the champion, export and register it."""

    data_dir = Parameter("data-dir", default="", help="PlantVillage-style folder; empty: the synthetic DEMO set")
    params_file = Parameter("params-file", default="", help="parameter file (default: the repository's params.yaml)")
    overrides = Parameter("set", default="", help='space-separated overrides, e.g. "train.epochs=3 data.seed=1"')

    def _params(self):
        return params_from_dict(self.params)

    @card(type="blank")
    @step
    def start(self):
        """Resolve and validate the parameters (a bad key fails here, before any work)."""
        overrides = dict(parse_override(tok) for tok in self.overrides.split())
        if self.data_dir:
            overrides["data.data_dir"] = self.data_dir
        params = load_params(self.params_file or None, overrides)
        self.params = params.to_dict()
        self.model_names = list(params.train.models)
        self.mlflow_parent_run_id = start_parent_run(
            self.params, {"metaflow_run_id": current.run_id, "metaflow_flow": current.flow_name},
            params.registry.tracking_uri, run_name=f"{current.flow_name}/{current.run_id}")
        # no data folder and no sources: prepare generates the DEMO set
        for part in cards.banner(not (params.data.data_dir or params.data.sources)):
            current.card.append(part)
        current.card.append(cards.Markdown(f"# Parameters\n```\n{cards.pretty(self.params)}\n```"))
        self.next(self.prepare)

    @resources(**RESOURCES.prepare.decorator_kwargs())
    @card(type="blank")
    @step
    def prepare(self):
        """Scan, check and split the data; decode it once into shards in the run's store."""
        params = self._params()
        summary, index = prepare(params, store=join(run_store(self), "data"))
        self.shards = index.to_dict()
        self.summary = summary.to_dict()
        log_dataset_input(self.mlflow_parent_run_id, self.summary, params.registry.tracking_uri)
        self.classes = summary.classes
        chart = cards.class_chart(self.summary, repo_path(params.evaluate.out_dir) / current.run_id / "classes.png")
        for part in cards.prepare_card(self.summary, chart):
            current.card.append(part)
        self.next(self.branch, foreach="model_names")

    @step
    def branch(self):
        """Route one model's training: here (``train``) or on a gang of nodes (``train_fanout``)."""
        self.model_name = self.input
        self.train_nodes = configured_nodes(self._params())
        self.placement = "nodes" if self.train_nodes > 1 else "local"
        self.next({"local": self.train, "nodes": self.train_fanout}, condition="placement")

    @catch(var="train_error", print_exception=True)
    @retry(times=1)
    @resources(**RESOURCES.train.decorator_kwargs())
    @card(type="blank")
    @step
    def train(self):
        """Train one model here (a foreach branch: the CNN and the ViT run at the same time)."""
        params = self._params()
        out_dir = self._train_dir(params)
        checkpoint, earlier = checkpoint_uris(self, self.model_name)
        on_epoch_end = self._live_training(params)
        result = train_branch(params, self.model_name, self._index(), out_dir,
                              parallel_branches=len(self.model_names), checkpoint_uri=checkpoint,
                              resume_uris=earlier, on_epoch_end=on_epoch_end)
        self._publish_training(result.to_dict(), Path(result.checkpoint_path).read_bytes(), out_dir)
        self.next(self.trained)

    @step
    def train_fanout(self):
        """Start the gang: ``train.distributed.nodes`` tasks of ``train_node``."""
        self.next(self.train_node, num_parallel=self.train_nodes)

    @retry(times=1)
    @resources(**RESOURCES.train.decorator_kwargs())
    @card(type="blank")
    @parallel
    @step
    def train_node(self):
        """One node of a data-parallel gang; node 0 logs live metrics, checkpoints and keeps the weights."""
        params = self._params()
        node = current.parallel
        group = NodeGroup(nnodes=node.num_nodes, node_rank=node.node_index, master_addr=node.main_ip,
                          master_port=rendezvous_port(f"{current.run_id}/{self.model_name}"))
        out_dir = self._train_dir(params) / (f"node-{node.node_index}" if node.node_index else "")
        checkpoint, earlier = checkpoint_uris(self, self.model_name)
        on_epoch_end = self._live_training(params) if group.is_main else None
        if not group.is_main:
            current.card.append(cards.Markdown(
                f"# {self.model_name}: node {node.node_index} of {node.num_nodes}\n"
                f"Live metrics, checkpoints and the weights are on node 0's card and task."))
        result = train_on_node(params, self.model_name, self._index(), out_dir, group,
                               parallel_branches=len(self.model_names), checkpoint_uri=checkpoint,
                               resume_uris=earlier, on_epoch_end=on_epoch_end)
        self.node_index = node.node_index
        self.node_result = result.to_dict()  # every node: its own share's history (loss, images)
        if group.is_main:
            self._publish_training(self.node_result, Path(result.checkpoint_path).read_bytes(), out_dir)
        self.next(self.train_nodes_join)

    @step
    def train_nodes_join(self, inputs):
        """Keep node 0's result and weights; record what every node trained on."""
        # node 0 alone has the weights, the result and the MLflow run id; the rest is the same on every node
        self.merge_artifacts(inputs, exclude=["node_index", "node_result"])
        self.node_images_per_epoch = {i.node_index: images_per_epoch(i.node_result["history"]) for i in inputs}
        self.node_train_loss = {i.node_index: [r["train_loss"] for r in i.node_result["history"]] for i in inputs}
        self.next(self.trained)

    @step
    def trained(self):
        """Where the two routes meet (a conditional route may not lead straight into the join)."""
        self.next(self.evaluate)

    def _train_dir(self, params) -> Path:
        return repo_path(params.train.out_dir) / current.run_id / self.model_name

    def _live_training(self, params):
        """Open the branch's MLflow run and the live card; returns the per-epoch callback."""
        uri = params.registry.tracking_uri
        # The branch's MLflow run exists from the first epoch on: metrics are live, not logged after the join.
        self.mlflow_run_id = start_branch_run(
            self.mlflow_parent_run_id, self.model_name, tracking_uri=uri,
            params={"arch": params.train.models[self.model_name].arch, "image_size": params.train.image_size},
            tags={"metaflow_run_id": current.run_id})
        refresh_card = cards.live_train_card(current.card, self.model_name, self.summary["is_demo"])

        def on_epoch_end(row, result):
            log_epoch_metrics(self.mlflow_run_id, row, int(row["epoch"]), uri)
            refresh_card(row, result)

        return on_epoch_end

    def _publish_training(self, result: dict, checkpoint: bytes, out_dir: Path) -> None:
        """Keep the result and weights as artifacts and add the training curves to this step's card."""
        self.train_result = result
        self.checkpoint = checkpoint
        curve = plot_training_curves({self.model_name: result["history"]}, out_dir / "curves.png")
        # is_demo=False: the live section already opened this card with the DEMO banner.
        for part in cards.train_card(result, str(curve), is_demo=False):
            current.card.append(part)

    def _index(self):
        return ShardIndex.from_dict(self.shards)

    @resources(**RESOURCES.evaluate.decorator_kwargs())
    @card(type="blank")
    @step
    def evaluate(self, inputs):
        """Test metrics, CNN vs ViT, champion, calibration, robustness; MLflow runs; quality gates."""
        self.merge_artifacts(inputs, include=["params", "shards", "summary", "classes", "mlflow_parent_run_id",
                                              "model_names"])
        params = self._params()
        self.train_errors = {i.model_name: str(i.train_error) for i in inputs if getattr(i, "train_error", None)}
        ok = [i for i in inputs if not getattr(i, "train_error", None)]
        if not ok:
            raise RuntimeError(f"every training branch failed: {self.train_errors}")
        self.train_results = {i.model_name: i.train_result for i in ok}
        self.checkpoints = {i.model_name: i.checkpoint for i in ok}
        checkpoints = self._checkpoint_files(params)
        eval_dir = repo_path(params.evaluate.out_dir)
        report = evaluate_models(params, self.train_results, checkpoints, self._index(), eval_dir / current.run_id,
                                 is_demo=self.summary["is_demo"], store=join(run_store(self), "eval"))
        # also as the latest metrics/plots beside the per-run folder: `dvc metrics show` / `dvc plots show`
        publish_latest_evaluation(eval_dir / current.run_id, eval_dir)
        self.report = report
        self.champion = report["champion"]
        live_runs = {i.model_name: getattr(i, "mlflow_run_id", None) for i in ok}
        self.mlflow_run_ids = {name: self._log_branch_run(params, name, checkpoints[name], live_runs[name])
                               for name in report["models"]}
        for part in cards.evaluate_card(report, self.train_errors):
            current.card.append(part)
        enforce_quality_gates(params, report)  # fails the run here: nothing exported, nothing registered
        self.next(self.distill)

    def _checkpoint_files(self, params) -> dict:
        """``{name: model.pt path}``, written from the branches' artifacts where this machine lacks the file."""
        ckpt_dir = repo_path(params.train.out_dir) / current.run_id
        checkpoints = {}
        for name, weights in self.checkpoints.items():
            path = ckpt_dir / name / "model.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_file():  # e.g. a resumed run, or branches that ran on another machine
                path.write_bytes(weights)
            checkpoints[name] = str(path)
        return checkpoints

    def _log_branch_run(self, params, name: str, checkpoint: str, run_id) -> str:
        """Complete branch ``name``'s MLflow run (opened live by its training) with its test results."""
        m = self.report["models"][name]
        return log_branch_run(
            self.mlflow_parent_run_id, name,
            params={"arch": m["arch"], **params.to_dict()["train"]["models"][name],
                    "image_size": params.train.image_size, "num_params": m["num_params"]},
            history=self.train_results[name]["history"],
            metrics={"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"],
                     "test_roc_auc_ovr": m["roc_auc_ovr_macro"], "latency_ms": m["latency_ms"],
                     "ece": m["calibration"]["ece"], "ece_uncalibrated": m["calibration"]["ece_uncalibrated"]},
            artifacts=list(m["plots"].values()) + [self.report["plots"]["curves"]],
            checkpoint_path=checkpoint,
            tags={"metaflow_run_id": current.run_id, "champion": str(name == self.champion),
                  "demo_data": str(self.summary["is_demo"])},
            tracking_uri=params.registry.tracking_uri, run_id=run_id)

    @retry(times=1)
    @resources(**RESOURCES.distill.decorator_kwargs())
    @card(type="blank")
    @step
    def distill(self):
        """The edge student: the champion distilled to a smaller input, with its own MLflow run (gated in export)."""
        params = self._params()
        name = self.champion
        uri = params.registry.tracking_uri
        run_id = start_branch_run(self.mlflow_parent_run_id, "student", tracking_uri=uri,
                                  params={"arch": params.student.arch, "image_size": params.student.image_size,
                                          "teacher": name},
                                  tags={"metaflow_run_id": current.run_id, "role": "edge student"})
        with tempfile.TemporaryDirectory() as tmp:
            teacher = Path(tmp) / "teacher.pt"
            teacher.write_bytes(self.checkpoints[name])
            result = distill_student(params, self.report, self.train_results[name], str(teacher), self._index(),
                                     repo_path(params.student.out_dir) / current.run_id,
                                     on_epoch_end=lambda row: log_epoch_metrics(run_id, row, int(row["epoch"]), uri))
        self.student = result
        trained = result["status"] == "trained"
        # The weights and the OOD fit travel as artifacts: export may run on another machine.
        self.student_checkpoint = Path(result["checkpoint"]).read_bytes() if trained else None
        ood = result.get("ood") if trained else None
        self.student_detector = Path(ood["detector"]).read_bytes() if ood else None
        self.student_mlflow_run_id = log_branch_run(
            self.mlflow_parent_run_id, "student", params=dict(result.get("settings", {})),
            history=result.get("history", []),
            metrics={"test_accuracy": result.get("metrics", {}).get("accuracy"),
                     "test_macro_f1": result.get("metrics", {}).get("macro_f1"),
                     "latency_ms": result.get("latency_ms"), "distill_seconds": result.get("distill_seconds")},
            artifacts=[], checkpoint_path=result.get("checkpoint"),
            tags={"metaflow_run_id": current.run_id, "status": result["status"], "reason": result["reason"][:250]},
            tracking_uri=uri, run_id=run_id)
        for part in cards.distill_card(result, self.summary["is_demo"]):
            current.card.append(part)
        self.next(self.export)

    def _student_files(self, tmp: str):
        """The distill result with its checkpoint and OOD detector written from the artifacts into ``tmp``."""
        if self.student["status"] != "trained":
            return self.student
        student = dict(self.student)
        student["checkpoint"] = str(Path(tmp) / "student.pt")
        Path(student["checkpoint"]).write_bytes(self.student_checkpoint)
        if self.student_detector is not None:
            student["ood"] = {**student["ood"], "detector": str(Path(tmp) / "student_ood.npz")}
            Path(student["ood"]["detector"]).write_bytes(self.student_detector)
        return student

    @retry(times=1)
    @resources(**RESOURCES.export.decorator_kwargs())
    @card(type="blank")
    @step
    def export(self):
        """Export the champion (ONNX, OpenVINO, INT8 behind its gate) and the student (behind its gate); register."""
        params = self._params()
        name = self.champion
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "model.pt"
            ckpt.write_bytes(self.checkpoints[name])
            path, metadata = export_champion(
                params, self.report, self.train_results[name], str(ckpt), self._index(),
                lineage={"metaflow_flow": current.flow_name, "metaflow_run_id": current.run_id,
                         "mlflow_run_id": self.mlflow_run_ids[name], "mlflow_parent_run_id": self.mlflow_parent_run_id,
                         "data_manifest_sha256": self.summary["manifest_sha256"], "data_root": self.summary["root"]},
                data_summary=self.summary, student=self._student_files(tmp))
        self.bundle_path = str(path)
        self.bundle_metadata = metadata
        self.registered = register_bundle(
            path, model_name=params.registry.model_name, alias=params.registry.alias,
            run_id=self.mlflow_run_ids[name], tracking_uri=params.registry.tracking_uri,
            tags={"metaflow_run_id": current.run_id, "architecture": metadata["architecture"],
                  "bundle_version": metadata["version"], "demo_data": str(self.summary["is_demo"])})
        model_card = (Path(path) / metadata["model_card"]).read_text() if metadata.get("model_card") else None
        for part in cards.export_card(self.bundle_path, metadata, self.registered, model_card):
            current.card.append(part)
        self.next(self.end)

    @step
    def end(self):
        """Record the outcome on the parent MLflow run and print where the bundle is."""
        params = self._params()
        champ = self.report["models"][self.champion]
        finish_parent_run(self.mlflow_parent_run_id,
                          {"champion_test_accuracy": champ["accuracy"], "champion_test_macro_f1": champ["macro_f1"]},
                          {"champion": self.champion, "bundle_path": self.bundle_path,
                           "registered_version": self.registered["version"]},
                          params.registry.tracking_uri)
        demo = " (SYNTHETIC DEMO DATA: not a real result)" if self.summary["is_demo"] else ""
        print(f"champion: {self.champion} test accuracy {champ['accuracy']:.4f} macro-F1 {champ['macro_f1']:.4f}{demo}")
        print(f"registered: {self.registered['model_uri']} (version {self.registered['version']})")
        print(f"bundle: {self.bundle_path}")
        student = self.bundle_metadata.get("student", {})
        print(f"edge student: {'kept' if student.get('kept') else 'not in the bundle'} ({student.get('reason')})")


if __name__ == "__main__":
    PlantDiseaseFlow()
