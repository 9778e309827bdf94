"""Reading ``params.yaml`` into :class:`~plantml.config.sections.Params`, with dotted overrides.

Every YAML value is converted to its annotated type without silent conversion and
checked against its declared rule; an unknown key or a bad value is a
:class:`~plantml.config.rules.ParamsError` naming the dotted key. Torch-free.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from plantml.config.rules import ParamsError, check_rule, rule_of
from plantml.config.sections import Params, to_plain

#: The repository's ``params.yaml`` (the default of :func:`load_params`).
DEFAULT_PARAMS_PATH = Path(__file__).resolve().parents[2] / "params.yaml"


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
    tree: dict[str, Any] = to_plain(dict(raw or {}))
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
