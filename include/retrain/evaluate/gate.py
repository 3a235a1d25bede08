"""The go/no-go gate: turn a baseline-vs-candidate comparison into GO or NO-GO with a reason per rule.

Thresholds come from the use-case YAML merged with the run's Params (``uc.thresholds``). A NO-GO is a normal
outcome (the DAG branches to "reject"), not an error, so nothing here raises for a bad model; it only raises
when the comparison itself is unusable.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.schemas.use_case import UseCase

# base_model: the untuned base model (prompted with the labels since retrain.evaluate.baseline; older metrics have
# no "baselines" entry and mean the base model with the candidate's prompt). base_model_prompted: an alias.
BASELINE_KINDS = ("production", "base_model", "base_model_prompted")
SIGNIFICANCE_ALPHA = 0.05


def _metric(comparison: dict, name: str) -> tuple[float | None, float | None]:
    m = comparison.get("metrics", {}).get(name)
    if m is None:
        raise ValueError(
            f"the comparison has no metric '{name}': pass the output of retrain.evaluate.metrics.compare(uc, baseline, candidate)"
        )
    return m.get("baseline"), m.get("candidate")


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


def _check(name: str, value: Any, threshold: Any, passed: bool, required: bool, reason: str) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed),
            "required": bool(required), "reason": reason}


def override_note(o: dict) -> str:
    """How a loosened threshold reads in the summary, the report and the registry history."""
    return f"threshold {o['threshold']} loosened from {o['floor']} to {o['value']} by {o['by']}: {o['reason']}"


def summary_line(head: str, checks: list[dict], overrides: list[dict]) -> str:
    """"GO: <head>; all N required checks passed" or "NO-GO: <head>; failed a, b — <first reason>", plus any
    gate override (shared by the structured and the generation gate)."""
    failed = [c for c in checks if c["required"] and not c["passed"]]
    if failed:
        summary = f"NO-GO: {head}; failed {', '.join(c['name'] for c in failed)} — {failed[0]['reason']}"
    else:
        summary = f"GO: {head}; all {sum(c['required'] for c in checks)} required checks passed"
    if overrides:
        summary += " (gate override: " + "; ".join(override_note(o) for o in overrides) + ")"
    return summary


def _slice_check(th, comparison: dict, baseline_kind: str, base_name: str) -> dict:
    """max_slice_regression: the candidate may not lose a slice of the test set (language, input length,
    evaluation.slices) by more than the threshold against the production model. Against the base model on a first
    run, or without a threshold, the worst slice is reported only."""
    limit = th.max_slice_regression
    worst = (comparison.get("analysis") or {}).get("worst_slice_regression")
    required = limit is not None and baseline_kind == "production"
    if worst is None:
        reason = "no slice of 5+ examples scores lower than with the " + base_name
        return _check("max_slice_regression", 0.0, limit, True, required, reason + ("" if required else " (info only)"))
    drop = -float(worst["delta"])
    ok = limit is None or drop <= limit
    reason = (f"worst slice {worst['slice']}={worst['value']} (n={worst['n']}): {worst['candidate']:.3f} vs "
              f"{worst['baseline']:.3f}, a drop of {drop:.3f}"
              + (f" {'<=' if ok else '>'} allowed {limit:.3f}" if limit is not None else ""))
    if not required:
        reason += (" (info only: no max_slice_regression set)" if limit is None
                   else " (info only: first run, no production model to regress from)")
    return _check("max_slice_regression", drop, limit, ok, required, reason)


def decide(uc: UseCase, comparison: dict, *, baseline_kind: str, overrides: list[dict] | None = None) -> dict:
    """GO only if every required check passes. Every rule is reported, including optional ones ("info").

    ``overrides``: thresholds this run loosened below the YAML's floors (run_config.json's ``gate_overrides``:
    threshold, floor, value, by, reason); recorded in the decision and named in its summary."""
    if baseline_kind not in BASELINE_KINDS:
        raise ValueError(f"baseline_kind must be one of {BASELINE_KINDS}, got {baseline_kind!r}")
    th = uc.thresholds
    primary = comparison.get("primary_label", uc.primary_label)
    base, cand = _metric(comparison, "primary_score")
    if cand is None or base is None:
        raise ValueError("the comparison has no primary score for one of the models; re-run the evaluation")
    baselines = comparison.get("baselines") or {}
    prompted = baselines.get("base_model_prompted")
    if baseline_kind == "production":
        base_name = "production model"
    else:
        base_name = "prompted base model" if prompted or baseline_kind == "base_model_prompted" else "base model"
    checks = []

    min_score = float(getattr(th, "min_score", 0.85))
    checks.append(_check(
        "min_score", cand, min_score, cand >= min_score, True,
        f"{primary} accuracy {cand:.3f} {'>=' if cand >= min_score else '<'} minimum {min_score:.3f}",
    ))

    min_rel = float(getattr(th, "min_relative_improvement", 0.10))
    if base > 0:
        rel = (cand - base) / base
        ok = rel >= min_rel
        reason = (f"{rel * 100:+.1f}% relative to the {base_name} ({cand:.3f} vs {base:.3f}) "
                  f"{'>=' if ok else '<'} required {_pct(min_rel)}")
        checks.append(_check("min_relative_improvement", rel, min_rel, ok, True, reason))
    else:
        # Relative gain over 0 is undefined (infinite): any real gain counts, and none is needed if the
        # threshold tolerates no gain at all.
        ok = cand > base or min_rel <= 0
        reason = (f"the {base_name} scored 0, so the relative gain is undefined; "
                  + (f"any positive gain passes and the candidate scored {cand:.3f}" if cand > 0
                     else "the candidate scored 0 too (no gain)"))
        checks.append(_check("min_relative_improvement", None, min_rel, ok, True, reason))

    max_lat = float(getattr(th, "max_p95_latency_regression", 0.25))
    base_p95, cand_p95 = _metric(comparison, "latency_p95")
    # The rule protects the latency users get today. On a first run nothing serves traffic yet, and an
    # untuned base model's latency mostly measures how long it rambles (or how soon it gives up), so the
    # comparison is shown but does not decide.
    lat_required = baseline_kind == "production"
    lat_note = "" if lat_required else " (info only: first run, no production latency to regress from)"
    if base_p95 is None or cand_p95 is None:
        checks.append(_check(
            "max_p95_latency_regression", None, max_lat, True, lat_required,
            "latency was not measured for both models, so it cannot be compared (rule skipped)" + lat_note,
        ))
    elif base_p95 <= 0:
        ok = cand_p95 <= 0
        checks.append(_check(
            "max_p95_latency_regression", None, max_lat, ok, lat_required,
            f"baseline p95 latency is 0 s, candidate {cand_p95:.3f} s: "
            + ("no regression" if ok else "any latency is a regression relative to 0") + lat_note,
        ))
    else:
        reg = (cand_p95 - base_p95) / base_p95
        ok = reg <= max_lat
        checks.append(_check(
            "max_p95_latency_regression", reg, max_lat, ok, lat_required,
            f"p95 latency {cand_p95:.3f} s vs {base_p95:.3f} s ({_pct(reg)}) "
            f"{'<=' if ok else '>'} allowed {_pct(max_lat)}" + lat_note,
        ))

    min_json = float(getattr(th, "min_json_validity", 0.95))
    _, json_valid = _metric(comparison, "json_validity")
    json_valid = json_valid or 0.0
    checks.append(_check(
        "min_json_validity", json_valid, min_json, json_valid >= min_json, True,
        f"{json_valid * 100:.1f}% of answers are valid JSON {'>=' if json_valid >= min_json else '<'} "
        f"minimum {min_json * 100:.1f}%",
    ))

    required_sig = bool(getattr(th, "require_significance", False))
    sig = comparison.get("significance") or {}
    boot, mc = sig.get("bootstrap") or {}, sig.get("mcnemar") or {}
    if boot and mc:
        significant = boot["ci_low"] > 0 and mc["p"] < SIGNIFICANCE_ALPHA
        reason = (f"{primary} gain {boot['diff']:+.3f}, {boot['ci'] * 100:.0f}% CI [{boot['ci_low']:+.3f}, "
                  f"{boot['ci_high']:+.3f}], McNemar p={mc['p']:.3g}: "
                  + ("significant" if significant else "not significant (needs CI above 0 and p < 0.05)"))
    else:
        significant, reason = False, "no significance results in the comparison"
    if not required_sig:
        reason += " (info only: require_significance is off)"
    checks.append(_check(
        "require_significance", {"ci_low": boot.get("ci_low"), "p": mc.get("p")},
        {"ci_low": "> 0", "p": f"< {SIGNIFICANCE_ALPHA}"}, significant, required_sig, reason,
    ))

    checks.append(_slice_check(th, comparison, baseline_kind, base_name))

    failed = [c for c in checks if c["required"] and not c["passed"]]
    decision = "GO" if not failed else "NO-GO"
    head = f"{primary} accuracy {cand:.3f} vs {base:.3f} ({base_name})"
    if baseline_kind == "production" and prompted:
        head += f", prompted base model {prompted['primary_score']:.3f}"
    overrides = [dict(o) for o in overrides or []]
    summary = summary_line(head, checks, overrides)
    return {
        "decision": decision,
        "use_case": uc.name,
        "primary_label": primary,
        "baseline_kind": baseline_kind,
        "baseline_score": base,
        "candidate_score": cand,
        "base_model_prompted_score": prompted["primary_score"] if prompted else None,
        "baselines": baselines_line(baselines),
        "checks": checks,
        "failed": [c["name"] for c in failed],
        "summary": summary,
        "overrides": overrides,
        "decided_at": datetime.now(timezone.utc).isoformat(),
    }


def baselines_line(baselines: dict) -> str | None:
    """Both baselines and the candidate's relative gain over each, on one line (None without them)."""
    parts = []
    for kind, title in (("base_model_prompted", "prompted base model"), ("production", "production model")):
        b = baselines.get(kind)
        if not b:
            continue
        gain = "undefined (it scored 0)" if b.get("relative_gain") is None else _pct(b["relative_gain"])
        parts.append(f"{title} {b['primary_score']:.3f} (candidate {gain})")
    return "baselines: " + "; ".join(parts) if parts else None


def decision_text(decision: dict) -> str:
    """One screen of plain text for the Airflow task log and the run note."""
    lines = [
        f"{decision['decision']} — {decision.get('use_case', '')} (baseline: {decision.get('baseline_kind')})",
        decision["summary"],
        *([decision["baselines"]] if decision.get("baselines") else []),
        "",
    ]
    for c in decision["checks"]:
        # Optional rules are shown but must not read like a failure that blocked the decision.
        status = ("PASS" if c["passed"] else "FAIL") if c["required"] else "INFO"
        lines.append(f"[{status}] {c['name']:<27} {c['reason']}")
    for o in decision.get("overrides") or []:
        lines.append(f"[OVERRIDE] {override_note(o)}")
    return "\n".join(lines)
