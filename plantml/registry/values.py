"""Small conversions between plantml's values and what MLflow stores (flat string params, numbers, filters)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}`` (MLflow params are flat strings)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = str(value)[:500]
    return out


def is_number(value: Any) -> bool:
    """A Python int/float (not bool) or a numpy scalar."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) or (hasattr(value, "dtype") and getattr(value, "shape", None) == ())


def now_ms() -> int:
    """Now, in milliseconds since the epoch (MLflow's timestamps)."""
    return int(time.time() * 1000)


def quote(value: str) -> str:
    """Escape a value for an MLflow search filter string literal."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def jsonable(tree: Any) -> Any:
    """``tree`` with values JSON cannot hold turned into strings."""
    return json.loads(json.dumps(tree, default=str))
