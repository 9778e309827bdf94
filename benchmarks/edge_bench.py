"""Edge benchmark: torch eager vs ONNX Runtime vs OpenVINO, FP32 vs INT8, one thread, batch 1.

Measures, in one run on one machine, for the bundle's input size:

* torch eager FP32 (the same architecture built with ``plantml.models.create_model``;
  latency does not depend on the weight values, and its accuracy equals ONNX FP32 up to the
  bundle's parity check, so it is not re-measured);
* ONNX Runtime FP32 / INT8 and OpenVINO FP32 (``INFERENCE_PRECISION_HINT=f32`` and the
  plugin default, labelled) / INT8, each loaded through :class:`edge.runtime.EdgeModel`
  (the product code path): median and p95 latency, model file size, test accuracy and
  macro-F1 on labelled images;
* the bundle's **edge student** when it ships one (``student/``, its own input size): the
  same rows for its models, on the same images through its own preprocessing, with the
  speed-up against the champion's torch eager and the accuracy drop against the champion's
  ONNX Runtime FP32 (the issue's bar: best INT8 of either >= 8x, <= 1 pt);
* peak RSS and cold start (process start to first prediction printed) of
  ``plantml-edge predict`` on one image, as a fresh process per run (``/usr/bin/time -v``),
  for the Python entry point and, with ``--binary``, the single-file binary.

Labelled images: every image under ``--data-dir/<class>/`` whose class is in the bundle, or,
with ``--manifest CSV`` (columns ``path,label,split``), only the rows with ``split == "test"``.

Usage::

    python benchmarks/edge_bench.py --bundle artifacts/bundles/latest \\
        --data-dir ../shared/data/plantvillage-mini --manifest artifacts/prepared/manifest.csv \\
        --binary dist/plantml-edge --json reports/edge_bench.json --markdown reports/edge_bench.md

Prints a markdown table; ``--json`` also writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

# Run as a script (python benchmarks/edge_bench.py), so the repository root is put on the path first.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plantml.bundle import Bundle, load_bundle, load_student_bundle, student_block  # noqa: E402
from plantml.preprocess import IMAGE_EXTENSIONS, load_image, preprocess_batch  # noqa: E402
from plantml.quantize import macro_f1  # noqa: E402
from plantml.timing import latency_stats  # noqa: E402

from benchmarks.edge_cold_start import process_rows  # noqa: E402

log = logging.getLogger("edge_bench")


# --------------------------------------------------------------------------- data


def labelled_images(bundle: Bundle, data_dir: Path, manifest: Path | None) -> list[tuple[Path, int]]:
    """``(path, class index)`` of the evaluation images (test split when a manifest is given)."""
    index = {c: i for i, c in enumerate(bundle.classes)}
    items: list[tuple[Path, int]] = []
    if manifest is not None:
        with open(manifest, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("split") == "test" and row["label"] in index:
                    p = Path(row["path"])
                    # Manifest paths may be absolute, relative to the cwd, or relative to --data-dir.
                    if not p.is_absolute() and not p.exists():
                        p = data_dir / p
                    items.append((p, index[row["label"]]))
    else:
        for class_dir in sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name in index):
            items += [(p, index[class_dir.name]) for p in sorted(class_dir.rglob("*"))
                      if p.suffix.lower() in IMAGE_EXTENSIONS]
    return items


# --------------------------------------------------------------------------- timing


def accuracy(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray, batch: int = 16) -> dict[str, float]:
    pred = np.concatenate([np.argmax(fn(x[i:i + batch]), axis=-1) for i in range(0, len(x), batch)])
    return {"accuracy": float(np.mean(pred == y)), "macro_f1": macro_f1(y, pred), "n": int(len(y))}


def model_bytes(bundle: Bundle, runtime: str, precision: str) -> int:
    """Bytes of every file (model + weights) of one runtime/precision."""
    return int(sum(f["bytes"] for f in bundle.metadata["files"]
                   if f["runtime"] == runtime and f["precision"] == precision))


def torch_eager(bundle: Bundle, arch: str, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """The bundle's computation in torch eager: the architecture, plus the OOD head when the
    bundle's model has one (random arrays of the same shapes: latency does not depend on values)."""
    import torch

    from plantml.models import create_model

    torch.set_num_threads(threads)
    model = create_model(arch, len(bundle.classes), pretrained=False, image_size=bundle.input_spec.size).eval()
    ood = bundle.metadata.get("metrics", {}).get("ood")
    if "ood_score" in bundle.outputs and ood:
        from plantml.models.scored import scored_classifier
        from plantml.ood import FeatureDetector

        rng = np.random.default_rng(0)
        dim, k = int(ood["feature_dim"]), int(ood["components"])
        model = scored_classifier(model, FeatureDetector(
            means=rng.normal(size=(len(bundle.classes), dim)).astype(np.float32),
            basis=np.linalg.qr(rng.normal(size=(dim, k)))[0].astype(np.float32),
            variances=np.ones(k, np.float32), rest_variance=1.0, shrinkage=0.0, n_fit=0))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x))
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return run


def s8s8_variant(bundle: Bundle, manifest: Path, data_dir: Path, out: Path, n: int = 300) -> Path:
    """The bundle's FP32 ONNX quantized the previous way (signed activations, S8S8) on up to
    ``n`` training images of the manifest, to compare with the bundle's U8S8 model."""
    from plantml.quantize import quantize_onnx

    index = {c: i for i, c in enumerate(bundle.classes)}
    paths = []
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("split") == "train" and row["label"] in index:
                p = Path(row["path"])
                paths.append(p if p.is_absolute() or p.exists() else data_dir / p)
    pick = np.random.default_rng(0).permutation(len(paths))[:n]
    calib = preprocess_batch([load_image(paths[i]) for i in pick], bundle.input_spec)
    return quantize_onnx(bundle.root / "model.onnx", out, calib, signed_activations=True)


# --------------------------------------------------------------------------- main


MEASURED_MODELS = [("onnxruntime", "fp32", True), ("onnxruntime", "int8", True),
                   ("openvino", "fp32", True), ("openvino", "fp32", False),
                   ("openvino", "int8", True), ("openvino", "int8", False)]


def evaluation_set(bundle: Bundle, args: argparse.Namespace) -> tuple[list[tuple[Path, int]], np.ndarray, np.ndarray]:
    """The labelled images (capped by ``--max-images``), their model inputs and their labels."""
    items = labelled_images(bundle, args.data_dir, args.manifest)
    if args.max_images:
        items = items[:args.max_images]
    if not items:
        raise SystemExit(f"no labelled images of the bundle's classes under {args.data_dir}")
    images = [load_image(p) for p, _ in tqdm(items, desc="load images", unit="img")]
    x = preprocess_batch(images, bundle.input_spec)
    y = np.array([label for _, label in items])
    return items, x, y


def torch_row(bundle: Bundle, arch: str, args: argparse.Namespace, one: np.ndarray) -> dict[str, Any]:
    """Torch eager latency; its accuracy is ONNX FP32's up to the export parity check."""
    fn = torch_eager(bundle, arch, args.threads)
    parity = bundle.metadata.get("parity", {}).get("max_abs_diff", {}).get("onnxruntime_fp32", {}).get("max")
    return {"name": "torch eager", "runtime": "torch", "precision": "fp32", "hint": None,
            **latency_stats(fn, one, args.runs, args.warmup),
            "size_bytes": model_bytes(bundle, "onnxruntime", "fp32"),
            "accuracy": None, "macro_f1": None,
            "note": f"accuracy = ONNX Runtime FP32 (export parity max abs logit diff {parity})"}


def runtime_rows(bundle: Bundle, args: argparse.Namespace, x: np.ndarray, y: np.ndarray,
                 who: str = "champion") -> list[dict[str, Any]]:
    """One row per bundle model (and OpenVINO hint), run through the product's ``EdgeModel``."""
    from edge.runtime import EdgeModel, runtime_installed

    rows: list[dict[str, Any]] = []
    for runtime, precision, f32 in MEASURED_MODELS:
        hint = ("f32" if f32 else "default") if runtime == "openvino" else None
        name = ("student " if who == "student" else "") + f"{runtime} {precision}" + (f" ({hint} hint)" if hint else "")
        if (runtime, precision) not in bundle.available() or not runtime_installed(runtime):
            gate = bundle.metadata.get("int8", {}).get("results", {}).get(runtime, {})
            note = gate.get("why", "not in bundle / runtime not installed") if precision == "int8" else "not in bundle"
            if f"{runtime}_{precision}" in bundle.metadata.get("student_gate_left_out", []):
                note = "left out by the student's gate (accuracy vs the champion FP32)"
            rows.append({"name": name, "runtime": runtime, "precision": precision, "hint": hint, "missing": True,
                         "who": who, "note": note})
            continue
        model = EdgeModel(args.bundle, runtime=runtime, precision=precision, threads=args.threads, openvino_f32=f32,
                          model=who)
        row = {"name": name, "runtime": runtime, "precision": precision, "hint": hint, "who": who,
               **latency_stats(model.logits, x[:1], args.runs, args.warmup),
               "size_bytes": model_bytes(bundle, runtime, precision),
               **accuracy(model.logits, x, y)}
        rows.append(row)
        log.info("%s: median %.2f ms, acc %.4f", name, row["median_ms"], row["accuracy"])
    return rows


def s8s8_row(bundle: Bundle, args: argparse.Namespace, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The S8S8 comparison model, rebuilt in a temporary folder and measured like the others."""
    import tempfile

    from plantml.runtime import onnxruntime_runner

    with tempfile.TemporaryDirectory(prefix="s8s8-") as tmp:
        path = s8s8_variant(bundle, args.manifest, args.data_dir, Path(tmp) / "model.s8s8.onnx")
        fn = onnxruntime_runner(path, threads=args.threads)
        return {"name": "onnxruntime int8 S8S8 (rebuilt by this benchmark, not the bundle file)",
                "runtime": "onnxruntime", "precision": "int8", "hint": None, "not_in_bundle": True,
                **latency_stats(fn, x[:1], args.runs, args.warmup),
                "size_bytes": path.stat().st_size, **accuracy(fn, x, y)}


def add_ratios(rows: list[dict[str, Any]], bundle: Bundle) -> float | None:
    """Add speed-up, size ratio and INT8 accuracy drop to each measured row; returns torch's median ms.

    Every ratio is against the champion (torch eager, ONNX FP32 size); a student row's
    ``accuracy_drop_pt`` is against the champion's ONNX Runtime FP32 (the bar's reference).
    """
    torch_ms = next((r["median_ms"] for r in rows if r["runtime"] == "torch"), None)
    fp32_acc = {r["runtime"]: r["accuracy"] for r in rows if r["precision"] == "fp32" and r.get("hint") in (None, "f32")
                and r["runtime"] != "torch" and "accuracy" in r and r.get("who", "champion") == "champion"}
    fp32_size = model_bytes(bundle, "onnxruntime", "fp32")
    for r in rows:
        if r.get("missing"):
            continue
        r["speedup_vs_torch"] = torch_ms / r["median_ms"] if torch_ms else None
        r["size_vs_onnx_fp32"] = r["size_bytes"] / fp32_size
        student = r.get("who") == "student"
        if (r["precision"] == "int8" or student) and r.get("accuracy") is not None:
            r["accuracy_drop_pt"] = (fp32_acc["onnxruntime" if student else r["runtime"]] - r["accuracy"]) * 100
    return torch_ms


def int8_goals(rows: list[dict[str, Any]], torch_ms: float | None) -> dict[str, Any] | None:
    """The fastest bundle INT8 model against the goals (8x torch, drop <= 1 pt, 1/3 of the size)."""
    int8 = [r for r in rows if r["precision"] == "int8" and not r.get("missing") and not r.get("not_in_bundle")]
    best = min(int8, key=lambda r: r["median_ms"]) if int8 else None
    if best is None or not torch_ms:
        return None
    goals = {
        "best_int8": best["name"],
        "speedup_vs_torch": best["speedup_vs_torch"], "speedup_goal": 8.0,
        "accuracy_drop_pt": best.get("accuracy_drop_pt"), "accuracy_drop_goal_pt": 1.0,
        "size_ratio": best["size_vs_onnx_fp32"], "size_ratio_goal": 1 / 3,
    }
    goals["met"] = bool(best["speedup_vs_torch"] >= 8.0 and best["accuracy_drop_pt"] <= 1.0
                        and best["size_vs_onnx_fp32"] <= 1 / 3)
    return goals


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the benchmark, as the JSON report."""
    bundle = load_bundle(args.bundle)
    arch = args.arch or bundle.metadata["architecture"]
    size = bundle.input_spec.size
    items, x, y = evaluation_set(bundle, args)
    log.info("%d labelled images, input %dx%d, %d thread(s)", len(x), size, size, args.threads)

    rows = [] if args.skip_torch else [torch_row(bundle, arch, args, x[:1])]
    rows += runtime_rows(bundle, args, x, y)
    if student_block(bundle.root):  # the same images through the student's own preprocessing
        sub = load_student_bundle(bundle.root)
        rows += runtime_rows(sub, args, preprocess_batch([load_image(p) for p, _ in items], sub.input_spec), y,
                             who="student")
    if args.compare_s8s8 and args.manifest is not None and (bundle.root / "model.onnx").is_file():
        rows.append(s8s8_row(bundle, args, x, y))
    goals = int8_goals(rows, add_ratios(rows, bundle))
    process = [] if args.skip_process else process_rows(bundle, args, items[0][0])

    return {
        "bundle": {"path": str(bundle.root), "name": bundle.name, "version": bundle.version, "architecture": arch,
                   "input_size": size, "lineage_note": bundle.metadata.get("lineage", {}).get("note")},
        "machine": machine_info(),
        "settings": {"threads": args.threads, "batch": 1, "runs": args.runs, "warmup": args.warmup,
                     "eval_images": int(len(x)), "eval_source": "manifest test split" if args.manifest else "data-dir",
                     "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])},
        "models": rows,
        "goals": goals,
        "process": process,
    }


def machine_info() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for mod in ("onnxruntime", "openvino", "torch", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[mod] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(), "versions": versions}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    b = report["bundle"]
    lines = [
        f"Bundle `{b['name']}` ({b['architecture']}, {b['input_size']}x{b['input_size']}); "
        f"{s['threads']} thread, batch 1, {s['runs']} timed runs after {s['warmup']} warm-up; "
        f"accuracy on {s['eval_images']} images ({s['eval_source']}). Machine: {report['machine']['cpu']}, "
        f"{report['machine']['cores']} cores; load average at end "
        f"{tuple(round(v, 1) for v in report['machine']['load_average_at_end'])}.",
        "",
        "| model | median ms | p95 ms | x torch | size MB | size / ONNX FP32 | accuracy | macro-F1 | INT8 drop (pt) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["models"]:
        if r.get("missing"):
            lines.append(f"| {r['name']} | — | — | — | — | — | — | — | not in bundle: {r.get('note')} |")
            continue
        acc = "= ONNX FP32 (parity)" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        f1 = "" if r["macro_f1"] is None else f"{r['macro_f1']:.4f}"
        drop = f"{r['accuracy_drop_pt']:+.2f}" if r.get("accuracy_drop_pt") is not None else ""
        speed = f"{r['speedup_vs_torch']:.1f}x" if r.get("speedup_vs_torch") else ""
        lines.append(f"| {r['name']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | {speed} | "
                     f"{r['size_bytes'] / 1e6:.2f} | {r['size_vs_onnx_fp32']:.2f} | {acc} | {f1} | {drop} |")
    if any(r.get("who") == "student" for r in report["models"]):
        lines += ["", "`student` rows: the bundle's edge student (its own input size); its drop column is against "
                      "the champion's ONNX Runtime FP32."]
    g = report.get("goals")
    if g:
        lines += ["", f"Best INT8: **{g['best_int8']}** — {g['speedup_vs_torch']:.1f}x torch eager (goal ≥ 8x), "
                      f"accuracy drop {g['accuracy_drop_pt']:+.2f} pt (goal ≤ 1), "
                      f"size {g['size_ratio']:.2f} of ONNX FP32 (goal ≤ 0.33): "
                      f"{'all goals met' if g['met'] else 'goals NOT all met'}."]
    if report["process"]:
        lines += ["", "| `plantml-edge predict`, one image | runtime | precision | cold start s (median) "
                      "| peak RSS MB |", "|---|---|---|---|---|"]
        for p in report["process"]:
            if "error" in p:
                lines.append(f"| {p['entry']} | {p['runtime']} | {p['precision']} | error: {p['error']} | |")
            else:
                lines.append(f"| {p['entry']} | {p['runtime']} | {p['precision']} | {p['cold_start_s']:.2f} | "
                             f"{p['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, required=True, help="<data-dir>/<class>/*.jpg")
    ap.add_argument("--manifest", type=Path, default=None, help="CSV path,label,split: use split == test only")
    ap.add_argument("--arch", default=None, help="architecture for torch eager (default: the bundle's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-images", type=int, default=0, help="cap the evaluation images (0: all)")
    ap.add_argument("--binary", action="append", default=[], help="also time this plantml-edge binary (repeatable)")
    ap.add_argument("--cold-repeats", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--compare-s8s8", action="store_true",
                    help="also time an S8S8 ONNX INT8 model built from the bundle (needs --manifest)")
    ap.add_argument("--skip-process", action="store_true", help="skip cold start / peak RSS")
    ap.add_argument("--json", type=Path, default=None, help="write the full report as JSON here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    report = run(args)
    md = markdown(report)
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
