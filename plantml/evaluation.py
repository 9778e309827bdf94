"""Evaluation: metrics on the test split, the champion rule, quality gates, plots.

Metrics are computed from probabilities so that every model (torch, ONNX Runtime,
OpenVINO, INT8) is measured by the same code. Plots are written as PNG files (rendered
here, not in the card, so cards stay fast).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from plantml.calibration import ece_sampling_floor, expected_calibration_error
from plantml.metrics import macro_f1
from plantml.plots import pyplot, save_figure

log = logging.getLogger(__name__)


class QualityGateError(RuntimeError):
    """The champion misses a quality gate from params; the message lists which."""


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1, one-vs-rest ROC-AUC, confusion matrix.

    Args:
        y_true: integer labels ``[N]``.
        probs: class probabilities ``[N, C]`` (rows sum to 1).
        classes: names, index-aligned with the columns.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    labels = list(range(len(classes)))
    y_pred = probs.argmax(1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    per_class_auc: list[float | None] = []
    for i in labels:
        positives = (y_true == i)
        if positives.all() or not positives.any():
            per_class_auc.append(None)  # undefined when a class is absent (or alone) in the split
        else:
            per_class_auc.append(float(roc_auc_score(positives, probs[:, i])))
    defined = [a for a in per_class_auc if a is not None]
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": macro_f1(y_true, y_pred, labels=labels),
        "roc_auc_ovr_macro": float(np.mean(defined)) if defined else None,
        "per_class": [
            {"class": c, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i]), "roc_auc": per_class_auc[i]}
            for i, c in enumerate(classes)
        ],
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def choose_champion(candidates: Mapping[str, Mapping[str, float]], metric: str, tolerance: float) -> tuple[str, str]:
    """Pick the champion by the rule in params.

    The model with the highest ``metric`` wins; if another is within ``tolerance`` of it
    and at least 20 % faster (``latency_ms``), that one wins instead: a tie in quality goes
    to the cheaper model to run. The 20 % margin keeps the choice stable under timing
    noise, so re-running evaluation on the same models picks the same champion.

    Args:
        candidates: ``{name: metrics}`` (``metric`` and ``latency_ms`` are read).
        metric: the metric to maximise.
        tolerance: how far below the best a model may be and still win on speed.

    Returns:
        ``(name, human-readable reason)``.
    """
    if not candidates:
        raise ValueError("no trained model to choose from")
    ranked = sorted(candidates.items(), key=lambda kv: -kv[1][metric])
    best_name, best = ranked[0]
    close = [(n, m) for n, m in ranked if best[metric] - m[metric] <= tolerance]
    fastest_name, fastest = min(close, key=lambda kv: kv[1].get("latency_ms", float("inf")))
    best_latency = best.get("latency_ms", float("inf"))
    if fastest_name != best_name and fastest.get("latency_ms", float("inf")) <= 0.8 * best_latency:
        return fastest_name, (
            f"{fastest_name}: {metric} {fastest[metric]:.4f} is within {tolerance} of {best_name} "
            f"({best[metric]:.4f}) and it is faster ({fastest.get('latency_ms', 0):.1f} ms vs "
            f"{best.get('latency_ms', 0):.1f} ms)"
        )
    others = ", ".join(f"{n} {m[metric]:.4f}" for n, m in ranked[1:])
    return best_name, f"{best_name}: highest {metric} {best[metric]:.4f}" + (f" (vs {others})" if others else "")


def check_quality_gates(metrics: Mapping[str, Any], min_macro_f1: float, min_accuracy: float, name: str) -> None:
    """Raise :class:`QualityGateError` if the champion misses a gate.

    Args:
        metrics: the champion's test metrics (``macro_f1``, ``accuracy``).
        min_macro_f1: ``evaluate.min_macro_f1``.
        min_accuracy: ``evaluate.min_accuracy``.
        name: the champion's name, for the message.
    """
    failures = []
    if metrics["macro_f1"] < min_macro_f1:
        failures.append(f"macro-F1 {metrics['macro_f1']:.4f} < evaluate.min_macro_f1 {min_macro_f1}")
    if metrics["accuracy"] < min_accuracy:
        failures.append(f"accuracy {metrics['accuracy']:.4f} < evaluate.min_accuracy {min_accuracy}")
    if failures:
        raise QualityGateError(f"quality gate failed for champion {name}: " + "; ".join(failures))


# --------------------------------------------------------------------------- domains


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``k / n`` (95 % for ``z = 1.96``); ``(nan, nan)`` for ``n = 0``.

    Wilson, not the normal approximation: with 72 field photos and accuracies near 0 or 1
    the normal interval leaves [0, 1] and undercovers.

    Args:
        k: successes.
        n: trials.
        z: the normal quantile of the confidence level.
    """
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # rounded: k = n must give an upper bound of exactly 1.0, not 0.9999999999999999
    return round(float(max(0.0, centre - half)), 12), round(float(min(1.0, centre + half)), 12)


def domain_metrics(labels: np.ndarray, probs: np.ndarray, domains: Sequence[str], classes: Sequence[str],
                   threshold: float | None = None, answered: np.ndarray | None = None,
                   n_bins: int = 15) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1, confusion, ECE, coverage and accuracy-on-answered, per domain.

    Args:
        labels: integer labels ``[N]``.
        probs: calibrated probabilities ``[N, C]`` (the ones the bundle answers with).
        domains: each image's domain (``lab``, ``field``, ...).
        classes: class names (columns of ``probs``).
        threshold: the abstain threshold on the top probability (``None``: every image answered).
        answered: optional extra ``bool [N]`` mask (the OOD rule): an image is answered only
            when it passes both.
        n_bins: ECE bins.

    Returns:
        ``{domain: {...}}``. Macro-F1 and the confusion matrix are over the classes that
        domain holds (a field set of four apple classes is not scored on 30 absent ones);
        the confusion matrix has one more column, ``other``, for predictions outside them.
        ``accuracy_ci95`` is a Wilson interval. ``ece_if_calibrated`` is the ECE a perfectly
        calibrated model with the same confidences would show on this many images
        (``[median, low, high]``, :func:`plantml.calibration.ece_sampling_floor`). ``coverage`` is the answered share;
        ``accuracy_on_answered`` is NaN when nothing is answered.
    """
    from sklearn.metrics import confusion_matrix

    labels, probs, domains = np.asarray(labels), np.asarray(probs), np.asarray(list(domains), dtype=object)
    if not (len(labels) == len(probs) == len(domains)):
        raise ValueError(f"domain_metrics: {len(labels)} labels, {len(probs)} predictions, {len(domains)} domains")
    if len(probs) == 0:
        return {}
    pred, conf = probs.argmax(1), probs.max(1)
    accepted = np.ones(len(labels), bool) if threshold is None else conf >= float(threshold)
    if answered is not None:
        accepted &= np.asarray(answered, dtype=bool)
    out: dict[str, dict[str, Any]] = {}
    for domain in sorted(set(domains.tolist())):
        m = domains == domain
        y, p, acc = labels[m], pred[m], accepted[m]
        present = sorted(set(y.tolist()))
        correct = int((y == p).sum())
        n, n_acc = int(m.sum()), int(acc.sum())
        cm = confusion_matrix(y, np.where(np.isin(p, present), p, -1), labels=[*present, -1])[:-1]
        out[domain] = {
            "n": n,
            "accuracy": correct / n,
            "accuracy_ci95": list(wilson_interval(correct, n)),
            "macro_f1": macro_f1(y, p, labels=present),
            "ece": expected_calibration_error(probs[m], y, n_bins),
            # What sampling alone gives a perfectly calibrated model here: [median, 2.5 %, 97.5 %].
            "ece_if_calibrated": list(ece_sampling_floor(probs[m], n_bins)),
            "coverage": n_acc / n,
            "n_answered": n_acc,
            "accuracy_on_answered": float((y[acc] == p[acc]).mean()) if n_acc else float("nan"),
            "accuracy_on_answered_ci95": list(wilson_interval(int((y[acc] == p[acc]).sum()), n_acc)),
            "classes": [classes[i] for i in present],
            "confusion": {"classes": [classes[i] for i in present],
                          "columns": [*(classes[i] for i in present), "other"], "matrix": cm.tolist()},
        }
    return out


def check_domain_gates(by_domain: Mapping[str, Mapping[str, Any]], gates: Sequence[Any]) -> list[dict[str, Any]]:
    """Each ``evaluate.gates`` entry checked against the champion's per-domain test metrics.

    A gate whose domain has no test images is ``not applicable`` (``passed: None``) unless
    it is ``required``, then it fails: a field floor cannot pass on a run without field
    photos by accident.

    Args:
        by_domain: the champion's per-domain test metrics.
        gates: ``evaluate.gates`` (domain, metric, min or max, required).

    Returns:
        One dict per gate: domain, metric, bound, value, passed (True/False/None), message.
    """
    results = []
    for g in gates:
        bound = f">= {g.min}" if g.min is not None else f"<= {g.max}"
        row: dict[str, Any] = {"domain": g.domain, "metric": g.metric, "bound": bound, "value": None}
        metrics = by_domain.get(g.domain)
        if metrics is None:
            row["passed"] = False if g.required else None
            row["message"] = f"{g.domain} {g.metric} {bound}: no {g.domain} test images" + (
                "" if g.required else " (not applicable)")
        else:
            value = float(metrics[g.metric])
            ok = (value >= g.min) if g.min is not None else (value <= g.max)
            ok = bool(ok) and not np.isnan(value)
            row.update(value=value, passed=ok, message=f"{g.domain} {g.metric} {value:.4f} {bound}"
                       + ("" if ok else " FAILED"))
        results.append(row)
    return results


# --------------------------------------------------------------------------- plots


def _short(name: str) -> str:
    return name.replace("___", ": ").replace("_", " ")[:28]


def plot_confusion_matrix(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    """Row-normalised confusion matrix with counts, written as a PNG to ``path`` (returned).

    Args:
        cm: the confusion matrix (rows: true class), labelled by ``classes`` on both axes.
        title: shown above the matrix.
    """
    plt = pyplot()
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * n + 3), max(4, 0.45 * n + 2)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [_short(c) for c in classes], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), [_short(c) for c in classes], fontsize=7)
    for i in range(n):
        for j in range(n):
            if cm[i, j]:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_figure(fig, path)


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """One-vs-rest ROC curves (micro-average bold).

    Args:
        y_true: integer labels ``[N]``.
        probs: class probabilities ``[N, C]``.
        classes: class names.
        path: the PNG to write.
        title: the plot's title.

    Returns:
        ``path``.
    """
    from sklearn.metrics import roc_curve

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, c in enumerate(classes):
        pos = y_true == i
        if pos.any() and not pos.all():
            fpr, tpr, _ = roc_curve(pos, probs[:, i])
            ax.plot(fpr, tpr, lw=0.8, alpha=0.6)
    onehot = np.eye(len(classes))[y_true]
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    ax.plot(fpr, tpr, lw=2.5, color="black", label="micro-average")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_training_curves(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """Loss and validation accuracy/macro-F1 per epoch, one line per model.

    Args:
        histories: ``{model: per-epoch rows}``.
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        ax1.plot(ep, [h["train_loss"] for h in hist], marker="o", label=f"{name} train")
        ax1.plot(ep, [h["val_loss"] for h in hist], marker="o", ls="--", label=f"{name} val")
        ax2.plot(ep, [h["val_accuracy"] for h in hist], marker="o", label=f"{name} val accuracy")
        ax2.plot(ep, [h["val_macro_f1"] for h in hist], marker="s", ls="--", label=f"{name} val macro-F1")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(0, 1.01)
    ax2.legend(fontsize=7)
    fig.suptitle("training curves")
    return save_figure(fig, path)


def plot_comparison(rows: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Side-by-side bars: accuracy, macro-F1, latency and size per model.

    Args:
        rows: ``{model: report}`` (``accuracy``, ``macro_f1``, ``latency_ms``, ``size_mb``).
        path: the PNG to write.

    Returns:
        ``path``.
    """
    plt = pyplot()
    names = list(rows)
    panels = [("accuracy", "test accuracy"), ("macro_f1", "test macro-F1"),
              ("latency_ms", "latency ms (torch, 1 thread)"),
              ("size_mb", "parameters (MB fp32)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3))
    for ax, (key, label) in zip(axes, panels):
        vals = [rows[n].get(key, 0) or 0 for n in names]
        bars = ax.bar(names, vals, color=["#3b7d3b", "#4a6fa5", "#a5674a", "#777"][: len(names)])
        ax.set_title(label, fontsize=9)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3g}", ha="center", va="bottom", fontsize=8)
    return save_figure(fig, path)
