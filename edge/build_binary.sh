#!/usr/bin/env bash
# Build the single-file `plantml-edge` binary with PyInstaller.
#
#   edge/build_binary.sh                          # -> dist/plantml-edge (ONNX Runtime + OpenVINO)
#   edge/build_binary.sh --variant onnxruntime    # ONNX Runtime only (smaller, faster cold start)
#   edge/build_binary.sh --dist /tmp/out --work /tmp/build --venv /opt/venv-edge
#
# The build runs in its own virtual environment (default .venv-edge, or $PLANTML_EDGE_VENV)
# that holds only `pip install .[edge] pyinstaller`: PyInstaller run inside the training
# environment would follow torch's hooks and produce a multi-GB binary. The environment
# is created on first use (needs the package index) and reused afterwards; it is
# reinstalled when setup.cfg changes. The sources bundled are the working tree's.
#
# PyInstaller does not cross-compile: the binary runs on the OS/CPU family it was built
# on (glibc of the build machine or newer). For arm64 (Raspberry Pi OS 64-bit) run this
# same script on the Pi or in an arm64 container; see docs/edge.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PLANTML_EDGE_VENV:-$REPO/.venv-edge}"
DIST="$REPO/dist"
WORK="$REPO/build/pyinstaller"
VARIANT="full"
NAME="plantml-edge"
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,16p' "$0"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --variant) VARIANT="$2"; shift 2 ;;
    --dist) DIST="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_binary.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$VARIANT" in full|onnxruntime) ;; *) echo "build_binary.sh: --variant must be full or onnxruntime" >&2; exit 2 ;; esac

# --- the edge build environment ------------------------------------------------------------
STAMP="$VENV/.plantml-edge-installed"
WANT="$(sha256sum "$REPO/setup.cfg" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/pyinstaller" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "build_binary.sh: preparing $VENV (pip install .[edge] pyinstaller)" >&2
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  # Install from a copy of the sources so that pip's in-tree build leaves the repo untouched.
  SRC="$(mktemp -d)"
  trap 'rm -rf "$SRC"' EXIT
  cp -r "$REPO/setup.cfg" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/plantml" "$REPO/edge" "$SRC/"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "$SRC[edge]" pyinstaller
  echo "$WANT" > "$STAMP"
fi
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('torch') else 1)"; then
  echo "build_binary.sh: torch is installed in $VENV; the edge build environment must not hold it" >&2
  exit 1
fi

# --- build -------------------------------------------------------------------------------
mkdir -p "$DIST" "$WORK"
# PYTHONPATH puts the working tree ahead of the copy installed in the venv.
PYTHONPATH="$REPO" PLANTML_REPO="$REPO" PLANTML_EDGE_VARIANT="$VARIANT" PLANTML_EDGE_NAME="$NAME" \
  "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath "$DIST" --workpath "$WORK" "$REPO/edge/plantml-edge.spec" >&2

BIN="$DIST/$NAME"
# Smoke test in a bare environment: no venv, minimal PATH.
env -i PATH=/usr/bin:/bin "$BIN" version >&2
SIZE=$(stat -c %s "$BIN")
echo "build_binary.sh: built $BIN ($VARIANT, $((SIZE / 1024 / 1024)) MiB, $SIZE bytes)" >&2
echo "$BIN"
