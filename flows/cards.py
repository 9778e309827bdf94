"""Card builders for the flows: each returns a list of Metaflow card components.

Images are rendered to PNG by plantml (evaluation/calibration/robustness plots) before
the card is built, so a card never runs matplotlib inside its 45 s rendering budget.

One module per card family in :mod:`flows.card_builders`: ``common`` (DEMO banner,
images, number formatting), ``training`` (data and training steps), ``evaluation``,
``student`` (the distill step and the student's gate), ``export`` and ``drift`` (the drift
flow). Every builder is re-exported here: flows use
``cards.<builder>``.
"""

from __future__ import annotations

from metaflow.cards import Image, Markdown, Table, ValueBox, VegaChart

from flows.card_builders.common import DEMO_BANNER, banner, fmt, image_or_note, pretty
from flows.card_builders.drift import MAX_EMBEDDED_REPORT_BYTES, drift_card, scores_figure
from flows.card_builders.evaluation import domain_parts, evaluate_card, per_class_spec
from flows.card_builders.export import export_card
from flows.card_builders.student import distill_card, student_gate_parts
from flows.card_builders.training import class_chart, curves_spec, live_train_card, prepare_card, train_card

# The former module's private helpers, under their old names.
_f, _img, _pretty = fmt, image_or_note, pretty

__all__ = [
    "Image", "Markdown", "Table", "ValueBox", "VegaChart", "DEMO_BANNER", "banner", "fmt", "image_or_note", "pretty",
    "drift_card", "scores_figure", "MAX_EMBEDDED_REPORT_BYTES", "domain_parts", "evaluate_card", "per_class_spec",
    "export_card", "class_chart", "curves_spec", "live_train_card", "prepare_card", "train_card", "distill_card",
    "student_gate_parts",
]
