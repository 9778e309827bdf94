"""The Linux aarch64 edge binary (issue 16, part 3), run under emulation on x86-64.

``edge/build_aarch64.sh`` builds ``plantml-edge-linux-aarch64`` without running aarch64 code
(arm64 Debian packages unpacked, aarch64 wheels, a self-extracting sh header); these tests
build it into ``tmp_path`` (downloads cached in ``build/aarch64-cache``), or test the already
built ``$PLANTML_EDGE_AARCH64_BINARY``, and run it:

* on an aarch64 host natively (the GitHub ``edge-arm64`` job);
* elsewhere under user-mode emulation. The file is a ``#!/bin/sh`` script that execs the
  carried ``ld-linux-aarch64.so.1``; without a binfmt handler for aarch64 (the CI machine may
  not allow one) the kernel cannot run that loader, so the header runs it as
  ``$PLANTML_EDGE_QEMU <loader> ...`` when that variable names ``qemu-aarch64-static``: only
  the Python process is emulated, the header's sh/tail/gzip/tar are the host's.

Every run uses ``env -i`` with a PATH holding only the shell tools the header uses and qemu
(``command -v python3`` fails there, checked), a fresh extraction cache, and no network
(``unshare -n`` where the kernel allows it). The top-1 class of 20 held-out real photos must be
the x86-64 one: ``$PLANTML_EDGE_BINARY`` (the PyInstaller binary) when set, else the same edge
CLI run by this Python (``python -m edge``, ONNX Runtime FP32 both sides).

Skips, saying why, only where the emulator (or mmdebstrap, installed with it by ``.ci/run``) is
missing or the download servers cannot be reached; ``PLANTML_REQUIRE_AARCH64=1`` (``.ci/run``,
the arm64 job) turns those skips into failures. Emulated timings are printed for the record
only: they say nothing about a real Raspberry Pi.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_CLASSES, make_leaf_image
from tests.support.real_sample import held_out_photos, real_sample_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NATIVE = platform.machine() in ("aarch64", "arm64")
#: What the self-extracting header runs (edge/build_aarch64.sh); python is deliberately absent.
HEADER_TOOLS = ("sh", "tail", "gzip", "tar", "mkdir", "chmod", "ln", "rm", "cut", "id", "uname", "grep",
                "sha256sum")
MAX_BYTES = 100 * 2**20


def _unavailable(reason: str):
    if os.environ.get("PLANTML_REQUIRE_AARCH64", "") not in ("", "0"):
        pytest.fail(f"PLANTML_REQUIRE_AARCH64 is set but {reason}")
    pytest.skip(reason)


def _no_network_prefix() -> list[str]:
    """``unshare -n`` (root) or ``unshare -rn`` (user namespaces) when available."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return []


@pytest.fixture(scope="module")
def qemu() -> str | None:
    """``qemu-aarch64-static`` (None on an aarch64 host), or skip/fail saying why."""
    if NATIVE:
        return None
    path = shutil.which("qemu-aarch64-static")
    if not path:
        _unavailable("qemu-aarch64-static is not installed (Debian/Ubuntu: apt-get install qemu-user-static)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True)
    if out.returncode != 0:
        _unavailable(f"qemu-aarch64-static does not run here: {out.stderr.strip()[:300]}")
    return path


@pytest.fixture(scope="module")
def binary(tmp_path_factory, qemu) -> Path:
    prebuilt = os.environ.get("PLANTML_EDGE_AARCH64_BINARY")
    if prebuilt:
        assert os.path.isfile(prebuilt), f"PLANTML_EDGE_AARCH64_BINARY={prebuilt} does not exist"
        return Path(prebuilt)
    tmp = tmp_path_factory.mktemp("aarch64")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    t0 = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO_ROOT / "edge" / "build_aarch64.sh"), "--dist", str(tmp / "dist"),
                           "--work", str(tmp / "work"), "--no-smoke"],
                          capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode in (3, 4):  # a build tool is missing / the download servers cannot be reached
        _unavailable(f"edge/build_aarch64.sh could not build: {proc.stderr.strip()[-400:]}")
    assert proc.returncode == 0, f"edge/build_aarch64.sh failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    path = tmp / "dist" / "plantml-edge-linux-aarch64"
    assert proc.stdout.strip().splitlines()[-1] == str(path)
    print(f"edge/build_aarch64.sh: {time.perf_counter() - t0:.1f} s")
    shutil.rmtree(tmp / "work", ignore_errors=True)  # 130 MB of staging
    return path


@pytest.fixture(scope="module")
def tools(tmp_path_factory, qemu) -> Path:
    """A PATH folder with the header's shell tools and qemu, and no Python."""
    folder = tmp_path_factory.mktemp("tools")
    for name in HEADER_TOOLS:
        found = shutil.which(name, path="/usr/bin:/bin")
        assert found, f"{name} not found in /usr/bin:/bin"
        (folder / name).symlink_to(found)
    if qemu:
        (folder / "qemu-aarch64-static").symlink_to(qemu)
    return folder


class Runner:
    """Runs the binary with ``env -i``, the tools PATH, its own extraction cache, no network."""

    def __init__(self, binary: Path, tools: Path, qemu: str | None, cache: Path) -> None:
        self.binary, self.tools, self.qemu, self.cache = binary, tools, qemu, cache

    def env(self) -> list[str]:
        env = [f"PATH={self.tools}", f"PLANTML_EDGE_CACHE={self.cache}"]
        return env + ([f"PLANTML_EDGE_QEMU={self.tools / 'qemu-aarch64-static'}"] if self.qemu else [])

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        cmd = [*_no_network_prefix(), "env", "-i", *self.env(), str(self.binary), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(binary, tools, qemu, tmp_path_factory) -> Runner:
    return Runner(binary, tools, qemu, tmp_path_factory.mktemp("cache"))


def test_one_file_that_runs_with_no_python_on_path(binary, tools, qemu, tmp_path):
    size = binary.stat().st_size
    assert binary.read_bytes()[:10] == b"#!/bin/sh\n" and os.access(binary, os.X_OK)
    assert 10 * 2**20 < size < MAX_BYTES, size
    probe = "command -v python3 || command -v python"
    no_python = subprocess.run(["env", "-i", f"PATH={tools}", "/bin/sh", "-c", probe], capture_output=True, text=True)
    assert no_python.returncode != 0 and not no_python.stdout, no_python.stdout
    runner = Runner(binary, tools, qemu, tmp_path / "cache")
    timings = []
    for _ in range(2):  # cold (extracts the payload), then warm
        t0 = time.perf_counter()
        out = runner("version", timeout=300)
        timings.append(time.perf_counter() - t0)
        assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)
    assert versions["python"].startswith("3.11.") and versions["onnxruntime"] and versions["numpy"]
    assert versions["openvino"] is None  # ONNX Runtime only, like plantml-edge-ort
    extracted = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(extracted) == 1 and (extracted[0] / "BUILD-INFO.txt").is_file()
    how = "native" if qemu is None else "EMULATED by qemu-aarch64-static, indicative only"
    print(f"plantml-edge-linux-aarch64: {size} bytes ({size / 2**20:.1f} MiB); `version` cold "
          f"{timings[0]:.2f} s, warm {timings[1]:.2f} s ({how}); {versions}")


def test_refuses_to_run_on_another_cpu_without_an_emulator(binary, tools, tmp_path):
    if NATIVE:
        pytest.skip("this host is aarch64: the binary runs natively")
    if Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("a binfmt handler for aarch64 is registered here: the binary runs through it")
    out = subprocess.run(["env", "-i", f"PATH={tools}", f"PLANTML_EDGE_CACHE={tmp_path}", str(binary), "version"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 126 and "PLANTML_EDGE_QEMU=qemu-aarch64-static" in out.stderr, out.stderr


# --------------------------------------------------------------------------- a torch-free bundle


@pytest.fixture(scope="module")
def colour_bundle(tmp_path_factory) -> Path:
    """A tiny real bundle made without torch (the arm64 CI job has none): an ONNX nearest-colour
    classifier (mean colour, then a linear layer) of the conftest's synthetic leaves."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from plantml.bundle import BundleWriter
    from plantml.preprocess import InputSpec, preprocess_image

    spec = InputSpec(size=16)
    classes = list(TINY_CLASSES)
    centroids = np.stack([preprocess_image(make_leaf_image(rgb, seed=1), spec).mean(axis=(1, 2))
                          for rgb in TINY_CLASSES.values()]).astype(np.float32)      # (C, 3)
    weight = (20.0 * centroids.T).astype(np.float32)                                # logits = 20 (x.c - |c|^2 / 2)
    bias = (-10.0 * (centroids ** 2).sum(axis=1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["mean", "weight"], ["scores"]),
         helper.make_node("Add", ["scores", "bias"], ["logits"])],
        "colour", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(classes)])],
        [numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    root = tmp_path_factory.mktemp("colour_bundle")
    with BundleWriter(root, "colour", "1") as w:
        (w.dir / "model.onnx").write_bytes(model.SerializeToString())
        w.add_file("model.onnx", fmt="onnx", runtime="onnxruntime", precision="fp32")
        path = w.commit({"name": "colour", "version": "1", "architecture": "mean_colour_linear", "classes": classes,
                         "input": spec.to_dict(), "metrics": {},
                         "calibration": {"temperature": 1.0, "abstain_threshold": 0.0},
                         "lineage": {"data_manifest_sha256": "synthetic"}})
    return Path(path)


def test_predicts_offline_on_a_tiny_bundle(run, colour_bundle, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, (name, rgb) in enumerate(TINY_CLASSES.items()):
        make_leaf_image(rgb, size=40, seed=700 + i).save(photos / f"{i}-{name}.jpg", quality=90)
    out = run("predict", "--bundle", str(colour_bundle), "--runtime", "onnxruntime", "--threads", "1", str(photos))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(TINY_CLASSES)
    for row in rows:
        assert row["label"] == Path(row["path"]).stem.split("-", 1)[1] == row["top_k"][0]["label"], row


def test_reports_errors_like_the_x86_binary(run, colour_bundle, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = run("predict", "--bundle", str(colour_bundle), str(bad))
    assert out.returncode == 1 and json.loads(out.stdout)["error"].startswith("not_image"), out.stderr
    out = run("predict", "--bundle", str(tmp_path / "none"), str(bad))
    assert out.returncode == 2 and "bundle directory not found" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------------------------------------- real photos vs x86-64


def _x86_reference(bundle: Path, precision: str, photos: list[Path]) -> tuple[str, list[dict]]:
    args = ["predict", "--bundle", str(bundle), "--runtime", "onnxruntime", "--precision", precision,
            *map(str, photos)]
    x86 = os.environ.get("PLANTML_EDGE_BINARY")
    cmd, what = ([x86, *args], x86) if x86 else ([sys.executable, "-m", "edge", *args], "python -m edge")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    return what, [json.loads(line) for line in out.stdout.splitlines()]


def test_same_top1_as_x86_64_on_20_real_photos(run):
    sample, bundle = real_sample_bundle()
    held_out = held_out_photos(sample, bundle, 20)
    photos = [p for p, _ in held_out]
    truth = {str(p): cls for p, cls in held_out}
    files = json.loads((bundle / "metadata.json").read_text())["files"]
    precisions = sorted({f["precision"] for f in files if f.get("runtime") == "onnxruntime"
                         and f.get("role", "model") == "model"})
    assert "fp32" in precisions, precisions
    for precision in precisions:  # the real-sample bundle has FP32 only; INT8 too where a bundle has it
        t0 = time.perf_counter()
        out = run("predict", "--bundle", str(bundle), "--runtime", "onnxruntime", "--precision", precision,
                  *map(str, photos), timeout=1200)
        seconds = time.perf_counter() - t0
        assert out.returncode == 0, out.stderr
        arm = [json.loads(line) for line in out.stdout.splitlines()]
        what, ref = _x86_reference(bundle, precision, photos)
        assert [r["path"] for r in arm] == [r["path"] for r in ref] == list(map(str, photos))
        differ = [(a["path"], a["top_k"][0]["label"], r["top_k"][0]["label"])
                  for a, r in zip(arm, ref) if a["top_k"][0]["label"] != r["top_k"][0]["label"]]
        assert not differ, f"{precision}: aarch64 and x86-64 ({what}) disagree on: {differ}"
        gap = max(abs(a["confidence"] - r["confidence"]) for a, r in zip(arm, ref))
        correct = sum(a["top_k"][0]["label"] == truth[a["path"]] for a in arm)
        print(f"{precision}: aarch64 vs x86-64 ({what}): same top-1 on {len(arm)}/20, max confidence gap "
              f"{gap:.2e}, {correct}/20 correct; 20 photos in {seconds:.1f} s including start-up "
              f"({'native' if NATIVE else 'emulated'})")
