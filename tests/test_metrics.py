"""Metrics on hand-made predictions for each use case, and the paired statistics against known values."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from retrain.schemas.use_case import load_use_case
from retrain.evaluate.metrics import (
    compare,
    load_test_set,
    mcnemar,
    paired_bootstrap,
    parse_output,
    score_predictions,
)


def ans(obj, latency=0.1, tokens=20, fenced=False, prose=False):
    text = json.dumps(obj, ensure_ascii=False)
    if fenced:
        text = f"```json\n{text}\n```"
    if prose:
        text = f"Here is the classification you asked for:\n{text}\nLet me know if you need more."
    return {"text": text, "latency_s": latency, "tokens": tokens, "error": None}


def raw(text, latency=0.1):
    return {"text": text, "latency_s": latency, "tokens": 5, "error": None}


# --- parsing -----------------------------------------------------------------------------------------


def test_parse_output_strict_lenient_and_garbage():
    assert parse_output('{"a": 1}') == ({"a": 1}, True)
    assert parse_output('  {"a": 1}\n') == ({"a": 1}, True)
    assert parse_output('```json\n{"a": {"b": "}"}}\n```') == ({"a": {"b": "}"}}, False)
    assert parse_output('Sure: {"a": 1} and then {"b": 2}') == ({"a": 1}, False)
    # A brace in prose before the real object must not stop the search.
    assert parse_output('use {curly} braces: {"a": 1}') == ({"a": 1}, False)
    assert parse_output("[1, 2]") == (None, False)
    assert parse_output('{"a": 1') == (None, False)
    assert parse_output("") == (None, False)
    assert parse_output(None) == (None, False)


# --- product_intent ------------------------------------------------------------------------------------

PI_GOLD = {"intent_type": "GIFT", "budget_tier": "premium", "category": "home", "recipient": "boss",
           "context_tags": ["gift", "wedding"], "priority_features": ["thoughtful", "premium_quality"]}


def test_product_intent_categories_sets_and_validity():
    uc = load_use_case("product_intent")
    g = PI_GOLD
    preds = [
        ans(g, latency=0.1),                                                           # perfect
        ans(g, latency=0.2, fenced=True, prose=True),                                  # rescued, not strict
        raw("I think this is a gift for a boss.", latency=0.3),                        # invalid JSON
        ans({**g, "intent_type": "PERSONAL_USE"}, latency=0.4),                        # wrong primary label
        ans({k: v for k, v in g.items() if k != "recipient"}, latency=0.5),            # missing required field
        ans({**g, "category": " HOME ", "recipient": "mother"}, latency=0.6),          # entity: 1 right, 1 wrong
        ans({**g, "context_tags": ["gift"], "priority_features": ["premium_quality", "thoughtful"]}, latency=0.7),
        ans({**g, "budget_tier": "cheap"}, latency=0.8),                               # label outside the enum
    ]
    out = score_predictions(uc, [g] * len(preds), preds, inputs=[f"query {i}" for i in range(len(preds))])
    rows, agg = out["per_example"], out["aggregate"]

    assert [r["category"] for r in rows] == ["ok", "ok", "invalid_json", "wrong_label", "missing_field",
                                             "wrong_entity", "wrong_set", "wrong_label"]
    assert [r["json_valid"] for r in rows] == [True, False, False, True, True, True, True, True]
    assert rows[1]["json_parsed"] and rows[1]["exact_match"] and rows[1]["schema_valid"]
    assert not rows[4]["schema_valid"] and rows[4]["missing_fields"] == ["recipient"]
    assert not rows[7]["schema_valid"]
    assert rows[0]["input"] == "query 0"

    # primary = intent_type: wrong only for #2 (invalid) and #3.
    assert agg["primary_label"] == "intent_type"
    assert agg["primary_score"] == pytest.approx(6 / 8)
    assert agg["accuracy"]["budget_tier"] == pytest.approx(6 / 8)
    assert agg["label_accuracy_macro"] == pytest.approx(6 / 8)
    assert agg["all_labels_accuracy"] == pytest.approx(5 / 8)
    assert agg["json_validity"] == pytest.approx(6 / 8)
    assert agg["json_parseable"] == pytest.approx(7 / 8)
    assert agg["schema_validity"] == pytest.approx(5 / 8)
    assert agg["exact_match"] == pytest.approx(2 / 8)   # only #0 and the fenced copy #1 equal the gold object
    assert agg["error_categories"] == {"invalid_json": 1, "missing_field": 1, "wrong_label": 2,
                                       "hallucinated_entity": 0, "wrong_entity": 1, "wrong_set": 1, "ok": 2}

    # Entities: 8 examples x 2 fields = 16 gold pairs. Misses: #2 both; #4 recipient; #5 recipient (also an FP).
    ent = agg["entities"]
    assert (ent["tp"], ent["fp"], ent["fn"]) == (12, 1, 4)
    assert ent["precision"] == pytest.approx(12 / 13)
    assert ent["recall"] == pytest.approx(12 / 16)
    assert ent["f1"] == pytest.approx(2 * (12 / 13) * (12 / 16) / (12 / 13 + 12 / 16))
    assert ent["hallucinated"] == 0
    assert ent["per_field"]["category"]["tp"] == 7      # " HOME " normalises to "home"

    # Sets: #2 invalid (0), #6 context_tags {gift} vs {gift, wedding} -> Jaccard 1/2; priority order ignored.
    ctx = agg["sets"]["context_tags"]
    assert ctx["exact_accuracy"] == pytest.approx(6 / 8)
    assert ctx["jaccard"] == pytest.approx((6 + 0.5) / 8)
    assert agg["sets"]["priority_features"]["exact_accuracy"] == pytest.approx(7 / 8)

    # Confusion: rows are gold, columns include the failure columns that occurred.
    conf = agg["confusion"]["intent_type"]
    row = conf["matrix"][conf["labels"].index("GIFT")]
    assert row[conf["columns"].index("GIFT")] == 6
    assert row[conf["columns"].index("PERSONAL_USE")] == 1
    assert row[conf["columns"].index("(invalid)")] == 1
    tier = agg["confusion"]["budget_tier"]
    assert tier["matrix"][tier["labels"].index("premium")][tier["columns"].index("(other)")] == 1
    assert agg["per_class"]["intent_type"]["GIFT"]["recall"] == pytest.approx(6 / 8)
    assert agg["per_class"]["intent_type"]["PERSONAL_USE"]["precision"] == 0.0

    # Latency 0.1..0.8: p50 0.45; numpy-linear p95 = 0.765; throughput from summed latencies.
    assert agg["latency"]["p50"] == pytest.approx(0.45)
    assert agg["latency"]["p95"] == pytest.approx(0.765)
    assert agg["latency"]["mean"] == pytest.approx(0.45)
    assert agg["throughput"]["source"] == "sum_of_latencies"
    assert agg["throughput"]["examples_per_s"] == pytest.approx(8 / 3.6)
    json.dumps(out)  # must be JSON-able for metrics.json / XCom


def test_wall_clock_throughput_and_inference_errors():
    uc = load_use_case("product_intent")
    # The inference layer reports a failed request as empty text with latency 0 and tokens 0.
    preds = [ans(PI_GOLD, tokens=10, latency=0.4), ans(PI_GOLD, tokens=10, latency=0.6),
             {"text": "", "latency_s": 0.0, "tokens": 0, "error": "RateLimitError: 429 after 5 attempts"}]
    agg = score_predictions(uc, [PI_GOLD] * 3, preds, wall_seconds=0.5)["aggregate"]
    assert agg["inference_errors"] == 1
    assert agg["error_categories"]["invalid_json"] == 1
    assert agg["throughput"] == {"examples_per_s": 6.0, "tokens_per_s": 40.0, "seconds": 0.5, "source": "wall_clock"}
    # Failed requests do not count as (very fast) latencies.
    assert agg["latency"]["measured"] == 2
    assert agg["latency"]["p50"] == pytest.approx(0.5)


def test_length_mismatch_and_empty_are_rejected_with_a_hint():
    uc = load_use_case("product_intent")
    with pytest.raises(ValueError, match="one result per test example"):
        score_predictions(uc, [PI_GOLD, PI_GOLD], [ans(PI_GOLD)])
    with pytest.raises(ValueError, match="empty"):
        score_predictions(uc, [], [])


# --- email_intel ---------------------------------------------------------------------------------------

EM_GOLD = {"intent": "purchase_order",
           "entities": {"po_number": "4500123456", "product": "XHU-00001", "quantity": 5},
           "actions": ["validate_po", "process_order", "check_inventory"], "urgency": "high"}


def test_email_intel_entities_hallucination_and_jaccard():
    uc = load_use_case("email_intel")
    g = EM_GOLD
    preds = [
        ans(g),
        # quantity as a string: same entity after normalisation, but the schema says integer.
        ans({**g, "entities": {**g["entities"], "quantity": "5"}}),
        # invents an SPA code the e-mail did not have, and gets the product wrong.
        ans({**g, "entities": {**g["entities"], "product": "XHU-00002", "spa_code": "CAS-123456-ABCDEF"}}),
        # drops the PO number (a miss, not a hallucination); actions partly right.
        ans({**g, "entities": {"product": "XHU-00001", "quantity": 5}, "actions": ["validate_po", "escalate"]}),
        ans({**g, "urgency": "low"}),
    ]
    out = score_predictions(uc, [g] * len(preds), preds)
    rows, agg = out["per_example"], out["aggregate"]
    assert [r["category"] for r in rows] == ["ok", "ok", "hallucinated_entity", "wrong_entity", "wrong_label"]
    assert not rows[1]["schema_valid"] and "quantity" in rows[1]["schema_error"]
    assert rows[2]["entities"]["hallucinated"] == ["entities.spa_code"]
    assert rows[2]["entities"]["wrong"] == ["entities.product"]
    assert rows[3]["entities"]["hallucinated"] == [] and rows[3]["entities"]["wrong"] == ["entities.po_number"]

    # 5 examples x 3 gold entities = 15. tp: 3+3+2+2+3 = 13; fp: product wrong + spa invented = 2; fn: 1 + 1 = 2.
    ent = agg["entities"]
    assert (ent["tp"], ent["fp"], ent["fn"]) == (13, 2, 2)
    assert ent["precision"] == pytest.approx(13 / 15) and ent["recall"] == pytest.approx(13 / 15)
    assert ent["hallucinated"] == 1 and ent["examples_with_hallucination"] == 1
    assert ent["per_field"]["entities.spa_code"]["fp"] == 1
    assert ent["per_field"]["entities.po_number"] == {"precision": 1.0, "recall": 0.8, "f1": pytest.approx(8 / 9),
                                                      "tp": 4, "fp": 0, "fn": 1}
    # {validate_po, escalate} vs {validate_po, process_order, check_inventory}: 1 / 4.
    assert rows[3]["sets"]["actions"] == {"exact": False, "jaccard": 0.25}
    assert agg["sets"]["actions"]["jaccard"] == pytest.approx((4 + 0.25) / 5)
    assert agg["sets"]["actions"]["exact_accuracy"] == pytest.approx(4 / 5)
    assert agg["accuracy"] == {"intent": 1.0, "urgency": pytest.approx(0.8)}
    assert agg["primary_score"] == 1.0


# --- hr_leave ------------------------------------------------------------------------------------------

HR_YES = {"eligible": True, "reason": "within policy", "required_approvers": ["manager", "hr"],
          "recommendations": ["Complete handover"]}
HR_NO = {"eligible": False, "reason": "exceeds balance", "required_approvers": [], "recommendations": []}


def test_hr_leave_boolean_labels_and_sets():
    uc = load_use_case("hr_leave")
    golds = [HR_YES, HR_YES, HR_NO, HR_NO, HR_YES, HR_YES]
    preds = [
        ans({**HR_YES, "reason": "fine", "required_approvers": ["hr", "manager"]}),   # free text differs
        ans({**HR_YES, "eligible": "true"}),           # the string "true" is not the boolean
        ans(HR_NO),
        ans({**HR_NO, "eligible": True}),
        ans({**HR_YES, "required_approvers": ["manager"]}),
        ans({k: v for k, v in HR_YES.items() if k != "reason"}),
    ]
    out = score_predictions(uc, golds, preds)
    rows, agg = out["per_example"], out["aggregate"]
    assert [r["category"] for r in rows] == ["ok", "wrong_label", "ok", "wrong_label", "wrong_set", "missing_field"]
    assert not rows[0]["exact_match"] and rows[2]["exact_match"]
    assert rows[4]["sets"]["required_approvers"] == {"exact": False, "jaccard": 0.5}
    # Two empty sets agree perfectly.
    assert rows[2]["sets"]["required_approvers"] == {"exact": True, "jaccard": 1.0}
    assert agg["primary_label"] == "eligible"
    assert agg["primary_score"] == pytest.approx(4 / 6)
    assert agg["entities"] is None
    conf = agg["confusion"]["eligible"]
    assert conf["labels"] == ["true", "false"]
    assert conf["matrix"][0][conf["columns"].index("(other)")] == 1
    assert conf["matrix"][1][conf["columns"].index("true")] == 1


def test_load_test_set_roundtrip(tmp_path):
    uc = load_use_case("hr_leave")
    path = tmp_path / "test.jsonl"
    lines = []
    for text, label in (("Employee: A\nType: sick_leave", HR_YES), ("Employee: B\nType: annual_leave", HR_NO)):
        lines.append(json.dumps({"messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(text)},
            {"role": "assistant", "content": json.dumps(label)}]}))
    path.write_text("\n".join(lines) + "\n")
    inputs, refs = load_test_set(uc, path)
    assert inputs == ["Employee: A\nType: sick_leave", "Employee: B\nType: annual_leave"]
    assert refs == [HR_YES, HR_NO]
    with pytest.raises(FileNotFoundError, match="build the dataset"):
        load_test_set(uc, tmp_path / "missing.jsonl")


# --- significance --------------------------------------------------------------------------------------


@pytest.mark.parametrize("b01,b10", [(0, 1), (3, 0), (7, 2), (10, 14), (1, 12), (12, 12)])
def test_mcnemar_exact_matches_scipy_binomtest(b01, b10):
    a = [False] * b01 + [True] * b10 + [True] * 5 + [False] * 3
    b = [True] * b01 + [False] * b10 + [True] * 5 + [False] * 3
    res = mcnemar(a, b)
    assert (res["b01"], res["b10"], res["method"]) == (b01, b10, "exact_binomial")
    assert res["p"] == pytest.approx(stats.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue, rel=1e-12)


@pytest.mark.parametrize("b01,b10", [(30, 12), (20, 20), (40, 5)])
def test_mcnemar_chi2_with_continuity_matches_scipy(b01, b10):
    a = [False] * b01 + [True] * b10
    b = [True] * b01 + [False] * b10
    res = mcnemar(a, b)
    expected_stat = (abs(b01 - b10) - 1) ** 2 / (b01 + b10)
    assert res["method"] == "chi2_continuity"
    assert res["statistic"] == pytest.approx(expected_stat)
    assert res["p"] == pytest.approx(stats.chi2.sf(expected_stat, 1), rel=1e-9)


def test_mcnemar_textbook_value_and_no_discordance():
    # (|30-12|-1)^2 / 42 = 6.881 -> p = 0.00871 (chi-square, 1 df).
    res = mcnemar([False] * 30 + [True] * 12, [True] * 30 + [False] * 12)
    assert res["statistic"] == pytest.approx(6.881, abs=1e-3)
    assert res["p"] == pytest.approx(0.00871, abs=1e-5)
    assert mcnemar([True, False], [True, False])["p"] == 1.0


def test_paired_bootstrap_known_cases():
    same = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], n=500)
    assert (same["diff"], same["ci_low"], same["ci_high"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    all_better = paired_bootstrap([0.0] * 30, [1.0] * 30, n=999)
    assert (all_better["diff"], all_better["ci_low"], all_better["ci_high"]) == (1.0, 1.0, 1.0)
    assert all_better["p"] == pytest.approx(2 / 1000)


def test_paired_bootstrap_agrees_with_normal_theory_and_is_deterministic():
    import numpy as np

    rng = np.random.default_rng(42)
    a = (rng.random(2000) < 0.6).astype(float)
    b = np.where(rng.random(2000) < 0.8, 1.0, a)   # b fixes most of a's mistakes
    d = b - a
    se = d.std(ddof=1) / math.sqrt(d.size)
    res = paired_bootstrap(list(a), list(b), n=2000, seed=7)
    assert res["diff"] == pytest.approx(d.mean())
    # Percentile CI of a mean on n=2000 is within a small margin of the normal-theory interval.
    assert res["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.004)
    assert res["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.004)
    assert res["p"] < 0.01
    assert paired_bootstrap(list(a), list(b), n=2000, seed=7) == res
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_compare_pairs_examples_and_rejects_different_test_sets():
    uc = load_use_case("product_intent")
    golds = [PI_GOLD] * 10
    base = score_predictions(uc, golds, [ans(PI_GOLD, latency=0.1)] * 5 + [raw("no")] * 5)
    cand = score_predictions(uc, golds, [ans(PI_GOLD, latency=0.2)] * 9 + [raw("no")])
    cmp = compare(uc, base, cand)
    m = cmp["metrics"]["primary_score"]
    assert (m["baseline"], m["candidate"]) == (0.5, 0.9)
    assert m["delta"] == pytest.approx(0.4) and m["relative"] == pytest.approx(0.8)
    assert cmp["metrics"]["latency_p95"]["higher_is_better"] is False
    assert cmp["significance"]["mcnemar"]["b01"] == 4 and cmp["significance"]["mcnemar"]["b10"] == 0
    assert cmp["significance"]["bootstrap"]["diff"] == pytest.approx(0.4)
    assert cmp["regression_count"] == 0
    json.dumps(cmp)

    other = score_predictions(uc, [{**PI_GOLD, "recipient": "self"}] * 10, [ans(PI_GOLD)] * 10)
    with pytest.raises(ValueError, match="different test sets"):
        compare(uc, base, other)
    shorter = score_predictions(uc, golds[:3], [ans(PI_GOLD)] * 3)
    with pytest.raises(ValueError, match="same test.jsonl"):
        compare(uc, base, shorter)
