"""Every gate rule, passing and failing, on comparisons built by the real scoring code."""

from __future__ import annotations

import json

import pytest

from retrain.schemas.run_params import apply_params, parse_run_params
from retrain.schemas.use_case import load_use_case
from retrain.evaluate.gate import decide, decision_text
from retrain.evaluate.report import write_decision
from retrain.evaluate.metrics import compare, score_predictions

GOLD = {"intent_type": "GIFT", "budget_tier": "premium", "category": "home", "recipient": "boss",
        "context_tags": ["gift"], "priority_features": ["thoughtful"]}
N = 40


def _preds(n_right: int, *, latency: float = 0.1, fenced: bool = False, invalid_rest: bool = False) -> list[dict]:
    """n_right answers with the right intent (the first ones), the rest wrong (or unparsable)."""
    out = []
    for i in range(N):
        if i < n_right:
            obj = GOLD
        elif invalid_rest:
            out.append({"text": "I cannot answer that.", "latency_s": latency, "tokens": 5, "error": None})
            continue
        else:
            obj = {**GOLD, "intent_type": "PERSONAL_USE"}
        text = json.dumps(obj)
        out.append({"text": f"```json\n{text}\n```" if fenced else text, "latency_s": latency, "tokens": 20,
                    "error": None})
    return out


def _decide(base_right, cand_right, *, params=None, baseline_kind="production", base_kw=None, cand_kw=None):
    uc = load_use_case("product_intent")
    if params:
        uc = apply_params(uc, parse_run_params(params))
    golds = [GOLD] * N
    base = score_predictions(uc, golds, _preds(base_right, **(base_kw or {})))
    cand = score_predictions(uc, golds, _preds(cand_right, **(cand_kw or {})))
    return decide(uc, compare(uc, base, cand), baseline_kind=baseline_kind)


def _check(decision, name):
    return next(c for c in decision["checks"] if c["name"] == name)


def test_good_candidate_goes_and_lists_every_check():
    d = _decide(24, 38)   # 0.60 -> 0.95
    assert d["decision"] == "GO", d["summary"]
    assert [c["name"] for c in d["checks"]] == ["min_score", "min_relative_improvement",
                                               "max_p95_latency_regression", "min_json_validity",
                                               "require_significance", "max_slice_regression"]
    for c in d["checks"]:
        assert set(c) == {"name", "value", "threshold", "passed", "required", "reason"}
        assert c["reason"]
    assert all(c["passed"] for c in d["checks"] if c["required"])
    assert d["failed"] == []
    assert d["summary"].startswith("GO:") and "\n" not in d["summary"]
    assert d["baseline_kind"] == "production"
    json.dumps(d)


def test_first_run_against_a_base_model_scoring_zero_goes():
    d = _decide(0, 36, baseline_kind="base_model", base_kw={"invalid_rest": True})   # 0.0 -> 0.90
    assert d["decision"] == "GO", d["summary"]
    rel = _check(d, "min_relative_improvement")
    assert rel["passed"] and rel["value"] is None
    assert "scored 0" in rel["reason"] and "any positive gain" in rel["reason"]
    assert d["baseline_kind"] == "base_model" and d["baseline_score"] == 0.0
    assert "base model" in d["summary"]


def test_first_run_with_both_at_zero_is_no_go():
    d = _decide(0, 0, baseline_kind="base_model")
    assert d["decision"] == "NO-GO"
    assert set(d["failed"]) == {"min_score", "min_relative_improvement"}
    assert "no gain" in _check(d, "min_relative_improvement")["reason"]


def test_gain_below_ten_percent_is_no_go():
    d = _decide(34, 36)   # 0.85 -> 0.90: +5.9% relative
    assert d["decision"] == "NO-GO"
    assert d["failed"] == ["min_relative_improvement"]
    rel = _check(d, "min_relative_improvement")
    assert rel["value"] == pytest.approx(0.05 / 0.85)
    assert rel["threshold"] == 0.10
    assert "+5.9%" in rel["reason"] and "< required +10.0%" in rel["reason"]
    assert "min_relative_improvement" in d["summary"]


def test_same_model_twice_is_no_go():
    d = _decide(36, 36)
    assert d["decision"] == "NO-GO" and d["failed"] == ["min_relative_improvement"]


def test_low_absolute_score_is_no_go_even_with_a_big_gain():
    d = _decide(12, 30)   # 0.30 -> 0.75
    assert d["decision"] == "NO-GO"
    assert d["failed"] == ["min_score"]
    assert _check(d, "min_score")["value"] == 0.75


def test_params_override_yaml_thresholds():
    d = _decide(12, 30, params={"min_score": 0.7})
    assert d["decision"] == "GO", d["summary"]
    assert _check(d, "min_score")["threshold"] == 0.7


def test_p95_latency_regression_fails():
    d = _decide(24, 38, base_kw={"latency": 1.0}, cand_kw={"latency": 1.5})   # +50% > 25%
    assert d["decision"] == "NO-GO"
    assert d["failed"] == ["max_p95_latency_regression"]
    lat = _check(d, "max_p95_latency_regression")
    assert lat["value"] == pytest.approx(0.5) and lat["threshold"] == 0.25


def test_p95_latency_is_info_only_on_a_first_run():
    d = _decide(0, 36, baseline_kind="base_model", base_kw={"latency": 0.1, "invalid_rest": True},
                cand_kw={"latency": 1.0})
    assert d["decision"] == "GO", d["summary"]
    lat = _check(d, "max_p95_latency_regression")
    assert lat["required"] is False and lat["passed"] is False
    assert "first run" in lat["reason"]


def test_p95_latency_within_allowance_and_faster_candidate_pass():
    assert _decide(24, 38, base_kw={"latency": 1.0}, cand_kw={"latency": 1.2})["decision"] == "GO"
    assert _decide(24, 38, base_kw={"latency": 1.0}, cand_kw={"latency": 0.3})["decision"] == "GO"


def test_unmeasured_latency_is_skipped_with_a_reason():
    uc = load_use_case("product_intent")
    golds = [GOLD] * N
    strip = lambda preds: [{**p, "latency_s": None} for p in preds]  # noqa: E731
    cmp = compare(uc, score_predictions(uc, golds, strip(_preds(24))), score_predictions(uc, golds, strip(_preds(38))))
    d = decide(uc, cmp, baseline_kind="production")
    lat = _check(d, "max_p95_latency_regression")
    assert lat["passed"] and "not measured" in lat["reason"]


def test_json_validity_below_minimum_fails():
    # Fenced answers still score on labels (lenient parse) but are not valid JSON for a consumer.
    d = _decide(24, 38, cand_kw={"fenced": True})
    assert d["decision"] == "NO-GO"
    assert d["failed"] == ["min_json_validity"]
    assert _check(d, "min_json_validity")["value"] == 0.0


def test_significance_is_info_when_not_required():
    d = _decide(32, 36)   # 0.80 -> 0.90, +12.5%, only 4 discordant pairs: McNemar p = 0.125
    assert d["decision"] == "GO", d["summary"]
    sig = _check(d, "require_significance")
    assert sig["required"] is False and sig["passed"] is False
    assert "info only" in sig["reason"] and "not significant" in sig["reason"]
    assert sig["value"]["p"] == pytest.approx(0.125)


def test_required_significance_not_met_is_no_go():
    d = _decide(32, 36, params={"require_significance": True})
    assert d["decision"] == "NO-GO"
    assert d["failed"] == ["require_significance"]
    assert _check(d, "require_significance")["required"] is True


def test_required_significance_met_goes():
    d = _decide(20, 40, params={"require_significance": True})   # 0.5 -> 1.0, 20 fixes, no regressions
    assert d["decision"] == "GO", d["summary"]
    sig = _check(d, "require_significance")
    assert sig["passed"] and sig["value"]["ci_low"] > 0 and sig["value"]["p"] < 1e-5


def test_bad_arguments_are_explained():
    uc = load_use_case("product_intent")
    with pytest.raises(ValueError, match="baseline_kind"):
        decide(uc, {"metrics": {}}, baseline_kind="prod")
    with pytest.raises(ValueError, match="retrain.evaluate.metrics.compare"):
        decide(uc, {"metrics": {}}, baseline_kind="production")


def test_write_decision_and_text(tmp_path):
    d = _decide(34, 36)
    path = write_decision(tmp_path, d)
    assert path == tmp_path / "decision.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))
    assert [p.name for p in tmp_path.iterdir()] == ["decision.json"]   # no temporary file left behind
    text = decision_text(d)
    assert text.splitlines()[0].startswith("NO-GO — product_intent")
    assert "[FAIL] min_relative_improvement" in text
    assert "[PASS] min_score" in text and "[INFO] require_significance" in text
    assert len(text.splitlines()) <= 20


def test_decide_run_reads_metrics_and_writes_decision_and_report(tmp_path):
    from retrain.evaluate.report import decide_run
    from retrain.evaluate.metrics import write_metrics

    uc = load_use_case("product_intent")
    golds = [GOLD] * N
    base = score_predictions(uc, golds, _preds(0, invalid_rest=True))
    cand = score_predictions(uc, golds, _preds(36))
    with pytest.raises(FileNotFoundError, match="evaluation stage"):
        decide_run(tmp_path, uc, baseline_kind="base_model")
    write_metrics(tmp_path, base, cand, compare(uc, base, cand))
    out = decide_run(tmp_path, uc, baseline_kind="base_model", labels={"baseline": "smollm2-135m-instruct"})
    assert out["decision"] == "GO" and out["failed"] == []
    assert json.loads((tmp_path / "decision.json").read_text())["decision"] == "GO"
    assert (tmp_path / "evaluation" / "report.html").is_file()
    assert out["text"].startswith("GO — product_intent")
    assert len(json.dumps(out)) < 4000   # small enough for XCom


def test_gate_overrides_are_recorded_in_the_decision_and_its_text():
    uc = load_use_case("product_intent")
    golds = [GOLD] * N
    base, cand = score_predictions(uc, golds, _preds(24)), score_predictions(uc, golds, _preds(38))
    overrides = [{"threshold": "min_score", "floor": 0.85, "value": 0.5, "by": "alice", "reason": "incident 42"}]
    d = decide(uc, compare(uc, base, cand), baseline_kind="production", overrides=overrides)
    assert d["overrides"] == overrides
    note = "threshold min_score loosened from 0.85 to 0.5 by alice: incident 42"
    assert note in d["summary"] and f"[OVERRIDE] {note}" in decision_text(d)
    plain = decide(uc, compare(uc, base, cand), baseline_kind="production")
    assert plain["overrides"] == [] and "OVERRIDE" not in decision_text(plain)


def _with_slices(comparison: dict, worst: dict | None) -> dict:
    return {**comparison, "analysis": {"slices": [worst] if worst else [], "worst_slice_regression": worst}}


def test_a_candidate_that_loses_a_slice_against_production_is_refused():
    from retrain.evaluate.metrics import compare, score_predictions

    uc = apply_params(load_use_case("product_intent"), parse_run_params({"max_slice_regression": 0.05}))
    golds = [GOLD] * N
    base = score_predictions(uc, golds, _preds(30))
    cand = score_predictions(uc, golds, _preds(38))
    worst = {"slice": "language", "value": "es", "n": 12, "baseline": 0.9, "candidate": 0.7, "delta": -0.2,
             "gated": True}
    d = decide(uc, _with_slices(compare(uc, base, cand), worst), baseline_kind="production")
    check = _check(d, "max_slice_regression")
    assert d["decision"] == "NO-GO" and check["required"] and not check["passed"]
    assert "language=es" in check["reason"] and "0.200" in check["reason"]
    # The same loss on a first run (base model baseline) is reported, not gated.
    d = decide(uc, _with_slices(compare(uc, base, cand), worst), baseline_kind="base_model")
    assert _check(d, "max_slice_regression")["required"] is False and d["decision"] == "GO"


def test_no_slice_threshold_reports_the_worst_slice_only():
    from retrain.evaluate.metrics import compare, score_predictions

    uc = load_use_case("product_intent")
    golds = [GOLD] * N
    base, cand = score_predictions(uc, golds, _preds(30)), score_predictions(uc, golds, _preds(38))
    worst = {"slice": "input_length", "value": "long (200+)", "n": 6, "baseline": 1.0, "candidate": 0.5,
             "delta": -0.5, "gated": True}
    d = decide(uc, _with_slices(compare(uc, base, cand), worst), baseline_kind="production")
    check = _check(d, "max_slice_regression")
    assert not check["required"] and "info only" in check["reason"] and d["decision"] == "GO"
