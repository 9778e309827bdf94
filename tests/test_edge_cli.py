"""The ``plantml-edge`` CLI: predict (JSON lines / CSV), bench, info, errors and exit codes."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.cli import main, percentile
from tests._edge_bundles import CLASSES, int8_tiny_bundle
from tests.conftest import REPO_ROOT, TINY_CLASSES, make_leaf_image


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return int8_tiny_bundle(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """photos/<class-index>_<name>.jpg at two folder depths, plus a non-image that is skipped."""
    root = tmp_path_factory.mktemp("photos")
    (root / "deeper").mkdir()
    for i, (name, rgb) in enumerate(TINY_CLASSES.items()):
        folder = root if i % 2 == 0 else root / "deeper"
        make_leaf_image(rgb, size=64, seed=700 + i).save(folder / f"{i}_{name}.jpg", quality=92)
    (root / "README.txt").write_text("not an image, not listed")
    return root


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _expected_label(path: str) -> str:
    return CLASSES[int(Path(path).name.split("_")[0])]


def test_predict_jsonl_over_a_folder_recursively(bundle, photos, capsys):
    code, out, _ = _run(capsys, "predict", "--bundle", str(bundle), str(photos))
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"path", "label", "confidence", "top_k", "abstained", "abstain_reason"}
        assert row["abstain_reason"] is None
        assert row["label"] == _expected_label(row["path"])
        assert len(row["top_k"]) == 3 and row["abstained"] is False


def test_unreadable_file_gives_an_error_line_and_exit_1(bundle, photos, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((photos / f"0_{CLASSES[0]}.jpg").read_bytes()[:200])
    args = ["predict", "--bundle", str(bundle), str(broken), str(photos), str(tmp_path / "missing.png")]
    code, out, err = _run(capsys, *args)
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5, "the run goes on after a bad file"
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {str(broken), str(tmp_path / "missing.png")}
    assert errors[str(broken)].startswith("truncated")
    assert sum("label" in r for r in rows) == 3
    assert "2 of 5 file(s) could not be classified" in err


def test_predict_csv_int8_onnxruntime_one_thread(bundle, photos, capsys):
    args = ["predict", "--bundle", str(bundle), "--runtime", "onnxruntime", "--precision", "int8",
            "--threads", "1", "--format", "csv", "--top-k", "2", str(photos)]
    code, out, _ = _run(capsys, *args)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "label", "confidence", "abstained", "abstain_reason", "ood_score", "top_k",
                             "error"]
    assert len(rows) == 3
    for row in rows:
        assert row["label"] == _expected_label(row["path"])
        assert 0.5 < float(row["confidence"]) <= 1.0
        assert row["abstained"] == "false" and row["error"] == ""
        assert len(row["top_k"].split(";")) == 2 and row["top_k"].startswith(row["label"] + ":")


def test_output_file_with_progress_bar(bundle, photos, tmp_path, capsys):
    target = tmp_path / "results.jsonl"
    code, out, err = _run(capsys, "predict", "--bundle", str(bundle), "-o", str(target), str(photos))
    assert code == 0 and out == ""
    assert len(target.read_text().splitlines()) == 3
    assert "predict" in err and "3/3" in err, "a folder written to a file shows a progress bar on stderr"


def test_bundle_from_environment(bundle, photos, monkeypatch, capsys):
    monkeypatch.setenv("PLANTML_BUNDLE", str(bundle))
    code, out, _ = _run(capsys, "predict", str(photos / f"0_{CLASSES[0]}.jpg"))
    assert code == 0 and json.loads(out)["label"] == CLASSES[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "x.jpg"], "no bundle given"),
        (["predict", "--bundle", "/nonexistent/bundle", "x.jpg"], "bundle directory not found"),
        (["info", "--bundle", "/nonexistent/bundle"], "bundle directory not found"),
        (["predict", "--bundle", "BUNDLE", "--threads", "0", "x.jpg"], "must be >= 1"),
        (["predict", "--bundle", "BUNDLE", "--precision", "int4", "x.jpg"], "invalid choice"),
    ],
)
def test_usage_and_bundle_errors_exit_2_with_one_line(bundle, monkeypatch, capsys, argv, message):
    monkeypatch.delenv("PLANTML_BUNDLE", raising=False)
    argv = [str(bundle) if a == "BUNDLE" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit from inside parse_args
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert message in err and err.count("\n") <= 2 and "Traceback" not in err


def test_corrupt_bundle_is_refused(bundle, photos, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    with open(broken / "openvino" / "model.bin", "r+b") as fh:
        fh.write(b"\0\0\0\0")
    code, out, err = _run(capsys, "predict", "--bundle", str(broken), str(photos))
    assert code == 2 and out == ""
    assert "sha256 mismatch for openvino/model.bin" in err and len(err.strip().splitlines()) == 1


def test_bench_prints_latency_percentiles_for_every_model(bundle, capsys):
    code, out, _ = _run(capsys, "bench", "--bundle", str(bundle), "--threads", "1", "--runs", "5", "--warmup", "1",
                        "--format", "json")
    assert code == 0
    results = json.loads(out)
    assert {(r["runtime"], r["precision"]) for r in results} == {
        ("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
    }
    for r in results:
        assert r["batch"] == 1 and r["input_size"] == 32 and r["threads"] == 1 and r["runs"] == 5
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
    code, out, _ = _run(capsys, "bench", "--bundle", str(bundle), "--runtime", "onnxruntime", "--precision", "int8",
                        "--runs", "3")
    assert code == 0 and "| onnxruntime | int8 |" in out and "p95 ms" in out and out.count("| onnxruntime") == 1


def test_info_prints_the_bundle_metadata(bundle, capsys):
    code, out, _ = _run(capsys, "info", "--bundle", str(bundle))
    assert code == 0
    info = json.loads(out)
    assert info["classes"] == CLASSES and info["num_classes"] == 3 and info["input"]["size"] == 32
    assert {(m["runtime"], m["precision"]) for m in info["models"] if m["role"] == "model"} >= {("onnxruntime", "int8")}
    assert info["metrics"]["int8_onnxruntime"]["kept"] is True
    assert info["int8"]["gate"]["max_accuracy_drop"] == 0.01
    assert set(info["installed_runtimes"]) == {"openvino", "onnxruntime"}


def test_percentile():
    assert percentile([1, 2, 3, 4, 5], 50) == 3
    assert percentile([1, 2, 3, 4, 5], 100) == 5
    assert percentile([1, 2], 50) == pytest.approx(1.5)


def test_console_script_runs_offline_without_torch(bundle, photos):
    """The real entry point in a fresh process, with torch/timm imports made to fail."""
    script = Path(sys.executable).with_name("plantml-edge")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "edge"]
    blocker = (
        "import sys\n"
        "for m in ('torch', 'torchvision', 'timm', 'metaflow'):\n"
        "    sys.modules[m] = None\n"
    )
    site = photos.parent / "block_torch"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(blocker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO_ROOT)]), "NO_PROXY": "*",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    out = subprocess.run([*cmd, "predict", "--bundle", str(bundle), "--precision", "int8", str(photos)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["label"] for r in rows] == [_expected_label(r["path"]) for r in rows] and len(rows) == 3


# --------------------------------------------------------------------------- issue 17: documented options really act


def test_batch_size_sets_the_inference_batches(bundle, photos, monkeypatch, capsys):
    """``--batch-size N``: the runtime sees batches of at most N images; the results do not change."""
    from edge.runtime import EdgeModel

    seen: list[int] = []
    real = EdgeModel.outputs

    def spy(self, batch):
        seen.append(len(batch))
        return real(self, batch)

    monkeypatch.setattr(EdgeModel, "outputs", spy)
    code, out_default, _ = _run(capsys, "predict", "--bundle", str(bundle), str(photos))
    assert code == 0 and seen == [3], seen
    seen.clear()
    code, out_two, _ = _run(capsys, "predict", "--bundle", str(bundle), "--batch-size", "2", str(photos))
    assert code == 0 and seen == [2, 1], seen
    seen.clear()
    code, out_one, _ = _run(capsys, "predict", "--bundle", str(bundle), "--batch-size", "1", str(photos))
    assert code == 0 and seen == [1, 1, 1], seen

    def labels(out):
        return {r["path"]: r["label"] for r in map(json.loads, out.splitlines())}

    assert labels(out_default) == labels(out_two) == labels(out_one)


@pytest.mark.parametrize("hint, config_hint, reported", [("f32", "f32", "f32"), ("default", None, "default")])
def test_openvino_hint_reaches_openvino(bundle, monkeypatch, capsys, hint, config_hint, reported):
    """``--openvino-hint``: f32 compiles with INFERENCE_PRECISION_HINT=f32, default leaves the plugin's own."""
    import openvino as ov

    configs: list[dict] = []
    real = ov.Core.compile_model

    def spy(self, model, device=None, config=None, *args, **kwargs):
        configs.append(dict(config or {}))
        return real(self, model, device, config or {}, *args, **kwargs)

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    code, out, err = _run(capsys, "bench", "--bundle", str(bundle), "--runtime", "openvino", "--precision", "fp32",
                          "--runs", "2", "--warmup", "0", "--format", "json", "--openvino-hint", hint)
    assert code == 0, err
    assert configs and all(c.get("INFERENCE_PRECISION_HINT") == config_hint for c in configs), configs
    rows = json.loads(out)
    assert [r["openvino_precision_hint"] for r in rows] == [reported]


def test_help_names_every_option(capsys):
    """``--help`` prints each subcommand's options (not only exit 0)."""
    expected = {
        "predict": ["--bundle", "--runtime", "--threads", "--openvino-hint", "--precision", "--format", "--top-k",
                    "--batch-size", "--output", "--no-progress", "PATH"],
        "bench": ["--bundle", "--runtime", "--threads", "--openvino-hint", "--precision", "--runs", "--warmup",
                  "--image", "--format"],
        "info": ["--bundle", "--model-card"],
    }
    for cmd, options in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            main([cmd, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: plantml-edge {cmd}"), text
        missing = [o for o in options if o not in text]
        assert not missing, f"plantml-edge {cmd} --help does not name {missing}:\n{text}"
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert all(c in top for c in ("predict", "bench", "info", "version")), top


# --------------------------------------------------------------------------- the edge student (issue 16)


@pytest.fixture(scope="module")
def student_bundles(tiny_shards, tmp_path_factory):
    """``(bundle with an edge student, bundle whose student failed its gate)`` from the tiny shards."""
    from plantml.pipeline import distill_student
    from tests.test_distill import _teacher, export_with_student, tiny_params

    _, _, index = tiny_shards
    tmp = tmp_path_factory.mktemp("student_cli")
    teacher, ckpt, report = _teacher(index, tmp)
    student = distill_student(tiny_params(), report, teacher, ckpt, index, tmp / "student", progress=False)
    kept, _ = export_with_student(tmp / "kept", tiny_params(**{"student.min_speedup": 0.001,
                                                               "student.max_accuracy_drop": 1.0}),
                                  index, ckpt, student)
    left_out, _ = export_with_student(tmp / "left_out", tiny_params(**{"student.min_speedup": 1000}),
                                      index, ckpt, student)
    return kept, left_out


def test_student_is_the_default_model_when_the_bundle_has_one(student_bundles, photos, capsys):
    kept, _ = student_bundles
    code, out, _ = _run(capsys, "bench", "--bundle", str(kept), "--runs", "3", "--warmup", "1", "--format", "json")
    assert code == 0
    assert {r["model"] for r in json.loads(out)} == {"student"}
    code, out, _ = _run(capsys, "bench", "--bundle", str(kept), "--model", "champion", "--runs", "3", "--warmup", "1",
                        "--format", "json")
    assert code == 0 and {r["model"] for r in json.loads(out)} == {"champion"}
    for which in ([], ["--model", "student"], ["--model", "champion"]):
        code, out, _ = _run(capsys, "predict", "--bundle", str(kept), *which, str(photos))
        assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = _run(capsys, "info", "--bundle", str(kept))
    info = json.loads(out)
    assert info["default_model"] == "student" and info["student"]["kept"] and info["student"]["image_size"] == 16


def test_asking_for_a_student_the_bundle_lacks_is_a_clear_error(student_bundles, bundle, photos, capsys):
    _, left_out = student_bundles
    code, out, _ = _run(capsys, "predict", "--bundle", str(left_out), str(photos))  # default: the champion
    assert code == 0 and len(out.splitlines()) == 3
    code, out, err = _run(capsys, "predict", "--bundle", str(left_out), "--model", "student", str(photos))
    assert code == 2 and out == ""
    assert "has no edge student" in err and "not faster enough" in err and "--model champion" in err
    # a bundle exported before students existed: no block at all
    code, _, err = _run(capsys, "bench", "--bundle", str(bundle), "--model", "student")
    assert code == 2 and "has no edge student (it was exported without one)" in err
