"""One parameter file for every entry point.

``params.yaml`` is loaded once into frozen dataclasses. Unknown keys and values of the
wrong type are rejected with a :class:`ParamsError` that names the dotted key, so a
typo never silently falls back to a default. The resolved parameters are stored with
every run and every bundle (:func:`Params.to_dict`).

Torch-free: serving and edge import this module.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_PARAMS_PATH = Path(__file__).resolve().parent.parent / "params.yaml"


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key."""


@dataclass(frozen=True)
class DataParams:
    data_dir: str | None = None
    demo_dir: str = "data/demo"
    demo_classes: int = 6
    demo_images_per_class: int = 40
    demo_image_size: int = 128
    split: tuple[float, float, float] = (0.7, 0.2, 0.1)
    seed: int = 42
    max_images_per_class: int | None = None
    prepared_dir: str = "artifacts/prepared"
    samples_per_shard: int = 1000

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ParamsError(f"data.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise ParamsError(f"data.split must be three non-negative fractions summing to 1, got {list(self.split)}")
        if self.demo_classes < 2:
            raise ParamsError("data.demo_classes must be at least 2")
        if self.demo_images_per_class < 10:
            raise ParamsError("data.demo_images_per_class must be at least 10")


@dataclass(frozen=True)
class ModelParams:
    arch: str = "efficientnet_lite0"
    lr: float = 1e-3
    epochs: int | None = None
    frozen_blocks: int = 0


@dataclass(frozen=True)
class DistributedParams:
    world_size: int = 1
    backend: str = "auto"

    def validate(self) -> None:
        if self.world_size < 1:
            raise ParamsError(f"train.distributed.world_size must be >= 1, got {self.world_size}")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ParamsError(f"train.distributed.backend must be auto, gloo or nccl, got {self.backend!r}")


@dataclass(frozen=True)
class TrainParams:
    image_size: int = 160
    batch_size: int = 32
    epochs: int = 8
    patience: int = 3
    label_smoothing: float = 0.1
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    device: str = "auto"
    num_threads: int = 0
    loader_workers: int = -1
    shuffle_buffer: int = 512
    seed: int = 42
    out_dir: str = "artifacts/train"
    distributed: DistributedParams = field(default_factory=DistributedParams)
    models: dict[str, ModelParams] = field(
        default_factory=lambda: {"cnn": ModelParams(), "vit": ModelParams(arch="hybrid_vit_tiny")}
    )

    def validate(self) -> None:
        if self.image_size < 32 or self.image_size % 16:
            raise ParamsError(f"train.image_size must be a multiple of 16 and >= 32, got {self.image_size}")
        if self.epochs < 1:
            raise ParamsError("train.epochs must be >= 1")
        if self.batch_size < 1:
            raise ParamsError("train.batch_size must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ParamsError(f"train.device must be auto, cpu or cuda, got {self.device!r}")
        if not self.models:
            raise ParamsError("train.models must name at least one model")
        if self.loader_workers < -1:
            raise ParamsError(f"train.loader_workers must be -1 (automatic) or >= 0, got {self.loader_workers}")
        if self.shuffle_buffer < 0:
            raise ParamsError(f"train.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


@dataclass(frozen=True)
class EvaluateParams:
    champion_metric: str = "macro_f1"
    champion_tie_tolerance: float = 0.005
    min_macro_f1: float = 0.5
    min_accuracy: float = 0.5
    out_dir: str = "artifacts/eval"

    def validate(self) -> None:
        if self.champion_metric not in ("macro_f1", "accuracy"):
            raise ParamsError(f"evaluate.champion_metric must be macro_f1 or accuracy, got {self.champion_metric!r}")


@dataclass(frozen=True)
class CalibrationParams:
    target_precision: float = 0.99
    min_coverage: float = 0.5
    ood_enabled: bool = True
    ood_acceptance: float = 0.95
    ood_components: int = 64
    ood_max_fit_images: int = 3000

    def validate(self) -> None:
        if not 0.0 < self.target_precision <= 1.0:
            raise ParamsError(f"calibration.target_precision must be in (0, 1], got {self.target_precision}")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ParamsError(f"calibration.min_coverage must be in [0, 1], got {self.min_coverage}")
        if not 0.5 <= self.ood_acceptance <= 1.0:
            raise ParamsError(f"calibration.ood_acceptance must be in [0.5, 1], got {self.ood_acceptance}")
        if self.ood_components < 1:
            raise ParamsError(f"calibration.ood_components must be >= 1, got {self.ood_components}")
        if self.ood_max_fit_images < 20:
            raise ParamsError(f"calibration.ood_max_fit_images must be >= 20, got {self.ood_max_fit_images}")


@dataclass(frozen=True)
class RobustnessParams:
    severities: tuple[int, ...] = (1, 3, 5)
    min_relative_accuracy: float = 0.0
    max_images: int = 300
    background_border: int = 8


@dataclass(frozen=True)
class Int8Params:
    enabled: bool = True
    calibration_images: int = 300
    max_accuracy_drop: float = 0.01
    max_eval_images: int = 1000


@dataclass(frozen=True)
class ExportParams:
    out_dir: str = "artifacts/bundles"
    name: str = "plantml-leaf-classifier"
    opset: int = 18
    parity_tolerance: float = 1e-4
    max_reference_images: int = 2000
    int8: Int8Params = field(default_factory=Int8Params)


@dataclass(frozen=True)
class RegistryParams:
    model_name: str = "plantml-leaf-classifier"
    alias: str = "champion"
    tracking_uri: str | None = None


@dataclass(frozen=True)
class DriftParams:
    threshold_share: float = 0.5
    min_rows: int = 30
    stattest_threshold: float = 0.05


@dataclass(frozen=True)
class StepResources:
    """What one flow step asks of a cluster (Metaflow ``@resources``; ignored when local)."""

    cpu: int = 2
    memory: int = 4096   # MB
    gpu: int = 0
    disk: int = 10240    # MB (Kubernetes ephemeral storage)

    def decorator_kwargs(self) -> dict[str, int]:
        """Arguments for Metaflow's ``@resources`` (no ``gpu`` key when none is wanted)."""
        kwargs = {"cpu": self.cpu, "memory": self.memory, "disk": self.disk}
        return {**kwargs, "gpu": self.gpu} if self.gpu else kwargs

    def validate(self) -> None:
        if self.cpu < 1 or self.memory < 256 or self.gpu < 0 or self.disk < 1024:
            raise ParamsError(f"resources: cpu >= 1, memory >= 256 MB, gpu >= 0, disk >= 1024 MB; got {self}")


@dataclass(frozen=True)
class ResourcesParams:
    prepare: StepResources = field(default_factory=lambda: StepResources(cpu=4, memory=6144, disk=20480))
    train: StepResources = field(default_factory=lambda: StepResources(cpu=4, memory=8192))
    evaluate: StepResources = field(default_factory=lambda: StepResources(cpu=4, memory=8192))
    export: StepResources = field(default_factory=lambda: StepResources(cpu=2, memory=6144))


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    calibration: CalibrationParams = field(default_factory=CalibrationParams)
    robustness: RobustnessParams = field(default_factory=RobustnessParams)
    export: ExportParams = field(default_factory=ExportParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    drift: DriftParams = field(default_factory=DriftParams)
    resources: ResourcesParams = field(default_factory=ResourcesParams)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable view (stored with runs and bundles)."""
        return _to_plain(self)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
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
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key} must be a mapping, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key} must be a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key} must be a list, got {type(value).__name__}")
        item = args[0]
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ParamsError(
            f"unknown parameter {where}{unknown[0]!s} (known in {prefix or 'top level'}: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
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
        ParamsError: on an unknown key or a bad value (the message names the key).
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
