"""The DVC pipeline, run for real on tiny data in a temporary git repository.

The repository's ``dvc.yaml``, ``.dvcignore`` and ``plantml/`` are copied into a fresh
git repo with ``dvc init``; the raw data (a tiny generated dataset) is tracked with
``dvc add data/raw``; ``params.yaml`` is the repository's with tiny settings. Then:

* ``dvc repro`` builds every stage (prepare, train@cnn, train@vit, evaluate, export) and
  the bundle holds the drift reference;
* a second ``dvc repro`` does no work and ``dvc status`` is clean;
* ``dvc dag``, ``dvc metrics show`` and ``dvc plots show`` work;
* ``dvc exp run -S evaluate.min_accuracy=...`` reruns evaluate (and export, its
  downstream) but neither prepare nor training.
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

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VENV_BIN = Path(sys.executable).parent
STAGES = ("prepare", "train@cnn", "train@vit", "evaluate", "export")


def tiny_params() -> dict:
    """The repository's params.yaml with tiny, fast settings (every key stays present:
    dvc.yaml interpolates paths from it)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(data_dir=None, split=[0.6, 0.2, 0.2], max_images_per_class=None)
    params["train"].update(
        image_size=32, batch_size=16, epochs=1, patience=1, num_threads=1, device="cpu",
        models={"cnn": {"arch": "tiny_cnn", "lr": 0.01}, "vit": {"arch": "tiny_cnn", "lr": 0.005}},
    )
    params["evaluate"].update(min_macro_f1=0.0, min_accuracy=0.0)
    params["robustness"].update(severities=[1], max_images=20)
    params["export"]["int8"]["enabled"] = False
    return params


def make_raw_data(root: Path, per_class: int = 15, size: int = 48) -> None:
    for c, (name, rgb) in enumerate(TINY_CLASSES.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng(c * 1000 + i)
            arr = np.array(rgb, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
            Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.jpg", quality=90)


@pytest.fixture
def dvc_repo(tmp_path) -> tuple[Path, dict]:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(REPO_ROOT / ".dvcignore", repo / ".dvcignore")
    shutil.copytree(REPO_ROOT / "plantml", repo / "plantml", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (repo / ".gitignore").write_text("__pycache__/\n")
    make_raw_data(repo / "data" / "raw")
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        # `python -m plantml.cli` in the stages must be this environment's python; the cwd
        # (the temp repo) comes first on sys.path, so the copied code is what runs.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home), "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
        "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"), "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"),
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
        "PYTHONDONTWRITEBYTECODE": "1", "PLANTML_PARAMS": str(repo / "params.yaml"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "data/raw"],
                ["git", "add", "-A"], ["git", "commit", "-qm", "tiny data + pipeline"]):
        run(cmd, repo, env)
    return repo, env


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def test_dvc_repro_is_incremental(dvc_repo):
    repo, env = dvc_repo
    dag = run(["dvc", "dag", "--md"], repo, env)
    for stage in STAGES:
        assert stage in dag

    first = run(["dvc", "repro"], repo, env)
    assert ran(first) == set(STAGES), first[-3000:]
    meta = json.loads((repo / "artifacts" / "bundle" / "metadata.json").read_text())
    assert meta["drift_reference"]["bundle_version"] == meta["version"]
    assert (repo / "artifacts" / "bundle" / "reference_stats.csv").is_file()
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "first repro"], repo, env)

    second = run(["dvc", "repro"], repo, env)
    assert ran(second) == set(), second
    assert skipped(second) == set(STAGES)
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env)

    shown = run(["dvc", "metrics", "show", "--json"], repo, env)
    metrics = json.loads(shown[shown.index("{"):])
    values = next(iter(metrics.values()))["data"]["artifacts/eval/metrics.json"]["data"]  # key "" = workspace
    assert {"accuracy", "macro_f1", "cnn", "vit"} <= set(values)
    plots = run(["dvc", "plots", "show", "-o", str(repo.parent / "plots")], repo, env)
    assert (repo.parent / "plots" / "index.html").is_file(), plots
    html = (repo.parent / "plots" / "index.html").read_text()
    assert "confusion" in html.lower() and "val_macro_f1" in html

    # one evaluation parameter: evaluate and its downstream rerun, data and training do not
    third = run(["dvc", "exp", "run", "-S", "evaluate.min_accuracy=0.01"], repo, env)
    assert {"prepare", "train@cnn", "train@vit"} <= skipped(third), third[-3000:]
    assert "evaluate" in ran(third) and not ran(third) & {"prepare", "train@cnn", "train@vit"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["evaluate"]["min_accuracy"] == 0.01
