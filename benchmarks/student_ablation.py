"""The edge student's settings, one row per variant, distilled from a finished flow run's champion.

One row = the flow's own distill stage (:func:`plantml.pipeline.distill_student`) on that run's
shards, champion checkpoint and evaluation report, with ``--set`` overrides of the
``student``/``train`` sections; the row compares the student's test accuracy (torch, overall
and per domain) with the champion's from the same report. The export gate decides on the
exported models (ONNX Runtime / OpenVINO, a stratified test subset); these rows are the
torch figures the stage itself logs. Usage::

    python benchmarks/student_ablation.py --run RUN_ID --variant default --out reports/bench/student.jsonl
    python benchmarks/student_ablation.py --run RUN_ID --variant s128 --set student.image_size=128 --out ...

Each run appends one JSON line (settings, per-domain accuracy of student and champion, the
drops, distill seconds, 1-thread latency, lscpu flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script (python benchmarks/student_ablation.py), so the repository root is put on the path first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.domain_ablation import append_row, cpu_flags  # noqa: E402
from plantml.config import load_params, parse_override  # noqa: E402
from plantml.pipeline import distill_student  # noqa: E402
from plantml.shards import load_index  # noqa: E402

log = logging.getLogger("student_ablation")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a PlantDiseaseFlow run id whose evaluate step finished")
    ap.add_argument("--variant", required=True, help="row name")
    ap.add_argument("--set", action="append", default=[], help="overrides key=value (student.*, train.*)")
    ap.add_argument("--out", required=True, help="JSON lines file to append the row to")
    return ap.parse_args(argv)


def run_paths(run: str) -> dict[str, Path]:
    """Where a local flow run left its shards, evaluation report and trained branches."""
    return {"index": ROOT / ".metaflow" / ".plantml" / "PlantDiseaseFlow" / run / "data",
            "report": ROOT / "artifacts" / "eval" / run / "report.json",
            "train": ROOT / "artifacts" / "train" / run}


def champion_by_domain(report: dict[str, Any]) -> dict[str, float]:
    """The champion's test accuracy per domain and overall (``all``), from the evaluation report."""
    out = {d: float(m["accuracy"]) for d, m in report.get("by_domain", {}).items()}
    out["all"] = float(report["models"][report["champion"]]["accuracy"])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = run_paths(args.run)
    for name, path in paths.items():
        if not path.exists():
            raise SystemExit(f"run {args.run}: no {name} at {path}")
    params = load_params(None, dict(parse_override(s) for s in args.set))
    report = json.loads(paths["report"].read_text())
    champion = report["champion"]
    teacher_dir = paths["train"] / champion
    teacher_result = json.loads((teacher_dir / "result.json").read_text())
    index = load_index(paths["index"])
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="student-ablation-") as out:
        result = distill_student(params, report, teacher_result, str(teacher_dir / "model.pt"), index, out)
    student = {d: float(m["accuracy"]) for d, m in result.get("by_domain", {}).items()}
    student["all"] = float(result["metrics"]["accuracy"]) if "metrics" in result else float("nan")
    teacher = champion_by_domain(report)
    s = params.student
    row = {"variant": args.variant, "run": args.run, "status": result["status"], "reason": result.get("reason", ""),
           "arch": s.arch, "image_size": s.image_size, "epochs": s.epochs, "lr": s.lr, "temperature": s.temperature,
           "alpha": s.alpha, "frozen_blocks": s.frozen_blocks, "ema_decay": params.train.ema_decay,
           "seed": params.train.seed, "best_epoch": result.get("best_epoch"), "epochs_run": result.get("epochs_run"),
           "student_accuracy": student, "champion_accuracy": teacher,
           "drop_points": {d: round(100 * (teacher[d] - student[d]), 2) for d in student if d in teacher},
           "distill_seconds": result.get("distill_seconds"), "stage_seconds": round(time.time() - t0, 1),
           "latency_ms": result.get("latency_ms"), "teacher_latency_ms": result.get("teacher_latency_ms"),
           "cpu": cpu_flags(), "time": time.strftime("%Y-%m-%d %H:%M")}
    append_row(args.out, row)  # also prints it
    return 0


if __name__ == "__main__":
    sys.exit(main())
