"""Sampling profile of one live gunicorn worker under closed-loop load (issue 16), grouped into cost centres.

Starts the service (``benchmarks/serve_harness.our_server``, 2 workers) on a bundle, keeps
two keep-alive clients POSTing 64 real JPEGs to ``/predict`` back to back (raw ``image/jpeg``
bodies like the peak phase of ``serve_load.py``, or ``--multipart``), records one worker
with ``py-spy record`` (``pip install py-spy``: a measuring tool, not a dependency of the
product) and prints the share of the worker's samples per cost centre. Not part of the
product; targets 127.0.0.1 only.

    python benchmarks/serve_profile.py --bundle artifacts/real-sample/bundle \\
        --images ../shared/data/plantvillage-mini --out /tmp/worker.txt
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.serve_harness import children_of, our_server  # noqa: E402

#: Cost centres, checked in order; a sample goes to the first whose frame names match.
COST_CENTRES = [
    ("inference (runtime's run call)", ["Session.run (onnxruntime", "InferRequest", "CompiledModel"]),
    ("JPEG decode (Pillow load)", ["ImageFile.load"]),
    ("resize (Pillow)", ["Image.resize"]),
    ("normalize (numpy)", ["normalize (plantml"]),
    ("header parse, EXIF, RGB", ["open_image", "finish_decode"]),
    ("calibration, softmax, top-k", ["Calibration.", "top_k (plantml", "softmax"]),
    ("drift thumbnail + statistics", ["shrink_for_stats", "image_statistics", "DriftFeed"]),
    ("metrics (prometheus)", ["prometheus_flask_exporter", "prometheus_client", "ServingMetrics"]),
    ("JSON encoding", ["jsonify", "JSONEncoder", "orjson", "OrjsonProvider", "json/provider"]),
    ("multipart parsing (werkzeug)", ["formparser", "multipart", "read_uploads"]),
    ("response write (gunicorn)", ["Response.write", "Response.send_headers", "Response.close"]),
    ("heartbeat (WorkerTmp.notify)", ["WorkerTmp.notify"]),
    ("main loop: poll, read and buffer requests", ["ThreadWorker.run", "wait_for_and_dispatch_events"]),
    ("rest of Flask (routing, request/response objects)", ["Flask.wsgi_app", "MethodFilter"]),
    ("rest of gunicorn (parse, environ, thread hand-off)", ["handle_request", "ThreadWorker.handle", "_WorkItem.run",
                                                            "enqueue_req", "defer"]),
]


def cost_centres(collapsed: Path) -> list[tuple[str, float]]:
    """Share of samples per cost centre of a py-spy ``--format raw`` (collapsed stacks) file."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        name = next((c for c, keys in COST_CENTRES if any(k in f for f in frames for k in keys)),
                    "other (idle thread-pool waits, interpreter)")
        counts[name] += int(n)
    total = sum(counts.values()) or 1
    return [(name, 100.0 * n / total) for name, n in counts.most_common()]


def keep_posting(url: str, bodies: list[bytes], multipart: bool, stop: threading.Event, offset: int) -> None:
    """One keep-alive client POSTing the images in turn until ``stop``."""
    import requests

    session, i = requests.Session(), offset
    while not stop.is_set():
        body = bodies[i % len(bodies)]
        if multipart:
            r = session.post(url, files={"file": ("leaf.jpg", body, "image/jpeg")}, timeout=30)
        else:
            r = session.post(url, data=body, headers={"Content-Type": "image/jpeg"}, timeout=30)
        r.raise_for_status()
        i += 2


def profile(args: argparse.Namespace) -> Path:
    """Serve, load, record one worker for ``--seconds``; returns the collapsed-stack file."""
    bodies = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[::31][:64]]
    server = our_server(args.runtime, args.precision, args.bundle, 2, Path(tempfile.mkdtemp()))
    server.start("/ready")
    stop = threading.Event()
    url = f"http://127.0.0.1:{server.port}/predict"
    clients = [threading.Thread(target=keep_posting, args=(url, bodies, args.multipart, stop, k)) for k in range(2)]
    try:
        for c in clients:
            c.start()
        time.sleep(3)  # past warm-up
        subprocess.run([args.py_spy, "record", "-p", str(children_of(server.proc.pid)[0]), "-d", str(args.seconds),
                        "-r", "250", "-f", "raw", "-o", str(args.out), "--nonblocking"], check=True,
                       capture_output=True)
    finally:
        stop.set()
        for c in clients:
            c.join(60)
        server.stop()
    return args.out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--runtime", default="onnxruntime")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--multipart", action="store_true", help="multipart uploads instead of raw image/jpeg bodies")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("worker-profile.txt"))
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = p.parse_args(argv)
    for name, share in cost_centres(profile(args)):
        print(f"| {name} | {share:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
