"""``plantml`` command line: run any pipeline stage alone (for DVC stages and shells).

::

    plantml prepare [--data-dir DIR|s3://...]   # -> artifacts/prepared/{index.json,*.tar,manifest.csv,summary.json}
    plantml prepare --data-dir lab=DIR,field=DIR  # several sources, one per domain (see plantml.data)
    plantml train --model cnn                   # -> artifacts/train/cnn/{model.pt,history.json,result.json}
    plantml evaluate                            # -> artifacts/eval/{metrics.json,report.json,plots/}
    plantml distill                             # -> artifacts/student/{model.pt,result.json} (the edge student)
    plantml export --out artifacts/bundle       # -> a bundle directory (atomic), optionally registered
    plantml drift --bundle B --current PATH     # drift report (see docs/drift.md)
    plantml schema [--out params.schema.json]   # the JSON schema of params.yaml (from plantml.config)
    plantml --version

Every command takes ``--params FILE`` and repeatable ``--set key=value`` overrides, reads
the same ``params.yaml`` as the Metaflow flow, and calls the same :mod:`plantml.pipeline`
functions. Errors are one line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from plantml import __version__
from plantml.config import Params, ParamsError, load_params, parse_override, schema_text

log = logging.getLogger("plantml")

EXIT_ERROR = 2
EXIT_GATE = 1


def _load(args: argparse.Namespace, extra: dict | None = None) -> Params:
    overrides = dict(parse_override(s) for s in (args.set or []))
    overrides.update(extra or {})
    return load_params(args.params, overrides)


def _prepared(params: Params):
    """The shard index and dataset summary that ``plantml prepare`` wrote."""
    from plantml.data import DataError, DatasetSummary
    from plantml.pipeline import repo_path
    from plantml.shards import load_index
    from plantml.storage import StorageError

    folder = repo_path(params.data.prepared_dir)
    try:
        index = load_index(str(folder))
        summary = DatasetSummary(**json.loads((folder / "summary.json").read_text()))
    except (StorageError, OSError) as exc:
        raise DataError(f"no prepared data in {folder}: run `plantml prepare` first") from exc
    return index, summary


def cmd_prepare(args: argparse.Namespace) -> int:
    from plantml.pipeline import prepare

    params = _load(args, {"data.data_dir": args.data_dir} if args.data_dir else None)
    summary, index = prepare(params, progress=not args.quiet)
    print(json.dumps({"shards": index.root, "n_images": summary.n_images, "classes": len(summary.classes),
                      "skipped": summary.n_skipped, "is_demo": summary.is_demo,
                      "splits": {s: index.count(s) for s in index.splits}}))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from plantml.pipeline import repo_path, train_branch

    params = _load(args)
    index, _ = _prepared(params)
    names = [args.model] if args.model else list(params.train.models)
    for name in names:
        out = repo_path(params.train.out_dir) / name
        # A checkpoint after every epoch: an interrupted `plantml train` continues where it stopped.
        result = train_branch(params, name, index, out, parallel_branches=1, progress=not args.quiet,
                              checkpoint_uri=str(out / "last_epoch.pt"))
        print(json.dumps({"model": name, "best_epoch": result.best_epoch, "val_macro_f1": result.best_val_macro_f1,
                          "checkpoint": result.checkpoint_path}))
    return 0


def _train_outputs(params: Params) -> tuple[dict, dict]:
    from plantml.pipeline import repo_path

    results, checkpoints = {}, {}
    for name in params.train.models:
        folder = repo_path(params.train.out_dir) / name
        if not (folder / "result.json").is_file():
            raise FileNotFoundError(f"no trained model {name!r} in {folder} (run `plantml train --model {name}`)")
        results[name] = json.loads((folder / "result.json").read_text())
        checkpoints[name] = str(folder / "model.pt")
    return results, checkpoints


def cmd_evaluate(args: argparse.Namespace) -> int:
    from plantml.pipeline import enforce_quality_gates, evaluate_models

    params = _load(args)
    index, summary = _prepared(params)
    results, checkpoints = _train_outputs(params)
    report = evaluate_models(params, results, checkpoints, index, params.evaluate.out_dir, is_demo=summary.is_demo,
                             progress=not args.quiet)
    champ = report["models"][report["champion"]]
    print(json.dumps({"champion": report["champion"], "reason": report["champion_reason"],
                      "accuracy": champ["accuracy"], "macro_f1": champ["macro_f1"]}))
    enforce_quality_gates(params, report)
    return 0


def _report(params: Params) -> dict:
    from plantml.pipeline import repo_path

    report_path = repo_path(params.evaluate.out_dir) / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"no evaluation report at {report_path} (run `plantml evaluate`)")
    return json.loads(report_path.read_text())


def cmd_distill(args: argparse.Namespace) -> int:
    from plantml.pipeline import distill_student, repo_path

    params = _load(args)
    index, _ = _prepared(params)
    results, checkpoints = _train_outputs(params)
    report = _report(params)
    name = report["champion"]
    result = distill_student(params, report, results[name], checkpoints[name], index,
                             repo_path(params.student.out_dir), progress=not args.quiet)
    print(json.dumps({k: result.get(k) for k in ("status", "reason", "arch", "image_size", "teacher", "init",
                                                 "distill_seconds", "metrics", "vs_champion_fp32", "checkpoint")}))
    return 0


def _student_result(params: Params, teacher_checkpoint: str) -> dict | None:
    """What `plantml distill` left for this champion: its result, a stale-student note, or ``None`` (none)."""
    from plantml.bundle import sha256_file
    from plantml.pipeline import repo_path

    path = repo_path(params.student.out_dir) / "result.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    if result.get("teacher_checkpoint_sha256") != sha256_file(teacher_checkpoint):
        return {"status": "stale", "reason": f"{path} was distilled from another champion checkpoint "
                                             "(run `plantml distill` again)"}
    return result


def cmd_export(args: argparse.Namespace) -> int:
    from plantml.export import git_commit
    from plantml.pipeline import enforce_quality_gates, export_champion

    params = _load(args)
    index, summary = _prepared(params)
    results, checkpoints = _train_outputs(params)
    report = _report(params)
    # The report exists even when evaluate failed a gate (it is what the card shows):
    # check the gates again so that a failed champion is never exported or registered.
    enforce_quality_gates(params, report)
    name = report["champion"]
    lineage = {"metaflow_run_id": None, "mlflow_run_id": None, "data_manifest_sha256": summary.manifest_sha256,
               "data_root": summary.root, "git_commit": git_commit(), "produced_by": "plantml export"}
    staging = Path(args.out).resolve().parent / f".staging-{os.getpid()}" if args.out else None
    path, metadata = export_champion(params, report, results[name], checkpoints[name], index, lineage,
                                     out_root=staging, progress=not args.quiet, data_summary=summary.to_dict(),
                                     student=_student_result(params, checkpoints[name]))
    if args.out:
        path = _replace_dir(path, Path(args.out).resolve())
        shutil.rmtree(staging, ignore_errors=True)
    registered = None
    if args.register:
        from plantml.registry import register_bundle

        registered = register_bundle(path, model_name=params.registry.model_name, alias=params.registry.alias,
                                     tracking_uri=params.registry.tracking_uri,
                                     tags={"architecture": metadata["architecture"],
                                           "bundle_version": metadata["version"]})
    student = metadata.get("student", {})
    print(json.dumps({"bundle": str(path), "version": metadata["version"], "champion": name,
                      "registered": registered, "student": {k: student.get(k) for k in ("kept", "reason")}}))
    return 0


def _replace_dir(src: Path, dst: Path) -> Path:
    """Move ``src`` to ``dst``, replacing an older ``dst`` with no moment where neither exists."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def cmd_drift(args: argparse.Namespace) -> int:
    from plantml.drift import run_drift_cli

    return run_drift_cli(args)


def cmd_schema(args: argparse.Namespace) -> int:
    """Print (or write) the JSON schema of params.yaml generated from :mod:`plantml.config`."""
    text = schema_text()
    if args.out:
        tmp = Path(f"{args.out}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``plantml`` argument parser (every option carries a help text; a test checks it)."""
    parser = argparse.ArgumentParser(prog="plantml", description="plant-leaf disease pipeline stages")
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--params", default=None, help="parameter file (default: params.yaml or $PLANTML_PARAMS)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a parameter (repeatable)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("prepare", help="scan, check and split the data; write the manifest")
    common(p)
    p.add_argument("--data-dir", default=None,
                   help="dataset folder or s3:// prefix, or several as DOMAIN=PATH,DOMAIN=PATH (e.g. "
                   "lab=../shared/data/plantvillage-mini,field=../shared/data/field-apple); default: "
                   "data.data_dir, else data.sources, else the DEMO set")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train one model (or all in train.models)")
    common(p)
    p.add_argument("--model", default=None, help="a key of train.models (e.g. cnn, vit)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test metrics, champion, calibration, robustness, quality gates")
    common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("distill", help="distill the champion into the edge student (student section of params)")
    common(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="export the champion (and the edge student, behind its gate) to a bundle")
    common(p)
    p.add_argument("--out", default=None,
                   help="fixed bundle path (replaced atomically); default: export.out_dir/NAME-VERSION")
    p.add_argument("--register", action="store_true", help="register the bundle in the MLflow model registry")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("drift", help="compare what the service saw with the bundle's reference statistics")
    try:
        from plantml.drift import add_drift_arguments

        add_drift_arguments(p)
    except ImportError as exc:  # the drift extra (evidently) is not installed
        p.set_defaults(_drift_unavailable=str(exc))
    p.set_defaults(func=cmd_drift)

    p = sub.add_parser("schema", help="print the JSON schema of params.yaml (generated from plantml.config)")
    p.add_argument("--out", default=None, help="write it to this file (atomically) instead of stdout")
    p.set_defaults(func=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``plantml`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from plantml.bundle import BundleError
    from plantml.data import DataError
    from plantml.evaluation import QualityGateError

    try:
        return int(args.func(args) or 0)
    except QualityGateError as exc:
        print(f"plantml {args.command}: {exc}", file=sys.stderr)
        return EXIT_GATE
    except (ParamsError, DataError, BundleError, FileNotFoundError, ValueError) as exc:
        print(f"plantml {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
