"""The export step's card: the bundle's files, parity, the INT8 gate, the registry entry, the model card."""

from __future__ import annotations

from typing import Any, Mapping

from metaflow.cards import Markdown, Table

from flows.card_builders.common import banner, fmt
from flows.card_builders.student import student_gate_parts


def export_card(bundle_path: str, metadata: Mapping[str, Any], registered: Mapping[str, Any] | None,
                model_card: str | None = None) -> list[Any]:
    """Formats, sizes, parity errors, INT8 gate, registry entry, and the bundle's model card.

    Args:
        bundle_path: the bundle directory.
        metadata: its ``metadata.json``.
        registered: :func:`plantml.registry.register_bundle`'s record (``None``: not registered).
        model_card: the bundle's ``MODEL_CARD.md`` text.

    Returns:
        The card's components.
    """
    parts: list[Any] = banner(bool(metadata["metrics"].get("is_demo_data")))
    parts.append(Markdown(f"# Export\nbundle `{bundle_path}` — `{metadata['name']}` version `{metadata['version']}`, "
                          f"architecture `{metadata['architecture']}`, input {metadata['input']['size']} px."))
    parity = metadata.get("parity", {}).get("max_abs_diff", {})
    rows = []
    for f in metadata["files"]:
        key = f"{f['runtime']}_{f['precision']}"
        p = parity.get(key, {})
        rows.append([f["path"], f["format"], f["runtime"], f["precision"], f.get("role", "model"),
                     f"{f['bytes'] / 1e6:.2f}", fmt(p.get("max"), 8) if p else "", f["sha256"][:12]])
    parts.append(Table(rows, headers=["file", "format", "runtime", "precision", "role", "MB",
                                      "max |Δ| vs torch", "sha256"]))
    ood_parity = metadata.get("parity", {}).get("ood_score_max_rel_diff", {})
    tables = [("logits, max abs diff", parity), ("ood_score, max relative diff", ood_parity)]
    rows = [[f"{k} ({what})"] + [fmt(v.get(f"batch_{b}"), 8) for b in (1, 2, 8)]
            for what, report in tables for k, v in report.items()]
    if rows:
        parts.append(Table(rows, headers=["runtime (output)", "batch 1", "batch 2", "batch 8"]))
    if ood_parity:
        threshold = fmt(metadata.get("calibration", {}).get("ood_threshold"))
        parts.append(Markdown(f"`ood_score` is the out-of-distribution score; inputs above "
                              f"`calibration.ood_threshold` = {threshold} abstain."))
    int8 = metadata.get("int8")
    if int8:
        gate = int8.get("gate", {})
        parts.append(Markdown("## INT8 accuracy gate\nan INT8 model is kept only if its test accuracy drops by at most "
                              f"**{gate.get('max_accuracy_drop')}** against FP32 of the same runtime "
                              f"({int8.get('calibration_images')} calibration images, {int8.get('eval_images')} test "
                              f"images, a stratified subset of {int8.get('eval_population', '?')}; "
                              f"{_gate_precision(metadata)}). "
                              f"Kept: **{', '.join(int8.get('passed') or []) or 'none'}**."))
        rows = []
        for runtime, res in int8.get("results", {}).items():
            m = metadata["metrics"].get(f"int8_{runtime}", {})
            rows.append([runtime, "kept" if res.get("kept") else "dropped", res.get("why", ""), fmt(m.get("accuracy")),
                         fmt(m.get("accuracy_drop")), fmt(res.get("speedup_vs_fp32"), 2),
                         fmt((m.get("size_bytes") or 0) / 1e6, 2)])
        parts.append(Table(rows, headers=["runtime", "INT8", "why", "accuracy", "drop", "speed-up vs FP32", "MB"]))
    parts += student_gate_parts(metadata.get("student"))
    if registered:
        parts.append(Markdown(f"## Registry\nregistered `{registered['name']}` version **{registered['version']}** "
                              f"with alias `@{registered['alias']}` (`{registered['model_uri']}`)."))
    if model_card:
        parts.append(Markdown(model_card))
    return parts


def _gate_precision(metadata: Mapping[str, Any]) -> str:
    """The INT8 gate's accuracy standard errors, in points (the gate can run on a subset)."""
    ses = [f"{k.split('_', 1)[1]} ±{100 * m['accuracy_standard_error']:.2f} pt"
           for k, m in metadata.get("metrics", {}).items()
           if k.startswith("int8_") and isinstance(m, Mapping) and "accuracy_standard_error" in m]
    return "INT8 accuracy standard error " + ", ".join(ses) if ses else "standard error not recorded"
