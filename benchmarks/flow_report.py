"""Summarise a PlantDiseaseFlow run from Metaflow's own records: task timeline, overlap of
the parallel training branches, wall time, and the champion's numbers.

    python benchmarks/flow_report.py [RUN_ID]        # default: the latest run
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_id", nargs="?", default=None)
    args = parser.parse_args()
    from metaflow import Flow, namespace

    namespace(None)
    flow = Flow("PlantDiseaseFlow")
    run = flow[args.run_id] if args.run_id else flow.latest_run
    tasks = []
    for step in run:
        for task in step:
            tasks.append({"step": step.id, "task": task.id, "start": task.created_at.timestamp(),
                          "end": task.finished_at.timestamp() if task.finished_at else None,
                          "branch": task.data.model_name if step.id == "train" and "model_name" in task else None})
    t0 = min(t["start"] for t in tasks)
    train = [t for t in tasks if t["step"] == "train"]
    overlap = (min(t["end"] for t in train) - max(t["start"] for t in train)) if len(train) > 1 else 0.0
    report = {"run": run.pathspec, "successful": run.successful,
              "wall_seconds": round(max(t["end"] or t0 for t in tasks) - t0, 1),
              "tasks": [{"step": t["step"], "branch": t["branch"], "start_s": round(t["start"] - t0, 1),
                         "end_s": round((t["end"] or t0) - t0, 1)} for t in sorted(tasks, key=lambda t: t["start"])],
              "train_overlap_seconds": round(overlap, 1)}
    if run.successful:
        rep = run.data.report
        report["champion"] = rep["champion"]
        report["models"] = {n: {k: m[k] for k in ("arch", "accuracy", "macro_f1", "latency_ms", "best_epoch",
                                                  "epochs_run", "train_seconds")} for n, m in rep["models"].items()}
        report["is_demo"] = rep["is_demo"]
        report["bundle"] = run.data.bundle_path
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
