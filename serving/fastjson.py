"""Flask's JSON answers encoded by orjson (issue 16: the encoder was a measurable share of a request).

orjson writes the same JSON text for what the service answers (dicts, lists, strings, ints,
Python floats, bools, ``None``) in a fraction of the time of the standard library, and
keeps the key order (the service never sorts keys). Dates and dataclasses are handed to
Flask's own ``default`` (orjson would write dates differently), so no answer changes.
Without orjson installed the app keeps Flask's provider.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask.json.provider import DefaultJSONProvider

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is in the serve extra; stay correct without it
    orjson = None
else:
    #: Types Flask encodes its own way go through ``default`` instead of orjson's native form.
    _PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


class OrjsonProvider(DefaultJSONProvider):
    """:class:`~flask.json.provider.DefaultJSONProvider` with orjson doing the encoding."""

    sort_keys = False

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        """Encode ``obj`` (Flask's encoder when called with options of the standard library)."""
        if kwargs:
            return super().dumps(obj, **kwargs)
        return self._encode(obj).decode()

    def response(self, *args: Any, **kwargs: Any) -> Any:
        """A JSON response, encoded straight to bytes (no ``str`` round trip)."""
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(self._encode(obj), mimetype=self.mimetype)

    def _encode(self, obj: Any) -> bytes:
        return orjson.dumps(obj, default=self.default, option=_PASSTHROUGH)


def use_fast_json(app: Flask) -> None:
    """Make ``jsonify`` and ``app.json`` encode with orjson (when it is installed)."""
    if orjson is not None:
        app.json = OrjsonProvider(app)
