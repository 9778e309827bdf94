"""``python -m plantml.drift``: the same command as ``plantml drift``."""

from plantml.drift.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
