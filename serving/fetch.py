"""Download a registered bundle from MLflow: ``python -m serving.fetch URI CACHE_DIR``.

The gunicorn master runs this in a child process before forking the workers, so that
the workers share one download and neither the master nor the workers ever import
mlflow (hundreds of MB that a model server does not need after start-up). Prints the
bundle directory on stdout; exits 1 with the reason on stderr.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from serving.predictor import ModelLoadError, fetch_model


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m serving.fetch MODEL_URI CACHE_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        path = fetch_model(args[0], Path(args[1]))
    except ModelLoadError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
