"""Would decoding JPEGs at reduced scale (libjpeg DCT scaling, ``Image.draft``) be safe for the service?

Issue 16 asked whether JPEGs could be decoded at 1/2, 1/4 or 1/8 scale down to the model's
input side (a 256-px photo for a 128-px model decoded straight at 128 px, no resize). This
script answers both questions that decides: does the model still answer the same, and do the
drift feed's statistics stay where the bundle's reference puts them? It runs every JPEG of a
folder (class = parent folder name) through the bundle with ONNX Runtime FP32 twice: the
service's path (``open_image`` + ``finish_decode`` + ``preprocess_image``) and the same path
with the extra draft, and prints top-1 agreement, accuracy and the shift of each statistic in
standard deviations. Not part of the product.

    python benchmarks/serve_draft_check.py --bundle artifacts/real-sample/bundle \\
        --images ../shared/data/plantvillage-mini
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from plantml.bundle import load_bundle  # noqa: E402
from plantml.imagestats import STAT_COLUMNS, image_statistics  # noqa: E402
from plantml.preprocess import finish_decode, open_image, preprocess_image  # noqa: E402
from serving.drift_feed import shrink_for_stats  # noqa: E402
from serving.predictor import Predictor  # noqa: E402


def draft_to_side(img, side: int) -> None:
    """Switch a JPEG not reduced yet to a 1/2, 1/4 or 1/8 decode keeping its shorter side >= ``side``."""
    if img.format not in ("JPEG", "MPO") or getattr(img, "decoderconfig", None):
        return
    width, height = img.size
    if min(width, height) >= 2 * side:
        shrink = min(width, height) / side
        img.draft(None, (math.ceil(width / shrink), math.ceil(height / shrink)))


def run_path(predictor: Predictor, paths: list[Path], draft: bool) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Probabilities and drift statistics of every image through one decode path."""
    tensors, stats = [], []
    for path in paths:
        img = open_image(path.read_bytes())
        if draft:
            draft_to_side(img, predictor.spec.size)
        rgb = finish_decode(img)
        tensors.append(preprocess_image(rgb, predictor.spec))
        stats.append(image_statistics(shrink_for_stats(rgb)))
    probs = [predictor.forward(np.stack(tensors[i:i + 32])).probabilities for i in range(0, len(tensors), 32)]
    return np.concatenate(probs), stats


def report(classes: list[str], paths: list[Path], full: tuple, drafted: tuple) -> None:
    """Print agreement, accuracy and the statistics' shifts."""
    (pa, sa), (pb, sb) = full, drafted
    ta, tb = pa.argmax(1), pb.argmax(1)
    truth = np.array([classes.index(p.parent.name) if p.parent.name in classes else -1 for p in paths])
    known = truth >= 0
    dconf = np.abs(pa.max(1) - pb.max(1))
    print(f"images {len(paths)}; top-1 agreement {(ta == tb).mean():.4f} ({int((ta != tb).sum())} differ)")
    print("|change of top-1 confidence| median %.4f p99 %.4f max %.4f" % tuple(np.percentile(dconf, [50, 99, 100])))
    print(f"accuracy: service path {(ta[known] == truth[known]).mean():.4f}, "
          f"with draft {(tb[known] == truth[known]).mean():.4f} (n={int(known.sum())})")
    for col in [c for c in STAT_COLUMNS if c in sa[0]]:
        va, vb = np.array([s[col] for s in sa]), np.array([s[col] for s in sb])
        sd = float(va.std()) or 1.0
        print(f"{col:20s} mean shift {(vb.mean() - va.mean()) / sd:+.3f} sd")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    args = p.parse_args(argv)
    predictor = Predictor(load_bundle(args.bundle), "onnxruntime", "fp32", 1)
    paths = sorted(args.images.rglob("*.jpg"))
    report(predictor.classes, paths, run_path(predictor, paths, False), run_path(predictor, paths, True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
