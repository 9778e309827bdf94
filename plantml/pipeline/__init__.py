"""The pipeline stages, one function each, shared by the Metaflow flow, the CLI and DVC.

``prepare`` -> ``train_branch`` (one per model, in parallel) -> ``evaluate_models`` ->
``distill_student`` (the edge student) -> ``export_champion``.
Each takes the frozen :class:`~plantml.config.Params` and plain data,
and returns plain data (dicts, paths), so a Metaflow step can store the result as an
artifact and the CLI can write it as JSON.

One job per module:

* :mod:`~plantml.pipeline.paths` — ``repo_path``: params' relative paths are relative to the checkout;
* :mod:`~plantml.pipeline.prepare_stage` — data sources, split, shards;
* :mod:`~plantml.pipeline.train_stage` — one model (branch) on the shards;
* :mod:`~plantml.pipeline.samples` — capped, stratified subsets of the shards;
* :mod:`~plantml.pipeline.scoring` — model passes over a split (logits, OOD scores) and the OOD fit;
* :mod:`~plantml.pipeline.evaluate_stage` — every model on the test split, then the champion;
* :mod:`~plantml.pipeline.champion` — the champion rule and the quality gates;
* :mod:`~plantml.pipeline.beyond_split` — OOD, corruptions, background baseline, shortcut, non-leaf inputs;
* :mod:`~plantml.pipeline.results` — the evaluation's typed results (``to_dict()`` at the edges);
* :mod:`~plantml.pipeline.reports` — ``report.json``, DVC's metrics and plot tables, the latest copy;
* :mod:`~plantml.pipeline.distill_stage` — the edge student, distilled from the champion;
* :mod:`~plantml.pipeline.student_export` — the student in the bundle's ``student/``, behind its gate;
* :mod:`~plantml.pipeline.export_stage` — the champion as a bundle.

Every name callers used from the former single module is re-exported here.
"""

from __future__ import annotations

from plantml.pipeline.beyond_split import shortcut_report
from plantml.pipeline.champion import champ_domains, champion_candidates, enforce_quality_gates
from plantml.pipeline.distill_stage import distill_student, student_spec
from plantml.pipeline.evaluate_stage import evaluate_models
from plantml.pipeline.export_stage import export_champion
from plantml.pipeline.paths import REPO_ROOT, repo_path
from plantml.pipeline.prepare_stage import prepare, resolve_data_root, resolve_sources
from plantml.pipeline.reports import DVC_EVAL_FILES, publish_latest_evaluation
from plantml.pipeline.results import (CalibrationResult, ChampionDecision, EvaluationReport, ModelReport, OODResult,
                                      RobustnessResult)
from plantml.pipeline.samples import domains_of, load_manifest, shrink_original, stratified_subset, subset_samples
from plantml.pipeline.scoring import SplitScores, fit_detector, score_split, torch_proba
from plantml.pipeline.student_export import gate_student, student_export_step
from plantml.pipeline.train_stage import train_branch

# The former module's private names that tests and benchmarks import.
_champion_candidates = champion_candidates
_shortcut_report = shortcut_report
_stratified_subset = stratified_subset
_torch_proba = torch_proba

__all__ = [
    "REPO_ROOT", "repo_path", "resolve_sources", "resolve_data_root", "prepare", "train_branch", "load_manifest",
    "subset_samples", "shrink_original", "domains_of", "stratified_subset", "SplitScores", "score_split",
    "fit_detector", "torch_proba", "evaluate_models", "champ_domains", "champion_candidates", "enforce_quality_gates",
    "shortcut_report", "DVC_EVAL_FILES", "publish_latest_evaluation", "export_champion", "CalibrationResult",
    "ChampionDecision", "EvaluationReport", "ModelReport", "OODResult", "RobustnessResult", "distill_student",
    "student_spec", "gate_student", "student_export_step",
]
