"""``plantml-edge``: offline leaf-disease prediction from an exported bundle.

Usage::

    plantml-edge predict --bundle bundle/ leaf1.jpg photos/          # JSON lines on stdout
    plantml-edge predict --model champion --bundle bundle/ photos/   # not the edge student
    plantml-edge predict --precision int8 --threads 1 --format csv photos/ > results.csv
    plantml-edge bench --bundle bundle/ --threads 1                  # latency percentiles
    plantml-edge info --bundle bundle/                               # bundle metadata
    plantml-edge info --bundle bundle/ --model-card                  # the model card (Markdown)

``--model`` picks the bundle's model: its edge student (a smaller, faster model distilled
from the champion, shipped only when it passed its accuracy and speed gate) by default
when the bundle has one, else the champion; asking for a student the bundle lacks is an
error that gives the reason recorded at export. ``--bundle`` defaults to ``$PLANTML_BUNDLE``.

Exit status: 0 when every image was classified, 1 when at least one file could not be read
(its line carries ``error``), 2 for a usage error or a missing/corrupt bundle. Nothing here touches the network.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import statistics
import sys
import time
from typing import Any, Sequence, TextIO

EXIT_OK, EXIT_FAILED_FILES, EXIT_USAGE = 0, 1, 2
CSV_COLUMNS = ("path", "label", "confidence", "abstained", "abstain_reason", "ood_score", "top_k", "error")

log = logging.getLogger("plantml-edge")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with status 2 and a one-line message (its default is also 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"plantml-edge: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``plantml-edge`` argument parser."""
    parser = _Parser(prog="plantml-edge", description="Offline plant-leaf disease prediction from a plantml bundle.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(p: argparse.ArgumentParser, model_opts: bool = True) -> None:
        p.add_argument("--bundle", default=os.environ.get("PLANTML_BUNDLE"),
                       help="bundle directory (default: $PLANTML_BUNDLE)")
        if model_opts:
            p.add_argument("--model", choices=("champion", "student"), default=None,
                           help="which model of the bundle: its edge student (default when the bundle has one) "
                                "or the champion")
            p.add_argument("--runtime", choices=("openvino", "onnxruntime"), default=None,
                           help="inference runtime (default: best available)")
            p.add_argument("--threads", type=_positive_int, default=None, help="inference threads (default: all cores)")
            p.add_argument("--openvino-hint", choices=("f32", "default"), default="f32",
                           help="OpenVINO INFERENCE_PRECISION_HINT: f32 (fidelity, default) or the plugin default "
                                "(bf16 on CPUs with AVX-512 BF16/AMX)")

    p = sub.add_parser("predict", help="classify image files and folders (recursive)")
    common(p)
    p.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl", help="output format (default: jsonl)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes listed in top_k (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per inference call (default 8)")
    p.add_argument("-o", "--output", default=None, help="write results to this file instead of stdout")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")

    b = sub.add_parser("bench", help="latency percentiles, batch 1, on the bundle's input size")
    common(b)
    b.add_argument("--precision", choices=("fp32", "int8", "all"), default="all",
                   help="precision(s) to time (default: every one in the bundle)")
    b.add_argument("--runs", type=_positive_int, default=100, help="timed runs per model (default 100)")
    b.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    b.add_argument("--image", default=None, help="time on this image (default: a fixed synthetic input)")
    b.add_argument("--format", choices=("table", "json"), default="table")

    i = sub.add_parser("info", help="print the bundle's metadata (with its model card) as JSON")
    common(i, model_opts=False)
    i.add_argument("--model-card", action="store_true", help="print only the bundle's MODEL_CARD.md (Markdown)")

    sub.add_parser("version", help="versions of plantml-edge and of the runtimes it can load (imports each)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plantml-edge`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="plantml-edge: %(levelname)s: %(message)s", stream=sys.stderr)
    from plantml.bundle import BundleError

    from edge.runtime import EdgeError

    if args.command == "version":
        return cmd_version()
    if not args.bundle:
        return _fail("no bundle given: use --bundle DIR or set PLANTML_BUNDLE")
    try:
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "bench":
            return cmd_bench(args)
        return cmd_info(args)
    except (BundleError, EdgeError) as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # `plantml-edge predict ... | head`: the reader left; not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _fail(message: str) -> int:
    print(f"plantml-edge: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USAGE


def _which(args: argparse.Namespace) -> str:
    """``--model``, or the bundle's default (its edge student when it has one, in the precision asked for)."""
    from edge.runtime import default_model

    if getattr(args, "model", None) is None:
        precision = getattr(args, "precision", None)
        args.model = default_model(args.bundle, None if precision == "all" else precision)
        log.info("model: %s (the bundle's default)", args.model)
    return args.model


def _model(args: argparse.Namespace, precision: str) -> Any:
    from edge.runtime import EdgeModel

    return EdgeModel(args.bundle, runtime=args.runtime, precision=precision, threads=args.threads,
                     openvino_f32=args.openvino_hint == "f32", model=_which(args))


# --------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify every image; one output row per input file."""
    from edge.runtime import collect_image_paths

    model = _model(args, args.precision)
    items = collect_image_paths(args.paths)
    paths = [p for p, _ in items]
    out: TextIO = open(args.output, "w", newline="") if args.output else sys.stdout
    to_file = bool(args.output) or not sys.stdout.isatty()
    show_bar = to_file and any(from_dir for _, from_dir in items) and not args.no_progress and len(paths) > 1
    writer = _RowWriter(out, args.format)
    failed = 0
    try:
        bar = _progress(len(paths), show_bar)
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            for row in model.predict_paths(chunk, k=args.top_k, batch_size=args.batch_size):
                failed += "error" in row
                writer.write(row)
            out.flush()
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    finally:
        if args.output:
            out.close()
    if failed:
        print(f"plantml-edge: {failed} of {len(paths)} file(s) could not be classified", file=sys.stderr)
    return EXIT_FAILED_FILES if failed else EXIT_OK


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="img", file=sys.stderr, desc="predict")


class _RowWriter:
    """JSON lines or CSV rows of prediction results."""

    def __init__(self, out: TextIO, fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self._csv = None
        if fmt == "csv":
            self._csv = csv.DictWriter(out, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
            self._csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is None:
            self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        flat = dict(row)
        if "top_k" in flat:
            flat["top_k"] = ";".join(f"{t['label']}:{t['confidence']:.6f}" for t in flat["top_k"])
        if "confidence" in flat:
            flat["confidence"] = f"{flat['confidence']:.6f}"
        if "abstained" in flat:
            flat["abstained"] = str(flat["abstained"]).lower()
        if flat.get("ood_score") is not None:
            flat["ood_score"] = f"{flat['ood_score']:.4f}"
        self._csv.writerow(flat)


# --------------------------------------------------------------------------- bench


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def time_model(model: Any, x: Any, runs: int, warmup: int) -> dict[str, float]:
    """Latency statistics (ms) of ``model.logits(x)``."""
    for _ in range(max(0, warmup)):
        model.logits(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.logits(x)
        times.append((time.perf_counter() - t0) * 1000.0)
    return {
        "runs": runs,
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "p50_ms": percentile(times, 50),
        "p90_ms": percentile(times, 90),
        "p95_ms": percentile(times, 95),
        "p99_ms": percentile(times, 99),
    }


def _bench_input(args: argparse.Namespace, spec: Any) -> Any:
    import numpy as np

    from plantml.preprocess import load_image, preprocess_batch

    if args.image:
        return preprocess_batch([load_image(args.image)], spec)
    # A fixed synthetic image: latency does not depend on pixel values.
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, size=(1, 3, spec.size, spec.size)).astype(np.float32)


def cmd_bench(args: argparse.Namespace) -> int:
    """Time every (runtime, precision) model asked for at batch 1."""
    from plantml.bundle import load_bundle, load_student_bundle
    from plantml.preprocess import ImageDecodeError

    from edge.runtime import RUNTIME_PREFERENCE, runtime_installed

    bundle = load_student_bundle(args.bundle) if _which(args) == "student" else load_bundle(args.bundle)
    precisions = ("fp32", "int8") if args.precision == "all" else (args.precision,)
    runtimes = (args.runtime,) if args.runtime else RUNTIME_PREFERENCE
    targets = [(r, p) for r in runtimes for p in precisions if (r, p) in bundle.available() and runtime_installed(r)]
    if not targets:
        return _fail(f"nothing to time: bundle has {bundle.available()}, asked for runtimes {list(runtimes)} "
                     f"and precisions {list(precisions)} (installed runtimes only)")
    try:
        x = _bench_input(args, bundle.input_spec)
    except ImageDecodeError as exc:
        return _fail(f"--image {args.image}: {exc}")
    results = []
    for runtime, precision in targets:
        t0 = time.perf_counter()
        args.runtime = runtime
        model = _model(args, precision)
        load_ms = (time.perf_counter() - t0) * 1000.0
        stats = time_model(model, x, args.runs, args.warmup)
        results.append({**model.describe(), "batch": 1, "input_size": bundle.input_spec.size,
                        "load_ms": load_ms, **stats})
    if args.format == "json":
        print(json.dumps(results, indent=2))
    else:
        print(_bench_table(results))
    return EXIT_OK


def _bench_table(results: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    head = ("model", "runtime", "precision", "threads", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "mean ms", "load ms")
    buf.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for r in results:
        runtime = r["runtime"] + (f" ({r['openvino_precision_hint']} hint)" if r.get("openvino_precision_hint") else "")
        cells = (r.get("model", "champion"), runtime, r["precision"], r["threads"] or "default",
                 *(f"{r[k]:.2f}" for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms", "load_ms")))
        buf.write("| " + " | ".join(str(c) for c in cells) + " |\n")
    buf.write(f"\nbatch 1, {results[0]['input_size']}x{results[0]['input_size']}, {results[0]['runs']} runs each\n")
    return buf.getvalue()


# --------------------------------------------------------------------------- info


def cmd_info(args: argparse.Namespace) -> int:
    """Print the bundle's metadata (verified) plus what this installation can run."""
    from plantml.bundle import load_bundle
    from plantml.model_card import read_model_card

    from edge.runtime import default_model, installed_runtimes

    bundle = load_bundle(args.bundle)
    meta = dict(bundle.metadata)
    info = {
        "path": str(bundle.root),
        **{k: meta.get(k) for k in ("name", "version", "architecture", "classes", "input", "calibration")},
        "num_classes": len(bundle.classes),
        "models": [
            {k: f.get(k) for k in ("path", "runtime", "precision", "role", "bytes", "sha256")} for f in meta["files"]
        ],
        "metrics": meta.get("metrics", {}),
        "int8": meta.get("int8"),
        "student": meta.get("student"),
        "default_model": default_model(args.bundle),
        "lineage": meta.get("lineage", {}),
        "installed_runtimes": installed_runtimes(),
    }
    if getattr(args, "model_card", False):
        print(read_model_card(bundle) or "(this bundle has no model card: exported before model cards existed)")
        return EXIT_OK
    info["model_card"] = read_model_card(bundle)
    print(json.dumps(info, indent=2))
    return EXIT_OK


def cmd_version() -> int:
    """Print versions; importing every runtime makes this the binary's smoke test."""
    import importlib

    versions: dict[str, Any] = {"python": sys.version.split()[0], "frozen": bool(getattr(sys, "frozen", False))}
    status = EXIT_OK
    for module in ("plantml", "numpy", "PIL", "onnxruntime", "openvino"):
        try:
            mod = importlib.import_module(module)
            versions[module] = getattr(mod, "__version__", None) or getattr(mod, "get_version", lambda: "?")()
        except ImportError as exc:
            versions[module] = None
            if module in ("numpy", "PIL"):
                versions[f"{module}_error"] = str(exc).splitlines()[0]
                status = EXIT_USAGE
    if not (versions["onnxruntime"] or versions["openvino"]):
        status = EXIT_USAGE
    print(json.dumps(versions))
    return status


if __name__ == "__main__":
    sys.exit(main())
