"""The evaluate step's card: the models side by side, the champion, calibration, OOD, domains, robustness."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from metaflow.cards import Markdown, Table, VegaChart

from flows.card_builders.common import banner, fmt, image_or_note


def per_class_spec(per_class: Sequence[Mapping[str, Any]], model_name: str) -> dict[str, Any]:
    """Interactive Vega-Lite bars: per-class F1 on the test split, worst first (hover: precision, recall, support).

    Args:
        per_class: the model's ``per_class`` rows.
        model_name: for the title.
    """
    rows = [{k: pc[k] for k in ("class", "precision", "recall", "f1", "support")} for pc in per_class]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 520,
        "title": f"{model_name}: per-class F1 (test)", "data": {"values": rows},
        "mark": {"type": "bar", "tooltip": True},
        "encoding": {"y": {"field": "class", "type": "nominal", "sort": "x"},
                     "x": {"field": "f1", "type": "quantitative", "scale": {"domain": [0, 1]}},
                     "color": {"field": "f1", "type": "quantitative",
                               "scale": {"scheme": "redyellowgreen", "domain": [0.5, 1]}}},
    }


def evaluate_card(report: Mapping[str, Any], train_errors: Mapping[str, str]) -> list[Any]:
    """CNN vs ViT side by side, champion, confusion, ROC, per-class, calibration, robustness.

    Args:
        report: the evaluation report (:func:`plantml.pipeline.evaluate_models`).
        train_errors: ``{branch: error}`` of the branches that failed and were left out.

    Returns:
        The card's components.
    """
    parts: list[Any] = banner(report["is_demo"])
    parts.append(Markdown(f"# Evaluation (test split)\n**Champion: `{report['champion']}`** — "
                          f"{report['champion_reason']}"))
    for name, err in train_errors.items():
        parts.append(Markdown(f"⚠️ branch `{name}` failed and was left out: `{err}`"))
    parts.append(_models_table(report["models"]))
    parts += image_or_note(report["plots"].get("comparison"), "CNN vs ViT")
    parts += image_or_note(report["plots"].get("curves"), "training curves")
    for name, m in report["models"].items():
        parts += _model_parts(name, m)
    champ = report["models"][report["champion"]]
    parts.append(_calibration_text(champ["calibration"], report["non_leaf"]))
    parts += domain_parts(report)
    parts += image_or_note(champ["plots"].get("reliability"), "reliability diagram")
    parts += image_or_note(report["plots"].get("coverage"), "coverage vs accuracy")
    if report.get("ood"):
        parts.append(_ood_text(report["ood"], report["non_leaf"], champ.get("calibration_confidence_only", {})))
        parts += image_or_note(report["plots"].get("ood"), "OOD score histogram")
    parts += _robustness_parts(report)
    return parts


def _models_table(models: Mapping[str, Mapping[str, Any]]) -> Any:
    """One row per model: quality, speed, size, training, calibration."""
    heads = ["model", "arch", "accuracy", "macro-F1", "ROC-AUC (ovr)", "latency ms", "params M", "best epoch",
             "train s", "ECE → calibrated"]
    rows = []
    for name, m in models.items():
        c = m["calibration"]
        rows.append([name, m["arch"], fmt(m["accuracy"]), fmt(m["macro_f1"]), fmt(m["roc_auc_ovr_macro"]),
                     fmt(m["latency_ms"], 1), fmt(m["num_params"] / 1e6, 2), m["best_epoch"],
                     fmt(m["train_seconds"], 0), f"{c['ece_uncalibrated']:.3f} → {c['ece']:.3f}"])
    return Table(rows, headers=heads)


def _model_parts(name: str, m: Mapping[str, Any]) -> list[Any]:
    """One model's section: confusion matrix, ROC, per-class F1 chart and table."""
    parts: list[Any] = [Markdown(f"## `{name}`")]
    parts += image_or_note(m["plots"]["confusion"], f"{name} confusion matrix")
    parts += image_or_note(m["plots"]["roc"], f"{name} ROC")
    parts.append(VegaChart(per_class_spec(m["per_class"], name)))
    parts.append(Table([[pc["class"], fmt(pc["precision"], 3), fmt(pc["recall"], 3), fmt(pc["f1"], 3), pc["support"],
                         fmt(pc["roc_auc"], 3)] for pc in m["per_class"]],
                       headers=["class", "precision", "recall", "F1", "support", "ROC-AUC"]))
    return parts


def _calibration_text(c: Mapping[str, Any], non_leaf: Mapping[str, Any]) -> Any:
    """The champion's temperature, ECE, abstain threshold and its effect on non-leaf inputs."""
    cap = c.get("domain_cap")
    lowered = (f" Lowered from {cap['threshold_for_precision']:.3f} so that every domain answers at least "
               f"{cap['min_coverage']:.0%} of its validation images (set by **{cap['domain']}**; "
               f"`calibration.domain_min_coverage`); validation precision target "
               f"{'still met' if c.get('met') else '**no longer met**'}." if cap else "")
    return Markdown(
        f"## Calibration and abstention (champion)\ntemperature **{c['temperature']:.3f}** fitted on validation; "
        f"test ECE {c['ece_uncalibrated']:.4f} → **{c['ece']:.4f}** (bootstrap 95 % interval "
        f"{c['ece_ci95'][0]:.3f}–{c['ece_ci95'][1]:.3f} on {c['n_test']} images). "
        f"Abstain threshold **{c['abstain_threshold']:.3f}** "
        f"(chosen on validation for precision ≥ {c['target_precision']}): test coverage **{c['test_coverage']:.3f}**, "
        f"accuracy on answered **{c['test_accuracy_at_threshold']:.4f}**. Non-leaf images abstained: "
        f"**{non_leaf['abstain_rate']:.0%}** of {non_leaf['n']} generated non-leaf images and "
        f"**{non_leaf['photo_abstain_rate']:.0%}** of {non_leaf['n_photos']} non-leaf photos.{lowered}"
    )


def _ood_text(ood: Mapping[str, Any], nl: Mapping[str, Any], conf_only: Mapping[str, Any]) -> Any:
    """The OOD score: how it is fitted, its threshold, what it rejects, and the confidence-only comparison."""
    rates = ood["rejection_rate"]
    return Markdown(
        "## Out-of-distribution score (champion)\nMahalanobis distance of the penultimate features to the "
        f"nearest class ({ood['components']} of {ood['feature_dim']} directions, Ledoit-Wolf shrinkage "
        f"{ood['shrinkage']:.3f}, fitted on {ood['n_fit']} training images); threshold **{ood['threshold']:.3f}** "
        f"= the {ood['acceptance']:.0%} quantile of validation scores. Rejected: validation "
        f"{rates.get('validation', float('nan')):.1%}, test **{rates.get('test', float('nan')):.1%}**, generated "
        f"non-leaves **{rates.get('generated_non_leaves', float('nan')):.0%}**, non-leaf photos "
        f"**{rates.get('non_leaf_photos', float('nan')):.0%}**. Without the OOD rule (confidence only) the "
        f"non-leaf abstain rates would be {nl.get('abstain_rate_confidence_only', float('nan')):.0%} and "
        f"{nl.get('photo_abstain_rate_confidence_only', float('nan')):.0%}, and test accuracy on answered "
        f"{fmt(conf_only.get('test_accuracy_at_threshold'))} at coverage {fmt(conf_only.get('test_coverage'), 3)}."
    )


def _robustness_parts(report: Mapping[str, Any]) -> list[Any]:
    """Accuracy under corruption, the background-only baseline, the severity chart and table."""
    rs = report["robustness"]["summary"]
    bb = report["background_baseline"]
    parts: list[Any] = [Markdown(
        f"## Robustness (champion, {report['robustness']['n_images']} test images)\nclean accuracy "
        f"{rs['clean_accuracy']:.4f}; mean under corruption {rs['mean_corrupted_accuracy']:.4f} "
        f"(relative **{rs['relative_accuracy']:.3f}**).\n\n**Background-only baseline** (border pixels only): "
        f"accuracy **{fmt(bb.get('accuracy'))}** vs chance {fmt(bb.get('chance'))} — a high value means the split "
        "rewards background, not the leaf."
    )]
    parts += image_or_note(report["plots"].get("robustness"), "accuracy vs corruption severity")
    parts.append(Table([[r["corruption"], r["severity"], fmt(r["accuracy"])] for r in report["robustness"]["rows"]],
                       headers=["corruption", "severity", "accuracy"]))
    return parts


def domain_parts(report: Mapping[str, Any]) -> list[Any]:
    """Per-domain evidence: metrics per kind of photo, the abstain rule per domain, domain gates, the shortcut check."""
    by_domain = report.get("by_domain") or {}
    if not by_domain:
        return []
    rows = []
    for d, m in by_domain.items():
        lo, hi = m["accuracy_ci95"]
        floor = m.get("ece_if_calibrated") or [float("nan")] * 3
        rows.append([d, m["n"], f"{m['accuracy']:.4f} [{fmt(lo, 3)}, {fmt(hi, 3)}]", fmt(m["macro_f1"]), fmt(m["ece"]),
                     f"{fmt(floor[0], 3)} [{fmt(floor[1], 3)}, {fmt(floor[2], 3)}]",
                     fmt(m["coverage"], 3), fmt(m["accuracy_on_answered"]), len(m["classes"])])
    parts: list[Any] = [Markdown("## Per domain (champion, test split)\naccuracy with its Wilson 95 % interval; "
                                 "macro-F1 over the classes that domain holds; ECE after temperature scaling, "
                                 "beside the ECE a perfectly calibrated model with the same confidences shows on "
                                 "this many images (sampling noise alone: median [95 % range]); coverage and "
                                 "accuracy on answered images under the bundle's abstain rule."),
                        Table(rows, headers=["domain", "images", "accuracy [95 % CI]", "macro-F1", "ECE",
                                             "ECE if perfectly calibrated", "coverage",
                                             "accuracy on answered", "classes"])]
    for w in (report.get("domain_abstention") or {}).get("warnings", []):
        parts.append(Markdown(f"⚠️ {w}"))
    gates = report.get("domain_gates") or []
    if gates:
        parts.append(Table([[g["domain"], g["metric"], g["bound"], fmt(g["value"]),
                             {True: "passed", False: "FAILED", None: "not applicable"}[g["passed"]]] for g in gates],
                           headers=["domain gate", "metric", "bound", "value", "result"]))
    for d, m in by_domain.items():
        if d != "lab" and len(m["classes"]) <= 12:  # a small domain's confusion is readable as a table
            conf = m["confusion"]
            parts.append(Markdown(f"**{d} confusion** (rows: true class; `other`: a class outside this domain)"))
            parts.append(Table([[c, *row] for c, row in zip(conf["classes"], conf["matrix"])],
                               headers=["true \\ predicted", *conf["columns"]]))
    sc = report.get("shortcut") or {}
    if sc.get("applicable"):
        parts.append(Markdown(
            f"## Background shortcut check\n{sc['n']} lab leaves of crops without field photos, cut out on their "
            f"plain backdrop and pasted onto backgrounds cut from field test photos: **{sc['target_rate']:.1%}** "
            f"predicted as a field crop ({', '.join(sc['target_classes'])}); on their own backdrop "
            f"{sc['target_rate_original']:.1%}. Accuracy {sc['accuracy_original']:.3f} on the backdrop → "
            f"{sc['accuracy_pasted']:.3f} on field backgrounds. A high share means the model learned "
            f"\"orchard background ⇒ {sc['target_classes'][0].split('___')[0]}\" (gate: "
            f"robustness.max_shortcut_rate = {sc.get('max_target_rate')})."))
    elif sc:
        parts.append(Markdown(f"*Background shortcut check: not applicable ({sc.get('reason')}).*"))
    return parts
