"""The edge student's cards: the distill step (training, test metrics) and its gate in the export card."""

from __future__ import annotations

from typing import Any, Mapping

from metaflow.cards import Markdown, Table

from flows.card_builders.common import fmt


def distill_card(result: Mapping[str, Any], is_demo: bool = False) -> list[Any]:
    """The distill step's card: what was distilled from what, per-epoch history, test metrics.

    Args:
        result: :func:`plantml.pipeline.distill_student`'s result.
        is_demo: the run used the synthetic DEMO data.
    """
    demo = " (SYNTHETIC DEMO DATA: not a real result)" if is_demo else ""
    head = (f"# Edge student{demo}\n`{result['arch']}` at **{result['image_size']} px**, distilled from the champion "
            f"`{result['teacher']}` (`{result['teacher_arch']}` at {result['teacher_image_size']} px).")
    if result.get("status") != "trained":
        return [Markdown(f"{head}\n\n**No student: {result.get('status')}** — {result.get('reason')}")]
    settings = result.get("settings", {})
    parts: list[Any] = [Markdown(
        f"{head}\nInitialised from {result.get('init')}; loss = α·KL·T² + (1-α)·CE with T = "
        f"{settings.get('temperature')}, α = {settings.get('alpha')}; {result.get('epochs_run')} epochs "
        f"(best {result.get('best_epoch')}) in **{fmt(result.get('distill_seconds'), 1)} s**. The export step "
        "ships it only if it passes its gate (accuracy vs the champion FP32, overall and per domain, and speed).")]
    rows = [[int(r["epoch"]), fmt(r["train_loss"]), fmt(r["train_accuracy"]), fmt(r.get("teacher_agreement")),
             fmt(r["val_accuracy"]), fmt(r["val_macro_f1"]), fmt(r["seconds"], 1)] for r in result.get("history", [])]
    parts.append(Table(rows, headers=["epoch", "loss", "train acc", "agrees with teacher", "val acc",
                                      "val macro-F1", "s"]))
    vs = result.get("vs_champion_fp32", {})
    m = result.get("metrics", {})
    rows = [["all", fmt(m.get("accuracy")), fmt(m.get("macro_f1")), m.get("n_test")]]
    rows += [[d, fmt(v.get("accuracy")), fmt(v.get("macro_f1")), v.get("n")]
             for d, v in result.get("by_domain", {}).items()]
    parts.append(Markdown(f"## Test split (torch FP32)\nchampion accuracy {fmt(vs.get('champion_accuracy'))}, "
                          f"student drop {fmt((vs.get('accuracy_drop') or 0) * 100, 2)} pt; torch eager latency "
                          f"(1 thread) {fmt(result.get('latency_ms'), 2)} ms vs the champion's "
                          f"{fmt(result.get('teacher_latency_ms'), 2)} ms."))
    parts.append(Table(rows, headers=["domain", "accuracy", "macro-F1", "images"]))
    return parts


def student_gate_parts(block: Mapping[str, Any] | None) -> list[Any]:
    """The export card's section on the student: kept or not, and why; accuracy and latency per model."""
    if not block:
        return []
    verdict = "**kept** in `student/`" if block.get("kept") else "**left out**"
    parts: list[Any] = [Markdown(f"## Edge student\n{verdict} — {block.get('reason')}")]
    gate = block.get("gate")
    if not gate:
        return parts
    champ = gate.get("champion_fp32", {})
    domains = list(champ)
    rows = [["champion onnxruntime_fp32"] + [fmt(champ[d]["accuracy"]) for d in domains]
            + [fmt(gate["latency_ms"]["champion"].get("onnxruntime_fp32"), 2)]]
    for name, acc in gate.get("student", {}).items():
        rows.append([f"student {name}"] + [fmt(acc.get(d, {}).get("accuracy")) for d in domains]
                    + [fmt(gate["latency_ms"]["student"].get(name), 2)])
    parts.append(Table(rows, headers=["model"] + [f"accuracy ({d}, n={champ[d]['n']})" for d in domains]
                       + ["ms (1 thread)"]))
    lat = ", ".join(f"{who} {k} {fmt(v, 2)} ms" for who in ("champion", "student")
                    for k, v in gate["latency_ms"][who].items())
    parts.append(Markdown(f"latency ({gate.get('latency')}): {lat}; speed-up of the fastest "
                          f"**{fmt(gate.get('speedup'), 2)}×** (needed {gate.get('min_speedup')}×)."))
    return parts
