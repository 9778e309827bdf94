"""Where the pipeline's relative paths point: the repository root, never the working directory."""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout this package lives in (``plantml/pipeline/paths.py`` -> three levels up).
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def repo_path(p: str | os.PathLike[str]) -> Path:
    """A path from params, made absolute.

    Args:
        p: a path as written in ``params.yaml`` (``~`` is expanded).

    Returns:
        ``p`` itself when absolute, else ``p`` under the repository root (not the cwd).
    """
    p = Path(p).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p
