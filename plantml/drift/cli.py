"""The ``plantml drift`` command (also ``python -m plantml.drift``).

Registered by :mod:`plantml.cli` as ``plantml drift``::

    plantml drift --bundle artifacts/bundle --current /var/log/plantml/drift \\
        --report reports/drift.html --json reports/drift.json --summary-out reports/drift_summary.json

Prints the JSON summary. Only a conclusive result is written to ``--summary-out``, the
file serving exports as the ``plantml_drift_share`` / ``plantml_drift_detected`` gauges,
so a failed run never overwrites the last real answer (its ``created_at`` shows how old
it is). Exit codes: 0 no drift, 1 drift (retrain recommended), 2 error or not enough data.

The only part of :mod:`plantml.drift` that reads ``params.yaml`` (:mod:`plantml.config`),
which is why the package loads it on first use only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any, Iterable

from plantml.config import ParamsError, load_params, parse_override
from plantml.drift.analysis import analyse, exit_code, write_summary
from plantml.drift.schema import EXIT_ERROR, DriftError

log = logging.getLogger(__name__)

DESCRIPTION = "Data drift: the bundle's reference statistics against what the service sees."


def add_drift_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``plantml drift`` arguments to a (sub)parser."""
    parser.add_argument("--bundle", required=True, help="exported bundle directory (holds reference_stats.csv)")
    parser.add_argument(
        "--current", required=True,
        help="the service's drift log: a .jsonl file, a glob, or a directory of *.jsonl*; or a folder of images",
    )
    parser.add_argument("--report", default=None, help="write the Evidently HTML report here")
    parser.add_argument("--json", dest="json_out", default=None, help="write the Evidently JSON report here")
    parser.add_argument(
        "--summary-out", default=None,
        help="write the summary here (serving exports it via PLANTML_DRIFT_SUMMARY); only conclusive results",
    )
    if not any(a.dest == "params" for a in parser._actions):
        parser.add_argument("--params", default=None, help="params.yaml (default: $PLANTML_PARAMS or the repo's)")
    if not any(a.dest == "set" for a in parser._actions):
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="override a parameter, e.g. --set drift.threshold_share=0.3")


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The summary of one run, or an ``"error"`` summary naming what went wrong."""
    try:
        overrides = dict(parse_override(s) for s in (getattr(args, "set", None) or []))
        params = load_params(getattr(args, "params", None), overrides).drift
        return analyse(
            args.bundle, args.current, params,
            report_html=getattr(args, "report", None), report_json=getattr(args, "json_out", None),
        )
    except (DriftError, ParamsError) as exc:
        log.error("%s", exc)
        return {
            "status": "error", "error": str(exc), "drift_detected": None, "drift_share": None,
            "retrain_recommended": False, "created_at": datetime.now(timezone.utc).isoformat(),
        }


def run_drift_cli(args: argparse.Namespace) -> int:
    """Run ``plantml drift``: print the JSON summary, write reports, return the exit code."""
    summary = _run(args)
    # The summary on stdout is the command's result for scripts to parse; logs go to stderr.
    print(json.dumps(summary, indent=1, default=str))
    sys.stdout.flush()
    code = exit_code(summary)
    summary_out = getattr(args, "summary_out", None)
    if summary_out and code != EXIT_ERROR:
        write_summary(summary, summary_out)
    elif summary_out:
        log.warning("no verdict: %s left unchanged", summary_out)
    return code


def main(argv: Iterable[str] | None = None) -> int:
    """Stand-alone entry point (``python -m plantml.drift``), same as ``plantml drift``."""
    parser = argparse.ArgumentParser(prog="plantml drift", description=DESCRIPTION)
    add_drift_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return run_drift_cli(parser.parse_args(list(argv) if argv is not None else None))
