"""Paired A/B of the service's CPU cost per request: two source trees served side by side.

Both servers (same bundle, runtime and precision, 2 workers each, real gunicorn on
loopback) run at once; blocks of requests alternate A, B, B, A, ... so that slow changes in
the machine's load hit both alike. The figure is the CPU time (user + system, from
``/proc/<pid>/stat``) of each server's master and workers per answered ``/predict``
request: what bounds the peak throughput of a saturated machine, and much steadier than
wall-clock req/s on a shared one. Compare a commit before a change with one after it::

    git worktree add /tmp/wt-a <commit before>; git worktree add /tmp/wt-b <commit after>
    .venv/bin/python benchmarks/ab_cpu_per_request.py --a /tmp/wt-a --b /tmp/wt-b \\
        --bundle artifacts/real-sample/bundle --runtime openvino --pairs 20 --out reports/bench/ab.json

Run an A/A pair (the same tree twice) to see the noise floor of the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics as st
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def harness_of(tree: Path, tag: str) -> ModuleType:
    """The server harness of ``tree`` (``benchmarks/serve_harness.py``, or ``serve_load.py`` in older trees)."""
    name = "serve_harness.py" if (tree / "benchmarks" / "serve_harness.py").exists() else "serve_load.py"
    spec = importlib.util.spec_from_file_location(f"harness_{tag}", tree / "benchmarks" / name)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(tree))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.pop(0)
    return module


def run_block(server, harness: ModuleType, images: list[bytes], count: int) -> float:
    """CPU milliseconds per request of ``server`` over ``count`` requests from 2 client threads."""
    url = f"http://127.0.0.1:{server.port}/predict"
    pids = [server.proc.pid] + harness.children_of(server.proc.pid)

    def post(i: int) -> int:
        files = {"file": ("leaf.jpg", images[i % len(images)], "image/jpeg")}
        return requests.post(url, files=files, timeout=30).status_code

    before = cpu_seconds(pids)
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(post, range(count)))
    if any(code != 200 for code in codes):
        raise RuntimeError(f"non-200 answers: {sorted(set(codes))}")
    return (cpu_seconds(pids) - before) / count * 1000


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", type=Path, required=True, help="source tree A (e.g. a worktree of the commit before)")
    p.add_argument("--b", type=Path, required=True, help="source tree B")
    p.add_argument("--bundle", type=Path, default=REPO_ROOT / "artifacts" / "real-sample" / "bundle")
    p.add_argument("--images", type=Path, default=REPO_ROOT.parent / "shared" / "data" / "plantvillage-mini")
    p.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--block", type=int, default=150, help="requests per block")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[::31][:64]]
    servers = {}
    try:
        for tag, tree in (("A", args.a), ("B", args.b)):
            harness = harness_of(tree.resolve(), tag)
            server = harness.our_server(args.runtime, args.precision, args.bundle.resolve(), 2,
                                        Path(tempfile.mkdtemp()))
            server.start("/ready")
            servers[tag] = (server, harness)
        for tag in ("A", "B"):
            run_block(*servers[tag], images, 30)  # warm-up
        cpu: dict[str, list[float]] = {"A": [], "B": []}
        for pair in range(args.pairs):
            for tag in (("A", "B") if pair % 2 == 0 else ("B", "A")):
                cpu[tag].append(run_block(*servers[tag], images, args.block))
    finally:
        for server, _ in servers.values():
            server.stop()
    ratios = [b / a for a, b in zip(cpu["A"], cpu["B"])]
    q1, _, q3 = st.quantiles(ratios, n=4)
    report = {"a": str(args.a), "b": str(args.b), "runtime": args.runtime, "precision": args.precision,
              "pairs": args.pairs, "block": args.block, "cpu_ms_per_request": cpu,
              "median_ms": {"A": st.median(cpu["A"]), "B": st.median(cpu["B"])},
              "median_ratio_b_over_a": st.median(ratios), "ratio_quartiles": [q1, q3],
              "loadavg_end": os.getloadavg(), "cpu_flags": _cpu_flags()}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


def _cpu_flags() -> list[str]:
    """The vector-instruction flags of this CPU that decide inference speed."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")) or "vnni" in f)
    return []


if __name__ == "__main__":
    main()
