"""The go/no-go gate of a generation use case (one tenant's adapter vs its baseline), from a comparison of
``retrain.evaluate.generation_metrics.compare`` and, optionally, a judge's pairwise result.

Same output shape as ``retrain.evaluate.gate.decide`` (decision, checks, failed, summary, baseline/candidate score,
overrides, decided_at) so the report, decision file and registry code record it unchanged. Pure: no IO. A NO-GO is a
normal outcome; it raises only when the comparison itself is unusable.

Rules (``generation_gate`` in the YAML, :class:`retrain.schemas.generation.GenerationGate`):

* ``min_chrf_gain``: chrF gain over the baseline >= the threshold AND its 95% CI above 0;
* ``min_attribution``: share of the candidate's replies the voice classifier attributes to the tenant;
* ``max_perplexity_regression``: candidate / baseline per-token perplexity - 1 (skipped when not measured);
* ``min_length_ratio`` / ``max_length_ratio``: mean candidate chars / mean reference chars within the window;
* ``min_judge_win_rate``: counts only when a judge ran and is calibrated (kappa >= min_kappa); otherwise reported
  for information, so an unchecked judge can never flip a decision.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from retrain.evaluate.gate import BASELINE_KINDS, _check, summary_line

PRIMARY = "chrf"


def _rule(rules: Any, name: str) -> float:
    value = rules.get(name) if isinstance(rules, dict) else getattr(rules, name, None)
    if value is None:
        raise ValueError(f"the generation gate has no '{name}': pass the use case's generation_gate (GenerationGate)")
    return float(value)


def _metric(comparison: dict, name: str) -> dict:
    m = (comparison.get("metrics") or {}).get(name)
    if m is None:
        raise ValueError(f"the comparison has no metric '{name}': pass the output of "
                         "retrain.evaluate.generation_metrics.compare(baseline, candidate)")
    return m


def _chrf_check(rules: Any, comparison: dict, base_name: str) -> dict:
    need = _rule(rules, "min_chrf_gain")
    m = _metric(comparison, "chrf")
    gain, low, high = m.get("gain"), m.get("ci_low"), m.get("ci_high")
    if gain is None:
        return _check("min_chrf_gain", None, need, False, True, "chrF was not measured for both models")
    big_enough = gain >= need
    significant = low is not None and low > 0
    ci = f"95% CI [{low:+.2f}, {high:+.2f}]" if low is not None and high is not None else "no CI"
    reason = (f"chrF {m['candidate']:.2f} vs {m['baseline']:.2f} ({base_name}): gain {gain:+.2f} "
              f"{'>=' if big_enough else '<'} required {need:+.2f}; {ci} "
              + ("excludes 0" if significant else "does not exclude 0 (not significant)"))
    return _check("min_chrf_gain", gain, {"gain": need, "ci_low": "> 0"}, big_enough and significant, True, reason)


def _attribution_check(rules: Any, comparison: dict, base_name: str) -> dict:
    need = _rule(rules, "min_attribution")
    m = _metric(comparison, "attribution")
    cand, base = m.get("candidate"), m.get("baseline")
    if cand is None:
        return _check("min_attribution", None, need, True, False,
                      "voice attribution was not measured (a voice classifier needs e-mails of 2+ tenants); "
                      "rule skipped (info only)")
    ok = cand >= need
    reason = (f"{cand * 100:.1f}% of the candidate's replies are attributed to the tenant "
              f"{'>=' if ok else '<'} required {need * 100:.1f}%"
              + (f" ({base_name}: {base * 100:.1f}%)" if base is not None else ""))
    return _check("min_attribution", cand, need, ok, True, reason)


def _perplexity_check(rules: Any, comparison: dict, base_name: str) -> dict:
    limit = _rule(rules, "max_perplexity_regression")
    reg = comparison.get("perplexity_regression")
    if reg is None:
        return _check("max_perplexity_regression", None, limit, True, False,
                      "per-token perplexity was not measured for both models; rule skipped (info only)")
    ok = reg <= limit
    m = (comparison.get("metrics") or {}).get("perplexity") or {}
    detail = (f"perplexity {m['candidate']:.3f} vs {m['baseline']:.3f} ({base_name}), "
              if m.get("candidate") is not None and m.get("baseline") is not None else "perplexity ")
    return _check("max_perplexity_regression", reg, limit, ok, True,
                  f"{detail}{reg * 100:+.1f}% {'<=' if ok else '>'} allowed {limit * 100:+.1f}%")


def _length_checks(rules: Any, comparison: dict) -> list[dict]:
    low, high = _rule(rules, "min_length_ratio"), _rule(rules, "max_length_ratio")
    ratio = _metric(comparison, "length_ratio").get("candidate")
    if ratio is None:
        why = "the length ratio was not measured (no reference characters)"
        return [_check("min_length_ratio", None, low, False, True, why),
                _check("max_length_ratio", None, high, False, True, why)]
    return [
        _check("min_length_ratio", ratio, low, ratio >= low, True,
               f"candidate replies are {ratio:.2f}x the length of the user's {'>=' if ratio >= low else '<'} "
               f"minimum {low:.2f}x"),
        _check("max_length_ratio", ratio, high, ratio <= high, True,
               f"candidate replies are {ratio:.2f}x the length of the user's {'<=' if ratio <= high else '>'} "
               f"maximum {high:.2f}x"),
    ]


def _judge_check(rules: Any, judge: dict | None) -> dict:
    need = _rule(rules, "min_judge_win_rate")
    if not judge:
        return _check("min_judge_win_rate", None, need, True, False, "no judge configured (info only)")
    rate = judge.get("win_rate")
    calibration = judge.get("calibration") or {}
    calibrated = calibration.get("calibrated", judge.get("calibrated")) is True
    kappa = calibration.get("kappa", judge.get("kappa"))
    min_kappa = calibration.get("min_kappa", judge.get("min_kappa"))
    ci = (f", 95% CI [{judge['ci_low']:.2f}, {judge['ci_high']:.2f}]"
          if judge.get("ci_low") is not None and judge.get("ci_high") is not None else "")
    if rate is None:
        return _check("min_judge_win_rate", None, need, True, False, "the judge produced no win rate (info only)")
    ok = rate >= need
    text = f"judge win rate {rate:.2f}{ci} {'>=' if ok else '<'} required {need:.2f}"
    if not calibrated:
        if kappa is None:
            why = calibration.get("reason") or "its agreement with the human labels was not measured"
        else:
            why = f"Cohen's kappa {kappa:.3f} < min_kappa {min_kappa}" if min_kappa is not None else \
                  f"Cohen's kappa {kappa:.3f} is below the minimum"
        return _check("min_judge_win_rate", rate, need, ok, False,
                      f"{text} (info only: the judge is not calibrated — {why})")
    return _check("min_judge_win_rate", rate, need, ok, True, f"{text} (judge calibrated, kappa {kappa:.3f})")


def decide(rules: Any, comparison: dict, *, baseline_kind: str, judge: dict | None = None,
           use_case: str | None = None, tenant: str | None = None, overrides: list[dict] | None = None) -> dict:
    """GO only if every required check passes; every rule is reported.

    ``rules``: the use case's GenerationGate (or a mapping/object with its field names); ``comparison``: output of
    ``generation_metrics.compare``; ``judge``: output of ``judge.run_pairwise`` with the output of
    ``judge.calibrate`` under ``"calibration"`` (or None when no judge is configured)."""
    if baseline_kind not in BASELINE_KINDS:
        raise ValueError(f"baseline_kind must be one of {BASELINE_KINDS}, got {baseline_kind!r}")
    base_name = "production model" if baseline_kind == "production" else "base model"
    chrf = _metric(comparison, PRIMARY)
    checks = [
        _chrf_check(rules, comparison, base_name),
        _attribution_check(rules, comparison, base_name),
        _perplexity_check(rules, comparison, base_name),
        *_length_checks(rules, comparison),
        _judge_check(rules, judge),
    ]
    failed = [c for c in checks if c["required"] and not c["passed"]]
    decision = "GO" if not failed else "NO-GO"
    tenant = tenant or comparison.get("tenant")
    who = f" for tenant {tenant}" if tenant else ""
    if chrf.get("candidate") is not None and chrf.get("baseline") is not None:
        head = f"chrF {chrf['candidate']:.2f} vs {chrf['baseline']:.2f} ({base_name}){who}"
    else:
        head = f"chrF not measured ({base_name}){who}"
    overrides = [dict(o) for o in overrides or []]
    summary = summary_line(head, checks, overrides)
    return {
        "decision": decision,
        "use_case": use_case,
        "tenant": tenant,
        "kind": "generation",
        "primary_label": PRIMARY,
        "baseline_kind": baseline_kind,
        "baseline_score": chrf.get("baseline"),
        "candidate_score": chrf.get("candidate"),
        "checks": checks,
        "failed": [c["name"] for c in failed],
        "summary": summary,
        "overrides": overrides,
        "decided_at": datetime.now(timezone.utc).isoformat(),
    }
