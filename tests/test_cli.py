"""The `plantml` CLI: bad input gives one line naming the problem and a non-zero exit, no traceback."""

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, make_leaf_image


def run_cli(*args, env_extra=None, cwd=None):
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "plantml.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO_ROOT, env=env, timeout=300)


def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_dir(tmp_path):
    proc = run_cli("prepare", "--data-dir", str(tmp_path / "missing"), "--set",
                   f"data.prepared_dir={tmp_path / 'prep'}")
    _assert_one_line_error(proc, "data directory not found")
    assert not (tmp_path / "prep").exists()


def test_single_class_folder(tmp_path):
    (tmp_path / "data" / "OnlyClass").mkdir(parents=True)
    for i in range(4):
        make_leaf_image((10, 100, 10), seed=i).save(tmp_path / "data" / "OnlyClass" / f"{i}.png")
    proc = run_cli("prepare", "--data-dir", str(tmp_path / "data"), "--set", f"data.prepared_dir={tmp_path / 'prep'}")
    _assert_one_line_error(proc, "need at least 2 class folders")


def test_unknown_parameter_key():
    proc = run_cli("prepare", "--set", "train.epoch=3")
    _assert_one_line_error(proc, "unknown parameter train.epoch")


def test_train_without_prepare(tmp_path):
    proc = run_cli("train", "--set", f"data.prepared_dir={tmp_path}")
    _assert_one_line_error(proc, "no prepared data in")


def test_prepare_reports_skips(tiny_dataset, tmp_path):
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    (data / "Tomato___healthy" / "junk.jpg").write_bytes(b"not a jpeg")
    proc = run_cli("prepare", "-q", "--data-dir", str(data), "--set", f"data.prepared_dir={tmp_path / 'prep'}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"] == 1 and out["n_images"] == 60 and out["is_demo"] is False
    assert "skipped 1 unreadable" in proc.stderr


COMMON_OPTIONS = ["--params", "--set", "--quiet"]


@pytest.mark.parametrize("cmd, options", [
    ("prepare", [*COMMON_OPTIONS, "--data-dir"]),
    ("train", [*COMMON_OPTIONS, "--model"]),
    ("evaluate", COMMON_OPTIONS),
    ("export", [*COMMON_OPTIONS, "--out", "--register"]),
    ("drift", ["--bundle", "--current", "--report", "--json", "--summary-out"]),
    ("schema", ["--out"]),
])
def test_help(cmd, options):
    """``--help`` exits 0 and its text names the command's options with their help (not only exit 0)."""
    from plantml.cli import build_parser

    proc = run_cli(cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith(f"usage: plantml {cmd}"), text
    missing = [o for o in options if o not in text]
    assert not missing, f"plantml {cmd} --help does not name {missing}:\n{text}"
    # every option's own help sentence is printed, not just its name
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for action in sub.choices[cmd]._actions:
        if action.help and action.option_strings and action.option_strings[-1] != "--help":
            first_words = " ".join(action.help.split()[:3]).split("%")[0].strip()
            assert first_words in " ".join(text.split()), (action.option_strings, first_words)


def test_top_level_help_lists_every_command():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("prepare", "train", "evaluate", "export", "drift", "schema"):
        assert f"    {cmd}" in proc.stdout, proc.stdout


def _walk_actions(parser, path="plantml"):
    """Every (command path, action) of the parser and its subparsers."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk_actions(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help():
    """Issue 14: help text on every CLI option of every subcommand (drift's options included)."""
    import argparse

    from plantml.cli import build_parser

    actions = list(_walk_actions(build_parser()))
    commands = {path for path, _ in actions}
    assert {"plantml prepare", "plantml train", "plantml evaluate", "plantml export", "plantml drift",
            "plantml schema"} <= commands
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in actions
               if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert not missing, f"options without help: {missing}"


def test_version():
    from plantml import __version__

    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"plantml {__version__}"


def test_schema_command_writes_the_checked_in_schema(tmp_path):
    from plantml.config import SCHEMA_PATH

    out = tmp_path / "schema.json"
    assert run_cli("schema", "--out", str(out)).returncode == 0
    assert out.read_text() == SCHEMA_PATH.read_text()


def test_bad_param_value_is_one_line(tmp_path):
    proc = run_cli("prepare", "--set", "train.models.cnn.arch=resnet9000")
    _assert_one_line_error(proc, "train.models.cnn.arch must be one of")
