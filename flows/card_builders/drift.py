"""The drift flow's card: the verdict, per-column scores (table and chart), the embedded Evidently report."""

from __future__ import annotations

import html
import math
from typing import Any, Mapping

from metaflow.cards import Image, Markdown, Table, ValueBox

#: The Evidently report is embedded in the card up to this size (it is always logged to MLflow).
MAX_EMBEDDED_REPORT_BYTES = 12_000_000


def drift_card(summary: Mapping[str, Any], current: str, report_html: str | None) -> list[Any]:
    """The drift analysis of ``current`` against the bundle's reference.

    Args:
        summary: :func:`plantml.drift.analyse`'s summary.
        current: what was analysed (drift log or image folder), as given.
        report_html: the Evidently HTML report (``None`` when the result is not conclusive).

    Returns:
        The card's components; "not enough data" is a result, shown without a verdict.
    """
    s = summary
    parts: list[Any] = [
        Markdown(f"# Drift: bundle {s.get('bundle_name')} version {s.get('bundle_version')}"),
        Markdown(f"Current data: `{current}` ({s['n_current']} rows) against {s['n_reference']} reference rows."),
    ]
    if s["status"] != "ok":
        return parts + [Markdown(f"## Not enough data: no verdict\n\n{s.get('message', '')}")]
    verdict = "DRIFT: retrain recommended" if s["retrain_recommended"] else "no dataset drift"
    parts.append(ValueBox(
        title="Share of drifted columns", value=f"{s['drift_share']:.2f}",
        subtitle=f"{verdict} (threshold {s['threshold_share']})",
        theme="warning" if s["drift_detected"] else "success",
    ))
    parts.append(Markdown(f"## {verdict}\n\n{s['message']}"))
    parts.append(_columns_table(s["columns"]))
    parts.append(Image.from_matplotlib(scores_figure(s["columns"]), label="per-column drift scores"))
    return parts + _report_parts(report_html)


def _columns_table(columns: Mapping[str, Mapping[str, Any]]) -> Any:
    """One row per column, drifted ones first: method, score, threshold, drifted."""
    rows = [
        [col, str(r["method"]), _fmt(r["score"]), _fmt(r["threshold"]), "yes" if r["drifted"] else "no"]
        for col, r in sorted(columns.items(), key=lambda kv: (not kv[1]["drifted"], kv[0]))
    ]
    return Table(rows, headers=["column", "method", "score", "threshold", "drifted"])


def _report_parts(report_html: str | None) -> list[Any]:
    """The Evidently report in an iframe, or where to find it when it is too large for the card."""
    if not report_html or len(report_html.encode()) > MAX_EMBEDDED_REPORT_BYTES:
        return [Markdown("The Evidently report is in the MLflow run (artifact `drift/`).")]
    # The report carries its own scripts: an iframe's srcdoc runs them in their own
    # document. Newlines are escaped too, so that the Markdown renderer sees one raw
    # HTML line (a blank line would end its HTML block and print the rest as text).
    srcdoc = html.escape(report_html, quote=True).replace("\r", "&#13;").replace("\n", "&#10;")
    return [Markdown("## Evidently report"),
            Markdown(f'<iframe title="Evidently drift report" style="width:100%;height:1400px;border:0" '
                     f'srcdoc="{srcdoc}"></iframe>')]


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def _strength(value: Any, method: Any) -> float:
    """-log10(p) for statistical tests (bigger = stronger drift), the distance otherwise."""
    if value is None:
        return 0.0
    value = float(value)
    return -math.log10(max(value, 1e-300)) if "p_value" in str(method) else value


def scores_figure(columns: Mapping[str, Mapping[str, Any]]) -> Any:
    """Drift strength per column with its threshold, drifted columns in red (pre-rendered: cards time out).

    Args:
        columns: the summary's ``columns`` (``score``, ``threshold``, ``method``, ``drifted`` each).

    Returns:
        A closed matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(columns)
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(names) + 1.2))
    strength = [_strength(columns[n]["score"], columns[n]["method"]) for n in names]
    limits = [_strength(columns[n]["threshold"], columns[n]["method"]) for n in names]
    ax.barh(names, strength, color=["#d62728" if columns[n]["drifted"] else "#2ca02c" for n in names])
    ax.scatter(limits, names, marker="|", s=200, color="black", label="threshold", zorder=3)
    ax.set_xscale("symlog", linthresh=2)
    ax.set_xlabel("drift strength: -log10(p) for statistical tests, distance otherwise")
    ax.legend(loc="lower right")
    ax.invert_yaxis()
    fig.tight_layout()
    plt.close(fig)
    return fig
