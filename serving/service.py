"""What every protocol adapter of the service shares: per-app state, client errors, image intake.

The Flask routes of ``serving.app`` (the plantml API and the upload page) and the KServe
Open Inference Protocol adapter of ``serving.oip`` both build on these, so neither imports
the other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from flask import request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from plantml.preprocess import ImageDecodeError, finish_decode, open_image, preprocess_image

from serving.drift_feed import DriftFeed, shrink_for_stats
from serving.limits import PixelGate, trim_heap
from serving.metrics import ServingMetrics
from serving.predictor import Predictor, unready_workers
from serving.settings import Settings

log = logging.getLogger(__name__)

#: After a request that decoded at least this many pixels, give freed heap back to the OS.
TRIM_AFTER_PIXELS = 2_000_000


class ClientError(Exception):
    """A request the client got wrong; becomes a JSON error with ``status``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


@dataclass
class PreparedImage:
    """One upload reduced to what the rest of the request needs (the full image is gone)."""

    tensor: np.ndarray  # CHW float32, the model input
    size: tuple[int, int]  # decoded width, height
    thumbnail: Image.Image | None  # the drift feed's 128-px thumbnail, when the feed is on


@dataclass
class ServiceState:
    """Per-app state: settings, the model (once loaded), metrics and the drift feed."""

    settings: Settings
    metrics: ServingMetrics
    predictor: Predictor | None = None
    drift: DriftFeed | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    gate: PixelGate | None = None

    def __post_init__(self) -> None:
        if self.gate is None:
            self.gate = PixelGate(self.settings.max_image_pixels)

    def set_predictor(self, predictor: Predictor) -> None:
        """Install a loaded model: readiness, model-info gauge and drift feed follow it."""
        self.predictor = predictor
        self.load_error = None
        self.metrics.set_model(predictor.name, predictor.version, predictor.runtime, predictor.precision)
        if self.settings.drift_log is not None:
            if self.drift is not None:
                self.drift.close()
            self.drift = DriftFeed(
                self.settings.drift_log, model_name=predictor.name, model_version=predictor.version,
                max_bytes=int(self.settings.drift_log_max_mb * 1024 * 1024), backups=self.settings.drift_log_backups,
                on_drop=self.metrics.drift_dropped.inc, sample_rate=self.settings.drift_sample_rate,
            )

    def require_predictor(self) -> Predictor:
        if self.predictor is None:
            detail = f": {self.load_error}" if self.load_error else ""
            raise ClientError(503, "not_ready", "model not loaded yet" + detail)
        return self.predictor


def not_ready_reason(state: ServiceState) -> str | None:
    """Why the server is not ready (this worker without a model, or a sibling worker), or ``None``."""
    if state.predictor is None:
        return "model not loaded" + (f": {state.load_error}" if state.load_error else "")
    others = unready_workers()
    if others:
        return f"{others} worker(s) of this server could not load the model (see the server log)"
    return None


def read_body() -> bytes:
    """The whole request body, refusing one over the limit even without a Content-Length.

    With ``Transfer-Encoding: chunked`` werkzeug's stream stops *at* the limit rather than
    failing, so a 12 MB chunked upload would be cut to 10 MB and answered; one more read
    tells the two apart.
    """
    stream = request.stream
    limit = request.max_content_length
    data = stream.read() if limit is None else stream.read(limit)
    if limit is not None and len(data) >= limit and stream.read(1):
        raise RequestEntityTooLarge()
    return data


def prepare_image(state: ServiceState, spec: Any, data: bytes, label: str, budget_left: int) -> PreparedImage:
    """Decode one upload and reduce it to its model input (and drift thumbnail).

    The header is checked first (per-image pixel and aspect limits, then the request's
    remaining pixel budget); the decode then waits for room in the worker's
    :class:`~serving.limits.PixelGate`. The full-size image lives only inside this call.

    Raises:
        ClientError: 400 for a bad or over-limit image, 413 over the request's pixel budget.
    """
    try:
        img = open_image(data, max_pixels=state.settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise ClientError(400, exc.reason, f"{label}: {exc}") from exc
    pixels = img.width * img.height
    if pixels > budget_left:
        raise ClientError(413, "too_many_pixels",
                          f"{label}: the request's images add up to more than "
                          f"{state.settings.max_request_megapixels:g} megapixels (PLANTML_MAX_REQUEST_MEGAPIXELS); "
                          "send fewer or smaller images per request")
    for_drift = state.drift is not None and state.drift.sampled()
    with state.gate.reserve(pixels):
        try:
            rgb = finish_decode(img)  # may be ``img`` itself (an upright RGB file)
        except ImageDecodeError as exc:
            raise ClientError(400, exc.reason, f"{label}: {exc}") from exc
        del img
        tensor = preprocess_image(rgb, spec)
        size = rgb.size
        thumbnail = shrink_for_stats(rgb) if for_drift else None
        del rgb
    return PreparedImage(tensor=tensor, size=size, thumbnail=thumbnail)


def prepare_images(state: ServiceState, spec: Any, uploads: Iterable[tuple[str, bytes]]) -> list[PreparedImage]:
    """Decode and reduce ``(label, bytes)`` uploads one at a time within the request's pixel budget.

    ``uploads`` may be a generator that extracts each image's bytes only when its turn comes,
    so a bad element is reported after the images before it were checked, as they arrive.

    Raises:
        ClientError: as :func:`prepare_image`, for the first upload that fails.
    """
    budget_left = state.settings.max_request_pixels
    prepared: list[PreparedImage] = []
    try:
        for label, data in uploads:
            one = prepare_image(state, spec, data, label, budget_left)
            budget_left -= one.size[0] * one.size[1]
            prepared.append(one)
    finally:
        if state.settings.max_request_pixels - budget_left >= TRIM_AFTER_PIXELS:
            trim_heap()
    return prepared


__all__ = ["ClientError", "PreparedImage", "ServiceState", "TRIM_AFTER_PIXELS", "not_ready_reason", "prepare_image",
           "prepare_images", "read_body"]
