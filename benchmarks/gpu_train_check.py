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
    from plantml.data import load_images, prepare_dataset, rows_for
    from plantml.training import load_checkpoint, predict_logits, train_model

    overrides = {"train.device": "cuda", "data.data_dir": args.data_dir, **dict(parse_override(s) for s in args.set)}
    params = load_params(overrides=overrides)
    rows, summary = prepare_dataset(args.data_dir, params.data.split, params.data.seed, progress=False)
    size = params.train.image_size
    train = load_images(rows_for(rows, "train"), summary.classes, size, progress=False)
    val = load_images(rows_for(rows, "val"), summary.classes, size, progress=False)
    test = load_images(rows_for(rows, "test"), summary.classes, size, progress=False)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "python": platform.python_version(),
              "image_size": size, "n_train": len(train[0]), "n_test": len(test[0]), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, mp in params.train.models.items():
            t0 = time.time()
            res = train_model(name, mp, params.train, train, val, summary.classes, Path(tmp) / name, threads=4,
                              progress=False)
            model, _ = load_checkpoint(res.checkpoint_path)
            logits = predict_logits(model.cuda(), test[0], res.input_spec, device="cuda")
            report["models"][name] = {
                "arch": mp.arch, "device": res.device, "epochs_run": res.epochs_run, "best_epoch": res.best_epoch,
                "seconds_per_epoch": [round(h["seconds"], 2) for h in res.history],
                "val_accuracy": [round(h["val_accuracy"], 4) for h in res.history],
                "test_accuracy": float((logits.argmax(1) == test[1]).mean()),
                "wall_seconds": round(time.time() - t0, 1),
            }
            print(json.dumps({name: report["models"][name]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
