"""Is the streaming loader the bottleneck? Training images/s: shards + augmentation vs pre-decoded tensors.

The same model, batch, threads and optimiser step, fed two ways:

* **pre-decoded**: a few batches of ``uint8`` tensors already in memory, cycled — the
  model's own forward + backward throughput, no I/O, decode or augmentation;
* **streaming**: :func:`plantml.loader.make_loader` over the prepared shards with the
  training augmentation, in-process (``--workers 0``) or in worker processes.

Rounds alternate the two so that a noisy shared machine slows both alike; the report
gives each round and the median ratio (streaming / pre-decoded; 1.0 = no loss).

    .venv/bin/python benchmarks/loader_throughput.py --sample ../shared/data/plantvillage-mini \\
        --threads 1 --workers 0 1 --out reports/bench/loader.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as a script (python benchmarks/loader_throughput.py), so the repository root is put on the path first.
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from plantml.config import load_params  # noqa: E402
from plantml.data import PixelStaging, augmentation_factory, prepare_dataset, write_shards  # noqa: E402
from plantml.loader import make_loader, to_model_input  # noqa: E402
from plantml.shards import ShardIndex  # noqa: E402


def _step(model, optimizer, x, y, torch) -> None:
    import torch.nn.functional as F

    loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def cpu_description() -> tuple[str, list[str]]:
    """The lscpu model name and which of the SIMD flags that matter for these timings it has."""
    flags = [line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
             if line.startswith(("Model name", "Flags"))]
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if any(f" {f}" in line for line in flags)]
    return next((line.split(":", 1)[1].strip() for line in flags if line.startswith("Model name")), ""), wanted


def shard_sample(sample: Path, size: int) -> ShardIndex:
    """The sample prepared into training shards (``size`` px) in a fresh temporary folder."""
    store = Path(tempfile.mkdtemp(prefix="plantml-loader-bench-"))
    staging = PixelStaging(size)
    rows, summary = prepare_dataset(sample, progress=False, staging=staging)
    _, index = write_shards(rows, summary, staging, str(store), progress=False)
    staging.close()
    return index


def measure(args: argparse.Namespace) -> dict:
    """Alternating rounds of pre-decoded and streaming training steps; the report as a dict."""
    import torch

    from plantml.training import build_model

    torch.set_num_threads(args.threads)
    params = load_params(overrides={"train.image_size": args.size, "train.batch_size": args.batch_size})
    index = shard_sample(args.sample, args.size)
    model, _, spec = build_model("cnn", params.train.models["cnn"], params.train, len(index.classes), "cpu")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    bs = args.batch_size
    cached = [next(iter(make_loader(index, "train", bs, train=True, seed=i))) for i in range(4)]
    augment = augmentation_factory(args.size)

    def predecoded(steps: int) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            images, labels = cached[i % len(cached)]
            _step(model, optimizer, to_model_input(images, spec), labels, torch)
        return steps * bs / (time.perf_counter() - t0)

    def streaming(steps: int, workers: int, epoch: int) -> float:
        loader = make_loader(index, "train", bs, train=True, epoch=epoch, workers=workers, augment_factory=augment)
        it = iter(loader)
        next(it)  # worker start-up is paid once per epoch, not per step: measured separately below
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            images, labels = next(it)
            _step(model, optimizer, to_model_input(images, spec), labels, torch)
            n += len(labels)
        return n / (time.perf_counter() - t0)

    predecoded(2)  # warm-up
    rounds = []
    for r in range(args.rounds):
        row = {"predecoded": predecoded(args.steps)}
        for w in args.workers:
            row[f"streaming_w{w}"] = streaming(args.steps, w, epoch=r + 1)
        rounds.append(row)
        print(json.dumps(row), file=sys.stderr)
    startup = {}
    for w in args.workers:
        t0 = time.perf_counter()
        next(iter(make_loader(index, "train", bs, train=True, workers=w, augment_factory=augment)))
        startup[f"w{w}"] = time.perf_counter() - t0
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0]}
    ratios = {k: float(np.median([r[k] / r["predecoded"] for r in rounds])) for k in rounds[0] if k != "predecoded"}
    cpu, wanted = cpu_description()
    return {"images_per_second_median": med, "ratio_to_predecoded_median": ratios, "rounds": rounds,
            "first_batch_seconds": startup, "threads": args.threads, "batch_size": bs, "image_size": args.size,
            "steps_per_round": args.steps, "model": params.train.models["cnn"].arch,
            "cpu": cpu, "cpu_flags": wanted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "plantvillage-mini")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = measure(args)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
