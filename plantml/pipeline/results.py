"""The evaluation's results as typed values; ``to_dict()`` gives the report's plain shape.

Inside the pipeline the stages read typed fields (``report.champion.name``,
``model.calibration.temperature``); at the edges — ``report.json``, ``metrics.json``, the
Metaflow artifact, the cards, MLflow — the report is the plain dict of
:meth:`EvaluationReport.to_dict`, whose keys and order are the report's documented shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class CalibrationResult:
    """Temperature scaling and the abstain threshold of one model (:func:`plantml.calibration.calibration_summary`).

    The fields the pipeline reads are typed; ``summary`` keeps everything the summary
    measured (NLL, validation figures, bootstrap interval), as the report stores it.
    """

    temperature: float
    abstain_threshold: float
    ece: float
    ece_uncalibrated: float
    test_coverage: float
    test_accuracy_at_threshold: float
    summary: Mapping[str, Any]

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> CalibrationResult:
        """Wrap a calibration summary dict.

        Args:
            summary: :func:`plantml.calibration.calibration_summary`'s result.

        Returns:
            The typed view of it.
        """
        return cls(temperature=summary["temperature"], abstain_threshold=summary["abstain_threshold"],
                   ece=summary["ece"], ece_uncalibrated=summary["ece_uncalibrated"],
                   test_coverage=summary["test_coverage"],
                   test_accuracy_at_threshold=summary["test_accuracy_at_threshold"], summary=summary)

    def to_dict(self) -> dict[str, Any]:
        """The summary as the report stores it."""
        return dict(self.summary)


@dataclass
class ModelReport:
    """One model's test-split evaluation: metrics, training facts, calibration, per-domain metrics, plots."""

    metrics: Mapping[str, Any]  # plantml.evaluation.classification_metrics: accuracy, macro_f1, per_class, ...
    arch: str
    num_params: int
    latency_ms: float
    train_seconds: float
    best_epoch: int
    epochs_run: int
    calibration: CalibrationResult
    calibration_confidence_only: CalibrationResult | None = None  # set when the OOD rule also decides abstention
    by_domain: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """Test accuracy."""
        return self.metrics["accuracy"]

    @property
    def macro_f1(self) -> float:
        """Test macro-F1 over all classes."""
        return self.metrics["macro_f1"]

    @property
    def size_mb(self) -> float:
        """The FP32 parameters' size in MB."""
        return self.num_params * 4 / 1e6

    def to_dict(self) -> dict[str, Any]:
        """The model's entry of ``report["models"]``."""
        out = {**self.metrics, "arch": self.arch, "num_params": self.num_params, "size_mb": self.size_mb,
               "latency_ms": self.latency_ms, "train_seconds": self.train_seconds, "best_epoch": self.best_epoch,
               "epochs_run": self.epochs_run, "calibration": self.calibration.to_dict()}
        if self.calibration_confidence_only is not None:
            out["calibration_confidence_only"] = self.calibration_confidence_only.to_dict()
        out["by_domain"] = self.by_domain
        out["plots"] = self.plots
        return out


@dataclass
class OODResult:
    """The champion's out-of-distribution score: threshold, rejection rates, where its detector is published."""

    summary: dict[str, Any]  # plantml.ood.summary_dict: threshold, acceptance, rejection_rate, fit facts
    detector_uri: str
    val_scores: list[float]
    test_scores: list[float]

    @property
    def threshold(self) -> float:
        """Scores above this abstain."""
        return self.summary["threshold"]

    def add_rejection_rates(self, **rates: float) -> None:
        """Record more rejection rates (e.g. of non-leaf inputs) beside the validation and test ones."""
        self.summary["rejection_rate"].update(rates)

    def to_dict(self) -> dict[str, Any]:
        """``report["ood"]``."""
        return {**self.summary, "detector_uri": self.detector_uri,
                "scores": {"validation": self.val_scores, "test": self.test_scores}}


@dataclass(frozen=True)
class RobustnessResult:
    """Accuracy under corruptions on a capped test subset."""

    rows: list[dict[str, Any]]  # one per corruption and severity
    summary: dict[str, Any]  # clean, mean corrupted and relative accuracy
    n_images: int

    @property
    def relative_accuracy(self) -> float:
        """Mean accuracy under corruption over clean accuracy."""
        return self.summary["relative_accuracy"]

    def to_dict(self) -> dict[str, Any]:
        """``report["robustness"]``."""
        return {"rows": self.rows, "summary": self.summary, "n_images": self.n_images}


@dataclass(frozen=True)
class ChampionDecision:
    """Which model ships, and why (in words)."""

    name: str
    reason: str


@dataclass
class EvaluationReport:
    """Everything the evaluate stage measured; :meth:`to_dict` is ``report.json``."""

    classes: list[str]
    is_demo: bool
    n_val: int
    n_test: int
    models: dict[str, ModelReport] = field(default_factory=dict)
    champion: ChampionDecision | None = None
    domain_abstention: dict[str, Any] = field(default_factory=dict)
    domain_gates: list[dict[str, Any]] = field(default_factory=list)
    ood: OODResult | None = None
    robustness: RobustnessResult | None = None
    background_baseline: dict[str, Any] = field(default_factory=dict)
    shortcut: dict[str, Any] = field(default_factory=dict)
    non_leaf: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)  # report-level PNGs, in the order they were drawn

    @property
    def champion_model(self) -> ModelReport:
        """The champion's :class:`ModelReport` (after the champion is chosen)."""
        if self.champion is None:
            raise ValueError("no champion chosen yet")
        return self.models[self.champion.name]

    def model_dicts(self) -> dict[str, dict[str, Any]]:
        """``{name: ModelReport.to_dict()}``: the models as the champion rule and the plots read them."""
        return {name: m.to_dict() for name, m in self.models.items()}

    def to_dict(self) -> dict[str, Any]:
        """The report as stored (``report.json``, the flow's artifact): the keys in their documented order."""
        champ = self.champion_model
        out: dict[str, Any] = {
            "classes": self.classes, "is_demo": self.is_demo, "models": self.model_dicts(), "plots": self.plots,
            "n_val": self.n_val, "n_test": self.n_test,
            "champion": self.champion.name, "champion_reason": self.champion.reason,
            "calibration": champ.calibration.to_dict(), "by_domain": champ.by_domain,
            "domain_abstention": self.domain_abstention, "domain_gates": self.domain_gates,
        }
        if self.ood is not None:
            out["ood"] = self.ood.to_dict()
        if self.robustness is not None:
            out["robustness"] = self.robustness.to_dict()
        out.update(background_baseline=self.background_baseline, shortcut=self.shortcut, non_leaf=self.non_leaf)
        return out
