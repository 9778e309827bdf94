"""Prometheus metrics of the service, correct across gunicorn workers.

Under gunicorn each worker is a process with its own counters. prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set *before* ``prometheus_client`` is
imported; ``gunicorn.conf.py`` does that) writes every sample to a per-process mmap file
in that directory, and ``/metrics`` sums them with a ``MultiProcessCollector`` whichever
worker answers the scrape. Without the variable (unit tests, ``flask run``) the same
metrics live in a registry private to the app, so several apps can coexist in one
process.

Names (the Grafana dashboard and alert rules use them):

* ``flask_http_request_duration_seconds{method,endpoint,status}`` (histogram) and
  ``flask_http_request_total{method,status}`` - prometheus-flask-exporter defaults,
  grouped by Flask endpoint so that model names in OIP paths add no series.
* ``plantml_inference_seconds`` (histogram, one observation per forward pass),
  ``plantml_batch_size`` (histogram), ``plantml_prediction_confidence`` (histogram),
  ``plantml_predictions_total{label}``, ``plantml_abstained_total``,
  ``plantml_rejected_inputs_total{reason}``,
  ``plantml_model_info{name,version,runtime,precision}`` (gauge = 1),
  ``plantml_drift_feed_dropped_total``.
* ``plantml_drift_share`` and ``plantml_drift_detected`` - read from the drift job's JSON
  summary (``PLANTML_DRIFT_SUMMARY``) at scrape time, so they are never stale per worker.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
                     2.5)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 1.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def multiprocess_enabled() -> bool:
    """Whether prometheus_client writes samples to a shared multiprocess directory."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


class DriftSummaryCollector:
    """Exports the drift job's summary file as ``plantml_drift_share`` / ``plantml_drift_detected``.

    Read at each scrape: the drift job rewrites the file on its own schedule, and a
    collector (rather than a gauge set by one worker) gives the same answer whichever
    worker serves ``/metrics``. A missing or malformed file exports nothing and logs why.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def collect(self) -> Iterable[object]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            summary = json.loads(self.path.read_text())
            share = float(summary["drift_share"])
            detected = float(bool(summary["drift_detected"]))
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("drift summary %s unreadable: %s", self.path, exc)
            return []
        return [
            GaugeMetricFamily("plantml_drift_share", "Share of drifted columns in the latest drift report", share),
            GaugeMetricFamily("plantml_drift_detected", "1 if the latest drift report detected dataset drift",
                              detected),
        ]


class ServingMetrics:
    """The service's own metrics, registered in ``registry``.

    In multiprocess mode the registry is only a namespace (values go to the mmap files);
    exposition always goes through :meth:`exposition_registry`.
    """

    def __init__(self, registry: object, drift_summary: Path | None = None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.registry = registry
        self.drift_summary = Path(drift_summary) if drift_summary else None
        self.inference_seconds = Histogram(
            "plantml_inference_seconds", "Model forward-pass time per batch (seconds)",
            buckets=INFERENCE_BUCKETS, registry=registry,
        )
        self.batch_size = Histogram(
            "plantml_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=registry,
        )
        self.confidence = Histogram(
            "plantml_prediction_confidence", "Top-1 calibrated confidence per image",
            buckets=CONFIDENCE_BUCKETS, registry=registry,
        )
        self.predictions = Counter(
            "plantml_predictions", "Predictions by top-1 label", ["label"], registry=registry,
        )
        self.abstained = Counter(
            "plantml_abstained", "Predictions abstained on (low confidence or out of distribution)", registry=registry,
        )
        self.rejected = Counter(
            "plantml_rejected_inputs", "Inputs refused as the client's fault, by reason", ["reason"],
            registry=registry,
        )
        self.drift_dropped = Counter(
            "plantml_drift_feed_dropped", "Drift-feed records dropped because the writer queue was full",
            registry=registry,
        )
        # "max": every worker reports 1 for the same labels, so the series is 1 once,
        # not once per worker (and survives a worker restart without a gap).
        self.model_info = Gauge(
            "plantml_model_info", "Model being served (value is always 1)",
            ["name", "version", "runtime", "precision"], multiprocess_mode="max", registry=registry,
        )
        if self.drift_summary is not None and not multiprocess_enabled():
            registry.register(DriftSummaryCollector(self.drift_summary))  # type: ignore[attr-defined]

    def set_model(self, name: str, version: str, runtime: str, precision: str) -> None:
        """Publish the model-info gauge."""
        self.model_info.labels(name=name, version=version, runtime=runtime, precision=precision).set(1)

    def observe_predictions(self, labels: list[str], confidences: list[float], abstained: list[bool]) -> None:
        """Count one batch's predictions."""
        for label, conf, abst in zip(labels, confidences, abstained):
            self.predictions.labels(label=label).inc()
            self.confidence.observe(conf)
            if abst:
                self.abstained.inc()

    def reject(self, reason: str) -> None:
        """Count an input refused as the client's fault."""
        self.rejected.labels(reason=reason).inc()

    def exposition_registry(self) -> object:
        """The registry to render for a scrape: all workers' samples in multiprocess mode."""
        if not multiprocess_enabled():
            return self.registry
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        if self.drift_summary is not None:
            registry.register(DriftSummaryCollector(self.drift_summary))
        return registry

    def render(self, accept_header: str | None) -> tuple[bytes, str]:
        """Encode the metrics for a scrape (OpenMetrics if the scraper asks for it)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept_header or "")
        return encoder(self.exposition_registry()), content_type


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (gunicorn ``child_exit`` hook)."""
    if not multiprocess_enabled():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def prepare_multiproc_dir(path: Path) -> None:
    """Create the multiprocess directory and wipe stale ``*.db`` files from a previous run.

    Stale files would add the previous run's counts to this run's.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        try:
            stale.unlink()
        except OSError as exc:
            log.warning("could not remove stale metrics file %s: %s", stale, exc)
