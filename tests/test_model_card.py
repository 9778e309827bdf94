"""Every bundle carries MODEL_CARD.md: registered, hashed, shown by the edge CLI and the export card."""

from __future__ import annotations

import json
import subprocess
import sys

from plantml.bundle import load_bundle
from plantml.model_card import MODEL_CARD_FILE, MODEL_CARD_ROLE, read_model_card, render_model_card
from tests.conftest import TINY_CLASSES


def test_bundle_has_a_verified_model_card_with_its_own_figures(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    entry = next(f for f in bundle.metadata["files"] if f["path"] == MODEL_CARD_FILE)
    assert entry["role"] == MODEL_CARD_ROLE and len(entry["sha256"]) == 64
    assert ("none", "none") not in bundle.available()  # a document, not a runnable model
    card = read_model_card(bundle)
    for text in ("## Intended use", "## Data", "## Performance", "## Abstention", "## Known limitations",
                 "| accuracy | 1.0000 |", "60 images in 3 classes", *TINY_CLASSES):
        assert text in card, text
    assert "DEMO" not in card and "synthetic tiny leaves" not in card  # no training-host paths in a public card


def test_demo_bundles_say_so_and_missing_figures_are_not_invented():
    card = render_model_card({"name": "m", "classes": ["A___x", "B___y"], "metrics": {"is_demo_data": True}})
    assert "synthetic DEMO" in card and "| accuracy | n/a |" in card
    assert "The data summary was not available" in card


def test_edge_info_shows_the_model_card(tiny_bundle):
    out = subprocess.run([sys.executable, "-m", "edge.cli", "info", "--bundle", str(tiny_bundle)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model_card"].startswith("# Model card: tiny-test-model 1")
    only = subprocess.run([sys.executable, "-m", "edge.cli", "info", "--bundle", str(tiny_bundle), "--model-card"],
                          capture_output=True, text=True, timeout=120)
    assert only.returncode == 0 and only.stdout.startswith("# Model card") and "## Known limitations" in only.stdout


def test_the_service_shows_the_model_card_on_model(tiny_bundle):
    from serving.app import create_app
    from serving.predictor import build_predictor
    from serving.settings import Settings

    settings = Settings(bundle=tiny_bundle)
    app = create_app(settings, predictor=build_predictor(settings))
    body = app.test_client().get("/model").get_json()
    assert body["model_card"] == read_model_card(load_bundle(tiny_bundle))
    assert str(tiny_bundle) not in body["model_card"]
