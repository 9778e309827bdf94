"""Scale curve of the training flow: wall time per step and peak memory at N images.

For each N, a dataset of N JPEGs is derived from the real sample (random resized crops,
flips and colour jitter of its photos, so no two files are identical and dedup keeps
them all), written to a scratch folder (never into ../shared), and the whole flow runs
on it with one epoch per model and otherwise default parameters. A sampler polls the
resident memory (RSS) of the flow's whole process tree every 0.5 s — both training
branches, their loader workers, every step — and records the peak of the sum and the
peak per step.

    .venv/bin/python benchmarks/scale_curve.py --sample ../shared/data/plantvillage-mini \\
        --sizes 2000 10000 50000 --out reports/bench/scale

Writes ``scale.json``, ``scale.md`` (tables, with lscpu flags) and ``scale.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
STEPS = ("start", "prepare", "train", "evaluate", "distill", "export", "end")


def derive_dataset(sample: Path, n: int, out: Path, seed: int = 0) -> None:
    """``n`` augmented JPEGs spread evenly over the sample's classes."""
    rng = np.random.default_rng(seed)
    classes = sorted(p for p in sample.iterdir() if p.is_dir())
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png")) for c in classes}
    for i in range(n):
        cls = classes[i % len(classes)].name
        src = files[cls][int(rng.integers(len(files[cls])))]
        img = Image.open(src).convert("RGB")
        w, h = img.size
        scale = rng.uniform(0.6, 1.0)
        cw, ch = int(w * scale), int(h * scale)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((256, 256), Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
        (out / cls).mkdir(parents=True, exist_ok=True)
        img.save(out / cls / f"{i:07d}.jpg", quality=90)


class TreeSampler(threading.Thread):
    """Peak memory of a process tree: of the sum, and per flow step (children count to their step).

    Two measures: RSS counts a shared library once *per process* that maps it (torch's
    ~0.6 GB of libraries twice when two branches run); PSS splits shared pages among the
    processes that share them, so the sum of PSS is what the run really occupies (what a
    cgroup / pod memory limit sees, less page cache).
    """

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.interval = interval
        self.peak_total = 0
        self.peak_pss_total = 0
        self.peak_step: dict[str, int] = defaultdict(int)
        # Who held the memory at the whole run's PSS peak: one row per process.
        self.peak_breakdown: list[dict] = []
        self.stop = threading.Event()

    @staticmethod
    def _step_of(proc: psutil.Process) -> str | None:
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            return None
        if "step" in cmd:
            i = cmd.index("step")
            if i + 1 < len(cmd) and cmd[i + 1] in STEPS:
                return cmd[i + 1]
        return None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            total = pss_total = 0
            per_step: dict[str, int] = defaultdict(int)
            step_of: dict[int, str] = {}
            rows: list[dict] = []
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss = info.rss
                except psutil.Error:
                    continue
                total += rss
                pss_total += getattr(info, "pss", rss)
                rows.append({"pid": p.pid, "rss_mb": rss / 2**20, "pss_mb": getattr(info, "pss", rss) / 2**20,
                             "cmd": _short_cmd(p)})
                step = self._step_of(p)
                if step is None:
                    try:
                        step = next((step_of[a.pid] for a in p.parents() if a.pid in step_of), None)
                    except psutil.Error:
                        step = None
                if step:
                    step_of[p.pid] = step
                    per_step[step] += rss
            self.peak_total = max(self.peak_total, total)
            if pss_total > self.peak_pss_total:
                self.peak_breakdown = sorted(rows, key=lambda r: -r["pss_mb"])
            self.peak_pss_total = max(self.peak_pss_total, pss_total)
            for s, v in per_step.items():
                self.peak_step[s] = max(self.peak_step[s], v)
            time.sleep(self.interval)


def _short_cmd(proc: psutil.Process) -> str:
    """The part of a command line that says which process it is (step name, card, loader worker)."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    keep = [c for c in cmd if not c.startswith("/") or c.endswith(".py")]
    return " ".join(Path(c).name if c.endswith(".py") else c for c in keep)[:160]


def step_times(run_id: str, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Wall seconds per step from Metaflow's task timestamps (parallel branches: first start to last end)."""
    code = (
        "import json,sys\nfrom metaflow import Flow, namespace\nnamespace(None)\n"
        "run = Flow('PlantDiseaseFlow')[sys.argv[1]]\nout = {}\n"
        "for s in run:\n    ts = list(s.tasks())\n"
        "    out[s.id] = max(t.finished_at.timestamp() for t in ts) - min(t.created_at.timestamp() for t in ts)\n"
        "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code, run_id], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit: what a pod's ``resources.limits.memory`` enforces.

    The flow runs inside it (its processes inherit the group), so a run that needs more than the
    limit is OOM-killed and fails; page cache (shard reads) counts but is reclaimed first.
    """

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, name: str, limit_mb: int) -> None:
        self.path = self.ROOT / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(str(limit_mb * 2**20))
        self.limit_mb = limit_mb

    def enter(self) -> None:
        """Move the calling process into the group (use as ``preexec_fn``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def report(self) -> dict:
        """Limit, peak usage (resident + page cache), limit hits and OOM kills."""
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {"limit_mb": self.limit_mb,
                "max_usage_mb": int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20,
                "failcnt": int((self.path / "memory.failcnt").read_text()),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        """Delete the (empty) group."""
        try:
            self.path.rmdir()
        except OSError:
            pass


def run_one(n: int, sample: Path, scratch: Path, extra: list[str], limit_mb: int | None = None) -> dict:
    data = scratch / f"data-{n}"
    if not data.exists():
        t0 = time.time()
        derive_dataset(sample, n, data)
        print(f"derived {n} images in {time.time() - t0:.0f} s", file=sys.stderr)
    work = scratch / f"work-{n}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = {**os.environ, "METAFLOW_USER": os.environ.get("METAFLOW_USER", "bench"), "PYTHONWARNINGS": "ignore",
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    overrides = " ".join(["train.epochs=1", "student.epochs=1", f"data.prepared_dir={work / 'prepared'}",
                          f"train.out_dir={work / 'train'}",
                          f"evaluate.out_dir={work / 'eval'}", f"export.out_dir={work / 'bundles'}",
                          "registry.model_name=scale-bench", *extra])
    cmd = [sys.executable, str(REPO / "flows" / "train_flow.py"), "run", "--data-dir", str(data), "--set", overrides,
           "--run-id-file", str(work / "run_id")]
    group = MemoryCgroup(f"plantml-scale-{n}-{os.getpid()}", limit_mb) if limit_mb else None
    t0 = time.time()
    with open(work / "flow.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=group.enter if group else None)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - t0
    cgroup = group.report() if group else None
    if group:
        group.remove()
    if rc != 0:
        raise SystemExit(f"flow failed at N={n} (memory cgroup: {cgroup}); see {work / 'flow.log'}")
    steps = step_times((work / "run_id").read_text().strip(), env, work)
    shards = sum(f.stat().st_size for f in work.rglob("*.tar"))
    return {"n": n, "wall_s": wall, "steps_s": steps, "peak_rss_total_mb": sampler.peak_total / 2**20,
            "peak_pss_total_mb": sampler.peak_pss_total / 2**20,
            "peak_rss_step_mb": {k: v / 2**20 for k, v in sampler.peak_step.items()},
            "peak_pss_breakdown": sampler.peak_breakdown,
            "shard_bytes": shards, "cgroup": cgroup}


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Flags"))
    except (StopIteration, OSError):
        pass
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "flags": wanted,
            "model": next((line.split(":", 1)[1].strip() for line in subprocess.run(
                ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "")}


def _cgroup_cell(cgroup: dict | None) -> str:
    if not cgroup:
        return "not limited"
    return f"{cgroup['limit_mb'] / 1024:.1f} GB / {cgroup['max_usage_mb'] / 1024:.2f} GB / {cgroup['oom_kills']}"


def write_report(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = machine()
    lines = [f"Machine: {info['model']}, {info['cores']} cores, flags {' '.join(info['flags'])}", "",
             "| N images | wall | prepare | train (both branches) | evaluate | distill | export | s per 1k images | "
             "peak PSS, whole run | peak RSS sum, whole run | peak RSS train step (2 branches) | shards | "
             "memory cgroup: limit / peak usage / OOM kills |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["steps_s"]
        lines.append(
            f"| {r['n']:,} | {r['wall_s'] / 60:.1f} min | {s.get('prepare', 0):.0f} s | {s.get('train', 0):.0f} s | "
            f"{s.get('evaluate', 0):.0f} s | {s.get('distill', 0):.0f} s | {s.get('export', 0):.0f} s | "
            f"{1000 * r['wall_s'] / r['n']:.0f} | "
            f"{r.get('peak_pss_total_mb', float('nan')) / 1024:.2f} GB | {r['peak_rss_total_mb'] / 1024:.2f} GB | "
            f"{r['peak_rss_step_mb'].get('train', 0) / 1024:.2f} GB | "
            f"{r['shard_bytes'] / 2**30:.2f} GB | {_cgroup_cell(r.get('cgroup'))} |")
    (out / "scale.md").write_text("\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r["n"] for r in results]
    for step in ("prepare", "train", "evaluate", "distill", "export"):
        axes[0].plot(ns, [r["steps_s"].get(step, 0) for r in results], marker="o", label=step)
    axes[0].plot(ns, [r["wall_s"] for r in results], marker="o", color="k", label="whole run")
    axes[0].set(xlabel="images", ylabel="seconds", title="wall time per step")
    axes[0].legend()
    axes[1].plot(ns, [r.get("peak_pss_total_mb", float("nan")) / 1024 for r in results], marker="o",
                 label="whole run, PSS sum")
    axes[1].plot(ns, [r["peak_rss_total_mb"] / 1024 for r in results], marker="o", label="whole run, RSS sum")
    axes[1].plot(ns, [r["peak_rss_step_mb"].get("train", 0) / 1024 for r in results], marker="o", label="train step")
    axes[1].axhline(3.0, color="r", linestyle="--", label="3 GB bar")
    axes[1].set(xlabel="images", ylabel="GB", title="peak resident memory", ylim=(0, None))
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sample", type=Path, default=REPO.parent / "shared" / "data" / "plantvillage-mini")
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000, 50000])
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "scale")
    ap.add_argument("--scratch", type=Path, default=None, help="where derived data and runs go (default: a temp dir)")
    ap.add_argument("--set", nargs="*", default=[], help="extra parameter overrides")
    ap.add_argument("--memory-limit-mb", type=int, default=None,
                    help="run the flow inside a cgroup v1 memory group with this hard limit (root; fails on OOM)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="plantml-scale-"))
    previous = args.out / "scale.json"
    # Sizes measured by an earlier invocation stay in the report (one size per invocation is allowed).
    results = [r for r in json.loads(previous.read_text())["results"] if r["n"] not in args.sizes] \
        if previous.is_file() else []
    for n in args.sizes:
        results.append(run_one(n, args.sample, scratch, args.set, args.memory_limit_mb))
        results.sort(key=lambda r: r["n"])
        print(json.dumps(results[-1]), file=sys.stderr)
        (args.out / "scale.json").write_text(json.dumps({"machine": machine(), "results": results}, indent=2))
        write_report(results, args.out)
    print((args.out / "scale.md").read_text())


if __name__ == "__main__":
    main()
