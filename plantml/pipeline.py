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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from plantml import shards as sh
from plantml import storage
from plantml.config import Params
from plantml.data import (DEFAULT_DOMAIN, DatasetSummary, DataSource, ManifestRow, PixelStaging, format_sources,
                          parse_data_dir, prepare_dataset, read_manifest_bytes, rows_for, save_prepared, write_shards)
from plantml.model_card import model_card_step
from plantml.preprocess import InputSpec, decode_image, preprocess_batch, softmax
from plantml.resources import available_cores, resolve_loader_workers, resolve_threads

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent


def repo_path(p: str | os.PathLike[str]) -> Path:
    """Relative paths in params are relative to the repository root, not the cwd."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


# --------------------------------------------------------------------------- prepare


def resolve_sources(params: Params) -> tuple[list[DataSource], bool]:
    """The run's data sources, and whether they are the generated demo set.

    ``data.data_dir`` (also what ``--data-dir`` sets) wins: a plain path is one ``lab``
    source, ``lab=PATH,field=PATH`` several (:func:`plantml.data.parse_data_dir`). Else
    ``data.sources``; else the synthetic DEMO set. Relative local paths are relative to
    the repository root, as every path in params.yaml.
    """
    d = params.data
    if d.data_dir:
        sources = parse_data_dir(d.data_dir)
        if d.sources:
            log.info("data.data_dir is set: it replaces the %d source(s) of data.sources", len(d.sources))
    elif d.sources:
        sources = [DataSource(s.domain, s.path if storage.is_s3(s.path) else str(repo_path(s.path)),
                              s.weight, s.split) for s in d.sources]
    else:
        from plantml.demo_data import ensure_demo_dataset

        root = ensure_demo_dataset(repo_path(d.demo_dir), d.demo_classes, d.demo_images_per_class, d.demo_image_size,
                                   d.seed)
        return [DataSource(DEFAULT_DOMAIN, str(root))], True
    return [_with_domain_defaults(params, s) for s in sources], False


def _with_domain_defaults(params: Params, src: DataSource) -> DataSource:
    """A source with its weight and split filled from ``data.domains`` (the source's own win) and its path resolved."""
    dom = params.data.domains.get(src.domain)
    weight = src.weight if src.weight is not None else (dom.weight if dom else 1.0)
    split = src.split or (dom.split if dom else None)
    root = src.root if storage.is_s3(src.root) else str(Path(src.root).expanduser().resolve())
    return DataSource(src.domain, root, weight, split)


def resolve_data_root(params: Params) -> tuple[str, bool]:
    """The sources as one ``--data-dir`` text (a plain path for one lab source), and whether it is the demo set."""
    sources, is_demo = resolve_sources(params)
    return format_sources(sources), is_demo


def prepare(params: Params, store: str | None = None, out_dir: str | os.PathLike[str] | None = None,
            progress: bool = True) -> tuple[DatasetSummary, sh.ShardIndex]:
    """Find and check the data, split it, decode it once into shards in ``store``.

    Args:
        store: where the shards go (a folder or ``s3://`` prefix every later step can
            reach); default: ``data.prepared_dir``.
        out_dir: local copy of ``manifest.csv`` + ``summary.json`` (default
            ``data.prepared_dir``; for DVC and people).

    Returns:
        ``(summary, shard index)``.
    """
    sources, is_demo = resolve_sources(params)
    if is_demo:
        log.warning("no data.data_dir given: using the SYNTHETIC DEMO dataset in %s (not real leaves)",
                    sources[0].root)
    store = store or str(repo_path(params.data.prepared_dir))
    staging = PixelStaging(params.train.image_size)
    try:
        rows, summary = prepare_dataset(sources, params.data.split, params.data.seed, params.data.max_images_per_class,
                                        is_demo=is_demo, progress=progress, staging=staging)
        rows, index = write_shards(rows, summary, staging, store, params.data.samples_per_shard, params.data.seed,
                                   progress)
    finally:
        staging.close()
    manifest = save_prepared(rows, summary, repo_path(out_dir or params.data.prepared_dir))
    log.info("prepared %d images in %d classes (%d skipped) -> %s (shards: %s)", summary.n_images,
             len(summary.classes), summary.n_skipped, manifest, store)
    return summary, index


# --------------------------------------------------------------------------- train


def train_branch(params: Params, name: str, index: sh.ShardIndex, out_dir: str | os.PathLike[str],
                 parallel_branches: int = 1, progress: bool = True, checkpoint_uri: str | None = None,
                 resume_uris: Sequence[str] = (), on_epoch_end: Any = None) -> Any:
    """Train model ``name`` (a key of ``train.models``) on the streamed shards.

    Threads and loader workers follow this process's CPU quota shared among
    ``parallel_branches``; ``train.distributed.world_size > 1`` trains data-parallel
    (:func:`plantml.distributed.train_distributed`).
    """
    from plantml.training import LoaderSettings, resolve_device, train_model

    if name not in params.train.models:
        raise ValueError(f"unknown model {name!r}: train.models has {', '.join(params.train.models)}")
    t = params.train
    share = max(1, available_cores() // max(1, parallel_branches))
    threads = resolve_threads(t.num_threads, parallel_branches)
    device = resolve_device(t.device)
    loader = LoaderSettings(workers=resolve_loader_workers(t.loader_workers, share, device),
                            shuffle_buffer=t.shuffle_buffer)
    kwargs = dict(out_dir=out_dir, progress=progress, loader=loader, checkpoint_uri=checkpoint_uri,
                  resume_uris=resume_uris, on_epoch_end=on_epoch_end)
    if t.distributed.world_size > 1:
        from plantml.distributed import train_distributed

        return train_distributed(name, t.models[name], t, index, threads=max(1, threads // t.distributed.world_size)
                                 if device == "cpu" else threads, backend=t.distributed.backend,
                                 world_size=t.distributed.world_size, **kwargs)
    return train_model(name, t.models[name], t, index, threads=threads, **kwargs)


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


def load_manifest(index: sh.ShardIndex) -> list[ManifestRow]:
    """The manifest stored beside the shards."""
    return read_manifest_bytes(storage.read_bytes(storage.join(index.root, sh.MANIFEST_FILE)))


def subset_samples(index: sh.ShardIndex, split: str, limit: int, seed: int,
                   rows: Sequence[ManifestRow] | None = None, with_originals: bool = False) -> list[sh.Sample]:
    """At most ``limit`` samples of ``split``, stratified by class, in one streaming pass.

    The training split is stored in random order, so its first ``limit`` samples are a
    uniform random sample and only the first shards are read; validation and test are
    stored by class, so their subset is chosen per class from the manifest.
    """
    if split == "train":
        out: list[sh.Sample] = []
        for s in sh.iter_split(index, split, with_originals=with_originals):
            if len(out) >= limit:
                break
            out.append(s)
        return out
    rows = rows if rows is not None else load_manifest(index)
    keys = {r.key for r in _stratified_subset(rows_for(rows, split), limit, seed)}
    return sh.select_keys(index, split, keys, with_originals=with_originals)


def shrink_original(data: bytes, size: int) -> Any:
    """An original photo decoded and shrunk so its shorter side is at most ``2 * size``.

    The corruption sweep and the background baseline work on this: field photos can be
    12 MP, and a few hundred of them at full size would not fit in a bounded step.
    """
    from PIL import Image

    img = decode_image(data)
    scale = 2 * size / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
    return img


@dataclass
class SplitScores:
    """One model's pass over a split: everything later stages need, nothing per-pixel."""

    logits: np.ndarray
    labels: np.ndarray
    ood_scores: np.ndarray | None
    domains: np.ndarray | None = None   # each image's domain (from the manifest), object array


def domains_of(keys: Sequence[str], rows: Sequence[ManifestRow]) -> np.ndarray:
    """The domain of each shard key (``lab`` for a key the manifest does not know: pre-domain shard sets)."""
    by_key = {r.key: r.domain for r in rows}
    return np.array([by_key.get(k, DEFAULT_DOMAIN) for k in keys], dtype=object)


def score_split(model: Any, index: sh.ShardIndex, split: str, spec: InputSpec, detector: Any = None,
                batch_size: int = 64, rows: Sequence[ManifestRow] | None = None) -> SplitScores:
    """Stream a split through ``model``: logits, labels, domains and (with ``detector``) OOD scores.

    Features are scored batch by batch and dropped, so memory holds ``N x classes``
    numbers, not ``N x 1280`` features or the images.

    Args:
        rows: the manifest (read from the store when not given), for each image's domain.
    """
    import torch

    from plantml.loader import iterate_split
    from plantml.models.scored import features_and_logits

    logits, labels, scores, keys = [], [], [], []
    model = model.eval()
    with torch.inference_mode():
        for x, y, k in iterate_split(index, split, spec, batch_size, with_key=True):
            keys += list(k)
            feats, lg = features_and_logits(model, x)
            logits.append(lg.float().numpy())
            labels.append(y.numpy())
            if detector is not None:
                scores.append(detector.score(feats.float().numpy()))
    n_classes = len(index.classes)
    return SplitScores(np.concatenate(logits) if logits else np.zeros((0, n_classes), np.float32),
                       np.concatenate(labels) if labels else np.zeros(0, np.int64),
                       np.concatenate(scores) if detector is not None and scores else None,
                       domains_of(keys, rows if rows is not None else load_manifest(index)))


def fit_detector(params: Params, model: Any, index: sh.ShardIndex, spec: InputSpec) -> Any:
    """The model's OOD detector, fitted on a random training subset (``calibration.ood_max_fit_images``)."""
    import torch

    from plantml import ood
    from plantml.loader import to_model_input
    from plantml.models.scored import features_and_logits

    c = params.calibration
    samples = subset_samples(index, "train", c.ood_max_fit_images, params.data.seed)
    feats = []
    model = model.eval()
    with torch.inference_mode():
        for i in range(0, len(samples), 64):
            chunk = samples[i:i + 64]
            x = to_model_input(torch.from_numpy(np.stack([s.pixels for s in chunk])), spec)
            feats.append(features_and_logits(model, x)[0].float().numpy())
    labels = np.array([s.label for s in samples])
    return ood.fit_feature_detector(np.concatenate(feats), labels, len(index.classes), c.ood_components)


def evaluate_models(params: Params, results: Mapping[str, Mapping[str, Any]], checkpoints: Mapping[str, str],
                    index: sh.ShardIndex, out_dir: str | os.PathLike[str], is_demo: bool = False,
                    store: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Test-split metrics for every trained model, the champion, calibration and robustness.

    Every pass streams the shards (:mod:`plantml.loader`); memory is bounded by the
    per-image outputs (logits, OOD scores) and the capped subsets (OOD fit, corruption
    sweep, background baseline), not by the size of the splits.

    Args:
        results: ``{name: TrainResult.to_dict()}`` of the branches that succeeded.
        checkpoints: ``{name: path to model.pt}``.
        index: the prepared shards.
        out_dir: receives plots (PNG), ``metrics.json`` and ``report.json``.
        store: where the champion's OOD detector is published for the export step
            (default: ``out_dir``); its URI is ``report["ood"]["detector_uri"]``.

    Returns:
        The evaluation report (plain dict; ``models``, ``champion``, ``champion_reason``,
        ``calibration``, ``robustness``, ``background_baseline``, ``non_leaf``, ``plots``).

    Gates are checked separately by :func:`enforce_quality_gates`.
    """
    import torch

    from plantml import calibration as cal
    from plantml import ood
    from plantml import robustness as rob
    from plantml.evaluation import (choose_champion, classification_metrics, domain_metrics, plot_comparison,
                                    plot_training_curves)
    from plantml.training import load_checkpoint, measure_latency_ms

    if not results:
        raise RuntimeError("no model finished training: nothing to evaluate")
    torch.set_num_threads(available_cores())
    out = repo_path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    first = next(iter(results.values()))
    classes, size = first["classes"], first["image_size"]
    c = params.calibration

    report: dict[str, Any] = {"classes": classes, "is_demo": is_demo, "models": {}, "plots": {},
                              "n_val": index.count("val"), "n_test": index.count("test")}
    models: dict[str, Any] = {}
    passes: dict[str, tuple[SplitScores, SplitScores]] = {}
    detectors: dict[str, Any] = {}
    rows = load_manifest(index)
    val_by_domain: dict[str, Any] = {}
    for name, res in results.items():
        model, _ = load_checkpoint(checkpoints[name])
        models[name] = model
        spec = InputSpec(size=size, mean=tuple(res["mean"]), std=tuple(res["std"]))
        # Each model gets its own detector (fit on a capped training subset), so the
        # validation and test passes score OOD batch by batch and keep no features.
        detectors[name] = fit_detector(params, model, index, spec) if c.ood_enabled else None
        val, test = (score_split(model, index, split, spec, detectors[name], rows=rows) for split in ("val", "test"))
        passes[name] = (val, test)
        m = classification_metrics(test.labels, softmax(test.logits), classes)
        masks = {}
        if detectors[name] is not None:
            threshold = ood.choose_ood_threshold(val.ood_scores, c.ood_acceptance)
            masks = {"val_in_distribution": val.ood_scores <= threshold,
                     "test_in_distribution": test.ood_scores <= threshold}
        calib_conf = cal.calibration_summary(val.logits, val.labels, test.logits, test.labels, c.target_precision,
                                             c.min_coverage)
        calib = cal.calibration_summary(val.logits, val.labels, test.logits, test.labels, c.target_precision,
                                        c.min_coverage, **masks) if masks else calib_conf
        m.update({
            "arch": res["arch"], "num_params": res["num_params"], "size_mb": res["num_params"] * 4 / 1e6,
            "latency_ms": measure_latency_ms(model, size, threads=1),
            "train_seconds": res["train_seconds"], "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
            "calibration": calib,
        })
        if masks:
            m["calibration_confidence_only"] = calib_conf
        # Per domain, with the probabilities and the abstain rule the bundle will answer with.
        m["by_domain"] = domain_metrics(test.labels, softmax(test.logits, calib["temperature"]), test.domains,
                                        classes, calib["abstain_threshold"], masks.get("test_in_distribution"))
        val_by_domain[name] = domain_metrics(val.labels, softmax(val.logits, calib["temperature"]), val.domains,
                                             classes, calib["abstain_threshold"], masks.get("val_in_distribution"))
        m["plots"] = _model_plots(name, res["arch"], m, test, calib["temperature"], classes, out / "plots")
        report["models"][name] = m
        log.info("%s: test accuracy %.4f macro-F1 %.4f latency %.1f ms", name, m["accuracy"], m["macro_f1"],
                 m["latency_ms"])

    champion, reason = choose_champion(_champion_candidates(report["models"], params.evaluate.champion_metric,
                                                            params.evaluate.champion_domain),
                                       params.evaluate.champion_metric, params.evaluate.champion_tie_tolerance)
    if params.evaluate.champion_domain and params.evaluate.champion_domain in champ_domains(report["models"]):
        reason = f"on {params.evaluate.champion_domain} test images: {reason}"
    report["champion"], report["champion_reason"] = champion, reason
    champ = report["models"][champion]
    report["calibration"] = champ["calibration"]
    report["by_domain"] = champ["by_domain"]
    report["domain_abstention"] = cal.domain_abstention(val_by_domain[champion], champ["by_domain"], c.min_coverage)
    report["domain_gates"] = _domain_gate_results(params, report)
    report["plots"]["curves"] = str(plot_training_curves({n: r["history"] for n, r in results.items()},
                                                         out / "plots" / "training_curves.png"))
    report["plots"]["comparison"] = str(plot_comparison(report["models"], out / "plots" / "comparison.png"))

    # Beyond the random split: out-of-distribution score, corruptions, background-only
    # baseline, non-leaf inputs.
    spec = InputSpec(size=size, mean=tuple(results[champion]["mean"]), std=tuple(results[champion]["std"]))
    detector = detectors[champion]
    val, test = passes[champion]
    if detector is not None:
        report["ood"] = _ood_summary(params, detector, val.ood_scores, test.ood_scores,
                                     storage.join(store or str(out), "ood_detector.npz"))
    predict = _torch_proba(models[champion], spec, champ["calibration"]["temperature"])
    rows = load_manifest(index)
    sub = subset_samples(index, "test", params.robustness.max_images, params.data.seed, rows, with_originals=True)
    sub_images = [shrink_original(s.original, size) if s.original else _pil(s.pixels) for s in sub]
    sub_labels = np.array([s.label for s in sub])
    rob_rows = rob.evaluate_corruptions(sub_images, sub_labels, predict, params.robustness.severities,
                                        seed=params.data.seed)
    report["robustness"] = {"rows": rob_rows, "summary": rob.robustness_summary(rob_rows), "n_images": len(sub)}
    report["plots"]["robustness"] = str(rob.robustness_chart(rob_rows, out / "plots" / "robustness.png"))
    train_sub = subset_samples(index, "train", 2000, params.data.seed)
    report["background_baseline"] = rob.background_baseline(
        [_pil(s.pixels) for s in train_sub], np.array([s.label for s in train_sub]),
        sub_images, sub_labels, border=params.robustness.background_border, seed=params.data.seed)
    report["background_baseline"]["train_images"] = "resized training pixels (shards)"
    del train_sub
    report["shortcut"] = _shortcut_report(params, predict, index, rows, classes)
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
        cal.coverage_accuracy_curve(softmax(test.logits, calib["temperature"]), test.labels),
        calib["abstain_threshold"], out / "plots" / "coverage_accuracy.png",
        target_precision=params.calibration.target_precision,
        operating_point=(calib["test_coverage"], calib["test_accuracy_at_threshold"]) if detector is not None
        else None))

    storage.write_bytes(out / "metrics.json", json.dumps(_dvc_metrics(report), indent=2).encode())
    storage.write_bytes(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    _write_plot_tables(report, out / "plots")
    return report


def champ_domains(models: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The domains every model was scored on."""
    sets = [set(m.get("by_domain", {})) for m in models.values()]
    return set.intersection(*sets) if sets else set()


def _champion_candidates(models: Mapping[str, Mapping[str, Any]], metric: str,
                         domain: str | None) -> dict[str, dict[str, Any]]:
    """The champion rule's view of each model: ``metric`` on ``domain``'s test images when that domain was scored."""
    if not domain:
        return {n: dict(m) for n, m in models.items()}
    if domain not in champ_domains(models):
        log.warning("evaluate.champion_domain %r has no test images in this run: the champion is chosen on all", domain)
        return {n: dict(m) for n, m in models.items()}
    return {n: {**m, metric: m["by_domain"][domain][metric]} for n, m in models.items()}


def _domain_gate_results(params: Params, report: Mapping[str, Any]) -> list[dict[str, Any]]:
    from plantml.evaluation import check_domain_gates

    results = check_domain_gates(report["by_domain"], params.evaluate.gates)
    for r in results:
        (log.warning if r["passed"] is False else log.info)("domain gate: %s", r["message"])
    return results


def _shortcut_report(params: Params, predict: Any, index: sh.ShardIndex, rows: Sequence[ManifestRow],
                     classes: Sequence[str]) -> dict[str, Any]:
    """The background-shortcut check on this run's data (:func:`plantml.robustness.shortcut_check`).

    Leaves: lab-domain test images of the classes no other domain has. Backgrounds: the
    other domains' test photos (never trained on). Not applicable to a one-domain run.
    """
    from plantml import robustness as rob

    test = rows_for(rows, "test")
    field_classes = {r.label for r in rows if r.domain != DEFAULT_DOMAIN}
    if not field_classes:
        return {"applicable": False, "reason": f"no photos outside the {DEFAULT_DOMAIN} domain in this run"}
    lab_keys = {r.key for r in test if r.domain == DEFAULT_DOMAIN and r.label not in field_classes}
    field_keys = {r.key for r in test if r.domain != DEFAULT_DOMAIN}
    if not lab_keys or not field_keys:
        return {"applicable": False, "reason": "no lab test leaf of another crop, or no field test photo"}
    lab, field = [], []
    for s in sh.iter_split(index, "test"):
        if s.key in lab_keys:
            lab.append(s)
        elif s.key in field_keys:
            field.append(s.pixels)
    index_of = {c: i for i, c in enumerate(classes)}
    out = rob.shortcut_check(predict, [s.pixels for s in lab], [s.label for s in lab], field,
                             [index_of[c] for c in sorted(field_classes)], classes,
                             max_images=params.robustness.shortcut_max_images, seed=params.data.seed)
    out["applicable"] = True
    out["max_target_rate"] = params.robustness.max_shortcut_rate
    return out


def _pil(pixels: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)


def _model_plots(name: str, arch: str, m: Mapping[str, Any], test: SplitScores, temperature: float,
                 classes: Sequence[str], plots: Path) -> dict[str, str]:
    from plantml import calibration as cal
    from plantml.evaluation import plot_confusion_matrix, plot_roc

    probs = softmax(test.logits)
    return {
        "confusion": str(plot_confusion_matrix(m["confusion_matrix"], classes, plots / f"confusion_{name}.png",
                                               f"{name} ({arch}) test confusion")),
        "roc": str(plot_roc(test.labels, probs, classes, plots / f"roc_{name}.png", f"{name} one-vs-rest ROC")),
        "reliability": str(cal.reliability_diagram(probs, softmax(test.logits, temperature), test.labels,
                                                   plots / f"reliability_{name}.png", temperature=temperature)),
    }


def _ood_summary(params: Params, detector: Any, val_scores: np.ndarray, test_scores: np.ndarray,
                 detector_uri: str) -> dict[str, Any]:
    """The champion's OOD section of the report; publishes the detector at ``detector_uri``.

    The export step (maybe on another machine) reads the detector from there, never from
    this step's disk.
    """
    from plantml import ood

    c = params.calibration
    threshold = ood.choose_ood_threshold(val_scores, c.ood_acceptance)
    summary = ood.summary_dict(detector, threshold, c.ood_acceptance, {
        "validation": ood.rejection_rate(val_scores, threshold), "test": ood.rejection_rate(test_scores, threshold)})
    summary["detector_uri"] = storage.write_bytes(detector_uri, detector.to_bytes())
    summary["scores"] = {"validation": val_scores.tolist(), "test": test_scores.tolist()}
    log.info("OOD threshold %.4f (%.0f %% of validation accepted); test rejected %.3f", threshold,
             100 * c.ood_acceptance, summary["rejection_rate"]["test"])
    return summary


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
    from plantml.evaluation import QualityGateError, check_domain_gates, check_quality_gates

    name = report["champion"]
    check_quality_gates(report["models"][name], params.evaluate.min_macro_f1, params.evaluate.min_accuracy, name)
    relative = report["robustness"]["summary"]["relative_accuracy"]
    if relative < params.robustness.min_relative_accuracy:
        raise QualityGateError(
            f"robustness gate failed for champion {name}: relative accuracy under corruption {relative:.3f} "
            f"< robustness.min_relative_accuracy {params.robustness.min_relative_accuracy}")
    # Re-checked from the metrics (not only read from the report), so a gate added after evaluate still applies.
    failed = [g["message"] for g in check_domain_gates(report.get("by_domain", {}), params.evaluate.gates)
              if g["passed"] is False]
    if failed:
        raise QualityGateError(f"domain gate failed for champion {name}: " + "; ".join(failed))
    shortcut = report.get("shortcut", {})
    if shortcut.get("applicable") and shortcut["target_rate"] > params.robustness.max_shortcut_rate:
        raise QualityGateError(
            f"shortcut gate failed for champion {name}: {shortcut['target_rate']:.3f} of non-field lab leaves on field "
            f"backgrounds predicted as a field class > robustness.max_shortcut_rate "
            f"{params.robustness.max_shortcut_rate}")


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
    out["by_domain"] = {d: {k: v[k] for k in ("n", "accuracy", "macro_f1", "ece", "coverage", "accuracy_on_answered")}
                        for d, v in report.get("by_domain", {}).items()}
    if report.get("shortcut", {}).get("applicable"):
        out["shortcut_target_rate"] = report["shortcut"]["target_rate"]
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


#: The evaluate stage's files that ``dvc.yaml`` declares as metrics and plots (relative to
#: ``evaluate.out_dir``); ``metrics.json`` last, so a reader that sees new metrics sees new plots.
DVC_EVAL_FILES = ("plots/confusion.csv", "plots/per_class.csv", "plots/training_curves.png", "plots/comparison.png",
                  "plots/robustness.png", "plots/coverage_accuracy.png", "metrics.json")


def publish_latest_evaluation(run_dir: str | os.PathLike[str], latest_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy a flow run's DVC metrics and plots to ``latest_dir`` (the paths ``dvc.yaml`` declares).

    The flow evaluates into ``evaluate.out_dir/<run_id>/``; this puts the same files beside
    the per-run folders, so ``dvc metrics show`` and ``dvc plots show`` show the latest
    evaluation, whether the flow or ``dvc repro`` made it. Each file is replaced atomically.

    Returns:
        The files written.
    """
    import shutil

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


# --------------------------------------------------------------------------- export


def export_champion(params: Params, report: Mapping[str, Any], train_result: Mapping[str, Any], checkpoint: str,
                    index: sh.ShardIndex, lineage: Mapping[str, Any],
                    out_root: str | os.PathLike[str] | None = None,
                    progress: bool = True,
                    data_summary: Mapping[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Export the champion to a bundle: ONNX + OpenVINO FP32 (parity-checked), INT8 behind the
    accuracy gate, drift reference statistics, calibration and metrics.

    The bundle also gets ``MODEL_CARD.md`` (:mod:`plantml.model_card`) from the metadata and
    ``data_summary``. Everything comes from the checkpoint, the report and the shard store: the OOD
    detector is read from ``report["ood"]["detector_uri"]``, never from the evaluate
    step's disk. The INT8 gate and the drift reference use stratified test subsets of at
    most ``export.int8.max_eval_images`` / ``export.max_reference_images`` images (the
    subset sizes and the gate's standard error are recorded in the metadata).

    Returns:
        ``(bundle_path, metadata)``.
    """
    import io

    import torch

    from plantml.export import export_bundle
    from plantml.quantize import int8_export_step
    from plantml.preprocess import normalize_batch
    from plantml.training import load_checkpoint

    torch.set_num_threads(available_cores())
    model, _ = load_checkpoint(checkpoint)
    ood_report = report.get("ood")
    exported = model
    if ood_report:
        from plantml.models.scored import scored_classifier
        from plantml.ood import FeatureDetector

        # The bundle's model returns (logits, ood_score): serving and edge read both.
        detector = FeatureDetector.load(io.BytesIO(storage.read_bytes(ood_report["detector_uri"])))
        exported = scored_classifier(model, detector)
    classes, size = train_result["classes"], train_result["image_size"]
    spec = InputSpec(size=size, mean=tuple(train_result["mean"]), std=tuple(train_result["std"]))
    rows = load_manifest(index)
    gate = subset_samples(index, "test", params.export.int8.max_eval_images, params.data.seed, rows)
    x_gate = normalize_batch(np.stack([s.pixels for s in gate]), spec)
    y_gate = np.array([s.label for s in gate])
    champ = report["models"][report["champion"]]
    calib = champ["calibration"]
    metrics = {
        "fp32": {k: champ[k] for k in ("accuracy", "macro_f1", "roc_auc_ovr_macro", "latency_ms")},
        "ece_uncalibrated": calib["ece_uncalibrated"], "ece": calib["ece"],
        "coverage_at_threshold": calib["test_coverage"], "accuracy_at_threshold": calib["test_accuracy_at_threshold"],
        "robustness": report["robustness"]["summary"],
        "background_baseline": report["background_baseline"],
        "non_leaf_abstain_rate": report["non_leaf"]["abstain_rate"],
        "n_test": index.count("test"), "is_demo_data": report["is_demo"],
        "by_domain": _finite(report.get("by_domain", {})),
    }
    if report.get("shortcut", {}).get("applicable"):
        metrics["shortcut"] = {k: v for k, v in report["shortcut"].items() if k not in ("per_class", "examples")}
    steps = []
    if params.export.int8.enabled:
        calib_samples = subset_samples(index, "train", params.export.int8.calibration_images, params.data.seed)
        x_calib = normalize_batch(np.stack([s.pixels for s in calib_samples]), spec)
        del calib_samples
        steps.append(int8_export_step(x_calib, x_gate, y_gate, params.export.int8.max_accuracy_drop,
                                      threads=available_cores(), population=index.count("test")))
    steps.append(_reference_step(params, model, spec, index, rows, calib["temperature"], classes))
    steps.append(model_card_step(data_summary))  # last: it reports what the steps before measured
    calibration = {"temperature": calib["temperature"], "abstain_threshold": calib["abstain_threshold"],
                   "target_precision": params.calibration.target_precision}
    if ood_report:
        calibration["ood_threshold"] = ood_report["threshold"]
        metrics["ood"] = {k: v for k, v in ood_report.items() if k not in ("scores", "detector_uri")}
    out = repo_path(out_root or params.export.out_dir)
    path, metadata = export_bundle(
        exported, out_root=out, name=params.export.name, architecture=train_result["arch"], classes=classes,
        input_spec=spec, parity_inputs=x_gate[:8], metrics=metrics, lineage=lineage, params=params.to_dict(),
        calibration=calibration,
        opset=params.export.opset, parity_tolerance=params.export.parity_tolerance, extra_steps=steps,
    )
    return path, metadata


def _finite(tree: Any) -> Any:
    """NaN/inf -> None, recursively: metadata.json stays strict JSON (e.g. nothing answered in a domain)."""
    if isinstance(tree, Mapping):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_finite(v) for v in tree]
    if isinstance(tree, float) and not np.isfinite(tree):
        return None
    return tree


class _StreamedOriginals:
    """The original photos of chosen test samples, decoded one at a time on iteration.

    The drift reference needs every photo at its original size (width, height and
    sharpness columns are compared with what the service sees); holding a few thousand
    12 MP field photos at once would not fit, so they are streamed from the shards.
    """

    def __init__(self, index: sh.ShardIndex, keys: Sequence[str]) -> None:
        self.index, self.keys = index, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        wanted = set(self.keys)
        for s in sh.iter_split(self.index, "test", with_originals=True):
            if s.key in wanted:
                yield decode_image(s.original) if s.original else _pil(s.pixels)


def _reference_step(params: Params, model: Any, spec: InputSpec, index: sh.ShardIndex, rows: Sequence[ManifestRow],
                    temperature: float, classes: Sequence[str]) -> Any:
    """The drift-reference export step over a stratified test subset, streamed."""
    from plantml.drift import reference_stats_step
    from plantml.preprocess import normalize_batch

    keys = {r.key for r in _stratified_subset(rows_for(rows, "test"), params.export.max_reference_images,
                                              params.data.seed)}
    logits, ordered = [], []
    for s_batch in _batched(s for s in sh.iter_split(index, "test") if s.key in keys):
        logits.append(_logits(model, normalize_batch(np.stack([s.pixels for s in s_batch]), spec)))
        ordered += [s.key for s in s_batch]
    test_logits = np.concatenate(logits)
    probs = softmax(test_logits, temperature)
    return reference_stats_step(_StreamedOriginals(index, ordered), [classes[i] for i in probs.argmax(1)],
                                probs.max(1), embeddings=test_logits, embedding_source="logits")


def _batched(items: Any, size: int = 64) -> Any:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _logits(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch_size])).numpy()
                               for i in range(0, len(x), batch_size)])
