"""Several data sources (domains) in one run: parsing, splitting, shards, sampling, per-domain evidence, gates.

All on tiny synthetic images (a "lab" set of plain-backdrop squares and a "field" set of
cluttered ones); nothing here reads ``../shared/data``.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plantml import shards as sh
from plantml.config import GateParams, ParamsError, params_from_dict
from plantml.data import (DEFAULT_DOMAIN, DataError, DataSource, PixelStaging, format_sources, parse_data_dir,
                          prepare_dataset, read_manifest_bytes, write_shards)
from plantml.evaluation import QualityGateError, check_domain_gates, domain_metrics, wilson_interval
from tests.conftest import REPO_ROOT, make_leaf_image

LAB = {"Apple___scab": (60, 60, 150), "Tomato___healthy": (40, 160, 40), "Grape___rot": (120, 80, 30)}
FIELD = {"Apple___scab": (70, 70, 160), "Apple___healthy": (90, 170, 60)}


def _cluttered(rgb, seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3)).astype(np.float32) * 0.5
    arr[16:48, 16:48] = np.array(rgb, np.float32) + rng.normal(0, 10, size=(32, 32, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Path, Path]:
    """``lab``: 3 classes x 12; ``field``: 2 classes x 10 (one class only in the field); one file in both."""
    lab, field = tmp_path_factory.mktemp("lab"), tmp_path_factory.mktemp("field")
    for c, (name, rgb) in enumerate(LAB.items()):
        (lab / name).mkdir()
        for i in range(12):
            make_leaf_image(rgb, seed=c * 100 + i).save(lab / name / f"l{i:02d}.png")
    for c, (name, rgb) in enumerate(FIELD.items()):
        (field / name).mkdir()
        for i in range(10):
            _cluttered(rgb, seed=5000 + c * 100 + i).save(field / name / f"f{i:02d}.png")
    # the same bytes in both sources: a duplicate across domains
    shutil.copy(lab / "Apple___scab" / "l00.png", field / "Apple___scab" / "copy_of_lab.png")
    return lab, field


# --------------------------------------------------------------------------- --data-dir


def test_plain_path_is_one_lab_source():
    assert parse_data_dir("/data/PlantVillage") == [DataSource(DEFAULT_DOMAIN, "/data/PlantVillage")]
    assert parse_data_dir("s3://bucket/pv") == [DataSource("lab", "s3://bucket/pv")]


def test_domain_pairs_and_commas_inside_paths():
    got = parse_data_dir("lab=/a/b,c,field=s3://bkt/x=y,z")
    assert got == [DataSource("lab", "/a/b,c"), DataSource("field", "s3://bkt/x=y,z")]
    assert format_sources(got) == "lab=/a/b,c,field=s3://bkt/x=y,z"
    assert format_sources([DataSource("lab", "/p")]) == "/p"


@pytest.mark.parametrize("text,message", [("lab=/a,lab=/b", "twice"), ("lab=", "DOMAIN=PATH"), ("  ", "empty")])
def test_bad_data_dir_is_a_clear_error(text, message):
    with pytest.raises(DataError, match=message):
        parse_data_dir(text)


# --------------------------------------------------------------------------- params


def test_sources_domains_and_gates_are_validated():
    p = params_from_dict({"data": {"sources": [{"domain": "lab", "path": "/x"},
                                               {"domain": "field", "path": "/y", "weight": 3}],
                                   "domains": {"field": {"split": [0.5, 0.2, 0.3]}}},
                          "evaluate": {"gates": [{"domain": "field", "metric": "accuracy", "min": 0.8}]}})
    assert p.data.sources[1].weight == 3.0 and p.data.sources[0].weight is None
    assert p.data.domains["field"].split == (0.5, 0.2, 0.3)
    bad = [({"data": {"sources": [{"domain": "lab", "path": "/x"}, {"domain": "lab", "path": "/y"}]}}, "once"),
           ({"data": {"sources": [{"domain": "1ab", "path": "/x"}]}}, "domain must match"),
           ({"data": {"sources": [{"domain": "lab", "path": "/x", "weight": 0}]}}, r"weight must be in \(0, 100\]"),
           ({"data": {"domains": {"field": {"split": [0.5, 0.5, 0.5]}}}}, "summing to 1"),
           ({"evaluate": {"gates": [{"domain": "field", "metric": "accuracy"}]}}, "exactly one of min or max"),
           ({"evaluate": {"gates": [{"domain": "field", "metric": "speed", "min": 1}]}}, "metric must be one of")]
    for raw, message in bad:
        with pytest.raises(ParamsError, match=message):
            params_from_dict(raw)


def test_data_dir_wins_and_domain_defaults_apply(tmp_path):
    from plantml.pipeline import resolve_sources

    p = params_from_dict({"data": {"data_dir": f"lab={tmp_path}/a,field={tmp_path}/b",
                                   "sources": [{"domain": "other", "path": "/nowhere"}],
                                   "domains": {"field": {"weight": 2.5, "split": [0.5, 0.2, 0.3]}}}})
    sources, demo = resolve_sources(p)
    assert not demo
    assert [(s.domain, s.weight, s.split) for s in sources] == [("lab", 1.0, None), ("field", 2.5, (0.5, 0.2, 0.3))]
    p = params_from_dict({"data": {"sources": [{"domain": "field", "path": "rel/dir", "weight": 4}],
                                   "domains": {"field": {"weight": 2.5}}}})
    (src,), _ = resolve_sources(p)
    assert src.weight == 4.0 and src.root == str(REPO_ROOT / "rel" / "dir")  # relative to the repository


# --------------------------------------------------------------------------- prepare


def test_prepare_two_sources_records_domains_and_splits_per_domain(two_sources, tmp_path):
    lab, field = two_sources
    staging = PixelStaging(32)
    try:
        sources = [DataSource("lab", str(lab)), DataSource("field", str(field), 2.0, (0.4, 0.2, 0.4))]
        rows, summary = prepare_dataset(sources, seed=3, progress=False, staging=staging)
        keyed, index = write_shards(rows, summary, staging, str(tmp_path / "store"), 8, 3, progress=False)
    finally:
        staging.close()
    assert summary.classes == sorted(set(LAB) | set(FIELD))  # the union of the sources' classes
    assert set(summary.domains) == {"lab", "field"}
    by = Counter((r.domain, r.label, r.split) for r in rows)
    # lab: 12 per class at 0.7/0.2/0.1 (the copied file is field's duplicate, grouped with its lab twin)
    assert [by[("lab", "Tomato___healthy", s)] for s in ("train", "val", "test")] == [9, 2, 1]
    # field: 10 per class at its own 0.4/0.2/0.4
    assert by[("field", "Apple___healthy", "test")] == 4 and by[("field", "Apple___healthy", "train")] == 4
    # a duplicate never straddles splits, even across domains
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r.sha256, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    twins = [r for r in rows if r.path.endswith(("l00.png", "copy_of_lab.png")) and r.label == "Apple___scab"]
    assert {r.domain for r in twins} == {"lab", "field"} and len({r.split for r in twins}) == 1
    # the manifest and every shard sample name the domain; the index keeps weights and counts
    stored = read_manifest_bytes((tmp_path / "store" / "manifest.csv").read_bytes())
    assert {r.domain for r in stored} == {"lab", "field"}
    key_domain = {r.key: r.domain for r in stored}
    samples = [s for split in ("train", "val", "test") for s in sh.iter_split(index, split)]
    assert all(s.meta["domain"] == key_domain[s.key] for s in samples)
    loaded = sh.load_index(str(tmp_path / "store"))
    assert loaded.domain_weights == {"lab": 1.0, "field": 2.0}
    assert sum(loaded.domain_counts["train"].values()) == loaded.count("train")
    assert loaded.weighted_train_factor() == pytest.approx(
        (loaded.domain_counts["train"]["lab"] + 2 * loaded.domain_counts["train"]["field"]) / loaded.count("train"))


def test_one_plain_source_keeps_its_old_manifest_digest(tiny_dataset):
    """Adding domains must not change what a one-source run's lineage hash was."""
    import hashlib

    rows, summary = prepare_dataset(tiny_dataset, progress=False)
    old = hashlib.sha256()
    for r in rows:
        old.update(f"{r.label}|{r.split}|{r.sha256}\n".encode())
    assert summary.manifest_sha256 == old.hexdigest()
    assert {r.domain for r in rows} == {"lab"} and summary.root == str(Path(tiny_dataset).resolve())


def test_old_manifest_without_domain_column_reads_as_lab():
    csv = b"path,label,split,sha256,width,height,key\na/1.jpg,a,train,abc,2,2,train0000000\n"
    (row,) = read_manifest_bytes(csv)
    assert row.domain == "lab"


def test_cli_prepare_takes_domain_pairs(two_sources, tmp_path):
    lab, field = two_sources
    out = tmp_path / "prepared"
    proc = subprocess.run([sys.executable, "-m", "plantml.cli", "prepare", "--data-dir", f"lab={lab},field={field}",
                           "--set", f"data.prepared_dir={out}", "--set", "train.image_size=32", "--quiet"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["domains"]["field"]["split"] == [0.5, 0.2, 0.3]  # params.yaml's data.domains.field
    assert "domain" in (out / "manifest.csv").read_text().splitlines()[0]


# --------------------------------------------------------------------------- sampling weights


def test_domain_weight_repeats_samples_in_training_only(two_sources, tmp_path):
    pytest.importorskip("torch")
    from plantml.loader import make_loader

    lab, field = two_sources
    staging = PixelStaging(32)
    try:
        rows, summary = prepare_dataset([DataSource("lab", str(lab)), DataSource("field", str(field), 3.0)],
                                        progress=False, staging=staging)
        _, index = write_shards(rows, summary, staging, str(tmp_path / "s"), 8, 0, progress=False)
    finally:
        staging.close()
    domain_of = {r.key: r.domain for r in read_manifest_bytes((tmp_path / "s" / "manifest.csv").read_bytes())}

    def seen(train: bool, weights):
        keys = [k for _, _, ks in make_loader(index, "train", 16, train=train, seed=1, epoch=1, with_key=True,
                                              domain_weights=weights) for k in ks]
        return Counter(domain_of[k] for k in keys)

    plain, weighted = seen(True, None), seen(True, index.domain_weights)
    assert weighted["field"] == 3 * plain["field"] and weighted["lab"] == plain["lab"]
    assert seen(False, index.domain_weights) == plain  # evaluation never reweights
    half = seen(True, {"lab": 0.5})
    assert 0.2 * plain["lab"] < half["lab"] < 0.8 * plain["lab"]


# --------------------------------------------------------------------------- per-domain metrics and gates


def test_domain_metrics_on_known_predictions():
    classes = ["a", "b", "c"]
    probs = np.array([[.9, .05, .05], [.1, .8, .1], [.2, .2, .6], [.5, .45, .05], [.3, .3, .4]])
    labels = np.array([0, 1, 2, 1, 2])
    got = domain_metrics(labels, probs, ["lab", "lab", "field", "field", "field"], classes, threshold=0.55)
    lab, field = got["lab"], got["field"]
    assert lab["accuracy"] == 1.0 and lab["coverage"] == 1.0 and lab["classes"] == ["a", "b"]
    assert field["n"] == 3 and field["accuracy"] == pytest.approx(2 / 3)
    assert field["coverage"] == pytest.approx(1 / 3) and field["accuracy_on_answered"] == 1.0
    assert field["confusion"]["columns"] == ["b", "c", "other"]
    assert field["confusion"]["matrix"] == [[0, 0, 1], [0, 2, 0]]  # b predicted as a: outside the field's classes
    # macro-F1 only over the domain's classes: b (F1 0) and c (F1 1)
    assert field["macro_f1"] == pytest.approx(0.5)
    lo, hi = field["accuracy_ci95"]
    assert lo < 2 / 3 < hi and (lo, hi) == pytest.approx(wilson_interval(2, 3))
    nothing = domain_metrics(labels, probs, ["x"] * 5, classes, threshold=0.99)["x"]
    assert nothing["coverage"] == 0 and math.isnan(nothing["accuracy_on_answered"])


def test_wilson_interval_matches_the_textbook():
    lo, hi = wilson_interval(58, 72)  # 80.6 % of 72 field photos
    assert lo == pytest.approx(0.6997, abs=2e-4) and hi == pytest.approx(0.8805, abs=2e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0  # exactly, not 0.99999...


def test_domain_gates_fail_pass_and_not_applicable():
    by_domain = {"lab": {"accuracy": 0.98, "ece": 0.02, "coverage": 0.9},
                 "field": {"accuracy": 0.6, "ece": 0.08, "coverage": 0.2}}
    gates = [GateParams("field", "accuracy", min=0.8), GateParams("lab", "ece", max=0.03),
             GateParams("field", "ece", max=0.03), GateParams("drone", "accuracy", min=0.5),
             GateParams("drone", "accuracy", min=0.5, required=True)]
    got = [r["passed"] for r in check_domain_gates(by_domain, gates)]
    assert got == [False, True, False, None, False]


def _report(by_domain, shortcut=None):
    champ = {"macro_f1": 0.99, "accuracy": 0.99, "by_domain": by_domain}
    return {"champion": "cnn", "models": {"cnn": champ}, "by_domain": by_domain,
            "robustness": {"summary": {"relative_accuracy": 0.9}}, "shortcut": shortcut or {"applicable": False}}


def test_enforce_quality_gates_names_the_failing_domain():
    from plantml.pipeline import enforce_quality_gates

    params = params_from_dict({"evaluate": {"gates": [{"domain": "field", "metric": "accuracy", "min": 0.8}]}})
    enforce_quality_gates(params, _report({"lab": {"accuracy": 0.99}}))  # no field photos: not applicable
    enforce_quality_gates(params, _report({"field": {"accuracy": 0.85}}))
    with pytest.raises(QualityGateError, match="field accuracy 0.6000 >= 0.8 FAILED"):
        enforce_quality_gates(params, _report({"field": {"accuracy": 0.6}}))
    strict = params_from_dict({"robustness": {"max_shortcut_rate": 0.3}})
    with pytest.raises(QualityGateError, match="shortcut gate"):
        enforce_quality_gates(strict, _report({}, {"applicable": True, "target_rate": 0.5}))


def test_champion_can_be_chosen_on_one_domain():
    from plantml.pipeline import _champion_candidates
    from plantml.evaluation import choose_champion

    models = {"cnn": {"macro_f1": 0.99, "latency_ms": 5, "by_domain": {"field": {"macro_f1": 0.60}}},
              "vit": {"macro_f1": 0.97, "latency_ms": 5, "by_domain": {"field": {"macro_f1": 0.80}}}}
    assert choose_champion(_champion_candidates(models, "macro_f1", None), "macro_f1", 0.0)[0] == "cnn"
    assert choose_champion(_champion_candidates(models, "macro_f1", "field"), "macro_f1", 0.0)[0] == "vit"
    # a domain the run does not have: the overall rule, not a crash
    assert choose_champion(_champion_candidates(models, "macro_f1", "drone"), "macro_f1", 0.0)[0] == "cnn"


def test_abstention_collapse_on_one_domain_is_recorded(caplog):
    from plantml.calibration import domain_abstention

    val = {"lab": {"coverage": 0.95}, "field": {"coverage": 0.10}}
    test = {"lab": {"coverage": 0.93, "accuracy_on_answered": 0.99}, "field": {"coverage": 0.05,
                                                                               "accuracy_on_answered": 1.0}}
    got = domain_abstention(val, test, min_coverage=0.5)
    assert got["domains"]["field"]["collapsed"] and not got["domains"]["lab"]["collapsed"]
    assert len(got["warnings"]) == 1 and "field" in got["warnings"][0]
    assert any("abstention collapses on field" in r.message for r in caplog.records)


def test_registry_flattens_domain_metrics():
    from plantml.registry import domain_metric_items

    items = domain_metric_items({"by_domain": {"field": {"accuracy": 0.8, "coverage": 0.7, "ece": 0.02,
                                                         "accuracy_on_answered": None, "n": 72}},
                                 "shortcut": {"target_rate": 0.05}})
    assert items == {"test_field_accuracy": 0.8, "test_field_coverage": 0.7, "test_field_ece": 0.02,
                     "test_field_n": 72.0, "shortcut_target_rate": 0.05}


def test_an_s3_source_beside_a_local_one(two_sources, tmp_path, monkeypatch):
    """`--data-dir lab=s3://...,field=LOCAL`: S3 sources keep working as one of several."""
    moto = pytest.importorskip("moto")
    import boto3

    from plantml import storage
    from plantml.pipeline import prepare

    lab, field = two_sources
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    storage._client.cache_clear()
    try:
        with moto.mock_aws():
            s3 = boto3.client("s3")
            s3.create_bucket(Bucket="leaves")
            for f in sorted(lab.rglob("*.png")):
                s3.upload_file(str(f), "leaves", f"lab/{f.relative_to(lab).as_posix()}")
            params = params_from_dict({"data": {"data_dir": f"lab=s3://leaves/lab,field={field}",
                                                "prepared_dir": str(tmp_path / "prep")},
                                       "train": {"image_size": 32}})
            summary, index = prepare(params, store="s3://leaves/run/data", progress=False)
            assert summary.domains["lab"]["root"] == "s3://leaves/lab" and summary.domains["field"]["n_images"] == 21
            assert summary.root == f"lab=s3://leaves/lab,field={field}"
            assert sh.load_index("s3://leaves/run/data").domain_counts["test"]["field"] >= 1
    finally:
        storage._client.cache_clear()
