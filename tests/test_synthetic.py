"""Synthetic production traffic: learnable labels, a realistic feedback mix, planted PII and planted defects.

The generator is the ground truth the whole pipeline is tested against, so these tests check it with
independent oracles (the use case's JSON Schema, the scrub patterns, the HR policy recomputed from the text)
rather than with its own helpers.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timedelta, timezone

import jsonschema
import pytest

from retrain.schemas.use_case import load_use_case, parse_use_case
from retrain.data.scrub import find_pii, scrub_text
from retrain.data.synthetic import (
    DIRTY_KINDS,
    SQL_INJECTION,
    generate_rows,
    hr_decision,
    insert_rows,
    seed_examples,
)

USE_CASES = ("product_intent", "email_intel", "hr_leave")
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _rows(name: str, n: int, **kw) -> list[dict]:
    kw.setdefault("start", START)
    return list(generate_rows(load_use_case(name), n, **kw))


def _true_label(row: dict):
    return row["corrected_output"] if row["corrected_output"] is not None else row["model_output"]


def _label_errors(uc, validator, label) -> list[str]:
    if not isinstance(label, dict):
        return [f"not an object: {type(label).__name__}"]
    errors = [e.message for e in validator.iter_errors(label)]
    for path, allowed in uc.allowed_labels.items():
        node = label
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node not in allowed or isinstance(node, bool) != isinstance(allowed[0], bool):
            errors.append(f"{path}={node!r} not in {allowed}")
    return errors


@pytest.mark.parametrize("name", USE_CASES)
def test_clean_rows_have_schema_valid_labels_and_inputs_within_limits(name):
    uc = load_use_case(name)
    validator = jsonschema.Draft202012Validator(uc.output_schema)
    rows = _rows(name, 3000, dirty=0.0)
    assert len(rows) == 3000
    for row in rows:
        assert row["dirty"] is None
        for label in (row["model_output"], row["corrected_output"]):
            if label is not None:
                assert _label_errors(uc, validator, label) == [], (row["input"], label)
        assert uc.data.min_input_chars <= len(row["input"]) <= uc.data.max_input_chars


@pytest.mark.parametrize("name", USE_CASES)
def test_true_label_is_a_function_of_the_text_and_inputs_are_varied(name):
    seen: dict[str, object] = {}
    rows = _rows(name, 5000, seed=7, dirty=0.0)
    for row in rows:
        if row["feedback"] == "rejected":
            continue  # the true label of a rejected row is not stored
        text = row["input"]
        for value in row["pii"]:
            text = text.replace(value, "<pii>")  # personal data never drives the label
        assert seen.setdefault(text, _true_label(row)) == _true_label(row), text
    distinct = len({r["input"] for r in rows})
    assert distinct / len(rows) > 0.9


def test_product_intent_labels_follow_the_cue_words():
    rows = [r for r in _rows("product_intent", 4000, seed=2, dirty=0.0) if r["feedback"] == "accepted"]
    tiers = {"economic": ("barato", "económico", "cheap", "affordable", "low cost", "under $30", "tight budget",
                          "bajo coste", "poco presupuesto", "menos de"),
             "premium": ("premium", "luxury", "high-end", "de lujo", "alta gama", "top of the line",
                         "sin límite", "money is no object", "lo mejor de lo mejor")}
    by_intent = Counter(r["model_output"]["intent_type"] for r in rows)
    assert set(by_intent) == {"GIFT", "PERSONAL_USE", "BUSINESS", "COMPARISON", "URGENT"}
    assert by_intent["GIFT"] == max(by_intent.values())  # seed 004: gifts dominate the traffic
    for row in rows:
        text, label = row["input"].lower(), row["model_output"]
        for tier, cues in tiers.items():
            if any(c in text for c in cues):
                assert label["budget_tier"] == tier, text
        if label["intent_type"] == "COMPARISON":
            assert re.search(r" vs | o | or | y | and ", text), text
        if label["budget_tier"] == "unspecified":
            assert not any(c in text for cues in tiers.values() for c in cues), text
    languages = Counter("es" if re.search(r"[áéíóúñ¿]|para|regalo|busco|quiero", r["input"].lower()) else "en"
                        for r in rows)
    assert min(languages.values()) / len(rows) > 0.3  # both Spanish and English traffic


def test_email_entities_are_present_in_the_text_and_survive_scrubbing():
    rows = [r for r in _rows("email_intel", 3000, seed=4, dirty=0.0) if r["feedback"] == "accepted"]
    keys = Counter()
    for row in rows:
        scrubbed = scrub_text(row["input"])
        assert row["input"].startswith("Subject: ") and "\nBody: " in row["input"]
        for key, value in row["model_output"]["entities"].items():
            keys[key] += 1
            assert str(value) in scrubbed, (key, value, scrubbed)
    assert set(keys) == {"po_number", "product", "quantity", "spa_code", "edi"}
    urgency = Counter(r["model_output"]["urgency"] for r in rows)
    assert set(urgency) == {"low", "medium", "high"}
    for row in rows:
        if re.search(r"URGENT|ASAP|critical", row["input"]):
            assert row["model_output"]["urgency"] == "high", row["input"]


def test_hr_policy_matches_the_seed_examples():
    ok = hr_decision("casual_leave", duration=2, balance=12, notice=3)
    assert ok["eligible"] is True and ok["required_approvers"] == ["manager"]
    too_long = hr_decision("sick_leave", duration=8, balance=12, notice=0)
    assert too_long["eligible"] is False and too_long["required_approvers"] == []
    assert "exceeds maximum consecutive days" in too_long["reason"]
    assert "Split into two requests: 5 days + 3 days" in too_long["recommendations"]
    assert hr_decision("annual_leave", duration=15, balance=21, notice=7)["required_approvers"] == ["manager", "hr"]
    assert hr_decision("annual_leave", duration=16, balance=21, notice=30)["eligible"] is False  # over max
    assert hr_decision("annual_leave", duration=10, balance=9, notice=30)["eligible"] is False  # over balance
    assert hr_decision("annual_leave", duration=10, balance=21, notice=6)["eligible"] is False  # short notice


def test_hr_labels_recomputed_from_the_visible_fields():
    policy = {"casual_leave": (3, 1, ["manager"]), "sick_leave": (5, 0, ["manager"]),
              "annual_leave": (15, 7, ["manager", "hr"])}
    rows = [r for r in _rows("hr_leave", 3000, seed=5, dirty=0.0) if r["feedback"] == "accepted"]
    eligible = 0
    for row in rows:
        fields = dict(line.split(": ", 1) for line in row["input"].splitlines())
        days = {k: int(fields[k].split()[0]) for k in ("Duration", "Balance", "Notice", "Policy max", "Min notice")}
        max_days, min_notice, approvers = policy[fields["Type"]]
        assert (days["Policy max"], days["Min notice"]) == (max_days, min_notice)
        ok = days["Duration"] <= max_days and days["Duration"] <= days["Balance"] and days["Notice"] >= min_notice
        label = row["model_output"]
        assert label["eligible"] is ok, row["input"]
        assert label["required_approvers"] == (approvers if ok else [])
        eligible += ok
    assert 0.3 < eligible / len(rows) < 0.7  # both outcomes well represented


@pytest.mark.parametrize("name", USE_CASES)
def test_generation_is_deterministic_per_seed(name):
    a = _rows(name, 500, seed=11, dirty=0.2)
    b = _rows(name, 500, seed=11, dirty=0.2)
    c = _rows(name, 500, seed=12, dirty=0.2)
    assert a == b
    assert [r["input"] for r in a] != [r["input"] for r in c]


@pytest.mark.parametrize("name", USE_CASES)
def test_feedback_mix_and_wrong_outputs(name):
    uc = load_use_case(name)
    validator = jsonschema.Draft202012Validator(uc.output_schema)
    rows = _rows(name, 20000, seed=1, dirty=0.0)
    mix = Counter(r["feedback"] for r in rows)
    assert abs(mix["accepted"] / len(rows) - 0.85) < 0.015
    assert abs(mix["corrected"] / len(rows) - 0.10) < 0.012
    assert abs(mix["rejected"] / len(rows) - 0.05) < 0.008
    for row in rows:
        if row["feedback"] == "accepted":
            assert row["corrected_output"] is None
        elif row["feedback"] == "corrected":
            # The model's answer was plausible (schema-valid) but wrong; the human's fix differs from it.
            assert row["corrected_output"] != row["model_output"]
            assert _label_errors(uc, validator, row["model_output"]) == []
        else:
            assert row["corrected_output"] is None and _label_errors(uc, validator, row["model_output"]) == []


@pytest.mark.parametrize("name", USE_CASES)
def test_planted_pii_is_recorded_and_scrubbed(name):
    rows = _rows(name, 6000, seed=3, dirty=0.0)
    with_pii = [r for r in rows if r["pii"]]
    assert 0.30 <= len(with_pii) / len(rows) <= 0.40
    kinds: Counter[str] = Counter()
    for row in rows:
        scrubbed = scrub_text(row["input"], kinds)
        for value in row["pii"]:
            assert value in row["input"]
            assert value not in scrubbed, (value, scrubbed)
        assert find_pii(scrubbed) == []
        if not row["pii"]:
            # Nothing else in the traffic looks like personal data, so scrubbing never eats PO numbers or SKUs.
            assert find_pii(row["input"]) == [], row["input"]
    expected = {"product_intent": {"EMAIL", "PHONE", "CARD"},
                "email_intel": {"EMAIL", "PHONE", "IBAN", "CARD"},
                "hr_leave": {"EMAIL", "PHONE", "IBAN", "SSN", "NATIONAL_ID"}}[name]
    assert expected <= set(kinds), kinds


def _is_broken(uc, validator, row) -> bool:
    text = row["input"]
    if not isinstance(text, str) or not text.strip() or len(text) > uc.data.max_input_chars:
        return True
    return bool(_label_errors(uc, validator, _true_label(row)))


@pytest.mark.parametrize("name", USE_CASES)
def test_dirty_rows_are_planted_at_the_requested_rate_and_are_really_broken(name):
    uc = load_use_case(name)
    validator = jsonschema.Draft202012Validator(uc.output_schema)
    rows = _rows(name, 3000, seed=9, dirty=0.3)
    dirty = [r for r in rows if r["dirty"]]
    assert abs(len(dirty) / len(rows) - 0.3) < 0.04
    assert set(DIRTY_KINDS) == {r["dirty"] for r in dirty}
    for row in rows:
        assert _is_broken(uc, validator, row) == (row["dirty"] is not None), row
        if row["dirty"]:
            # Broken rows look trusted, so only validation can keep them out of the training set.
            assert row["feedback"] in ("accepted", "corrected")
    prose = [r["model_output"] for r in dirty if r["dirty"] == "prose_json"]
    assert prose and all(isinstance(p, str) for p in prose)
    assert any(r["input"] is not None and len(r["input"]) >= 1 << 20 for r in dirty)
    sql = [r for r in rows if r["input"] and SQL_INJECTION in r["input"]]
    assert sql and all(r["dirty"] is None for r in sql)


def test_dirty_rows_are_rejected_by_the_dataset_contract():
    from retrain.data.dataset import check_example

    for name in USE_CASES:
        uc = load_use_case(name)
        validator = jsonschema.Draft202012Validator(uc.output_schema)
        for row in _rows(name, 1500, seed=13, dirty=0.3):
            if row["feedback"] == "rejected":
                continue
            label, reason = check_example(uc, row["input"], _true_label(row), validator)
            assert (reason is not None) == (row["dirty"] is not None), (row["dirty"], reason)


def test_normal_traffic_defaults_and_huge_inputs_are_capped():
    rows = _rows("product_intent", 20000, seed=6)  # default dirty=0.01
    assert 0.005 < sum(bool(r["dirty"]) for r in rows) / len(rows) < 0.015
    assert not any(r["dirty"] for r in _rows("product_intent", 2000, dirty=0.0))
    everything_dirty = _rows("email_intel", 2000, seed=1, dirty=1.0)
    assert all(r["dirty"] for r in everything_dirty)
    assert sum(r["dirty"] == "huge_input" for r in everything_dirty) <= 2  # bounded database volume


def test_created_at_is_aware_increasing_and_spans_a_month():
    rows = _rows("hr_leave", 5000, seed=0)
    times = [r["created_at"] for r in rows]
    assert all(t.tzinfo is not None for t in times)
    assert all(a < b for a, b in zip(times, times[1:]))
    assert START <= times[0] < START + timedelta(hours=1)
    assert timedelta(days=29) < times[-1] - times[0] <= timedelta(days=30)
    before = datetime.now(timezone.utc)
    default = [r["created_at"] for r in generate_rows(load_use_case("hr_leave"), 100, dirty=0.0)]
    # Default window: the last 30 days, ending no later than now.
    assert before - timedelta(days=30, seconds=1) <= default[0] < before - timedelta(days=29)
    assert default[-1] <= datetime.now(timezone.utc)


def test_bad_arguments_say_what_to_do():
    uc = load_use_case("product_intent")
    with pytest.raises(ValueError, match="fraction between 0 and 1"):
        list(generate_rows(uc, 10, dirty=1.5))
    other = parse_use_case({**uc.model_dump(), "name": "invoice_triage"})
    with pytest.raises(ValueError, match="no synthetic traffic generator.*supported: email_intel, email_voice, hr_leave"):
        list(generate_rows(other, 10))


# --- PostgreSQL ------------------------------------------------------------------------------------


def _db_rows(conn, use_case: str) -> list[tuple]:
    with conn.cursor() as cur:
        cur.execute("SELECT input, model_output, corrected_output, feedback, created_at FROM production_examples "
                    "WHERE use_case = %s ORDER BY id", (use_case,))
        return cur.fetchall()


def test_insert_rows_round_trips_every_value(db_conn):
    uc = load_use_case("email_intel")
    rows = _rows("email_intel", 1500, seed=21, dirty=0.3)
    assert insert_rows(db_conn, uc.name, iter(rows), batch_size=97) == len(rows)
    stored = _db_rows(db_conn, uc.name)
    assert len(stored) == len(rows)
    for row, (text, model_output, corrected, feedback, created_at) in zip(rows, stored):
        # Includes NULL vs '' inputs, the 1 MiB input, tabs/backslashes/"\N" and prose stored as a JSON string.
        assert text == row["input"]
        assert model_output == row["model_output"]
        assert corrected == row["corrected_output"]
        assert feedback == row["feedback"]
        assert created_at == row["created_at"]
    injected = [t for t, *_ in stored if t and SQL_INJECTION in t]
    assert injected and all("\\N C:\\temp\t" in t for t in injected)
    with db_conn.cursor() as cur:  # the payload was data, not SQL: the table is still there
        cur.execute("SELECT to_regclass('production_examples') IS NOT NULL")
        assert cur.fetchone()[0] is True


def test_seed_examples_reports_counts_and_appends(db_conn):
    for name in USE_CASES:
        uc = load_use_case(name)
        result = seed_examples(db_conn, uc, 800, seed=1, dirty=0.3, start=START)
        assert result["use_case"] == name and result["inserted"] == 800
        assert 0.25 < result["dirty_fraction"] < 0.35
        second = seed_examples(db_conn, uc, 200, seed=2, dirty=0.0, start=START + timedelta(days=31))
        assert second == {"use_case": name, "inserted": 200, "dirty_fraction": 0.0}
    with db_conn.cursor() as cur:
        cur.execute("SELECT use_case, count(*) FROM production_examples GROUP BY use_case ORDER BY use_case")
        assert cur.fetchall() == [(name, 1000) for name in sorted(USE_CASES)]


def test_insert_rows_without_schema_explains_the_fix(db_conn):
    with db_conn.cursor() as cur:
        cur.execute("CREATE SCHEMA IF NOT EXISTS synthetic_empty")
        cur.execute("SET search_path TO synthetic_empty")
    db_conn.commit()
    try:
        with pytest.raises(RuntimeError, match="production_examples does not exist.*schema.sql"):
            insert_rows(db_conn, "hr_leave", _rows("hr_leave", 5))
    finally:
        with db_conn.cursor() as cur:
            cur.execute("SET search_path TO public")
            cur.execute("DROP SCHEMA synthetic_empty")
        db_conn.commit()


def test_package_keeps_the_public_api():
    """retrain.data.synthetic is a package (one module per use case + pii); callers import from the package."""
    import retrain.data.synthetic as synthetic

    assert synthetic.supported_use_cases() == ["email_intel", "email_voice", "hr_leave", "product_intent"]
    for name in synthetic.__all__:
        assert hasattr(synthetic, name), name
    from retrain.data.synthetic.hr_leave import hr_decision as direct

    assert direct is hr_decision
