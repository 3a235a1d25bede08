"""Error classes and slices of the evaluation report (retrain.evaluate.analysis)."""

from __future__ import annotations

from retrain.evaluate import analysis


def _row(i, text, *, parsed=True, schema=True, labels=True, outcomes=None, sets=None, tokens=10, inp="quiero un regalo",
         missing=None, primary=None):
    return {"index": i, "text": text, "json_parsed": parsed, "schema_valid": schema, "all_labels_correct": labels,
            "primary_correct": labels if primary is None else primary, "entities": {"outcome": outcomes or {}},
            "sets": sets or {}, "tokens": tokens, "input": inp, "gold": {"intent_type": "GIFT"},
            "missing_fields": missing or []}


def test_every_error_class_is_recognised():
    rows = [
        _row(0, "   ", parsed=False, schema=False),
        _row(1, '{"intent_type": "GIFT", "tags": ["a", "b"', parsed=False, schema=False, tokens=64),
        _row(2, "I think it is a gift", parsed=False, schema=False),
        _row(3, '{"intent_type": "GIFT"}', missing=["budget_tier"]),
        _row(4, '{"intent_type": "URGENT"}', labels=False),
        _row(5, '{"intent_type": "GIFT"}', outcomes={"recipient": "miss"}),
        _row(6, '{"intent_type": "GIFT"}', outcomes={"recipient": "hallucinated"}),
        _row(7, '{"intent_type": "GIFT"}', sets={"tags": {"exact": False}}),
        _row(8, '{"intent_type": "GIFT"}', sets={"tags": {"exact": True}}),
    ]
    assert [analysis.error_class(r, budget=64) for r in rows] == [
        "empty", "truncated", "schema_error", "schema_error", "wrong_label", "missing_entity",
        "hallucinated_entity", "wrong_set", "ok"]
    report = analysis.error_analysis(rows * 2, budget=64)
    assert report["counts"]["schema_error"] == 4 and report["counts"]["ok"] == 2
    assert len(report["examples"]["schema_error"]) == analysis.EXAMPLES_PER_CLASS  # three examples, not all four
    assert "ok" not in report["examples"]


def test_language_and_length_slices():
    assert analysis.language("quiero un regalo para mi madre") == "es"
    assert analysis.language("looking for a cheap gift for my dad") == "en"
    assert analysis.language("XHU-2231 x 40") == "other"
    assert analysis.length_bucket("x" * 10).startswith("short") and analysis.length_bucket("x" * 500).startswith("long")


def test_slice_scores_find_the_slice_a_candidate_loses():
    base = [_row(i, "{}", labels=True, inp="quiero un regalo" if i < 6 else "a gift for my dad") for i in range(12)]
    # The candidate wins on English queries and loses half of the Spanish ones.
    cand = [_row(i, "{}", labels=(i >= 6 or i % 2 == 0), inp=base[i]["input"]) for i in range(12)]
    slices = analysis.slice_scores(base, cand, ["intent_type"])
    es = next(s for s in slices if s["slice"] == "language" and s["value"] == "es")
    assert es["n"] == 6 and es["baseline"] == 1.0 and es["candidate"] == 0.5 and es["gated"]
    worst = analysis.worst_slice_regression(slices)
    assert (worst["slice"], worst["value"]) in {("language", "es"), ("input_length", "short (<60 chars)")}
    assert any(s["slice"] == "gold.intent_type" and s["value"] == "GIFT" for s in slices)


def test_small_slices_are_reported_but_never_gated():
    base = [_row(0, "{}", labels=True)]
    cand = [_row(0, "{}", labels=False)]
    slices = analysis.slice_scores(base, cand)
    assert all(not s["gated"] for s in slices) and analysis.worst_slice_regression(slices) is None


def test_slices_must_name_output_fields():
    import pytest

    from retrain.schemas.use_case import ConfigError, load_use_case, parse_use_case

    data = load_use_case("product_intent").model_dump(mode="json")
    data["evaluation"]["slices"] = ["budget_tier"]
    assert parse_use_case(data).evaluation.slices == ["budget_tier"]
    data["evaluation"]["slices"] = ["no_such_field"]
    with pytest.raises(ConfigError, match="evaluation.slices: 'no_such_field'"):
        parse_use_case(data)


def test_the_report_shows_error_classes_examples_and_slices():
    from retrain.evaluate import report

    base = [_row(i, "{}", labels=True) for i in range(6)]
    cand = [_row(i, "{}" if i % 2 else "", labels=bool(i % 2)) for i in range(6)]
    comparison = {"analysis": {"errors": {"baseline": analysis.error_analysis(base),
                                          "candidate": analysis.error_analysis(cand)},
                               "slices": analysis.slice_scores(base, cand)}}
    rows = report._category_rows({}, {}, comparison)
    assert ["empty", "0", "3"] in rows
    examples = report._error_example_rows(comparison)
    assert len(examples) == 3 and all(r[:2] == ["candidate", "empty"] for r in examples)
    assert any(r[0] == "language" and r[1] == "es" and r[5] == "-0.500" for r in report._slice_rows(comparison))
