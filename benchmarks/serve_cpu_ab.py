"""A/B of the service's CPU time per request between variants: source trees x settings (issue 16).

CPU seconds (user + system, ``/proc/<pid>/stat``) of the gunicorn master and workers per
answered request, for 64 real JPEGs POSTed to ``/predict`` by 2 keep-alive client threads
(raw ``image/jpeg`` bodies like the peak phase of ``serve_load.py``; ``MODE=multipart`` for
uploads). CPU time per request is what limits peak throughput on a saturated machine and,
unlike wall-clock throughput, barely moves when other jobs share the cores. Variants run in
a rotated order each round; the summary gives medians and ratios to the first variant.
Not part of the product; targets 127.0.0.1 only.

    # VARIANTS.json: {"base": ["/work/wt-base", {}], "new": ["/work/wt-new", {"PLANTML_X": "v"}]}
    # ("TMP" in a value is replaced by the round's temporary folder)
    python benchmarks/serve_cpu_ab.py ROUNDS REQUESTS VARIANTS.json onnxruntime,openvino
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script: benchmarks.* from the repository root

from benchmarks.ab_cpu_per_request import cpu_seconds, harness_of  # noqa: E402 - after the path insert

BUNDLE = Path(os.environ.get("AB_BUNDLE", REPO_ROOT / "artifacts" / "real-sample" / "bundle"))
IMAGES = Path(os.environ.get("AB_IMAGES", REPO_ROOT.parent / "shared" / "data" / "plantvillage-mini"))
MODE = os.environ.get("MODE", "raw")


def poster(url: str, bodies: list[bytes]):
    """A function POSTing image ``i`` on a keep-alive session of the calling thread; returns the status."""
    import requests

    local = threading.local()

    def post(i: int) -> int:
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = bodies[i % len(bodies)]
        if MODE == "raw":
            return session.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=30).status_code
        return session.post(url, files={"file": ("leaf.jpg", body, "image/jpeg")}, timeout=30).status_code
    return post


def one_round(tree: str, extra: dict[str, str], runtime: str, n: int,
              bodies: list[bytes]) -> tuple[float, float, float]:
    """CPU ms per request, wall req/s and the largest worker RSS (MB) of one served variant."""
    harness = harness_of(Path(tree), Path(tree).name)
    tmp = Path(tempfile.mkdtemp())
    server = harness.our_server(runtime, "fp32", BUNDLE, int(extra.get("PLANTML_WORKERS", 2)), tmp)
    server.env.update({k: v.replace("TMP", str(tmp)) for k, v in extra.items()})
    server.start("/ready")
    post = poster(f"http://127.0.0.1:{server.port}/predict", bodies)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(post, range(40)))  # warm up
            pids = [server.proc.pid] + harness.children_of(server.proc.pid)
            c0, t0 = cpu_seconds(pids), time.monotonic()
            codes = list(pool.map(post, range(n)))
            c1, t1 = cpu_seconds(pids), time.monotonic()
        rss = max(m.get("rss_mb", 0.0) for m in server.worker_memory())
    finally:
        server.stop()
    if any(c != 200 for c in codes):
        raise RuntimeError(f"non-200 answers: {sorted(set(codes))}")
    return (c1 - c0) / n * 1000, n / (t1 - t0), rss


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not all(a.isdigit() for a in argv[:2]) or not Path(argv[2]).is_file():
        print("usage: serve_cpu_ab.py ROUNDS REQUESTS VARIANTS.json [RUNTIMES]  (see the module docstring)",
              file=sys.stderr)
        return 2
    rounds, n = int(argv[0]), int(argv[1])
    variants = json.loads(Path(argv[2]).read_text())
    runtimes = argv[3].split(",") if len(argv) > 3 else ["onnxruntime"]
    bodies = [p.read_bytes() for p in sorted(IMAGES.rglob("*.jpg"))[::31][:64]]
    names = list(variants)
    out: dict[str, dict[str, list[float]]] = {}
    for rnd in range(rounds):
        for runtime in runtimes:
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                ms, rps, rss = one_round(*variants[name], runtime, n, bodies)
                out.setdefault(runtime, {}).setdefault(name, []).append(ms)
                print(f"round {rnd} {runtime} {name}: {ms:.2f} CPU ms/request ({rps:.1f} req/s wall, "
                      f"worker RSS {rss:.0f} MB) load {os.getloadavg()[0]:.1f}", flush=True)
    for runtime, per in out.items():
        med = {k: statistics.median(v) for k, v in per.items()}
        ratios = {f"{k}/{names[0]}": round(statistics.median(a / b for a, b in zip(per[k], per[names[0]])), 3)
                  for k in per if k != names[0]}
        print(runtime, MODE, {k: round(v, 2) for k, v in med.items()}, "paired ratio medians", ratios)
    Path(os.environ.get("AB_OUT", "serve_cpu_ab.json")).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
