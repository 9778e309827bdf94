#!/usr/bin/env bash
# Build dist/plantml-edge-linux-aarch64 on any Linux host (x86-64 included) WITHOUT running
# aarch64 code: a self-extracting single file holding an arm64 Debian 12 (bookworm) CPython 3.11
# with its glibc 2.36, the aarch64 wheels of numpy, Pillow, tqdm and ONNX Runtime, and the
# working tree's edge/ + the plantml modules it imports.
#
#   edge/build_aarch64.sh                                   # -> dist/plantml-edge-linux-aarch64
#   edge/build_aarch64.sh --dist /tmp/out --work /tmp/build --cache build/aarch64-cache
#   edge/build_aarch64.sh --no-smoke                        # skip the post-build `version` run
#
# How (docs/edge.md, "arm64"): 1. `mmdebstrap --variant=extract --arch=arm64` downloads and
# unpacks (dpkg-deb -x; no maintainer script runs, no emulation) python3.11-minimal,
# libpython3.11-stdlib, libstdc++6 and their dependencies from deb.debian.org, signatures
# checked by apt; 2. `pip install --platform manylinux_2_x_aarch64 --only-binary=:all:
# --target` installs the aarch64 wheels; 3. the tree is pruned (test suites, tkinter, idle,
# ensurepip, headers, ONNX Runtime's tooling...), checked (every ELF's NEEDED libraries are
# present) and byte-compiled with this host's CPython 3.11 (.pyc files do not depend on the
# CPU); 4. it is packed as a tar.gz behind a POSIX sh header that extracts it once to a
# cache folder named by its sha256 and runs the carried loader:
#   lib/ld-linux-aarch64.so.1 --library-path lib usr/bin/python3.11 -I -B -m edge ARGS
# The target needs only /bin/sh, tail, gzip, tar, mkdir, ln (coreutils or busybox) and an
# aarch64 Linux kernel; nothing of its own glibc or Python is used.
#
# Downloads are cached under --cache (default build/aarch64-cache, git-ignored); a rerun with
# an unchanged cache needs no network. Needs: mmdebstrap (Debian/Ubuntu package; on a
# non-Debian host also debian-archive-keyring), tar, gzip, sha256sum, a Python with pip
# ($PYTHON, default .venv/bin/python, else python3); Python 3.11 to byte-compile (else the
# .pyc files are written at first run). Exit status: 0 built; 2 usage; 3 a required tool is
# missing; 4 a download failed and its server cannot be reached (offline); 1 anything else.
# stdout: the path of the binary (last line); progress on stderr.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIST="$REPO/dist"
WORK="$REPO/build/aarch64"
CACHE="$REPO/build/aarch64-cache"
NAME="plantml-edge-linux-aarch64"
SMOKE=auto
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
MIRROR="${PLANTML_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${PLANTML_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
SUITE=bookworm  # glibc 2.36, CPython 3.11: Raspberry Pi OS bookworm, Ubuntu 22.04+, Jetson L4T 36
DEBS="python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1,zlib1g,libexpat1,libffi8"

# ONNX Runtime for aarch64 is pinned apart from constraints.txt (x86-64: 1.32.0): its aarch64
# wheels from 1.28.0 on crash (SIGSEGV while `import onnxruntime` loads its extension) under
# Debian 12's qemu-aarch64 7.2 (1.32.0 with the default and cortex-a72 CPU models alike), so
# `make test` could not check them; 1.27.0 is the newest that runs there (2026-12-05: 1.20.1,
# 1.24.4, 1.25.1, 1.26.0, 1.27.0 work; 1.28.0, 1.29.0, 1.31.1, 1.32.0 crash). The GitHub arm64
# job runs this build on real hardware. Move the pin up when CI's emulator runs a newer one.
ORT_AARCH64="${PLANTML_ORT_AARCH64:-1.27.0}"

usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }
die() { local code=$1; shift; echo "build_aarch64.sh: $*" >&2; exit "$code"; }
g() { git -c safe.directory="$REPO" -C "$REPO" "$@"; }  # also when run by root on a user's checkout
say() { echo "build_aarch64.sh: $*" >&2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dist) DIST="$2"; shift 2 ;;
    --work) WORK="$2"; shift 2 ;;
    --cache) CACHE="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --no-smoke) SMOKE=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_aarch64.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
mkdir -p "$DIST" "$WORK" "$CACHE"
DIST="$(cd "$DIST" && pwd)"; WORK="$(cd "$WORK" && pwd)"; CACHE="$(cd "$CACHE" && pwd)"

# --- prerequisites -------------------------------------------------------------------------
for tool in tar gzip sha256sum; do
  command -v "$tool" >/dev/null || die 3 "'$tool' not found (coreutils/tar/gzip)"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die 3 "no pip for PYTHON=$PYTHON (set PYTHON to a Python with pip)"
pin() {  # the version constraints.txt pins (one source of truth with the x86-64 builds)
  local v; v=$(grep -iE "^$1==" "$REPO/constraints.txt" | head -n1 | cut -d= -f3)
  [[ -n "$v" ]] || die 1 "no pin for $1 in constraints.txt"
  echo "$v"
}
WHEELS=("numpy==$(pin numpy)" "pillow==$(pin pillow)" "tqdm==$(pin tqdm)" "onnxruntime==$ORT_AARCH64")

# A download failed: offline (exit 4) only when the server cannot even be reached.
download_failed() {  # $1 = what, $2 = URL whose host is probed, $3 = log file
  local hostport; hostport=$(sed -E 's#^[a-z]+://([^/]+).*#\1#' <<<"$2")
  local host=${hostport%%:*} port=${hostport##*:}
  [[ "$port" == "$hostport" ]] && { [[ "$2" == https* ]] && port=443 || port=80; }
  tail -n 20 "$3" >&2
  if ! timeout 10 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then
    die 4 "$1 failed and $host:$port cannot be reached: no network? (downloads are cached in $CACHE)"
  fi
  die 1 "$1 failed (see the log above)"
}

# --- 1. the arm64 Debian userland (extract only) ------------------------------------------
ROOT_TAR="$CACHE/debian-$SUITE-arm64.tar"
ROOT_KEY=$(printf '%s\n' "$SUITE" "$DEBS" "$MIRROR" "$SECURITY_MIRROR" | sha256sum | cut -c1-16)
if [[ ! -f "$ROOT_TAR" || "$(cat "$ROOT_TAR.key" 2>/dev/null)" != "$ROOT_KEY" ]]; then
  command -v mmdebstrap >/dev/null || die 3 "mmdebstrap not found: apt-get install mmdebstrap (.ci/run does)"
  keyring=()
  # On a non-Debian host (Ubuntu) apt does not trust Debian's keys by default.
  if [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] && ! grep -qs '^ID=debian' /etc/os-release; then
    keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
  fi
  say "downloading the arm64 $SUITE packages ($DEBS and dependencies) with mmdebstrap --variant=extract"
  log="$WORK/mmdebstrap.log"
  # The extract hook records the exact package versions (the .debs are removed afterwards).
  if ! mmdebstrap --variant=extract --arch=arm64 --format=tar "${keyring[@]}" --include="$DEBS" \
      --extract-hook='for f in "$1"/var/cache/apt/archives/*.deb; do dpkg-deb -f "$f" Package Version | paste -sd" " | sed "s/Package: //; s/ Version: /=/"; done > "$1"/PLANTML-DEBS' \
      "$SUITE" "$ROOT_TAR.tmp" "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
      "deb $SECURITY_MIRROR $SUITE-security main" >"$log" 2>&1; then
    rm -f "$ROOT_TAR.tmp"
    download_failed "mmdebstrap" "$MIRROR" "$log"
  fi
  mv "$ROOT_TAR.tmp" "$ROOT_TAR"
  echo "$ROOT_KEY" > "$ROOT_TAR.key"
fi

# --- 2. the aarch64 wheels ------------------------------------------------------------------
# Every manylinux tag up to the carried glibc (2.36), so pip picks the wheel built for it.
PLATFORMS=(--platform manylinux2014_aarch64)
for v in $(seq 17 36); do PLATFORMS+=(--platform "manylinux_2_${v}_aarch64"); done
PIPX=(--only-binary=:all: --no-deps --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none
      "${PLATFORMS[@]}")
WHEELHOUSE="$CACHE/wheels"
mkdir -p "$WHEELHOUSE"
have_wheel() {  # name==version already in the wheelhouse?
  local n=${1%%==*} v=${1##*==}
  compgen -G "$WHEELHOUSE/${n,,}-${v}-*.whl" >/dev/null || compgen -G "$WHEELHOUSE/${n^}-${v}-*.whl" >/dev/null
}
missing=()
for w in "${WHEELS[@]}"; do have_wheel "$w" || missing+=("$w"); done
if ((${#missing[@]})); then
  say "downloading aarch64 wheels: ${missing[*]}"
  log="$WORK/pip-download.log"
  # PIP_CONSTRAINT (a host-wide cap) must not veto the pins above.
  if ! PIP_CONSTRAINT= "$PYTHON" -m pip download --disable-pip-version-check --quiet "${PIPX[@]}" \
      -d "$WHEELHOUSE" "${missing[@]}" >"$log" 2>&1; then
    download_failed "pip download ${missing[*]}" "${PIP_INDEX_URL:-https://pypi.org/simple}" "$log"
  fi
fi

# --- 3. assemble the tree -----------------------------------------------------------------
STAGE="$WORK/stage"
rm -rf "$STAGE" "$WORK/root"
mkdir -p "$WORK/root" "$STAGE/lib" "$STAGE/usr/bin" "$STAGE/usr/lib" "$STAGE/share/doc"
tar -xf "$ROOT_TAR" -C "$WORK/root" --no-same-owner --exclude='./dev/*' \
  ./PLANTML-DEBS ./lib ./usr/lib ./usr/bin/python3.11 ./usr/share/doc
R="$WORK/root"
# glibc, the C++ runtime and the libraries python3.11 and its kept extension modules link to.
cp -L "$R/lib/ld-linux-aarch64.so.1" "$STAGE/lib/"
for so in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libresolv.so.2 libutil.so.1 \
          libz.so.1 libexpat.so.1 libffi.so.8 libbz2.so.1.0 liblzma.so.5 libstdc++.so.6 libgcc_s.so.1 \
          libnss_files.so.2 libnss_dns.so.2; do
  src=""
  for d in "$R/lib/aarch64-linux-gnu" "$R/usr/lib/aarch64-linux-gnu"; do [[ -e "$d/$so" ]] && { src="$d/$so"; break; }; done
  [[ -n "$src" ]] || die 1 "$so not found in the $SUITE arm64 packages"
  cp -L "$src" "$STAGE/lib/$so"
done
cp "$R/usr/bin/python3.11" "$STAGE/usr/bin/"
cp -a "$R/usr/lib/python3.11" "$STAGE/usr/lib/"
# Licences of what is redistributed (glibc LGPL, libstdc++ GCC RLE, PSF, ...).
for pkg in $(cut -d= -f1 "$R/PLANTML-DEBS"); do
  pkg=${pkg%%:*}
  [[ -f "$R/usr/share/doc/$pkg/copyright" ]] && install -D -m644 "$R/usr/share/doc/$pkg/copyright" "$STAGE/share/doc/$pkg/copyright"
done

PY="$STAGE/usr/lib/python3.11"
# Not needed by an offline CLI: tests, GUIs, packaging, databases, terminals, the ssl/crypto stack.
rm -rf "$PY"/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data,venv,sqlite3,dbm,curses,distutils,config-3.11-*} \
       "$PY"/turtle.py "$PY"/lib-dynload/{_ssl,_hashlib,_sqlite3,_dbm,_gdbm,_curses,_curses_panel,readline,_uuid,_crypt,nis}.*
SITE="$STAGE/usr/lib/python3/dist-packages"  # on sys.path through Debian's site.py
mkdir -p "$SITE"
log="$WORK/pip-install.log"
PIP_CONSTRAINT= "$PYTHON" -m pip install --disable-pip-version-check --quiet --no-index --find-links "$WHEELHOUSE" \
  --no-compile --target "$SITE" "${PIPX[@]}" "${WHEELS[@]}" >"$log" 2>&1 || { tail -n 20 "$log" >&2; die 1 "pip install --target failed"; }
# ONNX Runtime's tooling (quantization, transformers, ...) imports onnx/sympy and is not used
# at inference; capi/libonnxruntime.so.* is the C API library, which the Python extension
# (self-contained, RUNPATH $ORIGIN) does not load: 20 MB saved.
rm -rf "$SITE"/bin "$SITE"/numpy/{f2py,distutils,_pyinstaller,_core/include,random/_examples} \
       "$SITE"/onnxruntime/{tools,quantization,transformers,datasets,backend} "$SITE"/onnxruntime/capi/libonnxruntime.so.*
find "$SITE" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find "$SITE" -name '*.pyi' -delete

# The application: edge/ and the plantml modules it imports (found statically, function-level
# imports included, by the host's modulefinder; torch & co. are never among them: import-linter).
"$PYTHON" - "$REPO" "$SITE" <<'EOF'
import modulefinder, shutil, sys
from pathlib import Path
repo, site = Path(sys.argv[1]), Path(sys.argv[2])
finder = modulefinder.ModuleFinder(path=[str(repo)])
finder.run_script(str(repo / "edge" / "__main__.py"))
mods = sorted(n for n in finder.modules if n.split(".")[0] in ("edge", "plantml"))
files = [Path(finder.modules[n].__file__) for n in mods] + [repo / "edge" / "__main__.py"]
for src in files:
    dst = site / src.relative_to(repo)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
print(f"build_aarch64.sh: application modules: {' '.join(mods)}", file=sys.stderr)
EOF
find "$SITE/edge" "$SITE/plantml" -name '*.py' | grep -q 'edge/cli.py' || die 1 "edge/cli.py was not collected"

# Every shared object's NEEDED libraries must be in lib/ or beside it (wheel .libs, $ORIGIN):
# checked here with readelf (binutils) since nothing aarch64 runs at build time.
if command -v readelf >/dev/null; then
  bad=0
  have=$(ls "$STAGE/lib")
  while IFS= read -r -d '' elf; do
    dir=$(dirname "$elf")
    for need in $(readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      grep -qxF "$need" <<<"$have" && continue
      compgen -G "$dir/$need" >/dev/null && continue
      compgen -G "$SITE/*.libs/$need" >/dev/null && continue
      compgen -G "$SITE/*/.libs/$need" >/dev/null && continue
      if [[ "$elf" == */lib-dynload/* ]]; then  # a stdlib module whose library is not shipped
        say "dropping ${elf#"$STAGE"/} (needs $need)"; rm -f "$elf"; break
      fi
      echo "build_aarch64.sh: ${elf#"$STAGE"/} needs $need, which is not bundled" >&2; bad=1
    done
  done < <(find "$STAGE" -type f \( -name '*.so' -o -name '*.so.*' -o -path '*/usr/bin/*' \) -print0)
  ((bad == 0)) || die 1 "missing shared libraries (above)"
else
  say "readelf not found (binutils): shared-library closure not checked"
fi

# Byte-compile with this host's CPython 3.11: same bytecode on every CPU. unchecked-hash pycs
# are used whatever the extracted files' mtimes, and -B at run time keeps the cache read-only.
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  "$PYTHON" -I -m compileall -q -j 0 --invalidation-mode unchecked-hash "$STAGE/usr/lib/python3.11" "$SITE" >/dev/null \
    || die 1 "compileall failed"
else
  say "PYTHON is not CPython 3.11: no .pyc files bundled (slower first start)"
fi

# Dated by the commit (not the clock): the same tree and downloads give the same file.
EPOCH=$(g log -1 --format=%ct 2>/dev/null || date +%s)
{
  echo "plantml-edge for Linux aarch64, source date $(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ), commit $(g rev-parse --short HEAD 2>/dev/null || echo unknown)$(g diff --quiet 2>/dev/null || echo '+dirty')"
  echo "debian $SUITE arm64 packages:"; sed 's/^/  /' "$R/PLANTML-DEBS"
  echo "wheels:"; printf '  %s\n' "${WHEELS[@]}"
} > "$STAGE/BUILD-INFO.txt"
rm -rf "$R"

# --- 4. pack: sh header + tar.gz payload ------------------------------------------------------
PAYLOAD="$WORK/payload.tar.gz"
tar -C "$STAGE" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$EPOCH" -cf - . | gzip -n -6 > "$PAYLOAD"
SHA=$(sha256sum "$PAYLOAD" | cut -d' ' -f1)

HEADER="$WORK/header.sh"
cat > "$HEADER" <<'EOF'
#!/bin/sh
# plantml-edge for Linux aarch64: a POSIX sh header and a tar.gz payload (CPython 3.11 and
# glibc 2.36 from Debian 12, numpy, Pillow, ONNX Runtime, plantml's edge CLI). Built by
# edge/build_aarch64.sh; see docs/edge.md. Needs /bin/sh, tail, gzip, tar, mkdir, ln, rm.
#
# First run: the payload is checked and extracted to $PLANTML_EDGE_CACHE, else
# $XDG_CACHE_HOME/plantml-edge, else ~/.cache/plantml-edge, else $TMPDIR/plantml-edge-UID,
# in a folder named by its sha256 (later runs start from there). Then the carried loader runs
# the carried Python. On another CPU, PLANTML_EDGE_QEMU=qemu-aarch64-static runs it under
# user-mode emulation (the test suite does this on x86-64); a registered binfmt handler
# for aarch64 (qemu-user-static + binfmt-support) works too.
set -eu
SHA=@SHA@
SKIP=@SKIP@
self=$0
case $self in */*) ;; *) self=$(command -v -- "$self") ;; esac
if [ -n "${PLANTML_EDGE_CACHE:-}" ]; then base=$PLANTML_EDGE_CACHE
elif [ -n "${XDG_CACHE_HOME:-}" ]; then base=$XDG_CACHE_HOME/plantml-edge
elif [ -n "${HOME:-}" ] && [ -d "${HOME:-}" ] && [ -w "${HOME:-}" ]; then base=$HOME/.cache/plantml-edge
else base=${TMPDIR:-/tmp}/plantml-edge-$(id -u); fi
# Decided before extracting: how the aarch64 loader will run here.
emu=
case $(uname -m) in
  aarch64|arm64) ;;
  *) if [ -n "${PLANTML_EDGE_QEMU:-}" ]; then emu=$PLANTML_EDGE_QEMU
     elif grep -qs '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64; then :  # the kernel hands it to qemu
     else
       echo "plantml-edge: this is the Linux aarch64 build and this machine is $(uname -m)." >&2
       echo "  Run it on an aarch64 Linux (Raspberry Pi OS 64-bit, Ubuntu arm64, Jetson), or under emulation:" >&2
       echo "  PLANTML_EDGE_QEMU=qemu-aarch64-static $self ARGS  (Debian/Ubuntu: apt-get install qemu-user-static)" >&2
       exit 126
     fi ;;
esac
dir=$base/$SHA
if [ ! -f "$dir/.complete" ]; then
  mkdir -p "$base"
  chmod 700 "$base" 2>/dev/null || true
  if [ ! -O "$base" ]; then echo "plantml-edge: $base is not owned by this user; set PLANTML_EDGE_CACHE" >&2; exit 2; fi
  if command -v sha256sum >/dev/null 2>&1; then
    got=$(tail -n "+$SKIP" "$self" | sha256sum | cut -d' ' -f1)
    if [ "$got" != "$SHA" ]; then echo "plantml-edge: $self is corrupt (payload sha256 $got, expected $SHA)" >&2; exit 2; fi
  fi
  tmp=$base/.tmp.$$
  rm -rf "$tmp"; mkdir "$tmp"
  if ! tail -n "+$SKIP" "$self" | gzip -dc | tar -xf - -C "$tmp"; then
    rm -rf "$tmp"; echo "plantml-edge: could not extract to $base (disk full? set PLANTML_EDGE_CACHE)" >&2; exit 2
  fi
  : > "$tmp/.complete"
  if [ -L "$dir" ] && [ ! -f "$dir/.complete" ]; then rm -f "$dir"; fi  # its target was deleted
  # ln -sn is atomic and fails if the link exists: of two first runs racing, one link wins
  # and the other copy is removed (-n: never create the link inside the linked folder).
  ln -sn ".tmp.$$" "$dir" 2>/dev/null || rm -rf "$tmp"
fi
ld=$dir/lib/ld-linux-aarch64.so.1
py=$dir/usr/bin/python3.11
# -I: ignore PYTHON* variables and user site-packages; -B: never write into the cache.
if [ -n "$emu" ]; then exec "$emu" "$ld" --library-path "$dir/lib" "$py" -I -B -m edge "$@"; fi
exec "$ld" --library-path "$dir/lib" "$py" -I -B -m edge "$@"
EOF
lines=$(wc -l < "$HEADER")
sed -i "s/@SHA@/$SHA/; s/@SKIP@/$((lines + 1))/" "$HEADER"
[[ $(wc -l < "$HEADER") == "$lines" ]] || die 1 "header changed length"
BIN="$DIST/$NAME"
cat "$HEADER" "$PAYLOAD" > "$BIN.tmp"
chmod 755 "$BIN.tmp"
mv "$BIN.tmp" "$BIN"
SIZE=$(stat -c %s "$BIN")
UNPACKED=$(du -sk "$STAGE" | cut -f1)
say "built $BIN ($((SIZE / 1024 / 1024)) MiB, $SIZE bytes; $((UNPACKED / 1024)) MiB extracted; payload sha256 $SHA)"

# --- smoke test: natively on aarch64, else under qemu-aarch64-static when installed ----------
if [[ "$SMOKE" == auto ]]; then
  case "$(uname -m)" in
    aarch64|arm64) env -i PATH=/usr/bin:/bin "$BIN" version >&2 ;;
    *) if command -v qemu-aarch64-static >/dev/null; then
         env -i PATH=/usr/bin:/bin PLANTML_EDGE_CACHE="$WORK/cache" PLANTML_EDGE_QEMU="$(command -v qemu-aarch64-static)" \
           "$BIN" version >&2
       else say "not smoke-tested: this host is $(uname -m) and qemu-aarch64-static is not installed"; fi ;;
  esac
fi
echo "$BIN"
