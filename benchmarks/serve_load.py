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
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Run as a script (python benchmarks/serve_load.py), so the repository root is put on the path first.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.load_generators import run_closed_loop, run_open_loop, run_wrk  # noqa: E402
from benchmarks.serve_harness import Server, baseline_server, memory_mb, our_server  # noqa: E402

log = logging.getLogger("serve_load")

SHARED_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "plantvillage-mini"
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


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line (see the module docstring); the parser too, for its ``error``."""
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
    return p, p.parse_args(argv)


def server_for(config: str, bundle: Path, weights: Path | None, loaded: Any, available: set[tuple[str, str]],
               args: argparse.Namespace, tmp: Path) -> tuple[Server, str] | str:
    """The server of one ``runtime:precision`` config and its readiness path, or why it cannot run."""
    runtime, precision = config.split(":")
    if runtime == "torch":
        if weights is None:
            return "no --weights for the baseline"
        threads = 1 if precision == "baseline1" else None
        server = baseline_server(weights, args.workers, tmp, torch_threads=threads,
                                 arch=loaded.metadata["architecture"], n_classes=len(loaded.classes),
                                 size=loaded.input_spec.size)
        return server, "/health"
    if (runtime, precision) not in available:
        log.warning("skipping %s: not in the bundle", config)
        return f"bundle has no {runtime} {precision} model"
    return our_server(runtime, precision, bundle, args.workers, tmp), "/ready"


def bench_all(bundle: Path, weights: Path | None, images: list[Path], bodies: list[bytes],
              args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Every config of ``--configs`` in turn; a config that fails is reported, not fatal."""
    from plantml.bundle import load_bundle

    loaded = load_bundle(bundle)
    available = set(loaded.available())
    results = []
    for config in [c.strip() for c in args.configs.split(",") if c.strip()]:
        chosen = server_for(config, bundle, weights, loaded, available, args, tmp)
        if isinstance(chosen, str):
            results.append({"config": config, "error": chosen})
            continue
        server, ready_path = chosen
        try:
            results.append(bench_one(server, ready_path, images, bodies, args, tmp))
        except Exception as exc:  # noqa: BLE001 - one failed config must not lose the others
            log.exception("%s failed", config)
            results.append({"config": config, "error": str(exc)})
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if any config produced no peak figure."""
    p, args = parse_args(argv)
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
    results = bench_all(bundle, weights, images, bodies, args, tmp)
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
