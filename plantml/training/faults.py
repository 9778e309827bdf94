"""Test-only fault injection, so a test can prove that a retried branch resumes.

``PLANTML_FAIL_AT_EPOCH=3`` plus ``PLANTML_FAIL_MARKER=<file>`` makes the first attempt
raise at the start of epoch 3 (and create the marker), so a test can prove that a
retried branch continues from its last checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

FAIL_AT_EPOCH_ENV = "PLANTML_FAIL_AT_EPOCH"
FAIL_MARKER_ENV = "PLANTML_FAIL_MARKER"


class InjectedFailure(RuntimeError):
    """Raised by the test-only fault injection hook."""


def maybe_inject_failure(epoch: int) -> None:
    """Raise :class:`InjectedFailure` once, at the start of the epoch the environment names.

    Args:
        epoch: the epoch about to start.

    Raises:
        InjectedFailure: when ``PLANTML_FAIL_AT_EPOCH`` is ``epoch`` and the marker file
            named by ``PLANTML_FAIL_MARKER`` does not exist yet (it is created first).
    """
    at, marker = os.environ.get(FAIL_AT_EPOCH_ENV), os.environ.get(FAIL_MARKER_ENV)
    if at and marker and int(at) == epoch and not Path(marker).exists():
        Path(marker).write_text(str(epoch))
        raise InjectedFailure(f"injected failure at the start of epoch {epoch} ({FAIL_AT_EPOCH_ENV})")
