"""``plantml-serve``: start the prediction service under gunicorn.

    plantml-serve --bundle artifacts/bundles/latest              # port 8000, 2 workers
    plantml-serve --model-uri models:/plantml-leaf@champion --port 9000 --workers 4
    plantml-serve --bundle PATH --check                          # validate and exit

Options are turned into the ``PLANTML_*`` environment variables that
``serving/gunicorn.conf.py`` reads (options win over variables already set), validated
here so that a typo is reported before any process starts, and then this process is
replaced by ``python -m gunicorn -c serving/gunicorn.conf.py serving.wsgi:app``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from serving.settings import LOG_LEVELS, PRECISIONS, RUNTIMES, Settings, SettingsError

CONFIG_PATH = Path(__file__).resolve().parent / "gunicorn.conf.py"

#: option dest -> environment variable
OPTION_ENV = {
    "bundle": "PLANTML_BUNDLE",
    "model_uri": "PLANTML_MODEL_URI",
    "runtime": "PLANTML_RUNTIME",
    "precision": "PLANTML_PRECISION",
    "host": "PLANTML_HOST",
    "port": "PLANTML_PORT",
    "workers": "PLANTML_WORKERS",
    "threads": "PLANTML_THREADS",
    "http_threads": "PLANTML_HTTP_THREADS",
    "max_upload_mb": "PLANTML_MAX_UPLOAD_MB",
    "max_images": "PLANTML_MAX_IMAGES",
    "top_k": "PLANTML_TOP_K",
    "log_level": "PLANTML_LOG_LEVEL",
    "drift_log": "PLANTML_DRIFT_LOG",
    "drift_summary": "PLANTML_DRIFT_SUMMARY",
}


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (every option maps to a ``PLANTML_*`` variable)."""
    p = argparse.ArgumentParser(
        prog="plantml-serve",
        description="Serve a plantml bundle over HTTP (gunicorn + Flask, Prometheus metrics at /metrics).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", help="bundle directory (PLANTML_BUNDLE)")
    src.add_argument("--model-uri", help="MLflow registry URI, e.g. models:/NAME@champion (PLANTML_MODEL_URI)")
    p.add_argument("--runtime", choices=RUNTIMES, help="inference runtime (PLANTML_RUNTIME, default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="model precision (PLANTML_PRECISION, default fp32)")
    p.add_argument("--host", help="bind address (PLANTML_HOST, default 0.0.0.0)")
    p.add_argument("--port", help="bind port (PLANTML_PORT, default 8000)")
    p.add_argument("--workers", help="worker processes (PLANTML_WORKERS, default 2)")
    p.add_argument("--threads", help="inference threads per worker (PLANTML_THREADS, default cores // workers)")
    p.add_argument("--http-threads", help="request threads per worker (PLANTML_HTTP_THREADS, default 2)")
    p.add_argument("--max-upload-mb", help="request body limit in MB (PLANTML_MAX_UPLOAD_MB, default 10)")
    p.add_argument("--max-images", help="images per request (PLANTML_MAX_IMAGES, default 32)")
    p.add_argument("--top-k", help="classes per prediction (PLANTML_TOP_K, default 5)")
    p.add_argument("--log-level", choices=LOG_LEVELS, help="log level (PLANTML_LOG_LEVEL, default info)")
    p.add_argument("--drift-log", help="append drift statistics to this JSON-lines file (PLANTML_DRIFT_LOG)")
    p.add_argument("--drift-summary", help="drift job summary JSON to export as gauges (PLANTML_DRIFT_SUMMARY)")
    p.add_argument("--check", action="store_true", help="validate settings and the bundle, then exit")
    return p


def environment_for(args: argparse.Namespace, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment gunicorn is started with: ``base`` plus the given options."""
    env = dict(os.environ if base is None else base)
    for dest, var in OPTION_ENV.items():
        value = getattr(args, dest, None)
        if value is not None:
            env[var] = str(Path(value).resolve()) if dest == "bundle" else str(value)
            if dest == "bundle":
                env.pop("PLANTML_MODEL_URI", None)
            if dest == "model_uri":
                env.pop("PLANTML_BUNDLE", None)
    return env


def main(argv: list[str] | None = None) -> int:
    """Validate the options, then exec gunicorn (returns only on error or ``--check``)."""
    args = build_parser().parse_args(argv)
    env = environment_for(args)
    try:
        settings = Settings.from_env(env)
        settings.require_model_source()
    except SettingsError as exc:
        print(f"plantml-serve: {exc}", file=sys.stderr)
        return 2
    # The gunicorn master verifies the bundle again before forking (and fails with the
    # same message); here only --check pays for hashing it, to keep start-up fast.
    if args.check and settings.bundle is not None:
        from plantml.bundle import BundleError, load_bundle

        try:
            bundle = load_bundle(settings.bundle, verify=True)
        except BundleError as exc:
            print(f"plantml-serve: {exc}", file=sys.stderr)
            return 2
        if settings.runtime != "auto" and (settings.runtime, settings.precision) not in bundle.available():
            have = ", ".join(f"{r}/{p}" for r, p in bundle.available())
            print(f"plantml-serve: bundle has no {settings.runtime} {settings.precision} model (available: {have})",
                  file=sys.stderr)
            return 2
    if args.check:
        print(f"ok: would serve {settings.bundle or settings.model_uri} on {settings.bind} "
              f"with {settings.workers} workers x {settings.threads} inference thread(s)")
        return 0
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(CONFIG_PATH), "serving.wsgi:app"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
