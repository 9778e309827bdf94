"""``python -m edge`` runs the ``plantml-edge`` CLI (also the PyInstaller entry point)."""

import sys

from edge.cli import main

if __name__ == "__main__":
    sys.exit(main())
