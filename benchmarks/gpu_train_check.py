"""Check the training path on a CUDA GPU: same code, ``train.device=cuda``.

Trains each model of ``train.models`` on the given data with the repository's params
(prepare -> train -> test accuracy), on the GPU, and prints per-epoch timings and test
accuracy as JSON. Used once on a lent H100/H200 (see docs/benchmarks.md)::

    python benchmarks/gpu_train_check.py --data-dir PATH [--set train.image_size=224] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from plantml.config import load_params, parse_override
    from plantml.pipeline import prepare, score_split, train_branch
    from plantml.training import load_checkpoint

    overrides = {"train.device": "cuda", "data.data_dir": args.data_dir, **dict(parse_override(s) for s in args.set)}
    params = load_params(overrides=overrides)
    size = params.train.image_size
    with tempfile.TemporaryDirectory() as tmp:
        _, index = prepare(params, store=str(Path(tmp) / "shards"), out_dir=Path(tmp) / "prepared", progress=False)
        report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "python": platform.python_version(), "image_size": size, "n_train": index.count("train"),
                  "n_test": index.count("test"), "models": {}}
        for name, mp in params.train.models.items():
            t0 = time.time()
            res = train_branch(params, name, index, Path(tmp) / name, progress=False)
            model, _ = load_checkpoint(res.checkpoint_path)
            test = score_split(model, index, "test", res.input_spec)
            logits, labels = test.logits, test.labels
            report["models"][name] = {
                "arch": mp.arch, "device": res.device, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
                "seconds_per_epoch": [round(h["seconds"], 2) for h in res.history],
                "val_accuracy": [round(h["val_accuracy"], 4) for h in res.history],
                "test_accuracy": float((logits.argmax(1) == labels).mean()),
                "images_per_second": [round(h.get("images_per_second", 0.0), 1) for h in res.history],
                "wall_seconds": round(time.time() - t0, 1),
            }
            print(json.dumps({name: report["models"][name]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
