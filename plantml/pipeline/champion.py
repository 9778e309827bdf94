"""Choosing the champion among the evaluated models, and the quality gates it must pass."""

from __future__ import annotations

import logging
from typing import Any, Mapping

from plantml.config import Params
from plantml.evaluation import QualityGateError, check_domain_gates, check_quality_gates, choose_champion

log = logging.getLogger(__name__)


def champ_domains(models: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """The domains every model was scored on.

    Args:
        models: ``{name: model report}`` (each with ``by_domain``).

    Returns:
        The domain names common to all models.
    """
    sets = [set(m.get("by_domain", {})) for m in models.values()]
    return set.intersection(*sets) if sets else set()


def champion_candidates(models: Mapping[str, Mapping[str, Any]], metric: str,
                        domain: str | None) -> dict[str, dict[str, Any]]:
    """The champion rule's view of each model: ``metric`` on ``domain``'s test images when that domain was scored.

    Args:
        models: ``{name: model report}``.
        metric: the champion metric (``evaluate.champion_metric``).
        domain: ``evaluate.champion_domain`` (``None``: all test images).

    Returns:
        ``{name: metrics}`` for :func:`plantml.evaluation.choose_champion`.
    """
    if not domain:
        return {n: dict(m) for n, m in models.items()}
    if domain not in champ_domains(models):
        log.warning("evaluate.champion_domain %r has no test images in this run: the champion is chosen on all", domain)
        return {n: dict(m) for n, m in models.items()}
    return {n: {**m, metric: m["by_domain"][domain][metric]} for n, m in models.items()}


def pick_champion(params: Params, models: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The champion by ``evaluate.champion_*``, and the reason in words.

    Args:
        params: the run's parameters.
        models: ``{name: model report}``.

    Returns:
        ``(name, reason)``; the reason names the domain when the rule used one.
    """
    e = params.evaluate
    champion, reason = choose_champion(champion_candidates(models, e.champion_metric, e.champion_domain),
                                       e.champion_metric, e.champion_tie_tolerance)
    if e.champion_domain and e.champion_domain in champ_domains(models):
        reason = f"on {e.champion_domain} test images: {reason}"
    return champion, reason


def domain_gate_results(params: Params, by_domain: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``evaluate.gates`` checked on the champion's per-domain metrics, each logged.

    Args:
        params: the run's parameters.
        by_domain: the champion's per-domain test metrics.

    Returns:
        One row per gate (:func:`plantml.evaluation.check_domain_gates`).
    """
    results = check_domain_gates(by_domain, params.evaluate.gates)
    for r in results:
        (log.warning if r["passed"] is False else log.info)("domain gate: %s", r["message"])
    return results


def enforce_quality_gates(params: Params, report: Mapping[str, Any]) -> None:
    """Raise :class:`~plantml.evaluation.QualityGateError` if the champion misses a gate.

    Kept separate from :func:`plantml.pipeline.evaluate_models` so callers can record the
    evaluation (MLflow, card) before failing the run.

    Args:
        params: the run's parameters (the gates as they are now).
        report: the evaluation report (as returned, or read back from ``report.json``).

    Raises:
        QualityGateError: the first gate family the champion fails, with every failure in it.
    """
    name = report["champion"]
    check_quality_gates(report["models"][name], params.evaluate.min_macro_f1, params.evaluate.min_accuracy, name)
    _check_robustness_gate(params, name, report["robustness"]["summary"]["relative_accuracy"])
    # Re-checked from the metrics (not only read from the report), so a gate added after evaluate still applies.
    failed = [g["message"] for g in check_domain_gates(report.get("by_domain", {}), params.evaluate.gates)
              if g["passed"] is False]
    if failed:
        raise QualityGateError(f"domain gate failed for champion {name}: " + "; ".join(failed))
    _check_shortcut_gate(params, name, report.get("shortcut", {}))


def _check_robustness_gate(params: Params, name: str, relative: float) -> None:
    """Raise when the accuracy under corruption, relative to clean, is under ``robustness.min_relative_accuracy``."""
    if relative < params.robustness.min_relative_accuracy:
        raise QualityGateError(
            f"robustness gate failed for champion {name}: relative accuracy under corruption {relative:.3f} "
            f"< robustness.min_relative_accuracy {params.robustness.min_relative_accuracy}")


def _check_shortcut_gate(params: Params, name: str, shortcut: Mapping[str, Any]) -> None:
    """Raise when too many lab leaves on field backgrounds are predicted as a field class."""
    if shortcut.get("applicable") and shortcut["target_rate"] > params.robustness.max_shortcut_rate:
        raise QualityGateError(
            f"shortcut gate failed for champion {name}: {shortcut['target_rate']:.3f} of non-field lab leaves on field "
            f"backgrounds predicted as a field class > robustness.max_shortcut_rate "
            f"{params.robustness.max_shortcut_rate}")
