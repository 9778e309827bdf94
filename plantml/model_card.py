"""``MODEL_CARD.md``: what a bundle is for, what it was trained on, how well it does, where it fails.

Written into every bundle by the export step (last, so it sees the INT8 and drift
results), registered in ``metadata.json`` with role ``model_card`` and shown by the
export card, ``plantml-edge info`` and the service's ``GET /model``. Its text comes
only from the bundle's own metadata — every figure in it is one the pipeline measured
for this bundle. Torch-free.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

MODEL_CARD_FILE = "MODEL_CARD.md"
MODEL_CARD_ROLE = "model_card"

# The sections that say the same for every bundle.
INTENDED_USE = [
    "## Intended use",
    "Suggest which of the listed leaf diseases (or healthy) a photo of a **single leaf** shows, as a "
    "decision aid for growers and agronomists. Not a diagnosis: confirm before treating a crop. The "
    "model answers only for the classes below and abstains when it is unsure or when the input does "
    "not look like its training photos.", "",
]

KNOWN_LIMITATIONS = [
    "## Known limitations",
    "- **Lab photos.** PlantVillage photos show one leaf on a plain backdrop; the background-only baseline "
    "above shows how much a model can learn from the backdrop alone. Expect lower accuracy (and more "
    "abstentions) on field photos with cluttered backgrounds, several leaves, or natural light, unless "
    "field photos of that crop were a training source.",
    "- **Closed set.** Diseases, pests or crops not in the class list cannot be recognised; they are either "
    "abstained or, worse, confidently mislabelled as a listed class.",
    "- **One leaf per photo**, centred: the input is the centre crop of the shorter side.",
    "- Figures come from a random split of the same collection; they overstate accuracy on a new farm.",
]


def _pct(x: Any) -> str:
    return f"{100 * float(x):.1f} %" if isinstance(x, (int, float)) else "n/a"


def _num(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def render_model_card(metadata: Mapping[str, Any], data_summary: Mapping[str, Any] | None = None) -> str:
    """The model card of a bundle as Markdown.

    Args:
        metadata: the bundle's ``metadata.json`` content (metrics, calibration, classes, ...).
        data_summary: the prepared data's summary (counts per class and split, root, demo flag).
    """
    m = metadata.get("metrics", {})
    cal = metadata.get("calibration", {})
    summary = dict(data_summary or {})
    demo = bool(m.get("is_demo_data") or summary.get("is_demo"))
    lines = [f"# Model card: {metadata.get('name', 'plantml')} {metadata.get('version', '')}", ""]
    if demo:
        lines += ["> **Trained on the synthetic DEMO data set.** Its figures say nothing about real "
                  "plant-disease detection; do not deploy it.", ""]
    lines += INTENDED_USE + _model_section(metadata) + _data_section(metadata, summary)
    lines += _performance_section(m, cal) + _abstention_section(cal) + KNOWN_LIMITATIONS
    if data_summary is None:
        lines.append("- The data summary was not available when this card was written.")
    return "\n".join(lines) + "\n"


def _model_section(metadata: Mapping[str, Any]) -> list[str]:
    model_files = sorted({f["runtime"] + " " + f["precision"] for f in metadata.get("files", [])
                          if f.get("role", "model") == "model"})
    return [
        "## Model",
        f"- architecture `{metadata.get('architecture')}`, input {metadata.get('input', {}).get('size')} px "
        f"({metadata.get('input', {}).get('resize', 'shorter_side_center_crop')}), outputs "
        f"{', '.join(metadata.get('outputs', ['logits']))}",
        f"- files: {', '.join(model_files)}",
        "",
    ]


def _data_section(metadata: Mapping[str, Any], summary: Mapping[str, Any]) -> list[str]:
    classes = list(metadata.get("classes", []))
    counts = summary.get("counts", {})
    n_images = summary.get("n_images") or sum(sum(v.values()) for v in counts.values())
    crops = sorted({c.split("___")[0] for c in classes if "___" in c})
    return [
        "## Data",
        # No data root: the card is public (GET /model) and a training host's paths are not.
        f"- {n_images:,} images in {len(classes)} classes ({', '.join(crops) if crops else 'see the class list'}), "
        "split train/val/test stratified by class.",
        f"- test images: {metadata.get('metrics', {}).get('n_test', 'n/a')}. Classes: {', '.join(classes)}.", "",
    ]


def _performance_section(m: Mapping[str, Any], cal: Mapping[str, Any]) -> list[str]:
    fp32 = m.get("fp32", {})
    lines = [
        "## Performance (held-out test split)",
        "| measure | value |", "|---|---|",
        f"| accuracy | {_num(fp32.get('accuracy'), 4)} |",
        f"| macro-F1 | {_num(fp32.get('macro_f1'), 4)} |",
        f"| expected calibration error (after temperature {_num(cal.get('temperature'))}) | "
        f"{_num(m.get('ece'), 4)} |",
        f"| answered (coverage) at the abstention rule | {_pct(m.get('coverage_at_threshold'))} |",
        f"| accuracy on answered images | {_num(m.get('accuracy_at_threshold'), 4)} |",
        f"| generated non-leaf images abstained | {_pct(m.get('non_leaf_abstain_rate'))} |",
        f"| background-only baseline (border pixels alone) | "
        f"{_num(m.get('background_baseline', {}).get('accuracy'))} |",
    ]
    for runtime in ("openvino", "onnxruntime"):
        q = m.get(f"int8_{runtime}")
        if q:
            drop = q.get("accuracy_drop")
            lines.append(f"| INT8 {runtime}: kept / accuracy drop | {q.get('kept')} / "
                         f"{_num(100 * drop if isinstance(drop, float) else None, 2)} pt |")
    by_domain = m.get("by_domain") or {}
    if by_domain:
        lines += ["", "### Per kind of photo", "| domain | accuracy | macro-F1 |", "|---|---|---|"]
        lines += [f"| {d} | {_num(v.get('accuracy'), 4)} | {_num(v.get('macro_f1'), 4)} |"
                  for d, v in by_domain.items()]
    return lines


def _abstention_section(cal: Mapping[str, Any]) -> list[str]:
    return [
        "", "## Abstention",
        f"The service, the edge CLI and the MLflow model abstain (`abstained: true`, with a reason) when the "
        f"out-of-distribution score exceeds {_num(cal.get('ood_threshold'))} (`out_of_distribution`: the input is "
        f"unlike the training photos) or the calibrated top confidence is below {_num(cal.get('abstain_threshold'))} "
        f"(`low_confidence`). Treat an abstention as \"take another photo of one leaf, or ask an expert\".", "",
    ]


def model_card_step(data_summary: Mapping[str, Any] | None = None) -> Callable[[Any, dict[str, Any]], None]:
    """An ``extra_steps`` callable for :func:`plantml.export.export_bundle` writing ``MODEL_CARD.md``.

    Put it last: it reads the metrics the earlier steps (INT8 gate) added to the metadata.
    """

    def step(writer: Any, metadata: dict[str, Any]) -> None:
        (writer.dir / MODEL_CARD_FILE).write_text(render_model_card(metadata, data_summary))
        writer.add_file(MODEL_CARD_FILE, fmt="markdown", runtime="none", precision="none", role=MODEL_CARD_ROLE)
        metadata["model_card"] = MODEL_CARD_FILE

    return step


def read_model_card(bundle: Any) -> str | None:
    """The bundle's model card text (checked against its sha256), or ``None`` for older bundles."""
    name = bundle.metadata.get("model_card")
    if not name:
        return None
    return bundle.read_verified(name).decode()
