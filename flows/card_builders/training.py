"""Cards of the data and training steps: the data set, each branch's curves, the live training section."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from metaflow.cards import Markdown, Table, VegaChart

from flows.card_builders.common import banner, fmt, image_or_note


def prepare_card(summary: Mapping[str, Any], class_chart: str | None) -> list[Any]:
    """Dataset: layout, per-class split counts, skipped files.

    Args:
        summary: the prepared data's summary (``DatasetSummary.to_dict()``).
        class_chart: the PNG of images per class and split (``None``: not drawn).

    Returns:
        The card's components.
    """
    parts: list[Any] = banner(summary["is_demo"])
    parts.append(Markdown(
        f"# Data\n**{summary['n_images']}** images in **{len(summary['classes'])}** classes from `{summary['root']}` "
        f"(layout: {summary['layout']}). Skipped: **{summary['n_skipped']}** unreadable or non-image file(s); "
        f"exact-duplicate files kept within one split: {summary['n_duplicate_files']}. "
        f"Manifest sha256 `{summary['manifest_sha256'][:16]}…`."
    ))
    domains = summary.get("domains") or {}
    if domains:
        parts.append(Table([[d, f"`{v['root']}`", v["layout"], fmt(v["weight"], 2),
                             "/".join(str(x) for x in v["split"]) if v.get("split") else "data.split",
                             v["n_images"], v["splits"]["train"], v["splits"]["val"], v["splits"]["test"],
                             len(v["counts"])] for d, v in domains.items()],
                           headers=["domain", "source", "layout", "sampling weight", "split", "images", "train", "val",
                                    "test", "classes"]))
    parts += image_or_note(class_chart, "images per class and split")
    rows = [[c, v["train"], v["val"], v["test"]] for c, v in summary["counts"].items()]
    parts.append(Table(rows, headers=["class", "train", "val", "test"]))
    if summary["skipped"]:
        parts.append(Markdown("## Skipped files"))
        parts.append(Table([[s["path"], s["reason"]] for s in summary["skipped"][:50]], headers=["file", "reason"]))
    if summary.get("skipped_empty_classes"):
        parts.append(Markdown("Empty class folders (ignored): " + ", ".join(summary["skipped_empty_classes"])))
    return parts


def train_card(result: Mapping[str, Any], curve_png: str | None, is_demo: bool) -> list[Any]:
    """One branch: curves and the per-epoch table.

    Args:
        result: the branch's ``TrainResult.to_dict()``.
        curve_png: its training-curves PNG.
        is_demo: open with the DEMO banner.

    Returns:
        The card's components.
    """
    parts: list[Any] = banner(is_demo)
    parts.append(Markdown(
        f"# Training `{result['name']}` ({result['arch']})\nbest epoch **{result['best_epoch']}** of "
        f"{result['epochs_run']} (early stop: {result['stopped_early']}), val macro-F1 "
        f"**{result['best_val_macro_f1']:.4f}**, val accuracy {result['best_val_accuracy']:.4f}; "
        f"{result['num_params'] / 1e6:.2f} M parameters; {result['train_seconds']:.0f} s on {result['device']} "
        f"with {result['threads']} thread(s)."
    ))
    parts += image_or_note(curve_png, "training curves")
    keys = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr", "seconds"]
    parts.append(Table([[fmt(h[k]) for k in keys] for h in result["history"]], headers=keys))
    return parts


def curves_spec(history: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Interactive Vega-Lite chart of the training curves (loss and accuracy per epoch; hover for values)."""
    rows = [{"epoch": h["epoch"], "metric": k, "value": h[k]} for h in history
            for k in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "val_macro_f1") if k in h]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json", "width": 520, "height": 220,
        "data": {"values": rows},
        "mark": {"type": "line", "point": True, "tooltip": True},
        "encoding": {"x": {"field": "epoch", "type": "quantitative", "axis": {"tickMinStep": 1}},
                     "y": {"field": "value", "type": "quantitative"},
                     "color": {"field": "metric", "type": "nominal"}},
    }


def live_train_card(card: Any, model_name: str, is_demo: bool = False) -> Any:
    """A card section that refreshes after every epoch while the branch trains (with the DEMO banner if it applies).

    Args:
        card: the step's ``current.card``.
        model_name: the branch's model.
        is_demo: open with the DEMO banner.

    Returns:
        ``on_epoch_end(row, result)`` for :func:`plantml.training.train_model`.
    """
    progress = Markdown(f"## Training `{model_name}`: first epoch running…")
    chart = VegaChart(curves_spec([]))
    for part in banner(is_demo):
        card.append(part)
    card.append(progress)
    card.append(chart)
    card.refresh()

    def update(row: Mapping[str, float], result: Any) -> None:
        history = result.history
        lines = ["| epoch | train loss | val accuracy | val macro-F1 | images/s | s |", "|---|---|---|---|---|---|"]
        lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['val_accuracy']:.4f} | {h['val_macro_f1']:.4f} | "
                  f"{h.get('images_per_second', float('nan')):.1f} | {h['seconds']:.0f} |" for h in history]
        progress.update(f"## Training `{model_name}` — epoch {row['epoch']:.0f} done (best so far: epoch "
                        f"{result.best_epoch}, val macro-F1 {result.best_val_macro_f1:.4f})\n\n" + "\n".join(lines))
        chart.update(curves_spec(history))
        card.refresh(force=True)

    return update


def class_chart(summary: Mapping[str, Any], path: Path) -> str:
    """Stacked bars of images per class and split (rendered to PNG).

    Args:
        summary: the prepared data's summary (``counts``).
        path: the PNG to write.

    Returns:
        ``path`` as text.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes: Sequence[str] = list(summary["counts"])
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(classes) + 2), 3.5))
    bottom = [0] * len(classes)
    for split, colour in (("train", "#3b7d3b"), ("val", "#4a6fa5"), ("test", "#a5674a")):
        vals = [summary["counts"][c][split] for c in classes]
        ax.bar(range(len(classes)), vals, bottom=bottom, label=split, color=colour)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xticks(range(len(classes)), [c.replace("___", ": ")[:26] for c in classes], rotation=60, ha="right",
                  fontsize=7)
    ax.legend()
    ax.set_ylabel("images")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
