"""Helpers shared by the test modules (not tests themselves; fixtures stay in tests/conftest.py).

* :mod:`tests.support.net` — ``free_port``.
* :mod:`tests.support.serving` — a real gunicorn server, a uniform HTTP client, bad inputs.
* :mod:`tests.support.moto` — moto's S3 server on loopback.

Modules import one another relatively, so they work as ``tests.support`` and, for a run
from inside ``tests/``, as ``support``.
"""
