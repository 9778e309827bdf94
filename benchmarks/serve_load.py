"""Load benchmark of the prediction service against real gunicorn on loopback.

For each configuration (ONNX Runtime / OpenVINO x FP32 / INT8, and the plain Flask +
torch-eager baseline of ``benchmarks/flask_torch_baseline.py``) it:

1. starts the server (2 workers) and measures **start-to-ready**: process spawn until
   ``/ready`` first answers 200, and until every worker has logged its model load;
2. finds **peak throughput** with ``wrk`` (closed loop, 1 client thread, ``--connections``
   keep-alive connections, ``--duration`` seconds), POSTing 256x256 JPEG leaf photos
   (raw ``image/jpeg`` bodies, rotating over the image set);
3. offers **80 % of that peak** as an open-loop constant arrival rate from a Python
   asyncio/aiohttp generator for ``--duration`` seconds (latency measured from each
   request's *scheduled* send time, so queueing is not hidden) and reports p50/p95/p99
   and errors;
4. reads every worker's resident memory (VmRSS and PSS) after the load;
5. stops the server with SIGTERM.

Everything is bounded in time and count and targets 127.0.0.1 only. Without ``wrk`` the
peak phase falls back to the Python generator in closed-loop mode (reported).

Usage::

    # export an EfficientNet-Lite0 bundle (+ INT8 via plantml.quantize) and its torch weights, then run all
    python benchmarks/serve_load.py --export-to /tmp/plantml-bench --out /tmp/plantml-bench/results.json
    # or against an existing bundle (the baseline needs --weights for the same model)
    python benchmarks/serve_load.py --bundle PATH --configs onnxruntime:fp32,openvino:fp32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("serve_load")

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "plantvillage-mini"
GUNICORN_CONF = REPO_ROOT / "serving" / "gunicorn.conf.py"
DEFAULT_CONFIGS = "onnxruntime:fp32,openvino:fp32,onnxruntime:int8,openvino:int8,torch:baseline,torch:baseline1"


# --------------------------------------------------------------------------- inputs


def collect_images(src: Path | None, n: int, tmp: Path) -> list[Path]:
    """Up to ``n`` 256x256 JPEG leaf photos: from the shared sample, else synthetic ones."""
    if src is not None and src.is_dir():
        paths = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
        if paths:
            step = max(1, len(paths) // n)
            return paths[::step][:n]
    from PIL import Image

    out = tmp / "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = np.array([40 + i % 60, 120 + i % 80, 40], dtype=np.float32)
        arr = np.clip(base + rng.normal(0, 25, (256, 256, 3)), 0, 255).astype(np.uint8)
        p = out / f"leaf_{i:03d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def export_bench_bundle(out_root: Path, images: list[Path], int8: bool) -> tuple[Path, Path]:
    """EfficientNet-Lite0 (ImageNet backbone, untrained 18-class head) as a bundle + torch weights.

    Throughput does not depend on the head's weights; a trained bundle from the training
    flow can be passed with ``--bundle``/``--weights`` instead.
    """
    import torch

    from plantml.export import export_bundle
    from plantml.models import create_model
    from plantml.preprocess import InputSpec, load_image, preprocess_batch

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 18, image_size=224).eval()
    spec = InputSpec(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = preprocess_batch([load_image(p) for p in images], spec)
    steps = []
    if int8:
        from plantml.quantize import int8_export_step

        with torch.no_grad():
            y = model(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
        # The gate compares INT8 with FP32 on the FP32 model's own answers; the bundle is
        # for speed measurement only, so any drop is accepted (max_accuracy_drop=1).
        steps.append(int8_export_step(x, x, y, max_accuracy_drop=1.0))
    out_root.mkdir(parents=True, exist_ok=True)
    bundle, _ = export_bundle(
        model, out_root=out_root, name="plantml-bench", architecture="efficientnet_lite0",
        classes=[f"class_{i:02d}" for i in range(18)], input_spec=spec, parity_inputs=x[:8],
        metrics={"fp32": {"note": "benchmark bundle, untrained head"}},
        lineage={"metaflow_run_id": None, "mlflow_run_id": None, "data_manifest_sha256": "benchmark"},
        extra_steps=steps,
    )
    weights = out_root / "model_state.pt"
    torch.save(model.state_dict(), weights)
    return bundle, weights


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and PSS (proportional set size: shared pages split between sharers) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = int(line.split()[1]) / 1024
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class Server:
    """One server under test: ours (runtime/precision) or the torch baseline."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, workers: int, log_path: Path,
                 loaded_marker: str | None) -> None:
        self.name, self.cmd, self.env, self.port, self.workers = name, cmd, env, port, workers
        self.log_path, self.loaded_marker = log_path, loaded_marker
        self.proc: subprocess.Popen | None = None

    def start(self, ready_path: str, timeout: float = 180) -> dict[str, float]:
        import requests

        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(REPO_ROOT), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        first_ready = all_loaded = None
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            if first_ready is None:
                try:
                    if requests.get(f"http://127.0.0.1:{self.port}{ready_path}", timeout=5).status_code == 200:
                        first_ready = time.monotonic() - t0
                except requests.RequestException:
                    pass
            if all_loaded is None and self.loaded_marker:
                if self.log_path.read_text(errors="replace").count(self.loaded_marker) >= self.workers:
                    all_loaded = time.monotonic() - t0
            if first_ready is not None and (all_loaded is not None or not self.loaded_marker):
                break
            time.sleep(0.02)
        if first_ready is None:
            raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")
        return {"start_to_ready_s": first_ready, "start_to_all_workers_loaded_s": all_loaded}

    def worker_memory(self) -> list[dict[str, float]]:
        return [memory_mb(pid) for pid in children_of(self.proc.pid)]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def our_server(runtime: str, precision: str, bundle: Path, workers: int, tmp: Path) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "PROMETHEUS_"))}
    env.update({
        "PYTHONPATH": str(REPO_ROOT), "PLANTML_BUNDLE": str(bundle), "PLANTML_RUNTIME": runtime,
        "PLANTML_PRECISION": precision, "PLANTML_HOST": "127.0.0.1", "PLANTML_PORT": str(port),
        "PLANTML_WORKERS": str(workers), "PLANTML_ACCESS_LOG": "false", "PLANTML_LOG_LEVEL": "info",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / f"prom-{runtime}-{precision}"),
    })
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.wsgi:app"]
    return Server(f"{runtime}:{precision}", cmd, env, port, workers, tmp / f"server-{runtime}-{precision}.log",
                  loaded_marker="serving.predictor: model ")


def baseline_server(weights: Path, workers: int, tmp: Path, torch_threads: int | None = None,
                    arch: str = "efficientnet_lite0", n_classes: int = 18, size: int = 224) -> Server:
    """The torch baseline: torch's default threads, or ``torch_threads`` per worker (``torch:baseline1``).

    ``arch``, ``n_classes`` and ``size`` come from the served bundle, so both serve the same model.
    """
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), BASELINE_WEIGHTS=str(weights),
               BASELINE_ARCH=arch, BASELINE_CLASSES=str(n_classes), BASELINE_SIZE=str(size))
    env.pop("BASELINE_TORCH_THREADS", None)
    if torch_threads:
        env["BASELINE_TORCH_THREADS"] = str(torch_threads)
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--timeout", "120",
           "--no-control-socket", "benchmarks.flask_torch_baseline:create_app()"]
    name = f"torch:baseline{torch_threads or ''}"
    return Server(name, cmd, env, port, workers, tmp / f"server-{name.replace(':', '-')}.log", loaded_marker=None)


# --------------------------------------------------------------------------- load generators

WRK_SCRIPT = r"""
local paths = {%s}
local bodies = {}
local i = 0
init = function(args)
  for _, p in ipairs(paths) do
    local f = assert(io.open(p, "rb")); bodies[#bodies + 1] = f:read("*a"); f:close()
  end
end
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "/predict", {["Content-Type"] = "image/jpeg"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\"requests\": %%d, \"duration_us\": %%d, \"errors_connect\": %%d, \"errors_read\": %%d, " ..
    "\"errors_write\": %%d, \"errors_status\": %%d, \"errors_timeout\": %%d, \"p50_ms\": %%.3f, \"p95_ms\": %%.3f, " ..
    "\"p99_ms\": %%.3f, \"max_ms\": %%.3f}\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
"""


def run_wrk(port: int, images: list[Path], duration: int, connections: int, tmp: Path) -> dict[str, Any]:
    """Closed-loop peak throughput with wrk (1 thread)."""
    script = tmp / "bench.lua"
    script.write_text(WRK_SCRIPT % ", ".join(json.dumps(str(p)) for p in images))
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script),
           f"http://127.0.0.1:{port}/predict"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"WRKJSON (\{.*\})", proc.stdout)
    if proc.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed: {proc.stdout}\n{proc.stderr}")
    r = json.loads(m.group(1))
    r["throughput_rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["errors"] = sum(r[k] for k in r if k.startswith("errors_"))
    r["tool"] = f"wrk -t1 -c{connections} -d{duration}s"
    return r


async def _load(port: int, bodies: list[bytes], *, rate: float | None, duration: float, max_requests: int,
                concurrency: int) -> dict[str, Any]:
    import aiohttp

    url = f"http://127.0.0.1:{port}/predict"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def one(i: int, scheduled: float) -> None:
            async with sem:
                try:
                    async with session.post(url, data=bodies[i % len(bodies)],
                                            headers={"Content-Type": "image/jpeg"}) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors[f"status_{resp.status}"] = errors.get(f"status_{resp.status}", 0) + 1
                            return
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    return
            latencies.append(time.perf_counter() - scheduled)

        start = time.perf_counter()
        tasks = []
        i = 0
        if rate is not None:  # open loop: request i is due at start + i / rate
            while i < max_requests and (due := start + i / rate) < start + duration:
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, due)))
                i += 1
            await asyncio.gather(*tasks)
        else:  # closed loop: `concurrency` clients back to back
            async def client(k: int) -> None:
                n = k
                while time.perf_counter() - start < duration and n < max_requests:
                    await one(n, time.perf_counter())
                    n += concurrency
            await asyncio.gather(*(client(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(lat_ms, q))) if len(lat_ms) else (lambda q: float("nan"))
    return {
        "offered_rps": rate, "sent": i if rate is not None else len(latencies) + sum(errors.values()),
        "completed": len(latencies), "errors": sum(errors.values()), "error_kinds": errors,
        "achieved_rps": len(latencies) / elapsed, "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
        "max_ms": float(lat_ms.max()) if len(lat_ms) else float("nan"),
        "tool": "python asyncio+aiohttp " + ("open loop (constant arrival rate)" if rate else "closed loop"),
    }


def run_open_loop(port: int, bodies: list[bytes], rate: float, duration: float, max_requests: int) -> dict[str, Any]:
    return asyncio.run(_load(port, bodies, rate=rate, duration=duration, max_requests=max_requests, concurrency=64))


def run_closed_loop(port: int, bodies: list[bytes], duration: float, connections: int) -> dict[str, Any]:
    r = asyncio.run(_load(port, bodies, rate=None, duration=duration, max_requests=10**6, concurrency=connections))
    r["throughput_rps"] = r["achieved_rps"]
    return r


# --------------------------------------------------------------------------- main


def bench_one(server: Server, ready_path: str, images: list[Path], bodies: list[bytes], args: argparse.Namespace,
              tmp: Path) -> dict[str, Any]:
    import requests

    log.info("== %s: starting", server.name)
    result: dict[str, Any] = {"config": server.name}
    try:
        result.update(server.start(ready_path))
        for i in range(20):  # warm-up: first requests pay for lazy initialisation
            r = requests.post(f"http://127.0.0.1:{server.port}/predict", data=bodies[i % len(bodies)],
                              headers={"Content-Type": "image/jpeg"}, timeout=60)
            r.raise_for_status()
        if shutil.which("wrk") and not args.no_wrk:
            peak = run_wrk(server.port, images, args.duration, args.connections, tmp)
        else:
            peak = run_closed_loop(server.port, bodies, args.duration, args.connections)
        result["peak"] = peak
        log.info("%s peak: %.1f req/s (p50 %.1f ms, p99 %.1f ms, %d errors)", server.name,
                 peak["throughput_rps"], peak["p50_ms"], peak["p99_ms"], peak["errors"])
        rate = args.load_fraction * peak["throughput_rps"]
        slo = run_open_loop(server.port, bodies, rate, args.duration, max_requests=int(rate * args.duration) + 1)
        result["at_fraction_of_peak"] = {"fraction": args.load_fraction, **slo}
        log.info("%s at %.0f%% of peak (%.1f req/s): p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, %d errors",
                 server.name, 100 * args.load_fraction, rate, slo["p50_ms"], slo["p95_ms"], slo["p99_ms"],
                 slo["errors"])
        result["worker_memory"] = server.worker_memory()
        result["master_memory"] = memory_mb(server.proc.pid)
    finally:
        server.stop()
    return result


def machine_description() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    # the ratio is taken against the faster baseline variant (the conservative comparison)
    bases = [r for r in results if r["config"].startswith("torch:") and "peak" in r]
    base = max(bases, key=lambda r: r["peak"]["throughput_rps"]) if bases else None
    lines = [
        "| config | peak req/s | x best baseline | p50 / p99 ms at peak | req/s offered (80 %) "
        "| p50 / p95 / p99 ms at 80 % | errors | worker RSS MB (PSS) | ready s (all workers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "peak" not in r:
            lines.append(f"| {r['config']} | failed: {r.get('error', '?')} |||||||| ")
            continue
        p, s = r["peak"], r["at_fraction_of_peak"]
        ratio = f"{p['throughput_rps'] / base['peak']['throughput_rps']:.2f}" if base else "-"
        mem = r.get("worker_memory") or []
        rss = "/".join(f"{m['rss_mb']:.0f}" for m in mem)
        pss = "/".join(f"{m.get('pss_mb', float('nan')):.0f}" for m in mem)
        ready = f"{r['start_to_ready_s']:.2f}"
        if r.get("start_to_all_workers_loaded_s"):
            ready += f" ({r['start_to_all_workers_loaded_s']:.2f})"
        lines.append(
            f"| {r['config']} | {p['throughput_rps']:.1f} | {ratio} | {p['p50_ms']:.1f} / {p['p99_ms']:.1f} "
            f"| {s['offered_rps']:.1f} | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} "
            f"| {p['errors'] + s['errors']} | {rss} ({pss}) | {ready} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, help="bundle to serve (else --export-to makes one)")
    p.add_argument("--weights", type=Path, help="torch state dict of the same model, for the baseline")
    p.add_argument("--export-to", type=Path, help="export an EfficientNet-Lite0 bench bundle (+INT8, +weights) here")
    p.add_argument("--no-int8", action="store_true", help="do not quantize the exported bundle")
    p.add_argument("--images", type=Path, default=SHARED_SAMPLE,
                   help="folder of 256x256 JPEGs (default: the shared sample)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated (default {DEFAULT_CONFIGS})")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--duration", type=int, default=15, help="seconds per load phase")
    p.add_argument("--connections", type=int, default=4, help="concurrent connections in the peak phase")
    p.add_argument("--load-fraction", type=float, default=0.8, help="share of peak offered in the latency phase")
    p.add_argument("--no-wrk", action="store_true", help="use the Python generator for the peak phase too")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    machine = machine_description()  # before the run: the load average says how busy the machine was
    tmp = Path(tempfile.mkdtemp(prefix="plantml-serve-bench-"))
    images = collect_images(args.images, args.num_images, tmp)
    bodies = [p.read_bytes() for p in images]
    log.info("%d images from %s", len(images), images[0].parent.parent if images else "?")
    bundle, weights = args.bundle, args.weights
    if bundle is None:
        if args.export_to is None:
            p.error("give --bundle PATH or --export-to DIR")
        bundle, weights = export_bench_bundle(args.export_to, images[:64], int8=not args.no_int8)
        log.info("exported %s", bundle)
    from plantml.bundle import load_bundle

    loaded = load_bundle(bundle)
    available = set(loaded.available())
    results = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        runtime, precision = config.split(":")
        if runtime == "torch":
            if weights is None:
                results.append({"config": config, "error": "no --weights for the baseline"})
                continue
            threads = 1 if precision == "baseline1" else None
            server = baseline_server(weights, args.workers, tmp, torch_threads=threads,
                                     arch=loaded.metadata["architecture"], n_classes=len(loaded.classes),
                                     size=loaded.input_spec.size)
            ready_path = "/health"
        elif (runtime, precision) not in available:
            results.append({"config": config, "error": f"bundle has no {runtime} {precision} model"})
            log.warning("skipping %s: not in the bundle", config)
            continue
        else:
            server = our_server(runtime, precision, bundle, args.workers, tmp)
            ready_path = "/ready"
        try:
            results.append(bench_one(server, ready_path, images, bodies, args, tmp))
        except Exception as exc:  # noqa: BLE001 - one failed config must not lose the others
            log.exception("%s failed", config)
            results.append({"config": config, "error": str(exc)})
    report = {
        "machine": machine, "bundle": str(bundle), "images": len(images),
        "image_source": str(args.images if args.images and args.images.is_dir() else "synthetic"),
        "workers": args.workers, "duration_s": args.duration, "connections": args.connections,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "loadavg_at_end": os.getloadavg(), "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(markdown_table(results))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all("peak" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
