"""Metaflow card builders (flows/cards.py): every card of a DEMO run opens with the DEMO banner,
and no card of a real run carries it (issue 17, point 9)."""

from __future__ import annotations

import pytest

pytest.importorskip("metaflow")

from flows import cards  # noqa: E402

_BANNER_MARK = "DEMO DATA."


def _texts(parts) -> list[str]:
    """The Markdown text of each card part ('' for tables, images and charts)."""
    return [p._text if isinstance(p, cards.Markdown) else "" for p in parts]


def _summary(is_demo: bool) -> dict:
    return {"is_demo": is_demo, "n_images": 60, "classes": ["a", "b", "c"], "root": "/data", "layout": "flat",
            "n_skipped": 0, "n_duplicate_files": 0, "manifest_sha256": "0" * 64,
            "counts": {c: {"train": 14, "val": 4, "test": 2} for c in "abc"}, "skipped": []}


def _history() -> list[dict]:
    return [{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
             "val_macro_f1": 0.5, "lr": 0.001, "seconds": 3.0}]


def _train_result() -> dict:
    return {"name": "cnn", "arch": "tiny_cnn", "best_epoch": 1, "epochs_run": 1, "stopped_early": False,
            "best_val_macro_f1": 0.5, "best_val_accuracy": 0.5, "num_params": 1000, "train_seconds": 3.0,
            "device": "cpu", "threads": 1, "history": _history()}


def _report(is_demo: bool) -> dict:
    calibration = {"temperature": 1.2, "ece_uncalibrated": 0.1, "ece": 0.05, "ece_ci95": [0.01, 0.1], "n_test": 6,
                   "abstain_threshold": 0.5, "target_precision": 0.99, "test_coverage": 0.8,
                   "test_accuracy_at_threshold": 1.0}
    model = {"arch": "tiny_cnn", "accuracy": 0.9, "macro_f1": 0.9, "roc_auc_ovr_macro": 0.95, "latency_ms": 1.0,
             "num_params": 1000, "best_epoch": 1, "train_seconds": 3.0, "calibration": calibration,
             "plots": {"confusion": None, "roc": None, "reliability": None},
             "per_class": [{"class": c, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "roc_auc": 1.0}
                           for c in "abc"]}
    return {"is_demo": is_demo, "champion": "cnn", "champion_reason": "cnn: highest macro_f1",
            "models": {"cnn": model, "vit": {**model, "arch": "hybrid_vit_tiny"}}, "plots": {},
            "non_leaf": {"abstain_rate": 1.0, "n": 10, "photo_abstain_rate": 1.0, "n_photos": 0},
            "robustness": {"n_images": 6, "rows": [{"corruption": "brightness", "severity": 1, "accuracy": 0.9}],
                           "summary": {"clean_accuracy": 0.9, "mean_corrupted_accuracy": 0.9,
                                       "relative_accuracy": 1.0}},
            "background_baseline": {"accuracy": 0.3, "chance": 0.33}}


def _metadata(is_demo: bool) -> dict:
    return {"name": "m", "version": "1", "architecture": "tiny_cnn", "input": {"size": 32},
            "metrics": {"fp32": {"accuracy": 0.9}, "is_demo_data": is_demo},
            "files": [{"path": "model.onnx", "format": "onnx", "runtime": "onnxruntime", "precision": "fp32",
                       "bytes": 1000, "sha256": "f" * 64}]}


def _all_cards(is_demo: bool) -> dict[str, list]:
    return {
        "prepare": cards.prepare_card(_summary(is_demo), None),
        "train": cards.train_card(_train_result(), None, is_demo),
        "evaluate": cards.evaluate_card(_report(is_demo), {}),
        "export": cards.export_card("/bundles/m-1", _metadata(is_demo), None, "# Model card"),
    }


def test_every_card_of_a_demo_run_opens_with_the_banner():
    for step, parts in _all_cards(True).items():
        texts = _texts(parts)
        assert _BANNER_MARK in texts[0] and "synthetic" in texts[0], f"{step} card does not open with the banner"
        assert sum(_BANNER_MARK in t for t in texts) == 1, f"{step} card repeats the banner"


def test_no_card_of_a_real_run_has_the_banner():
    for step, parts in _all_cards(False).items():
        assert not any(_BANNER_MARK in t for t in _texts(parts)), f"{step} card of a real run shows the DEMO banner"


def test_evaluate_card_shows_domains_gates_abstention_and_the_shortcut():
    from plantml.evaluation import domain_metrics

    import numpy as np

    probs = np.array([[.9, .05, .05], [.1, .8, .1], [.2, .2, .6], [.5, .45, .05]])
    by_domain = domain_metrics(np.array([0, 1, 2, 1]), probs, ["lab", "lab", "field", "field"], list("abc"), 0.55)
    report = {**_report(False), "by_domain": by_domain,
              "domain_abstention": {"warnings": ["abstention collapses on field photos: coverage 0.1"]},
              "domain_gates": [{"domain": "field", "metric": "accuracy", "bound": ">= 0.8", "value": 0.5,
                                "passed": False}],
              "shortcut": {"applicable": True, "n": 40, "target_rate": 0.25, "target_rate_original": 0.02,
                           "accuracy_original": 0.98, "accuracy_pasted": 0.6, "target_classes": ["Apple___scab"],
                           "max_target_rate": 1.0}}
    parts = cards.evaluate_card(report, {})
    text = "\n".join(_texts(parts))
    assert "Per domain" in text and "abstention collapses on field" in text
    assert "**25.0%** predicted as a field crop (Apple___scab)" in text and "orchard background ⇒ Apple" in text
    tables = [p for p in parts if isinstance(p, cards.Table)]
    assert any("domain gate" in str(t._headers) for t in tables)
    per_domain = next(t for t in tables if "accuracy [95 % CI]" in str(t._headers))
    assert [row[0] for row in per_domain._data] == ["field", "lab"]
    field = {"root": "/f", "layout": "flat", "weight": 3.0, "split": [0.5, 0.2, 0.3], "n_images": 240,
             "splits": {"train": 120, "val": 48, "test": 72}, "counts": {"a": {}}}
    summary = {**_summary(False), "domains": {"field": field}}
    prep = cards.prepare_card(summary, None)
    assert any(isinstance(p, cards.Table) and "sampling weight" in str(p._headers) for p in prep)
    no_shortcut = cards.evaluate_card({**report, "shortcut": {"applicable": False, "reason": "one domain"}}, {})
    assert "not applicable (one domain)" in "\n".join(_texts(no_shortcut))


def _drift_summary(status: str) -> dict:
    columns = {"r_mean": {"method": "Wasserstein distance (normed)", "score": 0.4, "threshold": 0.1, "drifted": True},
               "sharpness": {"method": "K-S p_value", "score": 0.5, "threshold": 0.05, "drifted": False}}
    return {"status": status, "bundle_name": "m", "bundle_version": "1", "n_current": 60, "n_reference": 100,
            "message": "1 of 2 columns drifted", "drift_share": 0.5, "threshold_share": 0.5, "drift_detected": True,
            "retrain_recommended": True, "n_drifted_columns": 1, "columns": columns}


def test_drift_card_shows_the_verdict_or_says_there_is_none():
    """The drift card (flows/cards): verdict, table, chart; no verdict on too little data."""
    parts = cards.drift_card(_drift_summary("ok"), "logs/drift.jsonl", "<html><body>report</body></html>")
    texts = "\n".join(_texts(parts))
    assert "DRIFT: retrain recommended" in texts and "iframe" in texts and "logs/drift.jsonl" in texts
    assert any(isinstance(p, cards.Table) for p in parts) and any(isinstance(p, cards.Image) for p in parts)
    thin = "\n".join(_texts(cards.drift_card(_drift_summary("not_enough_data"), "logs/x.jsonl", None)))
    assert "no verdict" in thin and "retrain" not in thin
    assert "MLflow run" in "\n".join(_texts(cards.drift_card(_drift_summary("ok"), "x", None)))


def test_drift_run_metrics_count_always_and_score_only_when_conclusive():
    from plantml.registry import drift_metrics

    ok = drift_metrics(_drift_summary("ok"))
    assert ok["drift_detected"] == 1.0 and ok["drift_score.r_mean"] == 0.4 and ok["n_current"] == 60
    assert drift_metrics(_drift_summary("not_enough_data")) == {"n_current": 60, "n_reference": 100}
