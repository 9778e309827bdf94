"""Service settings, read once from environment variables into a frozen dataclass.

Every setting is an environment variable (the Kubernetes manifests set exactly these
names). A bad value is refused at start-up with a :class:`SettingsError` that names the
variable, the value and what is allowed, so a typo never silently falls back to a
default.

=========================== =================== ==============================================
variable                    default             meaning
=========================== =================== ==============================================
PLANTML_BUNDLE              (unset)             bundle directory to serve
PLANTML_MODEL_URI           (unset)             MLflow registry URI, e.g. ``models:/plantml@champion``
PLANTML_MODEL_CACHE         <tmp>/plantml-models where a registry bundle is downloaded
PLANTML_RUNTIME             auto                auto | onnxruntime | openvino
PLANTML_PRECISION           fp32                fp32 | int8
PLANTML_HOST                0.0.0.0             bind address
PLANTML_PORT                8000                bind port
PLANTML_WORKERS             2                   gunicorn worker processes
PLANTML_THREADS             max(1, cores//workers) inference threads per worker
PLANTML_HTTP_THREADS        2                   request threads per worker (gthread)
PLANTML_TIMEOUT             60                  seconds before a silent worker is restarted
PLANTML_GRACEFUL_TIMEOUT    30                  seconds in-flight requests get after SIGTERM
PLANTML_MAX_UPLOAD_MB       10                  request body limit (413 above it)
PLANTML_MAX_IMAGES          32                  images per request (400 above it)
PLANTML_MAX_IMAGE_MEGAPIXELS 16                 decoded pixels per image (400 above it)
PLANTML_MAX_REQUEST_MEGAPIXELS 64               decoded pixels per request, all images (413 above it)
PLANTML_READ_TIMEOUT        30                  seconds a client has to send one whole request (408 after)
PLANTML_MAX_CONNECTIONS     100                 open client connections per worker
PLANTML_MAX_REQUESTS        2000                requests before a worker is recycled (0 = never)
PLANTML_MAX_REQUESTS_JITTER 200                 random extra requests, so workers do not recycle together
PLANTML_METRICS_PORT        (unset)             serve /metrics only on this port (and nothing else there)
PLANTML_BUNDLE_SHA256       (unset)             expected sha256 of the bundle's metadata.json
PLANTML_RELOAD_RETRY_SECONDS 15                 a worker that failed to load the model retries this often
PLANTML_TOP_K               5                   classes listed per prediction
PLANTML_LOG_LEVEL           info                debug | info | warning | error | critical
PLANTML_ACCESS_LOG          true                gunicorn access log on stdout (true | false)
PLANTML_DRIFT_LOG           (unset = off)       JSON-lines drift feed (rotated by size)
PLANTML_DRIFT_LOG_MAX_MB    50                  rotate the drift feed above this size
PLANTML_DRIFT_LOG_BACKUPS   5                   rotated drift files kept
PLANTML_DRIFT_SAMPLE_RATE   1                   share of predictions written to the drift feed (0 < r <= 1)
PLANTML_DRIFT_SUMMARY       (unset)             drift job's JSON summary, exported as gauges
PROMETHEUS_MULTIPROC_DIR    (set by gunicorn.conf.py) metrics directory shared by workers
=========================== =================== ==============================================

Exactly one of ``PLANTML_BUNDLE`` and ``PLANTML_MODEL_URI`` is needed to serve; that is
checked by :meth:`Settings.require_model_source` where a model is actually loaded, so
that the settings themselves can be built (and tested) without one.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

RUNTIMES = ("auto", "onnxruntime", "openvino")
PRECISIONS = ("fp32", "int8")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(ValueError):
    """An environment variable has a bad value; the message names it."""


def available_cores() -> int:
    """CPU cores this process may use: the affinity mask, capped by a cgroup v2 CPU quota.

    In a container with ``resources.limits.cpu: 2`` on a 64-core node, ``os.cpu_count()``
    says 64; the quota in ``/sys/fs/cgroup/cpu.max`` says 2, and oversubscribing threads
    against a quota is what makes CPU inference latency spiky.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _number(name: str, raw: str, convert: Callable[[str], Any], noun: str, lo: float, hi: float) -> Any:
    """``raw`` converted and checked against ``[lo, hi]``; the error names the variable."""
    try:
        value = convert(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not {noun}") from None
    if not lo <= value <= hi:
        raise SettingsError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    return int(_number(name, raw, int, "an integer", lo, hi))


def _float(name: str, raw: str, lo: float, hi: float) -> float:
    return float(_number(name, raw, float, "a number", lo, hi))


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (true/false)")


def _choice(name: str, raw: str, allowed: tuple[str, ...]) -> str:
    value = raw.strip().lower()
    if value not in allowed:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(allowed)}")
    return value


def _path(name: str, raw: str) -> Path | None:
    raw = raw.strip()
    return Path(raw).expanduser() if raw else None


@dataclass(frozen=True)
class Settings:
    """All service settings (see the module docstring for the environment variables)."""

    bundle: Path | None = None
    model_uri: str | None = None
    model_cache: Path = Path(tempfile.gettempdir()) / "plantml-models"
    runtime: str = "auto"
    precision: str = "fp32"
    host: str = "0.0.0.0"
    port: int = 8000
    workers: int = 2
    threads: int = 0  # 0 = max(1, cores // workers), resolved in __post_init__
    http_threads: int = 2
    timeout: int = 60
    graceful_timeout: int = 30
    max_upload_mb: float = 10.0
    max_images: int = 32
    max_image_megapixels: float = 16.0
    max_request_megapixels: float = 64.0
    read_timeout: float = 30.0
    max_connections: int = 100
    max_requests: int = 2000
    max_requests_jitter: int = 200
    metrics_port: int | None = None
    bundle_sha256: str | None = None
    reload_retry_seconds: float = 15.0
    top_k: int = 5
    log_level: str = "info"
    access_log: bool = True
    drift_log: Path | None = None
    drift_log_max_mb: float = 50.0
    drift_log_backups: int = 5
    drift_sample_rate: float = 1.0
    drift_summary: Path | None = None
    prometheus_multiproc_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise SettingsError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.bundle is not None and self.model_uri:
            raise SettingsError(
                "set only one of PLANTML_BUNDLE and PLANTML_MODEL_URI "
                f"(got PLANTML_BUNDLE={str(self.bundle)!r} and PLANTML_MODEL_URI={self.model_uri!r})"
            )
        if self.model_uri is not None and not self.model_uri.startswith(("models:/", "runs:/")):
            raise SettingsError(
                f"PLANTML_MODEL_URI={self.model_uri!r} must look like models:/NAME@alias, models:/NAME/VERSION "
                "or runs:/RUN_ID/bundle"
            )
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise SettingsError(f"PLANTML_METRICS_PORT={self.metrics_port} must differ from PLANTML_PORT")
        if self.max_request_megapixels < self.max_image_megapixels:
            raise SettingsError(
                f"PLANTML_MAX_REQUEST_MEGAPIXELS={self.max_request_megapixels:g} is below "
                f"PLANTML_MAX_IMAGE_MEGAPIXELS={self.max_image_megapixels:g}: no large image could ever be answered"
            )
        if self.bundle_sha256 is not None and not _is_sha256(self.bundle_sha256):
            raise SettingsError(f"PLANTML_BUNDLE_SHA256={self.bundle_sha256!r} is not a 64-character hex sha256")
        if self.threads <= 0:
            object.__setattr__(self, "threads", max(1, available_cores() // max(1, self.workers)))

    @property
    def max_upload_bytes(self) -> int:
        """The request body limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_image_pixels(self) -> int:
        """Decoded pixels allowed per image."""
        return int(self.max_image_megapixels * 1_000_000)

    @property
    def max_request_pixels(self) -> int:
        """Decoded pixels allowed per request, all its images together."""
        return int(self.max_request_megapixels * 1_000_000)

    def _hostport(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{port}"

    @property
    def bind(self) -> str:
        """gunicorn's ``bind`` string (IPv6 hosts bracketed)."""
        return self._hostport(self.port)

    @property
    def binds(self) -> list[str]:
        """Every address gunicorn listens on: the API port, then the metrics port if separate."""
        return [self.bind] + ([self._hostport(self.metrics_port)] if self.metrics_port else [])

    def require_model_source(self) -> None:
        """Raise :class:`SettingsError` unless a bundle or a registry URI is set."""
        if self.bundle is None and not self.model_uri:
            raise SettingsError(
                "no model to serve: set PLANTML_BUNDLE=/path/to/bundle or PLANTML_MODEL_URI=models:/NAME@champion"
            )

    def with_overrides(self, **changes: Any) -> "Settings":
        """A copy with some fields changed (re-validated)."""
        if "workers" in changes and "threads" not in changes:
            changes["threads"] = 0  # re-derive cores // workers
        return replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-safe values (for ``/model`` and logs)."""
        return {f.name: (str(v) if isinstance(v, Path) else v) for f in fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from environment variables (``os.environ`` by default).

        Raises:
            SettingsError: naming the first variable with a bad value.
        """
        env = os.environ if environ is None else environ
        parsers: dict[str, tuple[str, Callable[[str, str], Any]]] = {
            "bundle": ("PLANTML_BUNDLE", _path),
            "model_uri": ("PLANTML_MODEL_URI", lambda n, r: r.strip() or None),
            "model_cache": ("PLANTML_MODEL_CACHE", _path),
            "runtime": ("PLANTML_RUNTIME", lambda n, r: _choice(n, r, RUNTIMES)),
            "precision": ("PLANTML_PRECISION", lambda n, r: _choice(n, r, PRECISIONS)),
            "host": ("PLANTML_HOST", lambda n, r: _host(n, r)),
            "port": ("PLANTML_PORT", lambda n, r: _int(n, r, 1, 65535)),
            "workers": ("PLANTML_WORKERS", lambda n, r: _int(n, r, 1, 64)),
            "threads": ("PLANTML_THREADS", lambda n, r: _int(n, r, 1, 256)),
            "http_threads": ("PLANTML_HTTP_THREADS", lambda n, r: _int(n, r, 1, 64)),
            "timeout": ("PLANTML_TIMEOUT", lambda n, r: _int(n, r, 1, 3600)),
            "graceful_timeout": ("PLANTML_GRACEFUL_TIMEOUT", lambda n, r: _int(n, r, 0, 3600)),
            "max_upload_mb": ("PLANTML_MAX_UPLOAD_MB", lambda n, r: _float(n, r, 0.01, 1024)),
            "max_images": ("PLANTML_MAX_IMAGES", lambda n, r: _int(n, r, 1, 1024)),
            "max_image_megapixels": ("PLANTML_MAX_IMAGE_MEGAPIXELS", lambda n, r: _float(n, r, 0.01, 100)),
            "max_request_megapixels": ("PLANTML_MAX_REQUEST_MEGAPIXELS", lambda n, r: _float(n, r, 0.01, 10_000)),
            "read_timeout": ("PLANTML_READ_TIMEOUT", lambda n, r: _float(n, r, 0.1, 3600)),
            "max_connections": ("PLANTML_MAX_CONNECTIONS", lambda n, r: _int(n, r, 1, 10_000)),
            "max_requests": ("PLANTML_MAX_REQUESTS", lambda n, r: _int(n, r, 0, 10_000_000)),
            "max_requests_jitter": ("PLANTML_MAX_REQUESTS_JITTER", lambda n, r: _int(n, r, 0, 10_000_000)),
            "metrics_port": ("PLANTML_METRICS_PORT", lambda n, r: _int(n, r, 1, 65535)),
            "bundle_sha256": ("PLANTML_BUNDLE_SHA256", lambda n, r: r.strip().lower() or None),
            "reload_retry_seconds": ("PLANTML_RELOAD_RETRY_SECONDS", lambda n, r: _float(n, r, 0.1, 86_400)),
            "top_k": ("PLANTML_TOP_K", lambda n, r: _int(n, r, 1, 1000)),
            "log_level": ("PLANTML_LOG_LEVEL", lambda n, r: _choice(n, r, LOG_LEVELS)),
            "access_log": ("PLANTML_ACCESS_LOG", _bool),
            "drift_log": ("PLANTML_DRIFT_LOG", _path),
            "drift_log_max_mb": ("PLANTML_DRIFT_LOG_MAX_MB", lambda n, r: _float(n, r, 0.001, 100_000)),
            "drift_log_backups": ("PLANTML_DRIFT_LOG_BACKUPS", lambda n, r: _int(n, r, 0, 1000)),
            "drift_sample_rate": ("PLANTML_DRIFT_SAMPLE_RATE", lambda n, r: _float(n, r, 0.0001, 1.0)),
            "drift_summary": ("PLANTML_DRIFT_SUMMARY", _path),
            "prometheus_multiproc_dir": ("PROMETHEUS_MULTIPROC_DIR", _path),
        }
        values: dict[str, Any] = {}
        for field_name, (var, parse) in parsers.items():
            raw = env.get(var)
            if raw is None or (raw.strip() == "" and field_name not in ("bundle", "drift_log", "drift_summary")):
                continue
            parsed = parse(var, raw)
            if parsed is not None:
                values[field_name] = parsed
        return cls(**values)


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _host(name: str, raw: str) -> str:
    value = raw.strip().strip("[]")
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise SettingsError(f"{name}={raw!r} is not a host name or IP address")
    return value
