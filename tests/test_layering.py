"""The one-way data flow of DESIGN.md, checked on the source and at import time."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

TRAINING_ONLY = {"torch", "torchvision", "timm", "metaflow", "lightning"}
WEB_AND_ORCHESTRATION = {"metaflow", "flask", "gunicorn"}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package,forbidden", [
    ("serving", TRAINING_ONLY), ("edge", TRAINING_ONLY), ("plantml", WEB_AND_ORCHESTRATION),
])
def test_no_forbidden_imports(package, forbidden):
    offenders = {str(p.relative_to(REPO_ROOT)): sorted(imported_roots(p) & forbidden)
                 for p in (REPO_ROOT / package).rglob("*.py") if imported_roots(p) & forbidden}
    assert not offenders, f"{package} must not import {sorted(forbidden)}: {offenders}"


def test_torch_free_modules_do_not_pull_torch():
    """Importing what serving and edge share must not import torch at run time either."""
    code = ("import sys; import plantml, plantml.config, plantml.bundle, plantml.preprocess, plantml.imagestats;"
            "bad=[m for m in ('torch','timm','metaflow','mlflow') if m in sys.modules];"
            "print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _lint_imports() -> str:
    """The ``lint-imports`` script of this interpreter's environment (the dev extra installs it)."""
    beside = Path(sys.executable).with_name("lint-imports")
    found = str(beside) if beside.is_file() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports not found: install the dev extra (pip install -e '.[dev]' -c constraints.txt)")
    return found


def test_import_contracts_hold():
    """The import-linter contracts in setup.cfg: inference is torch-free, edge is offline, the flow is one-way."""
    proc = subprocess.run([_lint_imports(), "--no-cache"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_shared_runtime_imports_light():
    """What the edge binary and every gunicorn worker import first pulls no data-science stack in.

    import-linter cannot say this: it follows imports inside function bodies (plantml.ood
    fits its OOD model with scikit-learn, lazily), while this is about what importing costs.
    """
    heavy = ("torch", "timm", "metaflow", "mlflow", "pandas", "sklearn", "scipy", "matplotlib", "flask",
             "onnxruntime", "openvino")
    code = ("import sys; import plantml.runtime, plantml.ood, edge.runtime;"
            f"bad=[m for m in {heavy!r} if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


#: One job per module (issue 15): the size limits the product code is held to.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
PRODUCT_DIRS = ("plantml", "serving", "edge", "flows", "benchmarks", "scripts")


def _oversized(path: Path) -> list[str]:
    """``path`` itself if over the module limit, and each function in it over the function limit."""
    source = path.read_text()
    found = [f"{path} ({source.count(chr(10))} lines)"] if source.count("\n") > MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_modules_and_functions_stay_small():
    """No product module over 400 lines, no function over 60 (def line to last line, docstring included)."""
    files = [p for d in PRODUCT_DIRS for p in sorted((REPO_ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    oversized = [item for p in files for item in _oversized(p)]
    assert not oversized, "split these (docs/architecture.md):\n" + "\n".join(oversized)
