"""The corruption sweep: accuracy on the test split under each corruption at each severity.

:func:`evaluate_corruptions` runs it; :func:`robustness_summary`, :func:`robustness_gate`,
:func:`robustness_table` and :func:`robustness_chart` report it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from plantml.plots import pyplot, save_figure
from plantml.robustness.corruptions import CORRUPTIONS, check_severity
from plantml.robustness.predict import PredictProba, predict_in_batches

log = logging.getLogger(__name__)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(probs.argmax(axis=1) == labels))


def evaluate_corruptions(
    images: list[Image.Image],
    labels: np.ndarray,
    predict_proba: PredictProba,
    severities: Iterable[int] = (1, 3, 5),
    seed: int = 0,
    corruptions: Sequence[str] | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Accuracy on clean images and under each corruption at each severity.

    Every (corruption, severity) pair gets its own generator seeded from
    ``(seed, corruption index, severity)``, so the result does not depend on the order
    or on which other corruptions run.

    Args:
        images: test images (PIL, any size).
        labels: ``(N,)`` integer class indices.
        predict_proba: list of PIL images -> ``(N, C)`` probabilities.
        severities: levels from 1 (mild) to 5 (severe).
        seed: base seed.
        corruptions: names to run (default: all of :data:`CORRUPTIONS`).
        batch_size: images per ``predict_proba`` call.

    Returns:
        Rows ``{"corruption", "severity", "accuracy", "n"}``; the first is
        ``{"corruption": "clean", "severity": 0, ...}``.

    Raises:
        ValueError: on empty input, mismatched labels, an unknown corruption or a bad severity.
    """
    from tqdm.auto import tqdm

    labels = np.asarray(labels)
    if len(images) == 0:
        raise ValueError("evaluate_corruptions: no images given")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"evaluate_corruptions: {len(images)} images but labels of shape {labels.shape}")
    names = list(corruptions) if corruptions is not None else list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {', '.join(unknown)}; known: {', '.join(CORRUPTIONS)}")
    severities = [check_severity(s) for s in severities]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    clean = predict_in_batches(predict_proba, images, None, batch_size)
    n_classes = clean.shape[1]
    rows: list[dict[str, Any]] = [
        {"corruption": "clean", "severity": 0, "accuracy": _accuracy(clean, labels), "n": len(images)}
    ]
    combos = [(name, s) for name in names for s in severities]
    for name, severity in tqdm(combos, desc="corruptions", leave=False, disable=None):
        rng = np.random.default_rng([int(seed), list(CORRUPTIONS).index(name), severity])
        fn = CORRUPTIONS[name]
        corrupted = [fn(img, severity, rng) for img in images]
        probs = predict_in_batches(predict_proba, corrupted, n_classes, batch_size)
        rows.append({"corruption": name, "severity": severity, "accuracy": _accuracy(probs, labels), "n": len(images)})
        log.debug("%s@%d: accuracy %.4f", name, severity, rows[-1]["accuracy"])
    return rows


def robustness_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate :func:`evaluate_corruptions` rows.

    Returns:
        ``{"clean_accuracy", "mean_corrupted_accuracy", "relative_accuracy",
        "worst": {"corruption", "severity", "accuracy"}, "per_corruption": {name: mean},
        "per_severity": {severity: mean}}``. ``relative_accuracy`` is mean corrupted
        accuracy / clean accuracy (0 when clean accuracy is 0).

    Raises:
        ValueError: without a clean row or without corrupted rows.
    """
    clean = [r for r in rows if r["corruption"] == "clean"]
    corrupted = [r for r in rows if r["corruption"] != "clean"]
    if not clean:
        raise ValueError("robustness_summary: rows have no 'clean' row (use evaluate_corruptions)")
    if not corrupted:
        raise ValueError("robustness_summary: rows have no corrupted rows")
    clean_acc = float(clean[0]["accuracy"])
    mean_acc = float(np.mean([r["accuracy"] for r in corrupted]))
    worst = min(corrupted, key=lambda r: r["accuracy"])
    per_corruption: dict[str, float] = {}
    for name in dict.fromkeys(r["corruption"] for r in corrupted):
        per_corruption[name] = float(np.mean([r["accuracy"] for r in corrupted if r["corruption"] == name]))
    per_severity = {
        int(s): float(np.mean([r["accuracy"] for r in corrupted if r["severity"] == s]))
        for s in sorted({r["severity"] for r in corrupted})
    }
    return {
        "clean_accuracy": clean_acc,
        "mean_corrupted_accuracy": mean_acc,
        "relative_accuracy": mean_acc / clean_acc if clean_acc > 0 else 0.0,
        "worst": {"corruption": worst["corruption"], "severity": int(worst["severity"]),
                  "accuracy": float(worst["accuracy"])},
        "per_corruption": per_corruption,
        "per_severity": per_severity,
    }


def robustness_gate(summary: dict[str, Any], min_relative_accuracy: float) -> dict[str, Any]:
    """Check ``robustness.min_relative_accuracy``; the caller fails the run if not passed.

    Returns:
        ``{"passed", "relative_accuracy", "min_relative_accuracy", "message"}``.
    """
    rel = float(summary["relative_accuracy"])
    passed = rel >= float(min_relative_accuracy)
    message = (
        f"robustness gate {'passed' if passed else 'FAILED'}: mean corrupted accuracy is {rel:.3f} of clean "
        f"(minimum {float(min_relative_accuracy):.3f}); worst {summary['worst']['corruption']}@"
        f"{summary['worst']['severity']} = {summary['worst']['accuracy']:.3f}"
    )
    return {"passed": passed, "relative_accuracy": rel, "min_relative_accuracy": float(min_relative_accuracy),
            "message": message}


def robustness_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one line per corruption, one column per severity, plus the mean."""
    clean = [r for r in rows if r["corruption"] == "clean"]
    corrupted = [r for r in rows if r["corruption"] != "clean"]
    severities = sorted({int(r["severity"]) for r in corrupted})
    lines = ["| corruption | " + " | ".join(f"severity {s}" for s in severities) + " | mean |",
             "|---|" + "---:|" * (len(severities) + 1)]
    if clean:
        acc = clean[0]["accuracy"]
        lines.append("| clean | " + " | ".join(f"{acc:.3f}" for _ in severities) + f" | {acc:.3f} |")
    for name in dict.fromkeys(r["corruption"] for r in corrupted):
        by_s = {int(r["severity"]): r["accuracy"] for r in corrupted if r["corruption"] == name}
        cells = [f"{by_s[s]:.3f}" if s in by_s else "-" for s in severities]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {np.mean(list(by_s.values())):.3f} |")
    return "\n".join(lines)


def robustness_chart(rows: Sequence[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Line chart: accuracy vs severity per corruption (severity 0 = clean), as PNG."""
    summary = robustness_summary(rows)
    plt = pyplot()

    clean = summary["clean_accuracy"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in summary["per_corruption"]:
        pts = sorted((int(r["severity"]), float(r["accuracy"])) for r in rows if r["corruption"] == name)
        xs, ys = [0] + [p[0] for p in pts], [clean] + [p[1] for p in pts]
        ax.plot(xs, ys, marker="o", lw=1.5, label=name)
    ax.axhline(clean, color="black", ls="--", lw=1, label=f"clean {clean:.3f}")
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("test accuracy")
    ax.set_xticks(sorted({0} | {int(r["severity"]) for r in rows}))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy under corruptions (mean {summary['mean_corrupted_accuracy']:.3f}, "
                 f"{summary['relative_accuracy']:.0%} of clean)")
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    return save_figure(fig, path)
