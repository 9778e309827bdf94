"""One parameter file for every entry point.

``params.yaml`` is loaded once into frozen dataclasses. Every key is declared here with
its type, its range or allowed values and a one-line description (:func:`param`), and
checked at load: an unknown key or a bad value is a :class:`ParamsError` whose message
names the dotted key and the rule it broke, e.g.
``train.patience must be >= 1, got -4``. Model architectures are checked against the
model registry (:func:`plantml.models.available_models`). The same declaration
generates the JSON schema of ``params.yaml`` (:func:`params_json_schema`, checked in as
``params.schema.json``: ``plantml schema --out params.schema.json`` or ``make schema``).
The resolved parameters are stored with every run and every bundle
(:func:`Params.to_dict`).

Torch-free: serving and edge import this module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

DEFAULT_PARAMS_PATH = Path(__file__).resolve().parent.parent / "params.yaml"

#: Where the generated JSON schema of ``params.yaml`` is checked in.
SCHEMA_PATH = DEFAULT_PARAMS_PATH.with_name("params.schema.json")

#: Marker for :attr:`Rule.choices`: the names of the model registry.
MODEL_REGISTRY = "model registry"

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"   # file-, stage- and registry-safe names


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key."""


# --------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Rule:
    """The constraints of one parameter beyond its type (also emitted into the JSON schema).

    Attributes:
        doc: one line for people (and the schema's ``description``).
        ge, gt, le, lt: numeric bounds (inclusive / exclusive).
        choices: the allowed values, or :data:`MODEL_REGISTRY` for the registered model names.
        multiple_of: integers only.
        pattern: a regular expression a string must match (``re.search``).
        min_items, max_items: length bounds of a list or mapping.
        item: the rule of every list item.
        key_pattern: a regular expression every mapping key must match.
    """

    doc: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | str | None = None
    multiple_of: int | None = None
    pattern: str | None = None
    min_items: int | None = None
    max_items: int | None = None
    item: Rule | None = None
    key_pattern: str | None = None


def param(default: Any = dataclasses.MISSING, doc: str = "", *,
          factory: Callable[[], Any] | None = None, **rule: Any) -> Any:
    """Declare one parameter: its default, description and :class:`Rule` keywords.

    Args:
        default: the default value (immutable); use ``factory`` for mutable defaults.
        doc: one line describing the parameter.
        factory: builds the default (sections, mappings).
        **rule: :class:`Rule` fields, e.g. ``ge=1`` or ``choices=("auto", "cpu")``.

    Returns:
        A :func:`dataclasses.field` carrying the rule in its metadata.
    """
    metadata = {"rule": Rule(doc=doc, **rule)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def rule_of(f: dataclasses.Field) -> Rule:
    """The :class:`Rule` declared on a dataclass field (an empty one if none)."""
    return f.metadata.get("rule", Rule())


def registered_models() -> tuple[str, ...] | None:
    """The model registry's names, or ``None`` where :mod:`plantml.models` cannot be imported.

    Imported here, lazily, for one reason: ``plantml.models`` sits above this module in
    the layering (it uses the config), and its names are data that the config must check.
    It imports no torch at import time (its constructors do), so this stays torch-free.
    """
    try:
        from plantml.models import available_models
    except ImportError:  # a minimal install without the models package
        return None
    return tuple(available_models())


def _choices(rule: Rule) -> tuple[Any, ...] | None:
    if rule.choices == MODEL_REGISTRY:
        return registered_models()
    return rule.choices  # type: ignore[return-value]


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds_text(rule: Rule) -> str | None:
    """``in [0, 1]``-style text for the numeric bounds of a rule (None if it has none)."""
    low = (f"[{_fmt(rule.ge)}" if rule.ge is not None else f"({_fmt(rule.gt)}" if rule.gt is not None else None)
    high = (f"{_fmt(rule.le)}]" if rule.le is not None else f"{_fmt(rule.lt)})" if rule.lt is not None else None)
    if low and high:
        return f"in {low}, {high}"
    if low:
        return f">= {low[1:]}" if low[0] == "[" else f"> {low[1:]}"
    if high:
        return f"<= {high[:-1]}" if high[-1] == "]" else f"< {high[:-1]}"
    return None


def _in_bounds(value: float, rule: Rule) -> bool:
    return not ((rule.ge is not None and value < rule.ge) or (rule.gt is not None and value <= rule.gt)
                or (rule.le is not None and value > rule.le) or (rule.lt is not None and value >= rule.lt))


def check_rule(value: Any, rule: Rule, key: str) -> None:
    """Check a type-converted value against its rule.

    Raises:
        ParamsError: naming ``key``, the rule and the value.
    """
    if value is None:
        return
    choices = _choices(rule)
    if choices is not None and value not in choices:
        source = f" (the {MODEL_REGISTRY})" if rule.choices == MODEL_REGISTRY else ""
        raise ParamsError(f"{key} must be one of {', '.join(map(str, choices))}{source}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamsError(f"{key} must be a finite number, got {value!r}")
        if not _in_bounds(value, rule):
            raise ParamsError(f"{key} must be {_bounds_text(rule)}, got {value!r}")
        if rule.multiple_of and value % rule.multiple_of:
            raise ParamsError(f"{key} must be a multiple of {rule.multiple_of}, got {value!r}")
    if isinstance(value, str) and rule.pattern and not re.search(rule.pattern, value):
        raise ParamsError(f"{key} must match {rule.pattern}, got {value!r}")
    if isinstance(value, (tuple, list, dict)):
        _check_items(value, rule, key)


def _check_items(value: tuple | list | dict, rule: Rule, key: str) -> None:
    if rule.min_items is not None and len(value) < rule.min_items:
        raise ParamsError(f"{key} must have at least {rule.min_items} item(s), got {len(value)}")
    if rule.max_items is not None and len(value) > rule.max_items:
        raise ParamsError(f"{key} must have at most {rule.max_items} item(s), got {len(value)}")
    if isinstance(value, dict):
        for k in value:
            if rule.key_pattern and not re.search(rule.key_pattern, k):
                raise ParamsError(f"{key} keys must match {rule.key_pattern}, got {k!r}")
    elif rule.item is not None:
        for i, item in enumerate(value):
            check_rule(item, rule.item, f"{key}[{i}]")


# --------------------------------------------------------------------------- the parameters


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
    epochs: int | None = param(None, "epochs for this model (null: train.epochs)", ge=1)
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
    epochs: int = param(8, "maximum epochs", ge=1)
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
    export: StepResources = param(doc="the export step", factory=lambda: StepResources(cpu=2, memory=6144))


@dataclass(frozen=True)
class Params:
    """plantml parameters (params.yaml): read by the Metaflow flow, DVC and the `plantml` CLI."""

    data: DataParams = param(doc="data", factory=DataParams)
    train: TrainParams = param(doc="training", factory=TrainParams)
    evaluate: EvaluateParams = param(doc="evaluation", factory=EvaluateParams)
    calibration: CalibrationParams = param(doc="calibration and abstention", factory=CalibrationParams)
    robustness: RobustnessParams = param(doc="robustness", factory=RobustnessParams)
    export: ExportParams = param(doc="export", factory=ExportParams)
    registry: RegistryParams = param(doc="model registry", factory=RegistryParams)
    drift: DriftParams = param(doc="drift analysis", factory=DriftParams)
    resources: ResourcesParams = param(doc="cluster resources per flow step", factory=ResourcesParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable view (stored with runs and bundles)."""
        return _to_plain(self)


# --------------------------------------------------------------------------- loading


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
    """Check a YAML scalar against ``bool``/``int``/``float``/``str`` (no silent conversion)."""
    if hint is bool and not isinstance(value, bool):
        raise ParamsError(f"{key} must be true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ParamsError(f"{key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ParamsError(f"{key} must be a string, got {value!r}")
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if value is None:
        raise ParamsError(f"{key} must not be null")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        return _coerce_tuple(value, args, key)
    return _coerce_scalar(value, hint, key)


def _coerce_tuple(value: Any, args: tuple[Any, ...], key: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ParamsError(f"{key} must be a list, got {type(value).__name__}")
    variadic = len(args) == 2 and args[1] is Ellipsis
    if not variadic and len(value) != len(args):
        raise ParamsError(f"{key} must be a list of {len(args)} items, got {len(value)}")
    items = [args[0]] * len(value) if variadic else list(args)
    return tuple(_coerce(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, items)))


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, raw)) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown parameter {where}{unknown[0]!s} (known in {prefix or 'top level'}: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
        check_rule(kwargs[name], rule_of(fields[name]), key)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ParamsError(f"cannot set {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value`` (value read as YAML) into ``(dotted_key, value)``."""
    if "=" not in text:
        raise ParamsError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def params_from_dict(raw: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None) -> Params:
    """Build :class:`Params` from a mapping plus dotted overrides.

    Args:
        raw: the parsed YAML (may be ``None`` for all defaults).
        overrides: ``{"train.epochs": 3}``-style values applied on top.

    Returns:
        The validated, frozen parameters.

    Raises:
        ParamsError: on an unknown key or a bad value (the message names the key and the rule).
    """
    tree: dict[str, Any] = _to_plain(dict(raw or {}))
    for dotted, value in (overrides or {}).items():
        _set_dotted(tree, dotted, value)
    return _build(Params, tree, "")


def load_params(path: str | os.PathLike[str] | None = None, overrides: Mapping[str, Any] | None = None) -> Params:
    """Load and validate ``params.yaml``.

    Args:
        path: the file; defaults to ``$PLANTML_PARAMS`` or the repository's ``params.yaml``.
        overrides: dotted-key overrides, e.g. ``{"train.epochs": 2}``.

    Raises:
        ParamsError: if the file is missing or invalid.
    """
    path = Path(path or os.environ.get("PLANTML_PARAMS") or DEFAULT_PARAMS_PATH)
    if not path.is_file():
        raise ParamsError(f"parameter file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    return params_from_dict(raw, overrides)


# --------------------------------------------------------------------------- JSON schema

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


def params_json_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of ``params.yaml``, generated from the declaration.

    Cross-field rules (``data.split`` sums to 1, train fraction > 0) are only described,
    not expressed; :func:`load_params` checks them.
    """
    defs: dict[str, Any] = {}
    root = _object_schema(Params, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "plantml params.yaml", **root, "$defs": dict(sorted(defs.items()))}


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    props = {}
    for f in dataclasses.fields(cls):
        rule = rule_of(f)
        prop = {**_type_schema(hints[f.name], rule, defs)}
        if rule.doc:
            prop["description"] = rule.doc
        if not dataclasses.is_dataclass(hints[f.name]):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            prop["default"] = _to_plain(default)
        props[f.name] = prop
    return {"type": "object", "description": (cls.__doc__ or "").strip().splitlines()[0],
            "properties": props, "additionalProperties": False}


def _type_schema(hint: Any, rule: Rule, defs: dict[str, Any]) -> dict[str, Any]:
    """The schema of one annotated type plus its rule's keywords."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = _type_schema(next(a for a in args if a is not type(None)), rule, defs)
        inner["type"] = [inner["type"], "null"]
        if "enum" in inner:
            inner["enum"] = [*inner["enum"], None]
        return inner
    if dataclasses.is_dataclass(hint):
        if hint.__name__ not in defs:
            defs[hint.__name__] = {}  # placeholder against recursion
            defs[hint.__name__] = _object_schema(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    if origin is dict:
        out: dict[str, Any] = {"type": "object", "additionalProperties": _type_schema(args[1], Rule(), defs)}
        if rule.key_pattern:
            out["propertyNames"] = {"pattern": rule.key_pattern}
        if rule.min_items is not None:
            out["minProperties"] = rule.min_items
        return out
    if origin is tuple:
        return _array_schema(args, rule, defs)
    return {"type": _JSON_TYPES[hint], **_rule_keywords(rule)}


def _array_schema(args: tuple[Any, ...], rule: Rule, defs: dict[str, Any]) -> dict[str, Any]:
    item = _type_schema(args[0], rule.item or Rule(), defs)
    if len(args) == 2 and args[1] is Ellipsis:
        out: dict[str, Any] = {"type": "array", "items": item}
    else:
        out = {"type": "array", "prefixItems": [item] * len(args), "items": False,
               "minItems": len(args), "maxItems": len(args)}
    if rule.min_items is not None:
        out["minItems"] = rule.min_items
    if rule.max_items is not None:
        out["maxItems"] = rule.max_items
    return out


def _rule_keywords(rule: Rule) -> dict[str, Any]:
    """JSON-schema keywords of a scalar's rule."""
    names = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum",
             "multiple_of": "multipleOf", "pattern": "pattern"}
    out = {names[k]: getattr(rule, k) for k in names if getattr(rule, k) is not None}
    choices = _choices(rule)
    if choices is not None:
        out["enum"] = list(choices)
    return out


def schema_text() -> str:
    """The schema as the checked-in file holds it (sorted keys, 2-space indent, final newline)."""
    import json

    return json.dumps(params_json_schema(), indent=2) + "\n"
