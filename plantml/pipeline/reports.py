"""The evaluate stage's files: ``report.json``, DVC's ``metrics.json`` and plot tables, the latest copy."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from plantml import storage

#: The evaluate stage's files that ``dvc.yaml`` declares as metrics and plots (relative to
#: ``evaluate.out_dir``); ``metrics.json`` last, so a reader that sees new metrics sees new plots.
DVC_EVAL_FILES = ("plots/confusion.csv", "plots/per_class.csv", "plots/training_curves.png", "plots/comparison.png",
                  "plots/robustness.png", "plots/coverage_accuracy.png", "metrics.json")

#: Per-domain numbers that ``dvc metrics show`` lists.
_DVC_DOMAIN_KEYS = ("n", "accuracy", "macro_f1", "ece", "coverage", "accuracy_on_answered")


def write_evaluation_files(report: Mapping[str, Any], out: Path) -> None:
    """Write ``metrics.json``, ``report.json`` and the DVC plot tables of a finished evaluation.

    Args:
        report: the evaluation report (plain data).
        out: the evaluate stage's folder (with ``plots/``).
    """
    storage.write_bytes(out / "metrics.json", json.dumps(dvc_metrics(report), indent=2).encode())
    storage.write_bytes(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    write_plot_tables(report, out / "plots")


def dvc_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The flat numbers DVC shows with ``dvc metrics show``.

    Args:
        report: the evaluation report.

    Returns:
        The champion's headline numbers, then each model's, then each domain's.
    """
    champ = report["models"][report["champion"]]
    calib = champ["calibration"]
    out: dict[str, Any] = {
        "champion": report["champion"],
        "is_demo_data": report["is_demo"],
        "accuracy": champ["accuracy"], "macro_f1": champ["macro_f1"],
        "ece_uncalibrated": calib["ece_uncalibrated"], "ece": calib["ece"],
        "abstain_threshold": calib["abstain_threshold"],
        "coverage": calib["test_coverage"],
        "accuracy_at_threshold": calib["test_accuracy_at_threshold"],
        "robustness_relative_accuracy": report["robustness"]["summary"]["relative_accuracy"],
        "background_baseline_accuracy": report["background_baseline"].get("accuracy"),
        "non_leaf_abstain_rate": report["non_leaf"]["abstain_rate"],
        "non_leaf_photo_abstain_rate": report["non_leaf"]["photo_abstain_rate"],
    }
    for name, m in report["models"].items():
        out[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "latency_ms": m["latency_ms"]}
    out["by_domain"] = {d: {k: v[k] for k in _DVC_DOMAIN_KEYS} for d, v in report.get("by_domain", {}).items()}
    if report.get("shortcut", {}).get("applicable"):
        out["shortcut_target_rate"] = report["shortcut"]["target_rate"]
    return out


def write_plot_tables(report: Mapping[str, Any], plots: Path) -> None:
    """CSV tables that ``dvc plots show`` renders (confusion pairs, per-class F1).

    Args:
        report: the evaluation report.
        plots: the folder they go to.
    """
    classes = report["classes"]
    champ = report["models"][report["champion"]]
    with open(plots / "confusion.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["actual", "predicted"])
        for i, row in enumerate(champ["confusion_matrix"]):
            for j, n in enumerate(row):
                for _ in range(n):
                    w.writerow([classes[i], classes[j]])
    with open(plots / "per_class.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for pc in champ["per_class"]:
            w.writerow([pc["class"], pc["precision"], pc["recall"], pc["f1"], pc["support"]])


def publish_latest_evaluation(run_dir: str | os.PathLike[str], latest_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy a flow run's DVC metrics and plots to ``latest_dir`` (the paths ``dvc.yaml`` declares).

    The flow evaluates into ``evaluate.out_dir/<run_id>/``; this puts the same files beside
    the per-run folders, so ``dvc metrics show`` and ``dvc plots show`` show the latest
    evaluation, whether the flow or ``dvc repro`` made it. Each file is replaced atomically.

    Args:
        run_dir: the run's evaluation folder.
        latest_dir: ``evaluate.out_dir``.

    Returns:
        The files written.
    """
    written = []
    for rel in DVC_EVAL_FILES:
        src, dst = Path(run_dir) / rel, Path(latest_dir) / rel
        if not src.is_file():
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        written.append(dst)
    return written
