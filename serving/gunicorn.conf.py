"""Gunicorn configuration of the prediction service.

    gunicorn -c serving/gunicorn.conf.py serving.wsgi:app     # or: plantml-serve --bundle PATH

Every value comes from :class:`serving.settings.Settings` (environment variables).

* No ``preload_app``: the model is built in each worker *after* the fork
  (``post_fork``), with ``PLANTML_THREADS`` (default ``cores // workers``) inference
  threads, so workers neither share native runtime state across a fork nor fight over
  every core.
* ``gthread`` workers: ``PLANTML_HTTP_THREADS`` request threads per worker, so ``/health``
  and ``/metrics`` answer while an inference runs; inference itself is serialised per
  worker by the predictor.
* Prometheus multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set here (a fresh
  temporary folder unless given) *before* any worker imports ``prometheus_client``, wiped
  once at start, and ``child_exit`` marks dead workers.
* A registry model (``PLANTML_MODEL_URI``) is downloaded once by the master, in a child
  process, and handed to the workers.
* SIGTERM: gunicorn stops accepting, lets in-flight requests finish for up to
  ``PLANTML_GRACEFUL_TIMEOUT`` seconds, then exits.
* Hostile clients: the worker class (:mod:`serving.worker`) reads each whole request in
  its event loop with a total deadline (``PLANTML_READ_TIMEOUT``) before a request thread
  sees it; workers are recycled after ``PLANTML_MAX_REQUESTS`` (+ jitter) requests, and
  glibc is told to keep few arenas and to return large blocks (``serving.limits``).
* A worker that cannot load the model stops the server only at first boot. Later (a
  respawn after the bundle changed on disk), it logs, stays up unready and retries; the
  other workers keep serving and ``/ready`` reports the server not ready meanwhile.
"""

# NOTE: gunicorn exec()s this file; names below that match gunicorn settings are settings.
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serving.settings import Settings, SettingsError

try:
    _settings = Settings.from_env()
    _settings.require_model_source()
except SettingsError as _exc:
    sys.stderr.write(f"plantml-serve: configuration error: {_exc}\n")
    sys.exit(2)

# Must happen before prometheus_client is imported anywhere (it picks its storage then).
_OWN_METRICS_DIR = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _OWN_METRICS_DIR = tempfile.mkdtemp(prefix="plantml-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _OWN_METRICS_DIR

bind = _settings.binds
workers = _settings.workers
worker_class = "serving.worker.BufferingThreadWorker"
worker_connections = _settings.max_connections
threads = _settings.http_threads
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests_jitter if _settings.max_requests else 0
timeout = _settings.timeout
graceful_timeout = _settings.graceful_timeout
keepalive = 5
preload_app = False
loglevel = _settings.log_level
errorlog = "-"
accesslog = "-" if _settings.access_log else None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
proc_name = "plantml-serve"
# A per-user control socket would collide between two servers on one host (tests, blue/green).
control_socket_disable = True
# The heartbeat file on tmpfs: a disk-backed /tmp can stall workers into timeouts (Docker, K8s).
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    worker_tmp_dir = "/dev/shm"


def on_starting(server):
    """Master, once: logging, fresh metrics folder, model download and a fail-fast bundle check."""
    logging.basicConfig(
        level=_settings.log_level.upper(), stream=sys.stderr,
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s",
    )
    from serving.limits import tune_malloc
    from serving.metrics import prepare_multiproc_dir

    tune_malloc()  # inherited by the workers; MALLOC_ARENA_MAX in the environment does it earlier still
    prepare_multiproc_dir(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))
    from serving.predictor import FETCHED_BUNDLE_ENV

    if _settings.model_uri:
        server.log.info("fetching %s from the MLflow registry", _settings.model_uri)
        proc = subprocess.run(
            [sys.executable, "-m", "serving.fetch", _settings.model_uri, str(_settings.model_cache)],
            capture_output=True, text=True,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            why = proc.stderr.strip()[-2000:] or f"the fetch printed no bundle path (exit status {proc.returncode})"
            server.log.error("cannot fetch %s: %s", _settings.model_uri, why)
            sys.exit(4)
        os.environ[FETCHED_BUNDLE_ENV] = lines[-1]
        server.log.info("bundle downloaded to %s", os.environ[FETCHED_BUNDLE_ENV])
    else:
        os.environ.pop(FETCHED_BUNDLE_ENV, None)
    from plantml.bundle import BundleError, load_bundle

    bundle_dir = _settings.bundle or Path(os.environ[FETCHED_BUNDLE_ENV])
    try:
        bundle = load_bundle(bundle_dir, verify=True, expected_metadata_sha256=_settings.bundle_sha256)
    except BundleError as exc:
        server.log.error("refusing to start: %s", exc)
        sys.exit(4)
    server.log.info(
        "serving %s %s from %s: %d workers x %d inference thread(s), runtime %s, precision %s",
        bundle.name, bundle.version, bundle.root, _settings.workers, _settings.threads,
        _settings.runtime, _settings.precision,
    )


def post_fork(server, worker):
    """Worker, after the fork: build this worker's predictor.

    At first boot a failure stops the server (exit 3 is gunicorn's WORKER_BOOT_ERROR: the
    master halts with the reason in the log instead of respawning forever). Once any
    worker has served, a failure must not take the healthy workers down with it: this
    worker stays up unready and retries (``serving.app``), and ``/ready`` says 503.
    """
    from serving.limits import tune_malloc
    from serving.predictor import (ModelLoadError, build_predictor, first_boot_done, mark_booted,
                                   set_worker_load_error, set_worker_predictor)

    tune_malloc()
    try:
        set_worker_predictor(build_predictor(Settings.from_env()))
    except (ModelLoadError, SettingsError) as exc:
        if not first_boot_done():
            server.log.error("worker %s cannot load the model: %s", worker.pid, exc)
            sys.exit(3)
        server.log.error("worker %s cannot load the model: %s; it stays up unready and retries, the other "
                         "workers keep serving", worker.pid, exc)
        set_worker_load_error(str(exc))
        return
    mark_booted()


def post_worker_init(worker):
    """Worker, ready to serve: make SIGTERM close idle keep-alive connections at once; a cheaper heartbeat."""
    _reap_idle_connections_on_shutdown(worker)
    _throttle_heartbeat(worker)


#: Seconds between two heartbeats of a worker (gunicorn's default: one per main-loop turn).
HEARTBEAT_EVERY_S = 1.0


def _throttle_heartbeat(worker, every=HEARTBEAT_EVERY_S):
    """gunicorn's gthread loop tells the master it is alive on *every* turn (a ``utime`` of
    its heartbeat file), i.e. about once per request under load: 4-6 % of a busy worker's
    samples in the issue-16 profile (docs/serving.md). Once a second is plenty against a
    ``PLANTML_TIMEOUT`` of tens of seconds; a worker that stops turning still stops
    beating and is killed after the same timeout.
    """
    notify = getattr(worker, "notify", None)
    if notify is None:
        return
    last = [float("-inf")]

    def notify_at_most_every():
        now = time.monotonic()
        if now - last[0] >= every:
            last[0] = now
            notify()

    worker.notify = notify_at_most_every


def _reap_idle_connections_on_shutdown(worker):
    """Workaround for gunicorn's gthread worker (checked on 26.2): during graceful shutdown
    it waits on its poller for up to ``graceful_timeout`` and only then expires idle
    keep-alive connections, so one idle client (a Prometheus scraper, a browser) holds
    the pod in Terminating for the whole grace period. Idle connections carry no request:
    expire them as soon as shutdown starts. In-flight requests are untouched. A no-op on
    worker classes without these internals; tests/test_serving_gunicorn.py checks it.
    """
    wait = getattr(worker, "wait_for_and_dispatch_events", None)
    if wait is None or not hasattr(worker, "keepalived_conns") or not hasattr(worker, "murder_keepalived"):
        return

    def wait_then_reap(timeout):
        if not worker.alive:
            for conn in list(worker.keepalived_conns) + list(getattr(worker, "pending_conns", ())):
                conn.timeout = 0
            timeout = min(timeout, 0.25)
        return wait(timeout)

    worker.wait_for_and_dispatch_events = wait_then_reap


def worker_exit(server, worker):
    """Worker, on the way out: write what the drift feed still holds."""
    from serving.predictor import set_worker_load_error

    set_worker_load_error(None)  # an unready worker that leaves no longer holds the server unready
    app = getattr(worker, "wsgi", None)
    state = getattr(app, "extensions", {}).get("plantml") if app is not None else None
    if state is not None and state.drift is not None:
        state.drift.close()


def on_exit(server):
    """Master, at shutdown: remove the metrics folder if this config created it."""
    if _OWN_METRICS_DIR and os.environ.get("PROMETHEUS_MULTIPROC_DIR") == _OWN_METRICS_DIR:
        import shutil

        shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)


def child_exit(server, worker):
    """Master: a worker died; drop its live gauges and any unready mark it left."""
    from serving.metrics import mark_worker_dead
    from serving.predictor import forget_unready_worker

    mark_worker_dead(worker.pid)
    forget_unready_worker(worker.pid)
