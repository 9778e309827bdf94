"""DriftFlow: compare what the service sees with the bundle's reference statistics.

start → analyse → end. ``analyse`` loads the bundle's ``reference_stats.csv``, reads the
current data (the service's drift log — a ``.jsonl`` file, a glob or a directory of
``*.jsonl*`` — or a folder of images, which the bundle's ONNX model labels), runs the
Evidently 0.7 data-drift report, and

* builds a card: the verdict, the share of drifted columns, a per-column table
  (method, score, threshold, drifted), a chart of the scores, and the Evidently report;
* logs the result to MLflow (experiment ``plantml-drift``): ``drift_share``,
  ``drift_detected``, ``n_current``, ``n_drifted_columns``, one ``drift_score.<column>``
  per column, and the HTML/JSON reports and summary as artifacts;
* optionally writes ``--summary-out`` (the file serving exports as the
  ``plantml_drift_share`` / ``plantml_drift_detected`` gauges; only a conclusive result).

"Not enough data" is a result, not a failure: the card and MLflow say so and no verdict
is written. Bad input (empty or malformed log, a reference from another bundle version)
fails the step with a message naming the problem.

Usage::

    export METAFLOW_USER=$USER
    python flows/drift_flow.py run --bundle artifacts/bundle --current /var/log/plantml/drift
    python flows/drift_flow.py run --bundle artifacts/bundle --current 'logs/drift-*.jsonl*' \\
        --summary-out reports/drift_summary.json
    python flows/drift_flow.py run --bundle artifacts/bundle --current path/to/new/photos
    python flows/drift_flow.py card view analyse          # the card of the latest run
    mlflow ui --backend-store-uri sqlite:///mlflow.db     # experiment "plantml-drift"

Parameters come from ``params.yaml`` (``--params`` to use another file; section ``drift``).
"""

from __future__ import annotations

import html
import json
import logging
import math
import tempfile
from pathlib import Path

from metaflow import FlowSpec, Parameter, card, current, step

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "plantml-drift"
#: The Evidently report is embedded in the card up to this size (it is always logged to MLflow).
MAX_EMBEDDED_REPORT_BYTES = 12_000_000


class DriftFlow(FlowSpec):
    """Drift analysis of the service's logged features against a bundle's reference."""

    bundle = Parameter("bundle", help="exported bundle directory (with reference_stats.csv)", required=True)
    current = Parameter(
        "current", help="drift log (.jsonl file, glob or directory of *.jsonl*) or a folder of images", required=True
    )
    params_file = Parameter("params-file", help="params.yaml (default: $PLANTML_PARAMS or the repo's)", default="")
    summary_out = Parameter("summary-out", help="write the summary here for the Prometheus gauges", default="")
    log_mlflow = Parameter("mlflow", help="log the result to MLflow", type=bool, default=True)

    @step
    def start(self):
        """Resolve parameters; fail fast on a missing bundle or current path."""
        from plantml.config import load_params

        params = load_params(self.params_file or None)
        self.drift_params = params.to_dict()["drift"]
        self.tracking_uri = params.registry.tracking_uri
        if not Path(self.bundle).is_dir():
            raise ValueError(f"bundle directory not found: {self.bundle}")
        self.next(self.analyse)

    @card(type="blank", id="drift", timeout=120)
    @step
    def analyse(self):
        """Run the Evidently report, build the card, log to MLflow."""
        from plantml import drift
        from plantml.config import DriftParams

        params = DriftParams(**self.drift_params)
        with tempfile.TemporaryDirectory(prefix="plantml-drift-") as tmp:
            html_path, json_path = Path(tmp) / "drift_report.html", Path(tmp) / "drift_report.json"
            self.summary = drift.analyse(self.bundle, self.current, params,
                                         report_html=html_path, report_json=json_path)
            conclusive = self.summary["status"] == "ok"
            self.report_html = html_path.read_text() if conclusive else None
            self.report_json = json.loads(json_path.read_text()) if conclusive else None
            if self.summary_out and conclusive:
                drift.write_summary(self.summary, self.summary_out)
            self.mlflow_run_id = self._log_mlflow(html_path, json_path) if self.log_mlflow else None
        self.drift_detected = self.summary.get("drift_detected")
        self.drift_share = self.summary.get("drift_share")
        self.retrain_recommended = bool(self.summary.get("retrain_recommended"))
        self._build_card()
        self.next(self.end)

    def _log_mlflow(self, html_path: Path, json_path: Path) -> str:
        import mlflow

        from plantml.registry import setup_mlflow

        setup_mlflow(self.tracking_uri, experiment=MLFLOW_EXPERIMENT)
        s = self.summary
        with mlflow.start_run(run_name=f"drift-{s.get('bundle_version')}") as run:
            mlflow.set_tags({
                "bundle_version": str(s.get("bundle_version")), "bundle_name": str(s.get("bundle_name")),
                "status": s["status"], "current": str(self.current), "metaflow_run_id": current.run_id,
                "retrain_recommended": str(s.get("retrain_recommended")),
            })
            metrics = {"n_current": s["n_current"], "n_reference": s["n_reference"]}
            if s["status"] == "ok":
                metrics.update(
                    drift_share=s["drift_share"], drift_detected=float(s["drift_detected"]),
                    n_drifted_columns=s["n_drifted_columns"],
                )
                metrics.update({
                    f"drift_score.{col}": r["score"] for col, r in s["columns"].items() if r["score"] is not None
                })
                mlflow.log_artifact(str(html_path), artifact_path="drift")
                mlflow.log_artifact(str(json_path), artifact_path="drift")
            mlflow.log_metrics(metrics)
            mlflow.log_dict(s, "drift/summary.json")
            return run.info.run_id

    def _build_card(self) -> None:
        from metaflow.cards import Image, Markdown, Table, ValueBox

        s = self.summary
        current.card.append(Markdown(f"# Drift: bundle {s.get('bundle_name')} version {s.get('bundle_version')}"))
        current.card.append(Markdown(
            f"Current data: `{self.current}` ({s['n_current']} rows) against {s['n_reference']} reference rows."
        ))
        if s["status"] != "ok":
            current.card.append(Markdown(f"## Not enough data: no verdict\n\n{s.get('message', '')}"))
            return
        verdict = "DRIFT: retrain recommended" if s["retrain_recommended"] else "no dataset drift"
        current.card.append(ValueBox(
            title="Share of drifted columns", value=f"{s['drift_share']:.2f}",
            subtitle=f"{verdict} (threshold {s['threshold_share']})",
            theme="warning" if s["drift_detected"] else "success",
        ))
        current.card.append(Markdown(f"## {verdict}\n\n{s['message']}"))
        rows = [
            [col, str(r["method"]), _fmt(r["score"]), _fmt(r["threshold"]), "yes" if r["drifted"] else "no"]
            for col, r in sorted(s["columns"].items(), key=lambda kv: (not kv[1]["drifted"], kv[0]))
        ]
        current.card.append(Table(rows, headers=["column", "method", "score", "threshold", "drifted"]))
        current.card.append(Image.from_matplotlib(_scores_figure(s["columns"]), label="per-column drift scores"))
        if self.report_html and len(self.report_html.encode()) <= MAX_EMBEDDED_REPORT_BYTES:
            # The report carries its own scripts: an iframe's srcdoc runs them in their own
            # document. Newlines are escaped too, so that the Markdown renderer sees one raw
            # HTML line (a blank line would end its HTML block and print the rest as text).
            srcdoc = html.escape(self.report_html, quote=True).replace("\r", "&#13;").replace("\n", "&#10;")
            current.card.append(Markdown("## Evidently report"))
            current.card.append(Markdown(
                f'<iframe title="Evidently drift report" style="width:100%;height:1400px;border:0" '
                f'srcdoc="{srcdoc}"></iframe>'
            ))
        else:
            current.card.append(Markdown("The Evidently report is in the MLflow run (artifact `drift/`)."))

    @step
    def end(self):
        """Print the summary line."""
        s = self.summary
        keys = ("status", "drift_detected", "drift_share", "n_current", "retrain_recommended", "bundle_version")
        print(json.dumps({k: s.get(k) for k in keys}))


def _fmt(value) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def _strength(value, method) -> float:
    """-log10(p) for statistical tests (bigger = stronger drift), the distance otherwise."""
    if value is None:
        return 0.0
    value = float(value)
    return -math.log10(max(value, 1e-300)) if "p_value" in str(method) else value


def _scores_figure(columns: dict):
    """Drift strength per column with its threshold, drifted columns in red (pre-rendered: cards time out)."""
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


if __name__ == "__main__":
    DriftFlow()
