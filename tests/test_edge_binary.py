"""Build the single-file ``plantml-edge`` binary and run it with a bare environment.

Builds with ``edge/build_binary.sh`` into ``tmp_path`` (never into the repo; or tests the
already-built ``$PLANTML_EDGE_BINARY``), reusing the
edge build environment when it exists (``$PLANTML_EDGE_VENV``, else ``.venv-edge`` at the
repo root; create it with ``edge/build_binary.sh`` or the lead's make target). Without one,
the script creates a fresh environment under ``tmp_path``; that needs the package index,
so it is skipped when the package index genuinely cannot be reached (pip reports connection
errors AND a TCP connection to the index's host fails) — unless ``PLANTML_REQUIRE_EDGE_BINARY=1``
(CI), where a build that cannot happen is a failure. Any other build failure, a pip
resolution error ("No matching distribution", "Could not find a version") included, fails.

The binary then runs under ``env -i PATH=/usr/bin:/bin`` (no venv, no Python on PATH, no
PYTHONPATH) and, where the kernel allows it, in a new network namespace with no
interfaces (``unshare -n``): a prediction that needed the network would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests._edge_bundles import CLASSES, int8_tiny_bundle
from tests.conftest import REPO_ROOT, TINY_CLASSES, make_leaf_image

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_BINARY_BYTES = 150 * 1024 * 1024  # torch alone would be several GB


def _no_network_prefix() -> list[str]:
    """``unshare -n`` (root) or ``unshare -rn`` (user namespaces) when available."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


#: What pip prints when it cannot reach the index (urllib3/requests connection errors), as
#: opposed to a resolution error, which it also prints after them when offline.
NETWORK_ERRORS = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                  "Name or service not known", "Connection refused", "ConnectTimeoutError", "ProxyError",
                  "No route to host")


def _is_network_failure(stderr: str) -> bool:
    """pip failed because it could not connect, not because of what it was asked to install."""
    return any(s in stderr for s in NETWORK_ERRORS)


def _index_reachable(timeout: float = 5.0) -> bool:
    """A TCP connection to the package index pip uses ($PIP_INDEX_URL, else pypi.org) succeeds."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


#: build_binary.sh announces the pip install on stderr before pip's own output.
_PREAMBLE = "build_binary.sh: preparing /tmp/venv-edge (pip install .[edge] pyinstaller)\n"
_RESOLUTION_ERROR = (_PREAMBLE + "ERROR: Could not find a version that satisfies the requirement onnxruntime==9.9.9\n"
                     "ERROR: No matching distribution found for onnxruntime==9.9.9\n")
_OFFLINE = (_PREAMBLE + "WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) "
            "after connection broken by "
            "'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: "
            "Failed to establish a new connection: [Errno -3] Temporary failure in name resolution')': /simple/pip/\n"
            + _RESOLUTION_ERROR.replace(_PREAMBLE, ""))


@pytest.mark.parametrize("stderr, network", [
    (_RESOLUTION_ERROR, False),  # a bad pin or a missing wheel: a real failure, never "offline"
    (_PREAMBLE + "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io\n", False),
    (_PREAMBLE + "pip: error: no such option: --frobnicate\n", False),
    (_OFFLINE, True),
    (_PREAMBLE + "ERROR: Could not install packages due to an OSError: "
     "HTTPSConnectionPool(host='pypi.org', port=443): Max retries exceeded "
     "(Caused by NewConnectionError(... [Errno 101] Network is unreachable))\n", True),
])
def test_only_a_network_failure_counts_as_offline(stderr, network):
    assert _is_network_failure(stderr) is network


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    prebuilt = os.environ.get("PLANTML_EDGE_BINARY")
    if prebuilt:  # CI that already ran `edge/build_binary.sh` tests that artefact instead of building twice
        assert os.path.isfile(prebuilt), f"PLANTML_EDGE_BINARY={prebuilt} does not exist"
        return Path(prebuilt)
    tmp = tmp_path_factory.mktemp("edge_binary")
    venv = os.environ.get("PLANTML_EDGE_VENV") or str(REPO_ROOT / ".venv-edge")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        venv = str(tmp / "venv-edge")
    env = {**os.environ, "PLANTML_EDGE_VENV": venv}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "edge" / "build_binary.sh"), "--dist", str(tmp / "dist"), "--work", str(tmp / "work")],
        capture_output=True, text=True, env=env, timeout=900,
    )
    if proc.returncode != 0:
        if _is_network_failure(proc.stderr) and not _index_reachable() \
                and not os.environ.get("PLANTML_REQUIRE_EDGE_BINARY"):
            pytest.skip(f"no edge build environment and no network to the package index: {proc.stderr[-300:]}")
        pytest.fail(f"edge/build_binary.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    path = tmp / "dist" / "plantml-edge"
    assert proc.stdout.strip().endswith(str(path))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return int8_tiny_bundle(tmp_path_factory)[0]


def _bare(binary, *args, timeout=180):
    cmd = [*_no_network_prefix(), "env", "-i", "PATH=/usr/bin:/bin", str(binary), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_binary_is_single_file_and_small(binary):
    size = binary.stat().st_size
    print(f"plantml-edge binary: {size} bytes ({size / 2**20:.1f} MiB)")
    assert binary.is_file() and os.access(binary, os.X_OK)
    assert 10 * 2**20 < size < MAX_BINARY_BYTES
    out = _bare(binary, "version")
    assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)
    assert versions["frozen"] is True and versions["onnxruntime"] and versions["openvino"]


def test_binary_predicts_with_a_bare_environment_and_no_network(binary, bundle, tmp_path_factory):
    image = tmp_path_factory.mktemp("img") / "leaf.jpg"
    make_leaf_image(TINY_CLASSES[CLASSES[2]], size=80, seed=4242).save(image, quality=90)
    for extra in ([], ["--runtime", "onnxruntime", "--precision", "int8", "--threads", "1"]):
        out = _bare(binary, "predict", "--bundle", str(bundle), *extra, str(image))
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert len(lines) == 1
        row = json.loads(lines[0])
        assert row["path"] == str(image) and row["label"] == CLASSES[2]
        assert row["abstained"] is False and row["top_k"][0]["label"] == CLASSES[2]


def test_binary_reports_errors_like_the_cli(binary, bundle, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = _bare(binary, "predict", "--bundle", str(bundle), "--runtime", "onnxruntime", str(bad))
    assert out.returncode == 1
    assert json.loads(out.stdout)["error"].startswith("not_image")
    out = _bare(binary, "predict", "--bundle", str(tmp_path / "none"), str(bad))
    assert out.returncode == 2 and "bundle directory not found" in out.stderr and "Traceback" not in out.stderr
