"""Cold start and peak RSS of ``plantml-edge predict``: one fresh process per run.

Part of ``benchmarks/edge_bench.py`` (its process table): each run is timed from process
start to exit under ``/usr/bin/time -v``, which also reports the peak resident memory,
for the Python entry point and for each single-file binary given with ``--binary``.
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plantml.bundle import Bundle

log = logging.getLogger("edge_bench")

COLD_START_MODELS = [("onnxruntime", "int8"), ("onnxruntime", "fp32"), ("openvino", "int8"), ("openvino", "fp32")]


def cold_start(cmd: list[str], repeats: int) -> dict[str, Any]:
    """Median wall time and peak RSS of a fresh ``plantml-edge predict`` process."""
    walls, rss = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=300)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:] or proc.returncode}
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        rss.append(int(m.group(1)) / 1024 if m else float("nan"))
    return {"cold_start_s": statistics.median(walls), "peak_rss_mb": statistics.median(rss),
            "cold_start_s_all": walls, "peak_rss_mb_all": rss, "repeats": repeats}


def process_rows(bundle: Bundle, args: argparse.Namespace, image: Path) -> list[dict[str, Any]]:
    """Cold start and peak RSS of ``plantml-edge predict`` (Python entry point, then each binary)."""
    entries = [("python -m edge", [sys.executable, "-m", "edge"])]
    for binary in args.binary:
        entries.append((f"binary {Path(binary).name}", [str(Path(binary).resolve())]))
    process: list[dict[str, Any]] = []
    for label, prefix in entries:
        for runtime, precision in COLD_START_MODELS:
            if (runtime, precision) not in bundle.available():
                continue
            if runtime == "openvino" and "-ort" in label:
                continue  # the ONNX-Runtime-only binary
            cmd = [*prefix, "predict", "--bundle", str(bundle.root), "--runtime", runtime,
                   "--precision", precision, "--threads", str(args.threads), str(image)]
            res = cold_start(cmd, args.cold_repeats)
            process.append({"entry": label, "runtime": runtime, "precision": precision, **res})
            log.info("%s %s %s: %s", label, runtime, precision,
                     {k: res.get(k) for k in ("cold_start_s", "peak_rss_mb")})
    return process
