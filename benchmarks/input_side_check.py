"""A trained branch scored on its test photos at other input sides than it was trained at.

Training crops (``RandomResizedCrop`` with scale 0.6-1) show leaves larger than the whole-photo
test input does, so a fully convolutional model is sometimes more accurate when tested at a
somewhat higher resolution than it was trained at (Touvron et al. 2019, "FixRes"). This scores
the test split's original photos (as the evaluation's robustness subset reads them) through
the shared preprocessing at each side, per domain, 1 thread. Usage::

    python benchmarks/input_side_check.py --index .metaflow/.plantml/PlantDiseaseFlow/RUN/data \
        --checkpoint artifacts/train/RUN/cnn/model.pt --sizes 160,176,192,208
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

# Run as a script, so the repository root is put on the path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plantml import shards as sh  # noqa: E402
from plantml.pipeline.samples import load_manifest, sample_image  # noqa: E402
from plantml.preprocess import InputSpec, preprocess_batch  # noqa: E402
from plantml.training import load_checkpoint  # noqa: E402


def accuracy_per_domain(model, samples, domains: np.ndarray, spec: InputSpec, train_size: int) -> dict[str, float]:
    """Test accuracy per domain with every photo preprocessed to ``spec.size``."""
    import torch

    preds = []
    for i in range(0, len(samples), 32):
        images = [sample_image(s, train_size) for s in samples[i:i + 32]]
        x = torch.from_numpy(preprocess_batch(images, spec)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            preds.append(model(x).argmax(1).numpy())
    pred, labels = np.concatenate(preds), np.array([s.label for s in samples])
    return {d: round(float((pred[domains == d] == labels[domains == d]).mean()), 4) for d in sorted(set(domains))}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, help="the prepared store (manifest.csv + shards)")
    ap.add_argument("--checkpoint", required=True, help="a branch's model.pt")
    ap.add_argument("--sizes", default="160,176,192,208", help="input sides to score, comma-separated")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    index = sh.load_index(args.index)
    model, meta = load_checkpoint(args.checkpoint)
    model.eval()
    domain_of = {r.key: r.domain for r in load_manifest(index)}
    samples = list(sh.iter_split(index, "test", with_originals=True))
    domains = np.array([domain_of[s.key] for s in samples])
    for size in (int(v) for v in args.sizes.split(",")):
        spec = InputSpec(size=size, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
        print(json.dumps({"trained_at": meta["image_size"], "tested_at": size,
                          "accuracy": accuracy_per_domain(model, samples, domains, spec, meta["image_size"]),
                          "n": {d: int((domains == d).sum()) for d in sorted(set(domains))}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
