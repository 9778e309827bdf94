"""Drift: reference statistics in the bundle, the drift log reader, the Evidently analysis,
the ``plantml drift`` CLI contract and the DriftFlow.

The acceptance pair runs on generated leaf images: a held-out batch from the same
generator must not drift, a colour/brightness-shifted batch must. (The documented run on
the real sample is in docs/drift.md.)
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from tests.conftest import REPO_ROOT, TINY_CLASSES, _train_tiny_model, card_text
from plantml import drift
from plantml.bundle import load_bundle
from plantml.config import DriftParams
from plantml.imagestats import STAT_COLUMNS

BUNDLE_VERSION = "7"
PARAMS = DriftParams(threshold_share=0.5, min_rows=30, stattest_threshold=0.05)


# ------------------------------------------------------------------ generated images


def leaf_image(rgb: tuple[int, int, int], seed: int, size: int = 64) -> Image.Image:
    """A leaf-ish ellipse of the class colour on a grey backdrop, with per-image jitter."""
    rng = np.random.default_rng(seed)
    bg = int(rng.integers(170, 220))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    cx, cy = size * rng.uniform(0.4, 0.6, 2)
    a, b = size * rng.uniform(0.25, 0.4), size * rng.uniform(0.15, 0.3)
    colour = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in rgb)
    ImageDraw.Draw(img).ellipse((cx - a, cy - b, cx + a, cy + b), fill=colour)
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def shifted(img: Image.Image) -> Image.Image:
    """Darker and with a warm colour cast: what a different camera / light would do."""
    arr = np.asarray(ImageEnhance.Brightness(img).enhance(0.6), dtype=np.float32) * np.array([1.3, 1.0, 0.7])
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_batch(seeds, shift: bool = False) -> list[Image.Image]:
    classes = list(TINY_CLASSES)
    out = []
    for s in seeds:
        img = leaf_image(TINY_CLASSES[classes[s % len(classes)]], seed=s)
        out.append(shifted(img) if shift else img)
    return out


def save_images(images, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"img_{i:04d}.jpg")
        img.save(paths[-1], quality=92)
    return paths


def write_log(table, path: Path, version: str = BUNDLE_VERSION) -> Path:
    """Write rows the way the service does: one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for i, row in enumerate(table.to_dict("records")):
            rec = {k: row[k] for k in (*STAT_COLUMNS, "confidence", "label")}
            rec.update(timestamp=f"2026-01-01T00:00:{i % 60:02d}Z", model_version=version)
            fh.write(json.dumps(rec) + "\n")
    return path


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def drift_bundle(tmp_path_factory) -> Path:
    """A real exported tiny bundle whose export ran :func:`drift.reference_stats_step`."""
    import torch

    from plantml.export import export_bundle
    from plantml.preprocess import InputSpec, preprocess_batch, softmax

    from plantml.preprocess import load_image

    classes = list(TINY_CLASSES)
    spec = InputSpec(size=32)
    model, parity_inputs = _train_tiny_model(classes, spec.size)
    # The reference goes through JPEG files like the current batches (and like real data):
    # JPEG's chroma subsampling alone moves hue and saturation statistics.
    paths = save_images(make_batch(range(90)), tmp_path_factory.mktemp("reference_images"))
    with torch.inference_mode():
        logits = model(torch.from_numpy(preprocess_batch([load_image(p) for p in paths], spec))).numpy()
    probs = softmax(logits)
    labels = [classes[i] for i in probs.argmax(axis=1)]
    step = drift.reference_stats_step(paths, labels, probs.max(axis=1), embeddings=logits, embedding_source="logits")
    path, _ = export_bundle(
        model, out_root=tmp_path_factory.mktemp("drift_bundles"), name="tiny-drift", architecture="tiny_cnn",
        classes=classes, input_spec=spec, parity_inputs=parity_inputs,
        metrics={"fp32": {"accuracy": 1.0}}, lineage={"data_manifest_sha256": "test"},
        version=BUNDLE_VERSION, extra_steps=[step],
    )
    return path


@pytest.fixture(scope="module")
def current_sets(drift_bundle, tmp_path_factory) -> dict[str, Path]:
    """Held-out and shifted batches, as image folders and as service-style drift logs."""
    bundle = load_bundle(drift_bundle)
    root = tmp_path_factory.mktemp("current")
    out = {}
    for name, shift, seeds in (("held", False, range(5000, 5060)), ("shifted", True, range(7000, 7060))):
        paths = save_images(make_batch(seeds, shift=shift), root / f"{name}_images")
        table, skipped = drift.images_table(paths, bundle)
        assert not skipped
        out[f"{name}_images"] = root / f"{name}_images"
        out[f"{name}_log"] = write_log(table, root / f"{name}_logs" / "drift-worker1.jsonl")
    return out


def cli(*argv: str) -> tuple[int, dict]:
    parser = argparse.ArgumentParser()
    drift.add_drift_arguments(parser)
    args = parser.parse_args(list(argv))
    return drift.run_drift_cli(args), args


# ------------------------------------------------------------------ reference in the bundle


def test_reference_statistics_are_stored_in_the_bundle(drift_bundle):
    import pandas as pd

    bundle = load_bundle(drift_bundle)  # verifies the sha256 of the reference files too
    info = bundle.metadata["drift_reference"]
    assert info["bundle_version"] == BUNDLE_VERSION and info["n_rows"] == 90
    table = pd.read_csv(bundle.path(info["path"]))
    assert list(table.columns[: len(STAT_COLUMNS)]) == list(STAT_COLUMNS)
    assert {"confidence", "label", "emb_pca_0"} <= set(table.columns)
    assert set(table["label"]) <= set(bundle.classes)
    assert table[list(STAT_COLUMNS)].notna().all().all()
    roles = {f["path"]: f["role"] for f in bundle.metadata["files"]}
    assert roles["reference_stats.csv"] == roles["reference_pca.npz"] == "drift_reference"
    # the reference files are not models: runtime selection is unaffected
    assert sorted(bundle.available()) == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert bundle.model_path("onnxruntime").name == "model.onnx"
    assert info["embedding"]["source"] == "logits" and info["embedding"]["dim"] == len(bundle.classes)


def test_reference_table_rejects_bad_inputs():
    imgs = make_batch(range(4))
    with pytest.raises(drift.DriftError, match="differ in length"):
        drift.build_reference_table(imgs, ["a"] * 3, np.full(4, 0.9))
    with pytest.raises(drift.DriftError, match=r"\[0, 1\]"):
        drift.build_reference_table(imgs, ["a"] * 4, np.array([0.9, 1.5, 0.2, 0.3]))
    with pytest.raises(drift.DriftError, match="not among the bundle's classes"):
        drift.build_reference_table(imgs, ["a", "b", "zzz", "a"], np.full(4, 0.9), classes=["a", "b"])
    with pytest.raises(drift.DriftError, match="no reference images"):
        drift.build_reference_table([], [], np.zeros(0))
    with pytest.raises(drift.DriftError, match="one row per image"):
        drift.build_reference_table(imgs, ["a"] * 4, np.full(4, 0.9), embeddings=np.zeros((3, 5)))


def test_reference_table_reads_paths_like_images(tmp_path):
    """Paths are decoded one at a time (a large test split never sits in memory)."""
    imgs = make_batch(range(4))
    paths = []
    for i, img in enumerate(imgs):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    from_images, _ = drift.build_reference_table(imgs, ["a"] * 4, np.full(4, 0.9))
    from_paths, _ = drift.build_reference_table(paths, ["a"] * 4, np.full(4, 0.9))
    assert from_images.equals(from_paths)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(drift.DriftError, match="bad.png cannot be read"):
        drift.build_reference_table([tmp_path / "bad.png"], ["a"], np.full(1, 0.9))


def test_pca_projection_matches_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))
    pca = drift.fit_pca(x, 3)
    proj = drift.project_pca(x, pca)
    assert proj.shape == (50, 3)
    assert np.allclose(proj.mean(axis=0), 0, atol=1e-9)
    assert np.all(np.diff(proj.var(axis=0)) <= 1e-9)  # components ordered by variance
    with pytest.raises(drift.DriftError, match="expects"):
        drift.project_pca(np.zeros((2, 4)), pca)


# ------------------------------------------------------------------ acceptance pair


def test_cli_acceptance_pair_on_drift_logs(drift_bundle, current_sets, tmp_path, capsys):
    summary_out = tmp_path / "gauges" / "drift_summary.json"
    report, report_json = tmp_path / "r" / "held.html", tmp_path / "r" / "held.json"

    code, _ = cli("--bundle", str(drift_bundle), "--current", str(current_sets["held_log"]),
                  "--report", str(report), "--json", str(report_json), "--summary-out", str(summary_out))
    printed = json.loads(capsys.readouterr().out)
    assert code == drift.EXIT_NO_DRIFT, printed["message"]
    assert printed["status"] == "ok" and printed["drift_detected"] is False and not printed["retrain_recommended"]
    assert printed["n_current"] == 60 and printed["drift_share"] <= 0.2, printed["drifted_columns"]
    assert set(printed["columns"]) == {*STAT_COLUMNS, "confidence", "label"}
    assert all({"method", "score", "threshold", "drifted"} <= set(c) for c in printed["columns"].values())
    assert "<html" in report.read_text()[:2000].lower()
    assert any("ValueDrift" in m["metric_name"] for m in json.loads(report_json.read_text())["metrics"])
    gauges = json.loads(summary_out.read_text())
    assert gauges["drift_detected"] is False and isinstance(gauges["drift_share"], float)
    assert gauges["bundle_version"] == BUNDLE_VERSION and gauges["n_current"] == 60 and gauges["created_at"]

    code, _ = cli("--bundle", str(drift_bundle), "--current", str(current_sets["shifted_log"].parent),
                  "--summary-out", str(summary_out))
    printed = json.loads(capsys.readouterr().out)
    assert code == drift.EXIT_DRIFT
    assert printed["drift_detected"] is True and printed["retrain_recommended"] is True
    assert printed["drift_share"] >= PARAMS.threshold_share
    assert {"r_mean", "b_mean", "v_mean"} <= set(printed["drifted_columns"])
    assert json.loads(summary_out.read_text())["drift_detected"] is True


def test_acceptance_pair_on_image_folders(drift_bundle, current_sets):
    held = drift.analyse(drift_bundle, current_sets["held_images"], PARAMS)
    assert held["status"] == "ok" and held["drift_detected"] is False, held["message"]
    assert held["drift_share"] <= 0.2, held["drifted_columns"]
    assert held["current"]["kind"] == "images" and held["n_current"] == 60
    # the bundle's reference PCA was fitted on logits, so current images get the same columns
    assert "emb_pca_0" in held["columns"]

    moved = drift.analyse(drift_bundle, current_sets["shifted_images"], PARAMS)
    assert moved["drift_detected"] is True and moved["retrain_recommended"] is True
    assert moved["drift_share"] > held["drift_share"]


# ------------------------------------------------------------------ bad input


def test_too_few_rows_is_not_enough_data_never_no_drift(drift_bundle, current_sets, tmp_path, capsys):
    lines = current_sets["held_log"].read_text().splitlines()[:10]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(lines) + "\n")
    summary_out = tmp_path / "drift_summary.json"
    summary_out.write_text('{"drift_detected": true, "drift_share": 0.8}')  # the last real verdict

    code, _ = cli("--bundle", str(drift_bundle), "--current", str(small), "--summary-out", str(summary_out))
    printed = json.loads(capsys.readouterr().out)
    assert code == drift.EXIT_ERROR
    assert printed["status"] == "not_enough_data" and printed["drift_detected"] is None
    assert "10 current" in printed["message"] and "drift.min_rows" in printed["message"]
    assert json.loads(summary_out.read_text())["drift_share"] == 0.8  # not overwritten by a non-verdict


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ("\n\n  \n", "empty"),
        ('{"r_mean": 0.1}\n', r"bad\.jsonl:1: missing key\(s\) g_mean"),
        ("not json\n", r"bad\.jsonl:1: not JSON"),
        ("[1, 2]\n", "expected a JSON object"),
        ("ROW\nNAN_ROW\n", r"bad\.jsonl:2: confidence must be a finite number"),
    ],
)
def test_empty_or_malformed_log_is_a_clear_error(tmp_path, current_sets, content, match):
    good = current_sets["held_log"].read_text().splitlines()[0]
    nan_row = json.dumps(dict(json.loads(good), confidence=float("nan")))  # json.dumps writes NaN
    path = tmp_path / "bad.jsonl"
    path.write_text(content.replace("NAN_ROW", nan_row).replace("ROW", good))
    with pytest.raises(drift.DriftError, match=match):
        drift.read_drift_log(path)


def test_log_values_are_validated(tmp_path, current_sets):
    rec = json.loads(current_sets["held_log"].read_text().splitlines()[0])
    for key, value, match in (("confidence", "0.9", "confidence must be a finite number"),
                              ("sharpness", True, "sharpness must be a finite number"),
                              ("label", "", "label must be a non-empty string")):
        bad = dict(rec, **{key: value})
        path = tmp_path / f"{key}.jsonl"
        path.write_text(json.dumps(rec) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(drift.DriftError, match=match):
            drift.read_drift_log(path)


def test_rotated_gzipped_and_partial_logs_are_read(tmp_path, current_sets):
    lines = current_sets["held_log"].read_text().splitlines()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "drift-w1.jsonl").write_text("\n".join(lines[:20]) + "\n" + lines[20][:40])  # write in progress
    (logs / "drift-w1.jsonl.1").write_text("\n".join(lines[21:40]) + "\n")
    with gzip.open(logs / "drift-w2.jsonl.2.gz", "wt") as fh:
        fh.write("\n".join(lines[40:]) + "\n")
    (logs / "README.txt").write_text("not a log")
    table = drift.read_drift_log(logs)
    assert len(table) == 59  # the half-written last line is skipped, nothing else
    assert len(drift.read_drift_log(str(logs / "drift-w1.jsonl*"))) == 39
    with pytest.raises(drift.DriftError, match="no drift log matches"):
        drift.read_drift_log(str(logs / "nothing-*.jsonl"))
    with pytest.raises(drift.DriftError, match="not found"):
        drift.read_drift_log(tmp_path / "missing.jsonl")


def test_reference_from_another_bundle_version_is_refused(drift_bundle, current_sets, tmp_path, capsys):
    copy = tmp_path / "bundle"
    shutil.copytree(drift_bundle, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["drift_reference"]["bundle_version"] = "6"
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(drift.ReferenceMismatchError, match="computed for bundle version 6.*version 7"):
        drift.load_reference(load_bundle(copy))
    code, _ = cli("--bundle", str(copy), "--current", str(current_sets["held_log"]))
    printed = json.loads(capsys.readouterr().out)
    assert code == drift.EXIT_ERROR and printed["status"] == "error" and "version 6" in printed["error"]


def test_log_from_another_model_version(drift_bundle, current_sets, tmp_path):
    import pandas as pd

    bundle = load_bundle(drift_bundle)
    table = drift.read_drift_log(current_sets["held_log"])
    old = write_log(table, tmp_path / "old" / "drift.jsonl", version="3")
    with pytest.raises(drift.ReferenceMismatchError, match="model version.*3.*bundle version 7"):
        drift.load_current(old, bundle)
    mixed = tmp_path / "mixed"
    write_log(table, mixed / "a.jsonl", version="3")
    write_log(pd.concat([table] * 2), mixed / "b.jsonl", version=BUNDLE_VERSION)
    current, info = drift.load_current(mixed, bundle)
    assert len(current) == 120 and info["n_other_version"] == 60


def test_bundle_without_reference_and_empty_folders(tiny_bundle, tmp_path):
    with pytest.raises(drift.DriftError, match="no drift reference"):
        drift.analyse(tiny_bundle, tmp_path, PARAMS)
    with pytest.raises(drift.DriftError, match="neither a drift log"):
        drift.load_current(tmp_path, load_bundle(tiny_bundle))
    with pytest.raises(drift.DriftError, match="bundle directory not found"):
        drift.analyse(tmp_path / "nope", tmp_path, PARAMS)


def test_exit_codes():
    assert drift.exit_code({"status": "ok", "drift_detected": False}) == 0
    assert drift.exit_code({"status": "ok", "drift_detected": True}) == 1
    assert drift.exit_code({"status": "not_enough_data", "drift_detected": None}) == 2
    assert drift.exit_code({"status": "error"}) == 2


def test_drift_module_stays_light():
    """serving imports plantml.drift / imagestats: no torch, no evidently at import time.

    Nor plantml.config: only the command line (plantml.drift.cli) reads params.yaml, and the
    package loads it on first use of a CLI name.
    """
    import subprocess
    import sys

    code = (
        "import sys, plantml.drift, plantml.imagestats; "
        "bad = [m for m in ('torch', 'evidently', 'metaflow', 'mlflow', 'onnxruntime', 'plantml.config', "
        "'plantml.drift.cli') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def test_package_keeps_every_import_path():
    """The split into plantml/drift/ keeps ``from plantml.drift import X`` and ``python -m plantml.drift``."""
    import subprocess
    import sys

    from plantml.drift import cli as drift_cli

    assert drift.run_drift_cli is drift_cli.run_drift_cli and drift.add_drift_arguments is drift_cli.add_drift_arguments
    assert set(drift.__all__) <= set(dir(drift)) | {"add_drift_arguments", "run_drift_cli", "main"}
    with pytest.raises(AttributeError):
        drift.no_such_name  # noqa: B018
    res = subprocess.run([sys.executable, "-m", "plantml.drift", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT)
    assert res.returncode == 0 and "--summary-out" in res.stdout, res.stderr


# ------------------------------------------------------------------ the flow


@pytest.mark.integration
def test_drift_flow_card_and_mlflow(drift_bundle, current_sets, tmp_path, monkeypatch):
    import mlflow
    from metaflow import Runner
    from metaflow.cards import get_cards

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # the local Metaflow datastore (.metaflow) goes here, for the run and the client
    env = {"MLFLOW_TRACKING_URI": uri, "METAFLOW_USER": "plantml-tests"}
    summary_out = tmp_path / "drift_summary.json"
    with Runner(str(REPO_ROOT / "flows" / "drift_flow.py"), show_output=False, env=env).run(
        bundle=str(drift_bundle), current=str(current_sets["shifted_log"]), summary_out=str(summary_out),
    ) as running:
        assert running.status == "successful", running.stderr
        task = running.run["analyse"].task
        assert task.data.drift_detected is True and task.data.retrain_recommended is True
        html = card_text(get_cards(task, id="drift")[0].get())
    for text in ("Share of drifted columns", "retrain recommended", "r_mean", "Evidently report", "iframe"):
        assert text in html, text
    assert json.loads(summary_out.read_text())["drift_detected"] is True

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["plantml-drift"], output_format="list")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["drift_detected"] == 1.0 and metrics["drift_share"] >= 0.5 and metrics["n_current"] == 60
    assert "drift_score.r_mean" in metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "drift")}
    assert {"drift/drift_report.html", "drift/drift_report.json", "drift/summary.json"} <= artifacts


def test_unreadable_images_in_a_folder_are_skipped_and_counted(drift_bundle, current_sets, tmp_path, capsys):
    """docs/drift.md: an unreadable image in a folder is skipped and counted (``current.n_skipped``)."""
    import shutil

    folder = tmp_path / "held_plus_junk"
    shutil.copytree(current_sets["held_images"], folder)
    (folder / "junk.jpg").write_bytes(b"not a jpeg at all")
    good = (folder / "img_0000.jpg").read_bytes()
    (folder / "sub").mkdir()
    (folder / "sub" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (folder / "empty.png").write_bytes(b"")

    code, _ = cli("--bundle", str(drift_bundle), "--current", str(folder))
    printed = json.loads(capsys.readouterr().out)
    assert code == drift.EXIT_NO_DRIFT, printed["message"]
    assert printed["current"]["kind"] == "images"
    assert printed["current"]["n_skipped"] == 3, printed["current"]
    assert printed["current"]["n_rows_read"] == 63 and printed["n_current"] == 60, printed["current"]

    # the same folder without the bad files: nothing skipped (the count is not a constant)
    _, info = drift.load_current(current_sets["held_images"], load_bundle(drift_bundle))
    assert info["n_skipped"] == 0 and info["n_rows_read"] == 60
