"""The DVC pipeline, run for real in a copy of this checkout (issue 14).

The copy holds what a fresh clone holds: the files git tracks (plus new, not yet ignored
ones, so uncommitted work is tested too), nothing git ignores, so no data, no DVC cache
and no ``dvc.lock``. The committed ``.dvc/`` makes it a DVC repository as it is. The only
change is a params override committed in the copy (tiny settings: 32 px, one epoch,
``tiny_cnn`` for both models, INT8 off), with ``data.data_dir`` left null: the built-in
DEMO data. Then:

* ``dvc repro`` runs every stage and ``dvc metrics show`` prints the champion's metrics;
* a second ``dvc repro`` runs nothing and ``dvc status`` is clean;
* changing ``train.models.vit.lr`` reruns ``train@vit``, evaluate, distill and export only;
* ``dvc add data/raw`` + ``data.data_dir: data/raw`` makes ``prepare`` read the real-data path;
* ``dvc push`` reaches the committed default (local) remote.

A unit test checks that the files the flow publishes as "latest" are the ones
``dvc.yaml`` declares.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import REPO_ROOT, TINY_CLASSES

VENV_BIN = Path(sys.executable).parent
STAGES = {"prepare", "train@cnn", "train@vit", "evaluate", "distill", "export"}


def tiny_params(params: dict) -> dict:
    """The repository's params with tiny, fast settings (every key stays: dvc.yaml interpolates them)."""
    params["data"].update(data_dir=None, demo_classes=3, demo_images_per_class=10, demo_image_size=32,
                          split=[0.6, 0.2, 0.2], max_images_per_class=None)
    params["train"].update(
        image_size=32, batch_size=16, epochs=1, patience=1, num_threads=1, loader_workers=0, device="cpu",
        models={"cnn": {"arch": "tiny_cnn", "lr": 0.01}, "vit": {"arch": "tiny_cnn", "lr": 0.005}},
    )
    params["evaluate"].update(min_macro_f1=0.0, min_accuracy=0.0)
    params["robustness"].update(severities=[1], max_images=20)
    params["export"]["int8"]["enabled"] = False
    # a real (tiny) edge student: distilled, exported into student/ or left out with the reason
    params["student"].update(arch="tiny_cnn", image_size=16, epochs=1, frozen_blocks=0)
    return params


def checkout_files() -> list[str]:
    """What a clone of this working tree holds: tracked files plus new files git does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO_ROOT / f).is_file()]


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def edit_params(repo: Path, change) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    change(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def clone(tmp_path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    for rel in checkout_files():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, repo / rel)
    assert (repo / ".dvc" / "config").is_file(), ".dvc/ must be committed (dvc init)"
    assert not (repo / "dvc.lock").exists() and not (repo / "data" / "raw").exists()
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        # `python -m plantml.cli` in the stages must be this environment's python; the cwd
        # (the copy) comes first on sys.path, so the copy's code is what runs.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home), "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"), "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for var in ("MLFLOW_TRACKING_URI", "PLANTML_PARAMS"):
        env.pop(var, None)
    edit_params(repo, tiny_params)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "clone + tiny params"]):
        run(cmd, repo, env)
    return repo, env


@pytest.mark.integration
@pytest.mark.slow
def test_dvc_repro_in_a_copy_of_the_checkout(clone):
    repo, env = clone
    dag = run(["dvc", "dag", "--md"], repo, env)
    assert all(stage in dag for stage in STAGES), dag

    first = run(["dvc", "repro"], repo, env)
    assert ran(first) == STAGES, first[-3000:]
    summary = json.loads((repo / "artifacts" / "prepared" / "summary.json").read_text())
    assert summary["is_demo"] is True
    assert (repo / "artifacts" / "bundle" / "metadata.json").is_file()
    student = json.loads((repo / "artifacts" / "bundle" / "metadata.json").read_text())["student"]
    assert student["status"] in ("kept", "rejected") and student["reason"], student
    assert (repo / "artifacts" / "bundle" / "student").is_dir() == student["kept"]

    shown = run(["dvc", "metrics", "show"], repo, env)
    assert "artifacts/eval/metrics.json" in shown and "macro_f1" in shown and "champion" in shown, shown
    as_json = run(["dvc", "metrics", "show", "--json"], repo, env)
    values = next(iter(json.loads(as_json[as_json.index("{"):]).values()))["data"]
    metrics = values["artifacts/eval/metrics.json"]["data"]
    assert {"champion", "accuracy", "macro_f1", "cnn", "vit"} <= set(metrics)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "first repro"], repo, env)

    second = run(["dvc", "repro"], repo, env)
    assert ran(second) == set() and skipped(second) == STAGES, second[-3000:]
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env)

    # one model's learning rate: that model retrains, then evaluate, the student and export; nothing else
    edit_params(repo, lambda p: p["train"]["models"]["vit"].update(lr=0.002))
    third = run(["dvc", "repro"], repo, env)
    assert ran(third) == {"train@vit", "evaluate", "distill", "export"}, third[-3000:]
    assert {"prepare", "train@cnn"} <= skipped(third)

    # the default remote committed in .dvc/config (a local folder beside the checkout) works
    run(["dvc", "push"], repo, env)
    assert any((repo.parent / "plantml-dvc-store").rglob("*"))

    # real data: `dvc add data/raw` + data.data_dir: data/raw -> prepare reads it
    make_raw_data(repo / "data" / "raw")
    run(["dvc", "add", "-q", "data/raw"], repo, env)
    edit_params(repo, lambda p: p["data"].update(data_dir="data/raw"))
    status = run(["dvc", "status", "prepare"], repo, env)
    assert "changed deps" in status and "data" in status, status
    fourth = run(["dvc", "repro", "prepare"], repo, env)
    assert ran(fourth) == {"prepare"}, fourth[-3000:]
    summary = json.loads((repo / "artifacts" / "prepared" / "summary.json").read_text())
    assert summary["is_demo"] is False and summary["n_images"] == 3 * 12


def make_raw_data(root: Path, per_class: int = 12, size: int = 40) -> None:
    for c, (name, rgb) in enumerate(TINY_CLASSES.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng(c * 1000 + i)
            arr = np.array(rgb, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=90)


def test_flow_publishes_the_files_dvc_declares(tmp_path):
    """`publish_latest_evaluation` (the flow's evaluate step) writes exactly dvc.yaml's metrics and eval plots."""
    from plantml.config import load_params
    from plantml.pipeline import DVC_EVAL_FILES, publish_latest_evaluation

    out_dir = load_params().evaluate.out_dir
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    declared = {next(iter(m)).replace("${evaluate.out_dir}", out_dir) for m in dvc["stages"]["evaluate"]["metrics"]}
    for plot in dvc["plots"]:
        y = plot if isinstance(plot, str) else next(iter(plot.values())).get("y")
        declared |= {y} if isinstance(y, str) else set(y or {})
    in_eval = {p[len(out_dir) + 1:] for p in declared if p.startswith(out_dir + "/")}
    assert in_eval == set(DVC_EVAL_FILES)

    run_dir = tmp_path / "eval" / "run-1"
    for rel in DVC_EVAL_FILES:
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_text(rel)
    written = publish_latest_evaluation(run_dir, tmp_path / "eval")
    assert [p.relative_to(tmp_path / "eval").as_posix() for p in written] == list(DVC_EVAL_FILES)
    assert (tmp_path / "eval" / "metrics.json").read_text() == "metrics.json"
    assert not list((tmp_path / "eval").rglob(".*.tmp-*"))
