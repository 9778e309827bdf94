"""One parameter file for every entry point.

``params.yaml`` is loaded once into frozen dataclasses. Every key is declared with
its type, its range or allowed values and a one-line description (:func:`param`), and
checked at load: an unknown key or a bad value is a :class:`ParamsError` whose message
names the dotted key and the rule it broke, e.g.
``train.patience must be >= 1, got -4``. Model architectures are checked against the
model registry (:func:`plantml.models.available_models`). The same declaration
generates the JSON schema of ``params.yaml`` (:func:`params_json_schema`, checked in as
``params.schema.json``: ``plantml schema --out params.schema.json`` or ``make schema``).
The resolved parameters are stored with every run and every bundle
(:func:`Params.to_dict`).

One job per module:

* :mod:`~plantml.config.rules` — how a parameter is declared and checked
  (:func:`param`, :class:`Rule`, :func:`check_rule`, :class:`ParamsError`).
* :mod:`~plantml.config.sections` — the parameters: one frozen dataclass per section.
* :mod:`~plantml.config.loading` — ``params.yaml`` plus dotted overrides into
  :class:`Params` (:func:`load_params`, :func:`params_from_dict`, :func:`parse_override`).
* :mod:`~plantml.config.schema` — the JSON schema generated from the declaration.

Every public name is re-exported here, so ``from plantml.config import X`` keeps working.
Torch-free: serving and edge import this package.
"""

from __future__ import annotations

from plantml.config.loading import DEFAULT_PARAMS_PATH, load_params, params_from_dict, parse_override
from plantml.config.rules import MODEL_REGISTRY, ParamsError, Rule, check_rule, param, registered_models, rule_of
from plantml.config.schema import SCHEMA_PATH, params_json_schema, schema_text
from plantml.config.sections import (GATE_METRICS, CalibrationParams, DataParams, DistributedParams, DomainParams,
                                     DriftParams, EvaluateParams, ExportParams, GateParams, Int8Params,
                                     ModelParams, Params, RegistryParams, ResourcesParams, RobustnessParams,
                                     SourceParams, StepResources, StudentParams, TrainParams)

__all__ = [
    "DEFAULT_PARAMS_PATH", "GATE_METRICS", "MODEL_REGISTRY", "SCHEMA_PATH", "CalibrationParams", "DataParams",
    "DistributedParams", "DomainParams", "DriftParams", "EvaluateParams", "ExportParams", "GateParams",
    "Int8Params", "ModelParams", "Params", "ParamsError", "RegistryParams", "ResourcesParams",
    "RobustnessParams", "Rule", "SourceParams", "StepResources", "StudentParams", "TrainParams", "check_rule",
    "load_params",
    "param", "params_from_dict", "params_json_schema", "parse_override", "registered_models", "rule_of",
    "schema_text",
]
