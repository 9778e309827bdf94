"""The servers under test of ``benchmarks/serve_load.py``, each a gunicorn process on 127.0.0.1.

:class:`Server` starts a command in its own session, measures start-to-ready (``/ready`` or
``/health`` first answering 200, and every worker having logged its model load), reads the
workers' memory from ``/proc`` and stops it with SIGTERM. :func:`our_server` builds the
service's command and environment, :func:`baseline_server` the Flask + torch-eager baseline.

The tests have their own harness (``tests/support/serving.py``): benchmarks never import
``tests/``, and the two measure different things (this one times start-up and serves the
torch baseline; the tests' one confines workers in a memory cgroup).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GUNICORN_CONF = REPO_ROOT / "serving" / "gunicorn.conf.py"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children_of(pid: int) -> list[int]:
    """Child process ids of ``pid`` (from /proc): the gunicorn workers of a master."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return sorted(kids)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and PSS (proportional set size: shared pages split between sharers) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss_mb"] = int(line.split()[1]) / 1024
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class Server:
    """One server under test: ours (runtime/precision) or the torch baseline."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], port: int, workers: int, log_path: Path,
                 loaded_marker: str | None) -> None:
        self.name, self.cmd, self.env, self.port, self.workers = name, cmd, env, port, workers
        self.log_path, self.loaded_marker = log_path, loaded_marker
        self.proc: subprocess.Popen | None = None

    def start(self, ready_path: str, timeout: float = 180) -> dict[str, float]:
        """Start the server; seconds until ``ready_path`` answers 200 and until every worker loaded.

        Raises:
            RuntimeError: the server exited, or was not ready within ``timeout`` seconds.
        """
        import requests

        self._log = open(self.log_path, "wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=str(REPO_ROOT), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        first_ready = all_loaded = None
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-3000:]}")
            if first_ready is None:
                try:
                    if requests.get(f"http://127.0.0.1:{self.port}{ready_path}", timeout=5).status_code == 200:
                        first_ready = time.monotonic() - t0
                except requests.RequestException:
                    pass
            if all_loaded is None and self.loaded_marker:
                if self.log_path.read_text(errors="replace").count(self.loaded_marker) >= self.workers:
                    all_loaded = time.monotonic() - t0
            if first_ready is not None and (all_loaded is not None or not self.loaded_marker):
                break
            time.sleep(0.02)
        if first_ready is None:
            raise RuntimeError(f"{self.name} not ready after {timeout}s: {self.log_path.read_text()[-3000:]}")
        return {"start_to_ready_s": first_ready, "start_to_all_workers_loaded_s": all_loaded}

    def worker_memory(self) -> list[dict[str, float]]:
        """VmRSS and PSS of each worker process."""
        return [memory_mb(pid) for pid in children_of(self.proc.pid)]

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to the whole session after 60 s."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def our_server(runtime: str, precision: str, bundle: Path, workers: int, tmp: Path) -> Server:
    """The service (``serving/gunicorn.conf.py``) on ``bundle`` with one runtime and precision."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PLANTML_", "PROMETHEUS_"))}
    env.update({
        "PYTHONPATH": str(REPO_ROOT), "PLANTML_BUNDLE": str(bundle), "PLANTML_RUNTIME": runtime,
        "PLANTML_PRECISION": precision, "PLANTML_HOST": "127.0.0.1", "PLANTML_PORT": str(port),
        "PLANTML_WORKERS": str(workers), "PLANTML_ACCESS_LOG": "false", "PLANTML_LOG_LEVEL": "info",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp / f"prom-{runtime}-{precision}"),
    })
    cmd = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "serving.wsgi:app"]
    return Server(f"{runtime}:{precision}", cmd, env, port, workers, tmp / f"server-{runtime}-{precision}.log",
                  loaded_marker="serving.predictor: model ")


def baseline_server(weights: Path, workers: int, tmp: Path, torch_threads: int | None = None,
                    arch: str = "efficientnet_lite0", n_classes: int = 18, size: int = 224) -> Server:
    """The torch baseline: torch's default threads, or ``torch_threads`` per worker (``torch:baseline1``).

    ``arch``, ``n_classes`` and ``size`` come from the served bundle, so both serve the same model.
    """
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), BASELINE_WEIGHTS=str(weights),
               BASELINE_ARCH=arch, BASELINE_CLASSES=str(n_classes), BASELINE_SIZE=str(size))
    env.pop("BASELINE_TORCH_THREADS", None)
    if torch_threads:
        env["BASELINE_TORCH_THREADS"] = str(torch_threads)
    cmd = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--timeout", "120",
           "--no-control-socket", "benchmarks.flask_torch_baseline:create_app()"]
    name = f"torch:baseline{torch_threads or ''}"
    return Server(name, cmd, env, port, workers, tmp / f"server-{name.replace(':', '-')}.log", loaded_marker=None)
