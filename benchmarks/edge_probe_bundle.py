"""Make a *benchmark* bundle quickly: ImageNet EfficientNet-Lite0 + a linear-probe head.

The edge benchmark (``benchmarks/edge_bench.py``) needs a bundle with FP32 and INT8 models
at 224x224. The real one comes from the training flow; this script makes a stand-in in
about a minute so the benchmark (latency, size, INT8 accuracy drop, memory, cold start)
can be exercised before that: the offline ImageNet backbone is frozen and only the
classifier is fitted (a linear probe) on a deterministic split of a PlantVillage-style
folder. Export goes through ``plantml.export.export_bundle`` with the real INT8 step
(``plantml.quantize.int8_export_step``), so the bundle is built exactly as the flow
builds one. It also writes ``manifest.csv`` (``path,label,split``) for ``--manifest``.

Usage::

    python benchmarks/edge_probe_bundle.py --data-dir ../shared/data/plantvillage-mini \\
        --out /tmp/edge-bench --per-class-test 20 --calibration-images 300
    python benchmarks/edge_bench.py --bundle /tmp/edge-bench/bundles/latest \\
        --data-dir ../shared/data/plantvillage-mini --manifest /tmp/edge-bench/manifest.csv

Not a training recipe: accuracy of a linear probe is below a fine-tuned model's.
"""

from __future__ import annotations

import argparse
import csv
import logging
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

# Run as a script (python benchmarks/edge_probe_bundle.py), so the repository root is put on the path first.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from plantml.export import export_bundle  # noqa: E402
from plantml.models import create_model  # noqa: E402
from plantml.preprocess import IMAGE_EXTENSIONS, InputSpec, load_image, preprocess_image  # noqa: E402
from plantml.quantize import evaluate, int8_export_step  # noqa: E402

log = logging.getLogger("edge_probe_bundle")


def split_folder(data_dir: Path, per_class_test: int, seed: int) -> list[tuple[Path, str, str]]:
    """Deterministic per-class split: ``per_class_test`` test images, the rest train."""
    rows = []
    for class_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        random.Random(f"{seed}-{class_dir.name}").shuffle(files)
        rows += [(f, class_dir.name, "test" if i < per_class_test else "train") for i, f in enumerate(files)]
    return rows


def load_batch(paths: list[Path], spec: InputSpec, desc: str) -> np.ndarray:
    """Model inputs of ``paths`` (a progress bar labelled ``desc``)."""
    return np.stack([preprocess_image(load_image(p), spec) for p in tqdm(paths, desc=desc, unit="img")])


def fit_linear_probe(model: Any, x_train: np.ndarray, y_train: np.ndarray, threads: int, epochs: int = 300) -> None:
    """Fit ``model``'s classifier on frozen backbone features (full-batch Adam, weight decay)."""
    import torch

    torch.set_num_threads(threads)
    model.eval()
    feats = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(x_train), 32), desc="features", unit="batch"):
            f = model.forward_features(torch.from_numpy(x_train[i:i + 32]))
            feats.append(model.forward_head(f, pre_logits=True))
    feats_t = torch.cat(feats).clone()
    y = torch.from_numpy(y_train).long()
    head = model.get_classifier()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(feats_t), y)
        loss.backward()
        opt.step()
    log.info("linear probe: final train loss %.4f", float(loss.detach()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="writes <out>/bundles/<bundle> and <out>/manifest.csv")
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--per-class-test", type=int, default=20)
    ap.add_argument("--calibration-images", type=int, default=300)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def write_manifest(rows: list[tuple[Path, str, str]], out: Path) -> None:
    """``<out>/manifest.csv`` (``path,label,split``), the edge benchmark's ``--manifest``."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows((str(p.resolve()), label, split) for p, label, split in rows)


def split_arrays(rows: list[tuple[Path, str, str]], classes: list[str],
                 spec: InputSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``x_train, y_train, x_test, y_test``: model inputs and class indices of both splits."""
    index = {c: i for i, c in enumerate(classes)}
    train = [(p, index[c]) for p, c, s in rows if s == "train"]
    test = [(p, index[c]) for p, c, s in rows if s == "test"]
    x_train = load_batch([p for p, _ in train], spec, "train images")
    y_train = np.array([y for _, y in train])
    x_test = load_batch([p for p, _ in test], spec, "test images")
    y_test = np.array([y for _, y in test])
    return x_train, y_train, x_test, y_test


def export_probe(args: argparse.Namespace, model: Any, classes: list[str], spec: InputSpec, x_train: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray, fp32: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """Export through the flow's own path: ``export_bundle`` with the real INT8 step (and its gate)."""
    rng = np.random.default_rng(args.seed)
    calib_idx = rng.choice(len(x_train), size=min(args.calibration_images, len(x_train)), replace=False)
    step = int8_export_step(x_train[calib_idx], x_test, y_test, args.max_accuracy_drop, threads=args.threads)
    return export_bundle(
        model, out_root=args.out / "bundles", name=f"probe-{args.arch}", architecture=args.arch, classes=classes,
        input_spec=spec, parity_inputs=x_test[:8], metrics={"fp32": fp32},
        lineage={"metaflow_run_id": None, "mlflow_run_id": None, "data_manifest_sha256": None,
                 "note": "benchmark stand-in: ImageNet backbone + linear-probe head (benchmarks/edge_probe_bundle.py)"},
        params={"probe": vars(args) | {"data_dir": str(args.data_dir), "out": str(args.out)}},
        calibration={"temperature": 1.0, "abstain_threshold": 0.0},
        extra_steps=[step],
    )


def main(argv: list[str] | None = None) -> int:
    """Build the probe bundle and its manifest; print the bundle's path."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    import torch

    torch.manual_seed(args.seed)
    rows = split_folder(args.data_dir, args.per_class_test, args.seed)
    classes = sorted({label for _, label, _ in rows})
    write_manifest(rows, args.out)
    spec = InputSpec(size=args.size)
    x_train, y_train, x_test, y_test = split_arrays(rows, classes, spec)

    model = create_model(args.arch, len(classes), image_size=args.size)
    fit_linear_probe(model, x_train, y_train, args.threads)
    model.eval()

    def torch_logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    fp32 = evaluate(torch_logits, x_test, y_test)
    log.info("torch FP32 test accuracy %.4f (n=%d)", fp32["accuracy"], fp32["n"])
    path, meta = export_probe(args, model, classes, spec, x_train, x_test, y_test, fp32)
    print(path)
    for runtime in ("openvino", "onnxruntime"):
        m = meta["metrics"][f"int8_{runtime}"]
        log.info("INT8 %s: %s", runtime, meta["int8"]["results"][runtime] | {"accuracy": m.get("accuracy")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
