"""The request path's cost cuts of issue 16: drift sampling and the orjson answers (no server process)."""

from __future__ import annotations

import json

import pytest

try:  # tests/ may or may not be a package
    from tests.conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from tests.support.serving import Client
except ImportError:  # pragma: no cover
    from conftest import TINY_CLASSES, jpeg_bytes, make_leaf_image
    from support.serving import Client

from serving.app import create_app
from serving.predictor import Predictor, build_predictor
from serving.settings import Settings, SettingsError

LABELS = list(TINY_CLASSES)


@pytest.fixture(scope="module")
def predictor(tiny_bundle) -> Predictor:
    return build_predictor(Settings(bundle=tiny_bundle))


def _leaves(n: int) -> list[tuple[str, bytes]]:
    return [(f"{i}.jpg", jpeg_bytes(make_leaf_image(TINY_CLASSES[LABELS[i % len(LABELS)]], size=64, seed=i)))
            for i in range(n)]


def test_drift_sample_rate_setting_is_read_and_checked():
    assert Settings.from_env({}).drift_sample_rate == 1.0  # every prediction, as before the setting existed
    assert Settings.from_env({"PLANTML_DRIFT_SAMPLE_RATE": "0.25"}).drift_sample_rate == 0.25
    for raw, message in (("0", "out of range"), ("1.5", "out of range"), ("half", "is not a number")):
        with pytest.raises(SettingsError, match=f"PLANTML_DRIFT_SAMPLE_RATE.*{message}"):
            Settings.from_env({"PLANTML_DRIFT_SAMPLE_RATE": raw})


def test_drift_feed_samples_at_the_configured_rate(tmp_path, monkeypatch):
    from serving import drift_feed

    feed = drift_feed.DriftFeed(tmp_path / "f.jsonl", model_name="m", model_version="1", sample_rate=0.2)
    try:
        draws = iter([0.1, 0.5, 0.19, 0.2, 0.99])
        monkeypatch.setattr(drift_feed.random, "random", lambda: next(draws))
        assert [feed.sampled() for _ in range(5)] == [True, False, True, False, False]
        monkeypatch.setattr(drift_feed.random, "random", lambda: pytest.fail("rate 1 must not draw"))
        feed.sample_rate = 1.0
        assert feed.sampled()
    finally:
        feed.close()


def test_sampled_drift_feed_keeps_records_whole_and_readable(tiny_bundle, predictor, tmp_path):
    """A sampled feed holds about rate x predictions, every record complete, and the drift job reads it."""
    from plantml.drift import read_drift_log
    from plantml.imagestats import STAT_COLUMNS

    log_path = tmp_path / "drift" / "feed.jsonl"
    app = create_app(Settings(bundle=tiny_bundle, drift_log=log_path, drift_sample_rate=0.5), predictor=predictor)
    c = Client(flask_client=app.test_client())
    n = 120
    for i in range(0, n, 8):
        r = c.post_files("/predict", _leaves(8))
        assert r.status == 200 and len(r.body["predictions"]) == 8
    assert app.extensions["plantml"].drift.flush(10)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert 0.25 * n < len(rows) < 0.75 * n  # binomial(120, 0.5): outside this is p < 1e-7
    for row in rows:
        assert set(STAT_COLUMNS) <= set(row) and row["label"] in LABELS and (row["width"], row["height"]) == (64, 64)
    assert len(read_drift_log(log_path)) == len(rows)


def test_answers_are_orjson_encoded_and_unchanged(tiny_bundle, predictor):
    """The orjson provider writes what Flask's encoder wrote (same keys, order, values); odd types fall back."""
    import datetime

    from flask.json.provider import DefaultJSONProvider

    from serving.fastjson import OrjsonProvider

    app = create_app(Settings(bundle=tiny_bundle), predictor=predictor)
    assert isinstance(app.json, OrjsonProvider)
    c = Client(flask_client=app.test_client())
    r = c.post_files("/predict", _leaves(1))
    assert r.status == 200
    body = r.body
    assert list(body)[:2] == ["predictions", "model"] and body["prediction"] == body["predictions"][0]["label"]
    reference = DefaultJSONProvider(app)
    reference.sort_keys = False
    assert json.loads(app.json.dumps(body)) == json.loads(reference.dumps(body))
    assert list(json.loads(app.json.dumps(body))) == list(body)
    odd = {"when": datetime.date(2026, 1, 2), "n": 1}
    assert json.loads(app.json.dumps(odd)) == json.loads(reference.dumps(odd))
    with app.app_context():
        assert json.loads(app.json.response(odd).get_data()) == json.loads(reference.dumps(odd))
