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

import json
import sys
import tempfile
from pathlib import Path

from metaflow import FlowSpec, Parameter, card, current, step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from flows import cards  # noqa: E402
from plantml import drift  # noqa: E402
from plantml.config import DriftParams, load_params  # noqa: E402
from plantml.registry import log_drift_run  # noqa: E402


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
        with tempfile.TemporaryDirectory(prefix="plantml-drift-") as tmp:
            html_path, json_path = Path(tmp) / "drift_report.html", Path(tmp) / "drift_report.json"
            self.summary = drift.analyse(self.bundle, self.current, DriftParams(**self.drift_params),
                                         report_html=html_path, report_json=json_path)
            conclusive = self.summary["status"] == "ok"
            self.report_html = html_path.read_text() if conclusive else None
            self.report_json = json.loads(json_path.read_text()) if conclusive else None
            if self.summary_out and conclusive:
                drift.write_summary(self.summary, self.summary_out)
            self.mlflow_run_id = log_drift_run(
                self.summary, current=self.current, tracking_uri=self.tracking_uri,
                report_files=(html_path, json_path), tags={"metaflow_run_id": current.run_id},
            ) if self.log_mlflow else None
        self.drift_detected = self.summary.get("drift_detected")
        self.drift_share = self.summary.get("drift_share")
        self.retrain_recommended = bool(self.summary.get("retrain_recommended"))
        for part in cards.drift_card(self.summary, self.current, self.report_html):
            current.card.append(part)
        self.next(self.end)

    @step
    def end(self):
        """Print the summary line."""
        s = self.summary
        keys = ("status", "drift_detected", "drift_share", "n_current", "retrain_recommended", "bundle_version")
        print(json.dumps({k: s.get(k) for k in keys}))


if __name__ == "__main__":
    DriftFlow()
