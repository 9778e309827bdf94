"""How a parameter is declared and checked: :func:`param`, :class:`Rule`, :func:`check_rule`.

Every field of the parameter dataclasses (:mod:`plantml.config.sections`) carries a
:class:`Rule` in its metadata; the loader (:mod:`plantml.config.loading`) checks each
value against it and the schema generator (:mod:`plantml.config.schema`) turns it into
JSON-schema keywords. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

#: Marker for :attr:`Rule.choices`: the names of the model registry.
MODEL_REGISTRY = "model registry"


class ParamsError(ValueError):
    """A parameter file or override is invalid; the message names the key."""


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


def choices_of(rule: Rule) -> tuple[Any, ...] | None:
    """The allowed values of a rule, with :data:`MODEL_REGISTRY` resolved to the registry's names."""
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

    Args:
        value: the value, already converted to its annotated type (``None`` passes).
        rule: the parameter's declared rule.
        key: the dotted key, for the message.

    Raises:
        ParamsError: naming ``key``, the rule and the value.
    """
    if value is None:
        return
    choices = choices_of(rule)
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
