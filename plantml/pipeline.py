"""The pipeline stages, one function each, shared by the Metaflow flow, the CLI and DVC.

``prepare`` -> ``train_branch`` (one per model, in parallel) -> ``evaluate_models`` ->
``export_champion``. Each takes the frozen :class:`~plantml.config.Params` and plain data,
and returns plain data (dicts, paths), so a Metaflow step can store the result as an
artifact and the CLI can write it as JSON.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from plantml.config import Params
from plantml.data import DatasetSummary, ManifestRow, load_images, prepare_dataset, rows_for, save_prepared
from plantml.preprocess import InputSpec, load_image, preprocess_batch, softmax

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(p: str | os.PathLike[str]) -> Path:
    """Relative paths in params are relative to the repository root, not the cwd."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


# --------------------------------------------------------------------------- prepare


def resolve_data_root(params: Params) -> tuple[Path, bool]:
    """The dataset folder and whether it is the generated demo set."""
    if params.data.data_dir:
        return Path(params.data.data_dir).expanduser().resolve(), False
    from plantml.demo_data import ensure_demo_dataset

    d = params.data
    root = ensure_demo_dataset(repo_path(d.demo_dir), d.demo_classes, d.demo_images_per_class, d.demo_image_size,
                               d.seed)
    return root, True


def prepare(params: Params, out_dir: str | os.PathLike[str] | None = None,
            progress: bool = True) -> tuple[list[ManifestRow], DatasetSummary, Path]:
    """Find and check the data, split it, and write ``manifest.csv`` + ``summary.json``.

    Returns:
        ``(rows, summary, manifest_path)``.
    """
    root, is_demo = resolve_data_root(params)
    if is_demo:
        log.warning("no data.data_dir given: using the SYNTHETIC DEMO dataset in %s (not real leaves)", root)
    rows, summary = prepare_dataset(root, params.data.split, params.data.seed, params.data.max_images_per_class,
                                    is_demo=is_demo, progress=progress)
    manifest = save_prepared(rows, summary, repo_path(out_dir or params.data.prepared_dir))
    log.info("prepared %d images in %d classes (%d skipped) -> %s", summary.n_images, len(summary.classes),
             summary.n_skipped, manifest)
    return rows, summary, manifest


# --------------------------------------------------------------------------- train


def train_branch(params: Params, name: str, rows: Sequence[ManifestRow], classes: Sequence[str],
                 out_dir: str | os.PathLike[str], parallel_branches: int = 1, progress: bool = True) -> Any:
    """Load the train/val splits and train model ``name`` (a key of ``train.models``)."""
    from plantml.training import resolve_threads, train_model

    if name not in params.train.models:
        raise ValueError(f"unknown model {name!r}: train.models has {', '.join(params.train.models)}")
    size = params.train.image_size
    threads = resolve_threads(params.train.num_threads, parallel_branches)
    train = load_images(rows_for(rows, "train"), classes, size, progress, desc=f"load train ({name})")
    val = load_images(rows_for(rows, "val"), classes, size, progress, desc=f"load val ({name})")
    return train_model(name, params.train.models[name], params.train, train, val, classes, out_dir, threads, progress)


# --------------------------------------------------------------------------- evaluate


def _torch_proba(model: Any, spec: InputSpec, temperature: float = 1.0):
    """``list[PIL] -> probabilities`` over a torch model, through the shared preprocessing."""
    import torch

    def predict(images: Sequence[Any]) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.from_numpy(preprocess_batch(images, spec))).numpy()
        return softmax(logits, temperature)

    return predict


def _stratified_subset(rows: Sequence[ManifestRow], limit: int, seed: int) -> list[ManifestRow]:
    """At most ``limit`` rows, each class keeping its share (at least one row), deterministic for ``seed``."""
    if len(rows) <= limit:
        return list(rows)
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_label.setdefault(r.label, []).append(r)
    picked: list[ManifestRow] = []
    for label in sorted(by_label):
        members = by_label[label]
        k = max(1, round(limit * len(members) / len(rows)))
        picked += [members[i] for i in sorted(rng.choice(len(members), size=min(k, len(members)), replace=False))]
    return picked


def evaluate_models(params: Params, results: Mapping[str, Mapping[str, Any]], checkpoints: Mapping[str, str],
                    rows: Sequence[ManifestRow], out_dir: str | os.PathLike[str], is_demo: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Test-split metrics for every trained model, the champion, calibration and robustness.

    Args:
        results: ``{name: TrainResult.to_dict()}`` of the branches that succeeded.
        checkpoints: ``{name: path to model.pt}``.
        rows: the manifest.
        out_dir: receives plots (PNG) and ``metrics.json``.

    Returns:
        The evaluation report (plain dict; ``models``, ``champion``, ``champion_reason``,
        ``calibration``, ``robustness``, ``background_baseline``, ``non_leaf``, ``plots``).

    Gates are checked separately by :func:`enforce_quality_gates`.
    """
    import torch

    from plantml import calibration as cal
    from plantml import robustness as rob
    from plantml.evaluation import (choose_champion, classification_metrics, plot_comparison, plot_confusion_matrix,
                                    plot_roc, plot_training_curves)
    from plantml.models.scored import extract_features
    from plantml.training import available_cores, load_checkpoint, measure_latency_ms

    if not results:
        raise RuntimeError("no model finished training: nothing to evaluate")
    torch.set_num_threads(available_cores())
    out = repo_path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    classes, size = first["classes"], first["image_size"]
    x_test, y_test = load_images(rows_for(rows, "test"), classes, size, progress, desc="load test")
    x_val, y_val = load_images(rows_for(rows, "val"), classes, size, progress, desc="load val")

    report: dict[str, Any] = {"classes": classes, "is_demo": is_demo, "models": {}, "plots": {}}
    models: dict[str, Any] = {}
    test_logits_of: dict[str, np.ndarray] = {}
    val_logits_of: dict[str, np.ndarray] = {}
    features_of: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # (val, test): the champion's feed the OOD fit
    for name, res in results.items():
        model, _ = load_checkpoint(checkpoints[name])
        models[name] = model
        spec = InputSpec(size=size, mean=tuple(res["mean"]), std=tuple(res["std"]))
        val_features, val_logits = extract_features(model, x_val, spec)
        test_features, test_logits = extract_features(model, x_test, spec)
        features_of[name] = (val_features, test_features)
        test_logits_of[name] = test_logits
        val_logits_of[name] = val_logits
        m = classification_metrics(y_test, softmax(test_logits), classes)
        calib = cal.calibration_summary(val_logits, y_val, test_logits, y_test,
                                        params.calibration.target_precision, params.calibration.min_coverage)
        m.update({
            "arch": res["arch"], "num_params": res["num_params"], "size_mb": res["num_params"] * 4 / 1e6,
            "latency_ms": measure_latency_ms(model, size, threads=1),
            "train_seconds": res["train_seconds"], "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
            "calibration": calib,
        })
        m["plots"] = {
            "confusion": str(plot_confusion_matrix(m["confusion_matrix"], classes,
                                                   out / "plots" / f"confusion_{name}.png",
                                                   f"{name} ({res['arch']}) test confusion")),
            "roc": str(plot_roc(y_test, softmax(test_logits), classes, out / "plots" / f"roc_{name}.png",
                                f"{name} one-vs-rest ROC")),
            "reliability": str(cal.reliability_diagram(softmax(test_logits), softmax(test_logits, calib["temperature"]),
                                                       y_test, out / "plots" / f"reliability_{name}.png",
                                                       temperature=calib["temperature"])),
        }
        report["models"][name] = m
        log.info("%s: test accuracy %.4f macro-F1 %.4f latency %.1f ms", name, m["accuracy"], m["macro_f1"],
                 m["latency_ms"])

    champion, reason = choose_champion(report["models"], params.evaluate.champion_metric,
                                       params.evaluate.champion_tie_tolerance)
    report["champion"], report["champion_reason"] = champion, reason
    champ = report["models"][champion]
    report["calibration"] = champ["calibration"]
    report["plots"]["curves"] = str(plot_training_curves({n: r["history"] for n, r in results.items()},
                                                         out / "plots" / "training_curves.png"))
    report["plots"]["comparison"] = str(plot_comparison(report["models"], out / "plots" / "comparison.png"))

    # Beyond the random split: out-of-distribution score, corruptions, background-only
    # baseline, non-leaf inputs.
    spec = InputSpec(size=size, mean=tuple(results[champion]["mean"]), std=tuple(results[champion]["std"]))
    detector = None
    if params.calibration.ood_enabled:
        detector, report["ood"], ood_masks = _fit_ood(params, models[champion], spec, rows, classes,
                                                      features_of[champion], out, progress)
        # Same confidence threshold (chosen on all validation images); coverage and accuracy
        # now count only what both rules answer.
        champ["calibration_confidence_only"] = champ["calibration"]
        champ["calibration"] = cal.calibration_summary(
            val_logits_of[champion], y_val, test_logits_of[champion], y_test, params.calibration.target_precision,
            params.calibration.min_coverage, val_in_distribution=ood_masks[0], test_in_distribution=ood_masks[1])
        report["calibration"] = champ["calibration"]
    predict = _torch_proba(models[champion], spec, champ["calibration"]["temperature"])
    sub = _stratified_subset(rows_for(rows, "test"), params.robustness.max_images, params.data.seed)
    sub_images = [load_image(r.path) for r in sub]
    sub_labels = np.array([classes.index(r.label) for r in sub])
    rob_rows = rob.evaluate_corruptions(sub_images, sub_labels, predict, params.robustness.severities,
                                        seed=params.data.seed)
    rob_summary = rob.robustness_summary(rob_rows)
    report["robustness"] = {"rows": rob_rows, "summary": rob_summary, "n_images": len(sub)}
    report["plots"]["robustness"] = str(rob.robustness_chart(rob_rows, out / "plots" / "robustness.png"))
    train_sub = _stratified_subset(rows_for(rows, "train"), 2000, params.data.seed)
    report["background_baseline"] = rob.background_baseline(
        [load_image(r.path) for r in train_sub], np.array([classes.index(r.label) for r in train_sub]),
        sub_images, sub_labels, border=params.robustness.background_border, seed=params.data.seed)
    non_leaf = rob.non_leaf_images(n=60, size=max(size, 224), seed=params.data.seed)
    photos = rob.non_leaf_photos(n=12, size=max(size, 224), seed=params.data.seed)
    report["non_leaf"] = _non_leaf_report(models[champion], spec, champ["calibration"], detector,
                                          report.get("ood", {}).get("threshold"), non_leaf, photos)
    if detector is not None:
        report["ood"]["rejection_rate"].update(generated_non_leaves=report["non_leaf"]["ood_rate"],
                                               non_leaf_photos=report["non_leaf"]["photo_ood_rate"])
        report["plots"]["ood"] = str(_ood_histogram(report["ood"], report["non_leaf"],
                                                    out / "plots" / "ood_scores.png"))
    calib = champ["calibration"]
    report["plots"]["coverage"] = str(cal.coverage_accuracy_plot(
        cal.coverage_accuracy_curve(softmax(test_logits_of[champion], calib["temperature"]), y_test),
        calib["abstain_threshold"], out / "plots" / "coverage_accuracy.png",
        target_precision=params.calibration.target_precision,
        operating_point=(calib["test_coverage"], calib["test_accuracy_at_threshold"]) if detector is not None
        else None))

    (out / "metrics.json").write_text(json.dumps(_dvc_metrics(report), indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _write_plot_tables(report, out / "plots")

    return report


def _fit_ood(params: Params, model: Any, spec: InputSpec, rows: Sequence[ManifestRow], classes: Sequence[str],
             eval_features: tuple[np.ndarray, np.ndarray], out: Path,
             progress: bool) -> tuple[Any, dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """Fit the champion's OOD detector on training features; threshold on validation.

    ``eval_features``: the champion's (validation, test) penultimate features.

    Returns:
        ``(detector, report["ood"], (val_in_distribution, test_in_distribution))``; the
        detector is also saved to ``out/ood_detector.npz`` (its path is in the report) for
        the export step.
    """
    from plantml import ood
    from plantml.models.scored import extract_features

    c = params.calibration
    fit_rows = _stratified_subset(rows_for(rows, "train"), c.ood_max_fit_images, params.data.seed)
    x_fit, y_fit = load_images(fit_rows, classes, spec.size, progress, desc="load train (OOD fit)")
    detector = ood.fit_feature_detector(extract_features(model, x_fit, spec)[0], y_fit, len(classes),
                                        c.ood_components)
    del x_fit
    val_scores, test_scores = (detector.score(f) for f in eval_features)
    threshold = ood.choose_ood_threshold(val_scores, c.ood_acceptance)
    summary = ood.summary_dict(detector, threshold, c.ood_acceptance, {
        "validation": ood.rejection_rate(val_scores, threshold), "test": ood.rejection_rate(test_scores, threshold)})
    summary["detector_path"] = str(detector.save(out / "ood_detector.npz"))
    summary["scores"] = {"validation": val_scores.tolist(), "test": test_scores.tolist()}
    log.info("OOD threshold %.4f (%.0f %% of validation accepted); test rejected %.3f", threshold,
             100 * c.ood_acceptance, summary["rejection_rate"]["test"])
    return detector, summary, (val_scores <= threshold, test_scores <= threshold)


def _non_leaf_report(model: Any, spec: InputSpec, calib: Mapping[str, Any], detector: Any,
                     ood_threshold: float | None, non_leaf: Sequence[Any], photos: Sequence[Any]) -> dict[str, Any]:
    """Abstention on generated non-leaf images and non-leaf photos, with and without the OOD rule."""
    from plantml import ood
    from plantml.models.scored import extract_features
    from plantml.robustness import abstain_rate

    out: dict[str, Any] = {"n": len(non_leaf), "n_photos": len(photos)}
    for key, images in (("", non_leaf), ("photo_", photos)):
        if not images:
            out.update({f"{key}abstain_rate": float("nan"), f"{key}abstain_rate_confidence_only": float("nan")})
            continue
        feats, logits = extract_features(model, preprocess_batch(list(images), spec))
        probs = softmax(logits, calib["temperature"])
        scores = detector.score(feats) if detector is not None else None
        abstained, _ = ood.decide(probs, scores, calib["abstain_threshold"], ood_threshold)
        out[f"{key}abstain_rate"] = float(abstained.mean())
        out[f"{key}abstain_rate_confidence_only"] = abstain_rate(probs, calib["abstain_threshold"])
        if scores is not None:
            out[f"{key}ood_rate"] = ood.rejection_rate(scores, ood_threshold)
            out[f"{key}scores"] = scores.tolist()
    return out


def _ood_histogram(ood_report: Mapping[str, Any], non_leaf: Mapping[str, Any], path: Path) -> Path:
    from plantml.ood import score_histogram

    groups = {"validation leaves": np.asarray(ood_report["scores"]["validation"]),
              "test leaves": np.asarray(ood_report["scores"]["test"]),
              "generated non-leaves": np.asarray(non_leaf.get("scores", [])),
              "non-leaf photos": np.asarray(non_leaf.get("photo_scores", []))}
    return score_histogram(groups, ood_report["threshold"], path)


def enforce_quality_gates(params: Params, report: Mapping[str, Any]) -> None:
    """Raise :class:`~plantml.evaluation.QualityGateError` if the champion misses a gate.

    Kept separate from :func:`evaluate_models` so callers can record the evaluation
    (MLflow, card) before failing the run.
    """
    from plantml.evaluation import QualityGateError, check_quality_gates

    name = report["champion"]
    check_quality_gates(report["models"][name], params.evaluate.min_macro_f1, params.evaluate.min_accuracy, name)
    relative = report["robustness"]["summary"]["relative_accuracy"]
    if relative < params.robustness.min_relative_accuracy:
        raise QualityGateError(
            f"robustness gate failed for champion {name}: relative accuracy under corruption {relative:.3f} "
            f"< robustness.min_relative_accuracy {params.robustness.min_relative_accuracy}")


def _dvc_metrics(report: Mapping[str, Any]) -> dict[str, Any]:
    """The flat numbers DVC shows with ``dvc metrics show``."""
    champ = report["models"][report["champion"]]
    out: dict[str, Any] = {
        "champion": report["champion"],
        "is_demo_data": report["is_demo"],
        "accuracy": champ["accuracy"], "macro_f1": champ["macro_f1"],
        "ece_uncalibrated": champ["calibration"]["ece_uncalibrated"], "ece": champ["calibration"]["ece"],
        "abstain_threshold": champ["calibration"]["abstain_threshold"],
        "coverage": champ["calibration"]["test_coverage"],
        "accuracy_at_threshold": champ["calibration"]["test_accuracy_at_threshold"],
        "robustness_relative_accuracy": report["robustness"]["summary"]["relative_accuracy"],
        "background_baseline_accuracy": report["background_baseline"].get("accuracy"),
        "non_leaf_abstain_rate": report["non_leaf"]["abstain_rate"],
        "non_leaf_photo_abstain_rate": report["non_leaf"]["photo_abstain_rate"],
    }
    for name, m in report["models"].items():
        out[name] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "latency_ms": m["latency_ms"]}
    return out


def _write_plot_tables(report: Mapping[str, Any], plots: Path) -> None:
    """CSV tables that ``dvc plots show`` renders (confusion pairs, per-class F1)."""
    import csv

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


# --------------------------------------------------------------------------- export


def export_champion(params: Params, report: Mapping[str, Any], train_result: Mapping[str, Any], checkpoint: str,
                    rows: Sequence[ManifestRow], lineage: Mapping[str, Any],
                    out_root: str | os.PathLike[str] | None = None,
                    progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Export the champion to a bundle: ONNX + OpenVINO FP32 (parity-checked), INT8 behind the
    accuracy gate, drift reference statistics, calibration and metrics.

    Returns:
        ``(bundle_path, metadata)``.
    """
    import torch

    from plantml.drift import reference_stats_step
    from plantml.export import export_bundle
    from plantml.quantize import int8_export_step
    from plantml.training import available_cores, load_checkpoint, normalize_batch

    torch.set_num_threads(available_cores())
    model, _ = load_checkpoint(checkpoint)
    ood_report = report.get("ood")
    exported = model
    if ood_report:
        from plantml.models.scored import scored_classifier
        from plantml.ood import FeatureDetector

        # The bundle's model returns (logits, ood_score): serving and edge read both.
        exported = scored_classifier(model, FeatureDetector.load(ood_report["detector_path"]))
    classes, size = train_result["classes"], train_result["image_size"]
    spec = InputSpec(size=size, mean=tuple(train_result["mean"]), std=tuple(train_result["std"]))
    test_rows = rows_for(rows, "test")
    x_test, y_test = load_images(test_rows, classes, size, progress, desc="load test")
    calib_rows = _stratified_subset(rows_for(rows, "train"), params.export.int8.calibration_images, params.data.seed)
    x_calib, _ = load_images(calib_rows, classes, size, progress, desc="load calibration")
    test_nchw = normalize_batch(x_test, spec)
    champ = report["models"][report["champion"]]
    calib = champ["calibration"]
    metrics = {
        "fp32": {k: champ[k] for k in ("accuracy", "macro_f1", "roc_auc_ovr_macro", "latency_ms")},
        "ece_uncalibrated": calib["ece_uncalibrated"], "ece": calib["ece"],
        "coverage_at_threshold": calib["test_coverage"], "accuracy_at_threshold": calib["test_accuracy_at_threshold"],
        "robustness": report["robustness"]["summary"],
        "background_baseline": report["background_baseline"],
        "non_leaf_abstain_rate": report["non_leaf"]["abstain_rate"],
        "n_test": len(test_rows), "is_demo_data": report["is_demo"],
    }
    steps = []
    if params.export.int8.enabled:
        steps.append(int8_export_step(normalize_batch(x_calib, spec), test_nchw, y_test,
                                      params.export.int8.max_accuracy_drop, threads=available_cores()))
    test_logits = _logits(model, test_nchw)
    probs = softmax(test_logits, calib["temperature"])
    # The reference is computed on the original files, as the service sees uploads (not the resized inputs).
    steps.append(reference_stats_step([r.path for r in test_rows], [classes[i] for i in probs.argmax(1)], probs.max(1),
                                      embeddings=test_logits, embedding_source="logits"))
    calibration = {"temperature": calib["temperature"], "abstain_threshold": calib["abstain_threshold"],
                   "target_precision": params.calibration.target_precision}
    if ood_report:
        calibration["ood_threshold"] = ood_report["threshold"]
        metrics["ood"] = {k: v for k, v in ood_report.items() if k not in ("scores", "detector_path")}
    out = repo_path(out_root or params.export.out_dir)
    path, metadata = export_bundle(
        exported, out_root=out, name=params.export.name, architecture=train_result["arch"], classes=classes,
        input_spec=spec, parity_inputs=test_nchw[:8], metrics=metrics, lineage=lineage, params=params.to_dict(),
        calibration=calibration,
        opset=params.export.opset, parity_tolerance=params.export.parity_tolerance, extra_steps=steps,
    )
    return path, metadata


def _logits(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                               for i in range(0, len(x), batch_size)])
