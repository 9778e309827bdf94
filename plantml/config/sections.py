"""The parameters themselves: one frozen dataclass per section of ``params.yaml``.

Each field is declared with :func:`~plantml.config.rules.param` (default, description,
rule); a section's ``validate`` holds the cross-field rules a single key cannot express.
Torch-free.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from plantml.config.rules import MODEL_REGISTRY, ParamsError, Rule, param

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"   # file-, stage- and registry-safe names
_DOMAIN = r"^[A-Za-z][A-Za-z0-9_-]*$"   # a domain name: also a metric-key and CLI-safe word


@dataclass(frozen=True)
class SourceParams:
    """One data source of a run: a folder of class folders from one kind of photo (a *domain*)."""

    domain: str = param("lab", "kind of photo, e.g. lab or field (reported separately)", pattern=_DOMAIN)
    path: str = param("", "dataset folder or s3:// prefix (PlantVillage layout)", pattern=r"\S")
    weight: float | None = param(None, "training sampling weight of each image (2: seen twice as often); null: "
                                       "data.domains.<domain>.weight", gt=0, le=100)
    split: tuple[float, float, float] | None = param(None, "train / val / test fractions for this source "
                                                     "(null: data.domains.<domain>.split, else data.split)",
                                                     item=Rule(ge=0, le=1))

    def validate(self) -> None:
        """A split of its own must be a proper one."""
        _check_split(self.split, f"data.sources[{self.domain}].split")


@dataclass(frozen=True)
class DomainParams:
    """Settings of every source of one domain (also for sources given as ``--data-dir DOMAIN=PATH``)."""

    weight: float = param(1.0, "training sampling weight of each image of this domain", gt=0, le=100)
    split: tuple[float, float, float] | None = param(None, "train / val / test fractions (null: data.split)",
                                                     item=Rule(ge=0, le=1))

    def validate(self) -> None:
        """A split of its own must be a proper one."""
        _check_split(self.split, "data.domains.<domain>.split")


def _check_split(split: tuple[float, ...] | None, key: str) -> None:
    if split is not None and (abs(sum(split) - 1) > 1e-6 or split[0] <= 0):
        raise ParamsError(f"{key} must be three fractions (train > 0) summing to 1, got {list(split)}")


@dataclass(frozen=True)
class DataParams:
    """Where the images come from and how they are split and sharded."""

    data_dir: str | None = param(None, "dataset folder or s3:// prefix (PlantVillage layout), or several as "
                                       "DOMAIN=PATH,DOMAIN=PATH; set, it replaces data.sources; null: data.sources, "
                                       "or the synthetic DEMO set", pattern=r"\S")
    sources: tuple[SourceParams, ...] = param((), "data sources, one per domain (used when data.data_dir is null)")
    domains: dict[str, DomainParams] = param(doc="per-domain sampling weight and split (domain: settings)",
                                             factory=dict, key_pattern=_DOMAIN)
    demo_dir: str = param("data/demo", "where the DEMO set is generated (git-ignored)", pattern=r"\S")
    demo_classes: int = param(6, "classes of the DEMO set", ge=2, le=8)
    demo_images_per_class: int = param(40, "images per DEMO class", ge=10)
    demo_image_size: int = param(128, "side of a DEMO image in pixels", ge=32, le=1024)
    split: tuple[float, float, float] = param((0.7, 0.2, 0.1), "train / val / test fractions (stratified, "
                                              "deterministic for the seed; they sum to 1)", item=Rule(ge=0, le=1))
    seed: int = param(42, "seed of the split and the shard order", ge=0)
    max_images_per_class: int | None = param(None, "cap per class (null: all)", ge=1)
    prepared_dir: str = param("artifacts/prepared", "shards + manifest written by `plantml prepare`", pattern=r"\S")
    samples_per_shard: int = param(1000, "images per WebDataset tar shard", ge=1)

    def validate(self) -> None:
        """Cross-field rules the per-key declaration cannot express."""
        if abs(sum(self.split) - 1) > 1e-6 or self.split[0] <= 0:
            raise ParamsError(f"data.split must be three fractions (train > 0) summing to 1, got {list(self.split)}")
        domains = [s.domain for s in self.sources]
        if len(set(domains)) != len(domains):
            raise ParamsError(f"data.sources: each domain may appear once, got {domains}")
        for i, s in enumerate(self.sources):
            if not s.path:
                raise ParamsError(f"data.sources[{i}].path must be a folder or s3:// prefix, got an empty string")


@dataclass(frozen=True)
class ModelParams:
    """One model of the comparison (a key of ``train.models``)."""

    arch: str = param("efficientnet_lite0", "architecture in the model registry", choices=MODEL_REGISTRY)
    lr: float = param(1e-3, "peak learning rate (AdamW)", gt=0, le=1)
    epochs: int | None = param(None, "at most this many epochs for this model, never more than train.epochs "
                                     "(null: train.epochs)", ge=1)
    frozen_blocks: int = param(0, "stem + this many pretrained blocks frozen", ge=0, le=7)


@dataclass(frozen=True)
class DistributedParams:
    """Data-parallel (DDP) training of each branch."""

    world_size: int = param(1, "DDP processes per node (GPUs per node; > 1: DDP)", ge=1)
    nodes: int = param(1, "Metaflow @parallel nodes per training branch (1: train in the train step; "
                          "> 1: a gang of nodes x world_size DDP ranks)", ge=1)
    backend: str = param("auto", "auto: nccl on CUDA, gloo on CPU", choices=("auto", "gloo", "nccl"))


def _default_models() -> dict[str, ModelParams]:
    return {"cnn": ModelParams(), "vit": ModelParams(arch="hybrid_vit_tiny")}


@dataclass(frozen=True)
class TrainParams:
    """Training of every model in ``train.models`` (one parallel branch each)."""

    image_size: int = param(160, "model input side in pixels", ge=32, le=1024, multiple_of=16)
    batch_size: int = param(32, "images per step", ge=1)
    micro_batch_size: int = param(16, "forward/backward in chunks of this many images, one optimiser step per "
                                      "batch (bounds activation memory); 0: the whole batch at once", ge=0)
    epochs: int = param(8, "maximum epochs of every model", ge=1)
    patience: int = param(3, "early stopping: epochs without a better validation macro-F1", ge=1)
    label_smoothing: float = param(0.1, "cross-entropy label smoothing", ge=0, lt=1)
    weight_decay: float = param(0.05, "AdamW weight decay", ge=0, le=1)
    warmup_epochs: int = param(1, "linear learning-rate warm-up", ge=0)
    device: str = param("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    num_threads: int = param(0, "torch threads; 0: CPU quota // parallel branches", ge=0)
    loader_workers: int = param(-1, "DataLoader processes; -1: from the CPU quota", ge=-1)
    shuffle_buffer: int = param(512, "samples per loader worker's shuffle buffer", ge=0)
    background_replace: float = param(0.0, "share of plain-backdrop (lab) training images put on a random "
                                           "cluttered background (augmentation)", ge=0, le=1)
    outlier_exposure: float = param(0.0, "leafless random backgrounds added to each batch, per labelled image, "
                                         "trained towards a uniform prediction (Outlier Exposure): the model learns "
                                         "to be unsure when there is no leaf", ge=0, le=1)
    ema_decay: float = param(0.0, "exponential moving average of the weights (validated and kept instead of the "
                                  "raw weights, by the branches and the edge student): the largest per-step decay, "
                                  "warmed up from 0; 0: off", ge=0, lt=1)
    distributed: DistributedParams = param(doc="data-parallel training", factory=DistributedParams)
    seed: int = param(42, "seed of initialisation, augmentation and order", ge=0)
    out_dir: str = param("artifacts/train", "where `plantml train` writes each model", pattern=r"\S")
    models: dict[str, ModelParams] = param(doc="the models compared (name: settings)", factory=_default_models,
                                           min_items=1, key_pattern=r"^[A-Za-z0-9_-]+$")


GATE_METRICS = ("accuracy", "macro_f1", "coverage", "accuracy_on_answered", "ece")


@dataclass(frozen=True)
class GateParams:
    """One quality gate on one domain's test metrics (``ece``: a ceiling, the others: floors)."""

    domain: str = param("field", "the domain whose test images are gated", pattern=_DOMAIN)
    metric: str = param("accuracy", "metric of evaluate's per-domain report", choices=GATE_METRICS)
    min: float | None = param(None, "the run fails below this", ge=0, le=1)
    max: float | None = param(None, "the run fails above this", ge=0, le=1)
    required: bool = param(False, "fail when the domain has no test images (false: recorded as not applicable)")

    def validate(self) -> None:
        """Exactly one bound."""
        if (self.min is None) == (self.max is None):
            raise ParamsError(f"evaluate.gates ({self.domain} {self.metric}): give exactly one of min or max")


@dataclass(frozen=True)
class EvaluateParams:
    """Champion choice and quality gates."""

    champion_metric: str = param("macro_f1", "highest wins", choices=("macro_f1", "accuracy"))
    champion_domain: str | None = param(None, "champion_metric measured on this domain's test images (null: all)",
                                        pattern=_DOMAIN)
    champion_tie_tolerance: float = param(0.005, "within this of the best, the faster model wins", ge=0, le=1)
    min_macro_f1: float = param(0.5, "quality gate: the run fails below this", ge=0, le=1)
    min_accuracy: float = param(0.5, "quality gate: the run fails below this", ge=0, le=1)
    gates: tuple[GateParams, ...] = param((), "per-domain quality gates, e.g. {domain: field, metric: accuracy, "
                                              "min: 0.8}")
    out_dir: str = param("artifacts/eval", "where `plantml evaluate` writes", pattern=r"\S")


@dataclass(frozen=True)
class CalibrationParams:
    """Temperature scaling, the abstain threshold and the out-of-distribution score."""

    target_precision: float = param(0.99, "abstain threshold chosen on validation for this precision", gt=0, le=1)
    min_coverage: float = param(0.5, "lowest share of answered images accepted", ge=0, le=1)
    domain_min_coverage: float = param(0.0, "the abstain threshold is lowered (below target_precision's) until "
                                            "every domain answers at least this share of its validation images "
                                            "(runs with several domains only); 0: off", ge=0, le=1)
    ood_enabled: bool = param(True, "fit and export the out-of-distribution score")
    ood_acceptance: float = param(0.95, "OOD threshold = this quantile of validation scores", ge=0.5, le=1)
    ood_components: int = param(64, "leading covariance directions kept", ge=1)
    ood_max_fit_images: int = param(3000, "training images the OOD detector is fitted on", ge=20)


@dataclass(frozen=True)
class RobustnessParams:
    """The corruption sweep and the background-only baseline."""

    severities: tuple[int, ...] = param((1, 3, 5), "corruption severities (1..5, ImageNet-C style)",
                                        min_items=1, item=Rule(ge=1, le=5))
    min_relative_accuracy: float = param(0.0, "gate: mean corrupted accuracy / clean accuracy", ge=0, le=1)
    max_images: int = param(300, "stratified test subset of the sweep", ge=1)
    background_border: int = param(8, "border pixels the background-only baseline sees", ge=1)
    shortcut_max_images: int = param(200, "lab leaves pasted onto field backgrounds by the shortcut check", ge=1)
    max_shortcut_rate: float = param(1.0, "gate: share of those predicted as a field crop (1: report only)",
                                     ge=0, le=1)


@dataclass(frozen=True)
class Int8Params:
    """Post-training INT8 quantisation behind an accuracy gate."""

    enabled: bool = param(True, "try INT8 (kept only if it passes the gate)")
    calibration_images: int = param(300, "training images for calibration", ge=1)
    max_accuracy_drop: float = param(0.01, "INT8 kept only if test accuracy drops by at most this", ge=0, le=1)
    max_eval_images: int = param(1000, "stratified test subset of the INT8 gate", ge=1)


@dataclass(frozen=True)
class ExportParams:
    """The exported bundle."""

    out_dir: str = param("artifacts/bundles", "where bundles are written", pattern=r"\S")
    name: str = param("plantml-leaf-classifier", "bundle name", pattern=_NAME)
    opset: int = param(18, "ONNX opset (17+: LayerNormalization; the dynamo exporter needs 18+)", ge=17, le=23)
    parity_tolerance: float = param(1e-4, "max |logit difference| ONNX/OpenVINO vs torch", gt=0, le=1)
    max_reference_images: int = param(2000, "stratified test subset for the drift reference", ge=1)
    int8: Int8Params = param(doc="INT8 quantisation", factory=Int8Params)


@dataclass(frozen=True)
class StudentParams:
    """The edge student: the champion distilled into a smaller/faster network (flow step ``distill``)."""

    enabled: bool = param(True, "distill an edge student after evaluate (kept in the bundle only if it passes "
                                "its gate)")
    arch: str = param("efficientnet_lite0", "student architecture (the champion's: initialised from its weights)",
                      choices=MODEL_REGISTRY)
    image_size: int = param(112, "student input side in pixels; must be below the champion's", ge=16, le=1024,
                            multiple_of=16)
    epochs: int = param(4, "distillation epochs (early stopping on validation macro-F1 with train.patience)",
                        ge=1)
    lr: float = param(0.001, "peak learning rate (AdamW, warm-up + cosine)", gt=0, le=1)
    temperature: float = param(4.0, "distillation temperature T (softens both distributions)", gt=0, le=100)
    alpha: float = param(0.7, "loss = alpha * KL(student/T || teacher/T) * T^2 + (1 - alpha) * CE", ge=0, le=1)
    frozen_blocks: int = param(1, "stem + this many blocks of the student frozen", ge=0, le=7)
    max_accuracy_drop: float = param(0.01, "gate: each shipped student model's test accuracy (overall and per "
                                           "domain) at most this below the champion FP32's", ge=0, le=1)
    min_speedup: float = param(1.1, "gate: champion's fastest 1-thread latency / student's fastest must reach "
                                    "this", gt=0, le=1000)
    out_dir: str = param("artifacts/student", "where `plantml distill` writes the student", pattern=r"\S")


@dataclass(frozen=True)
class RegistryParams:
    """The MLflow model registry."""

    model_name: str = param("plantml-leaf-classifier", "registered model name", pattern=_NAME)
    alias: str = param("champion", "alias moved to each new version (not 'latest' nor vN)",
                       pattern=r"^(?!latest$)(?![vV][0-9]+$)[A-Za-z0-9_-]+$")
    tracking_uri: str | None = param(None, "null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db", pattern=r"\S")


@dataclass(frozen=True)
class DriftParams:
    """The drift analysis (`plantml drift`)."""

    threshold_share: float = param(0.5, "share of drifted columns that means 'retrain recommended'", gt=0, le=1)
    min_rows: int = param(30, "fewer rows on either side: no verdict", ge=2)
    stattest_threshold: float = param(0.05, "a column drifts when its test's p-value is below this", gt=0, lt=1)


@dataclass(frozen=True)
class StepResources:
    """What one flow step asks of a cluster (Metaflow ``@resources``; ignored when local)."""

    cpu: int = param(2, "CPU cores", ge=1)
    memory: int = param(4096, "memory in MB", ge=256)
    gpu: int = param(0, "GPUs", ge=0)
    disk: int = param(10240, "disk in MB (Kubernetes ephemeral storage)", ge=1024)

    def decorator_kwargs(self) -> dict[str, int]:
        """Arguments for Metaflow's ``@resources`` (no ``gpu`` key when none is wanted)."""
        kwargs = {"cpu": self.cpu, "memory": self.memory, "disk": self.disk}
        return {**kwargs, "gpu": self.gpu} if self.gpu else kwargs


@dataclass(frozen=True)
class ResourcesParams:
    """``@resources`` per flow step."""

    prepare: StepResources = param(doc="the prepare step",
                                   factory=lambda: StepResources(cpu=4, memory=6144, disk=20480))
    train: StepResources = param(doc="each training branch", factory=lambda: StepResources(cpu=4, memory=8192))
    evaluate: StepResources = param(doc="the evaluate step", factory=lambda: StepResources(cpu=4, memory=8192))
    distill: StepResources = param(doc="the distill step (edge student)",
                                   factory=lambda: StepResources(cpu=4, memory=8192))
    export: StepResources = param(doc="the export step", factory=lambda: StepResources(cpu=2, memory=6144))


@dataclass(frozen=True)
class Params:
    """plantml parameters (params.yaml): read by the Metaflow flow, DVC and the `plantml` CLI."""

    data: DataParams = param(doc="data", factory=DataParams)
    train: TrainParams = param(doc="training", factory=TrainParams)
    evaluate: EvaluateParams = param(doc="evaluation", factory=EvaluateParams)
    calibration: CalibrationParams = param(doc="calibration and abstention", factory=CalibrationParams)
    robustness: RobustnessParams = param(doc="robustness", factory=RobustnessParams)
    student: StudentParams = param(doc="the edge student (knowledge distillation)", factory=StudentParams)
    export: ExportParams = param(doc="export", factory=ExportParams)
    registry: RegistryParams = param(doc="model registry", factory=RegistryParams)
    drift: DriftParams = param(doc="drift analysis", factory=DriftParams)
    resources: ResourcesParams = param(doc="cluster resources per flow step", factory=ResourcesParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable view (stored with runs and bundles)."""
        return to_plain(self)


def to_plain(value: Any) -> Any:
    """Dataclasses, mappings and sequences as plain dicts and lists (JSON-serialisable).

    Args:
        value: a parameter section, or any value inside one.

    Returns:
        The same data built from dicts, lists and scalars only.
    """
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value
