"""The JSON schema of ``params.yaml``, generated from the declaration (``params.schema.json``).

``plantml schema --out params.schema.json`` (or ``make schema``) writes it; a test checks
the checked-in file equals :func:`schema_text`. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from plantml.config.loading import DEFAULT_PARAMS_PATH
from plantml.config.rules import Rule, choices_of, rule_of
from plantml.config.sections import Params, to_plain

#: Where the generated JSON schema of ``params.yaml`` is checked in.
SCHEMA_PATH = DEFAULT_PARAMS_PATH.with_name("params.schema.json")

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
            prop["default"] = to_plain(default)
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
    choices = choices_of(rule)
    if choices is not None:
        out["enum"] = list(choices)
    return out


def schema_text() -> str:
    """The schema as the checked-in file holds it (sorted keys, 2-space indent, final newline)."""
    return json.dumps(params_json_schema(), indent=2) + "\n"
