"""build_dataset: contract checks, quarantine, dedup, stable splits, frozen test set, manifest."""

from __future__ import annotations

import hashlib
import json

import jsonschema
import pytest

from retrain.data.collect import input_hash, split_for
from retrain.schemas.use_case import load_use_case
from retrain.data.dataset import DatasetError, build_dataset, check_example

UC = load_use_case("product_intent")


def label(intent="GIFT", budget="mid_range"):
    return {"intent_type": intent, "budget_tier": budget, "category": "unspecified", "recipient": "mother",
            "context_tags": ["gift"], "priority_features": ["thoughtful"]}


def write_batch(run_dir, rows):
    with open(run_dir / "batch.jsonl", "w") as fh:
        for i, (text, lab) in enumerate(rows, 1):
            split = split_for(input_hash(text), 0.8, 0.1) if isinstance(text, str) and text.strip() else None
            fh.write(json.dumps({"source_id": i, "input": text, "label_raw": lab, "feedback": "accepted",
                                 "split": split}) + "\n")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("text", "raw", "reason"),
    [
        (None, label(), "empty_input"),
        ("   ", label(), "empty_input"),
        ("x" * 1_000_000, label(), "input_too_long"),
        ("hola", label(), "input_too_short"),
        ("regalo para mamá", "Sure! Here is the JSON: {\"intent_type\": \"GIFT\"}", "invalid_json"),
        ("regalo para mamá", None, "invalid_json"),
        ("regalo para mamá", label(intent="GIFTS"), "unknown_label"),
        ("regalo para mamá", {"intent_type": "GIFT"}, "schema"),
    ],
)
def test_contract_violations_are_named(text, raw, reason):
    got, why = check_example(UC, text, raw, jsonschema.Draft202012Validator(UC.output_schema))
    assert got is None and why.startswith(reason), why


def test_json_string_label_is_parsed():
    got, why = check_example(UC, "regalo para mamá", json.dumps(label()), jsonschema.Draft202012Validator(UC.output_schema))
    assert why is None and got == label()


def test_build_writes_chat_files_manifest_and_quarantine(db_conn, run_dir):
    rows = [(f"regalo número {i} para mi madre", label()) for i in range(60)]
    rows += [("Regalo  número 3 para mi MADRE", label(budget="premium"))]  # duplicate after normalisation
    rows += [("regalo raro", label(intent="REFUND"))]
    write_batch(run_dir, rows)
    result = build_dataset(db_conn, UC, "run-1", run_dir)
    counts = result["counts"]
    assert counts["collected"] == 62 and counts["rejected"] == 1 and counts["duplicates_removed"] == 1
    assert counts["train"] + counts["val"] + counts["test"] == 60
    rejected = read(run_dir / "rejected.jsonl")
    assert rejected[0]["reason"] == "unknown_label: intent_type='REFUND'"

    example = read(run_dir / "train.jsonl")[0]
    roles = [m["role"] for m in example["messages"]]
    assert roles == ["system", "user", "assistant"] and list(example) == ["messages"]
    assert json.loads(example["messages"][2]["content"])["intent_type"] == "GIFT"
    # The answer is written in the output schema's key order (labels first), not jsonb's shortest-key-first order.
    assert list(json.loads(example["messages"][2]["content"])) == list(UC.output_schema["properties"])
    # the later duplicate (a human's newer label) wins
    all_rows = [json.loads(m["messages"][2]["content"]) for s in ("train", "val", "test")
                for m in read(run_dir / f"{s}.jsonl") if "número 3 " in m["messages"][1]["content"].lower()]
    assert [r["budget_tier"] for r in all_rows] == ["premium"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl"):
        assert manifest["files"][name]["sha256"] == hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
    assert manifest["label_distribution"]["train"]["intent_type"]["GIFT"] == counts["train"]


def test_test_set_is_frozen_and_accumulates(db_conn, tmp_path):
    month1, month2 = tmp_path / "m1", tmp_path / "m2"
    month1.mkdir(), month2.mkdir()
    texts = [f"búsqueda de producto {i}" for i in range(200)]
    write_batch(month1, [(t, label()) for t in texts[:100]])
    build_dataset(db_conn, UC, "m1", month1)
    test1 = read(month1 / "test.jsonl")
    # Month 2 relabels everything and adds new rows: test labels stay frozen, train labels follow the correction.
    write_batch(month2, [(t, label(intent="BUSINESS")) for t in texts])
    build_dataset(db_conn, UC, "m2", month2)
    test2 = read(month2 / "test.jsonl")
    assert all(row in test2 for row in test1) and len(test2) > len(test1)
    frozen = {r["messages"][1]["content"]: json.loads(r["messages"][2]["content"])["intent_type"] for r in test2}
    assert all(frozen[r["messages"][1]["content"]] == "GIFT" for r in test1)
    assert {json.loads(r["messages"][2]["content"])["intent_type"] for r in read(month2 / "train.jsonl")} == {"BUSINESS"}
    train_inputs = {r["messages"][1]["content"] for r in read(month2 / "train.jsonl")}
    assert not train_inputs & set(frozen)


def test_rebuild_is_idempotent(db_conn, run_dir):
    write_batch(run_dir, [(f"consulta {i} de portátil", label()) for i in range(80)])
    build_dataset(db_conn, UC, "r", run_dir)
    first = {s: (run_dir / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")}
    build_dataset(db_conn, UC, "r", run_dir)
    assert first == {s: (run_dir / f"{s}.jsonl").read_bytes() for s in ("train", "val", "test")}
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM dataset_examples")
        assert cur.fetchone()[0] == 80


def test_missing_batch_says_what_to_run(db_conn, run_dir):
    with pytest.raises(DatasetError, match="run collect_examples"):
        build_dataset(db_conn, UC, "r", run_dir)


# --- hostile months (issue 16) ---------------------------------------------------------------------------------

from retrain.data.dataset import is_blank, parse_batch_line, training_decision  # noqa: E402
from retrain.errors import is_user_error  # noqa: E402
from retrain.schemas.use_case import parse_use_case  # noqa: E402


def write_rows(run_dir, rows):
    """rows: dicts with input, label_raw and optionally feedback, source_id, updated_at (raw lines allowed as str)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "batch.jsonl", "w") as fh:
        for i, row in enumerate(rows, 1):
            if isinstance(row, str):
                fh.write(row + "\n")
                continue
            text = row["input"]
            split = split_for(input_hash(text), 0.8, 0.1) if isinstance(text, str) and text.strip() else None
            record = {"source_id": row.get("source_id", i), "input": text, "label_raw": row["label_raw"],
                      "feedback": row.get("feedback", "accepted"), "split": split}
            if "updated_at" in row:
                record["updated_at"] = row["updated_at"]
            fh.write(json.dumps(record) + "\n")


def text_in(split, prefix="consulta de regalo"):
    return next(t for t in (f"{prefix} {i}" for i in range(10_000)) if split_for(input_hash(t), 0.8, 0.1) == split)


def stored_label(db_conn, text):
    with db_conn.cursor() as cur:
        cur.execute("SELECT label, label_human FROM dataset_examples WHERE input_hash = %s", (input_hash(text),))
        return cur.fetchone()


def manifest_of(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def test_newest_human_correction_beats_500_conflicting_copies_within_a_month(db_conn, tmp_path):
    text = text_in("train")
    rows = []
    for i in range(1, 501):
        # Corrections at ids 100 (BUSINESS) and 300 (URGENT); accepted model outputs everywhere else, the last
        # one (id 500) with yet another label: the old rule ("last row by id") picked that one.
        if i == 100:
            rows.append({"input": text, "label_raw": label(intent="BUSINESS"), "feedback": "corrected"})
        elif i == 300:
            rows.append({"input": text.upper(), "label_raw": label(intent="URGENT"), "feedback": "corrected"})
        else:
            rows.append({"input": text, "label_raw": label(intent="GIFT" if i % 2 else "COMPARISON")})
    write_rows(tmp_path / "m1", rows)
    result = build_dataset(db_conn, UC, "m1", tmp_path / "m1")
    got, human = stored_label(db_conn, text)
    assert got["intent_type"] == "URGENT" and human is True
    assert result["counts"]["train"] == 1 and result["counts"]["duplicates_removed"] == 499

    conflicts = manifest_of(tmp_path / "m1")["conflicts"]
    assert conflicts["inputs"] == 1 and conflicts["by_kind"] == {"human_vs_human": 1}
    example = conflicts["examples"][0]
    assert example["input_hash"] == input_hash(text) and example["rows_this_month"] == 500
    assert example["distinct_labels"] == 4
    assert example["winner"]["source"] == "human" and example["winner"]["label"]["intent_type"] == "URGENT"
    assert {c["label"]["intent_type"] for c in example["losers"]} <= {"BUSINESS", "GIFT", "COMPARISON"}
    assert text not in json.dumps(conflicts)  # hashes and labels only, never the input
    assert manifest_of(tmp_path / "m1")["counts"]["label_conflicts"] == 1


def test_newer_updated_at_wins_between_two_corrections(db_conn, tmp_path):
    text = text_in("train")
    write_rows(tmp_path / "m1", [
        {"input": text, "label_raw": label(intent="BUSINESS"), "feedback": "corrected", "source_id": 1,
         "updated_at": "2026-03-05T10:00:00+00:00"},
        {"input": text, "label_raw": label(intent="URGENT"), "feedback": "corrected", "source_id": 2,
         "updated_at": "2026-03-01T10:00:00+00:00"},
        {"input": text, "label_raw": label(intent="GIFT"), "source_id": 3, "updated_at": "2026-03-09T10:00:00Z"},
    ])
    build_dataset(db_conn, UC, "m1", tmp_path / "m1")
    assert stored_label(db_conn, text)[0]["intent_type"] == "BUSINESS"


def test_month_3_accepted_output_does_not_replace_the_month_2_correction(db_conn, tmp_path):
    texts = [text_in("train", f"regalo {k}") for k in range(3)]
    # Month 1: accepted model outputs. Month 2: a human corrects them (and the model repeats its answer later
    # in the same month). Month 3: the model answers again, with a higher id.
    write_rows(tmp_path / "m1", [{"input": t, "label_raw": label(intent="GIFT")} for t in texts])
    build_dataset(db_conn, UC, "m1", tmp_path / "m1")
    write_rows(tmp_path / "m2", [
        *({"input": t, "label_raw": label(intent="BUSINESS"), "feedback": "corrected", "source_id": 10 + k}
          for k, t in enumerate(texts)),
        *({"input": t, "label_raw": label(intent="GIFT"), "source_id": 20 + k} for k, t in enumerate(texts)),
    ])
    build_dataset(db_conn, UC, "m2", tmp_path / "m2")
    assert {stored_label(db_conn, t)[0]["intent_type"] for t in texts} == {"BUSINESS"}
    write_rows(tmp_path / "m3", [{"input": t, "label_raw": label(intent="PERSONAL_USE"), "source_id": 30 + k}
                                 for k, t in enumerate(texts)])
    result = build_dataset(db_conn, UC, "m3", tmp_path / "m3")
    assert {stored_label(db_conn, t)[0]["intent_type"] for t in texts} == {"BUSINESS"}
    train = [json.loads(r["messages"][2]["content"])["intent_type"] for r in read(tmp_path / "m3" / "train.jsonl")]
    assert train == ["BUSINESS"] * 3
    conflicts = manifest_of(tmp_path / "m3")["conflicts"]
    assert conflicts["inputs"] == 3 and conflicts["by_kind"] == {"human_vs_model": 3}
    assert conflicts["examples"][0]["resolution"] == "kept the stored human label"
    assert result["new_rows"] == 0  # nothing changed in the curated dataset
    # Month 4: a newer human correction does replace the month-2 one.
    write_rows(tmp_path / "m4", [{"input": texts[0], "label_raw": label(intent="URGENT"), "feedback": "corrected",
                                  "source_id": 40}])
    assert build_dataset(db_conn, UC, "m4", tmp_path / "m4")["new_rows"] == 1
    assert stored_label(db_conn, texts[0])[0]["intent_type"] == "URGENT"


def test_a_3000_level_label_is_rejected_not_a_crash(db_conn, run_dir):
    deep = '{"a": ' * 3000 + "1" + "}" * 3000
    good = [{"input": f"regalo número {i} para mi madre", "label_raw": label()} for i in range(5)]
    write_rows(run_dir, [
        *good,
        # The jsonb label inline in the batch line (as collect writes it), and as a JSON string.
        json.dumps({"source_id": 90, "input": "regalo profundo uno", "label_raw": None, "feedback": "corrected",
                    "split": "train"}).replace('"label_raw": null', f'"label_raw": {deep}'),
        {"input": "regalo profundo dos", "label_raw": "[" * 3000 + "]" * 3000, "source_id": 91},
        # 40 levels: parses fine, still over data.max_label_depth.
        {"input": "regalo profundo tres", "label_raw": {"x": json.loads("[" * 39 + "1" + "]" * 39)}, "source_id": 92},
        {"input": "regalo enorme", "label_raw": {**label(), "category": "x" * 30_000}, "source_id": 93},
    ])
    result = build_dataset(db_conn, UC, "r", run_dir)
    assert result["counts"]["rejected"] == 4 and result["counts"]["train"] + result["counts"]["val"] + \
        result["counts"]["test"] == 5
    rejected = {r["source_id"]: r["reason"] for r in read(run_dir / "rejected.jsonl")}
    assert rejected[90].startswith("label_too_deep: nested 3000 levels > data.max_label_depth=32")
    assert rejected[91].startswith("label_too_deep") and rejected[92].startswith("label_too_deep")
    assert rejected[93].startswith("label_too_large")
    assert result["rejected_reasons"] == {"label_too_deep": 3, "label_too_large": 1}
    assert len((run_dir / "rejected.jsonl").read_text()) < 20_000  # the monster is not copied around


def test_parse_batch_line_keeps_the_row_of_a_too_deep_member():
    line = '{"source_id": 7, "input": "a \\"quoted\\" {brace} [x]", "label_raw": ' + "[" * 2000 + "]" * 2000 + \
        ', "feedback": "accepted", "split": "train"}'
    row = parse_batch_line(line)
    assert row["source_id"] == 7 and row["input"] == 'a "quoted" {brace} [x]' and row["split"] == "train"
    assert row["label_raw"].depth == 2000
    with pytest.raises(ValueError):
        parse_batch_line("[" * 5000 + "]" * 4000)


@pytest.mark.parametrize("text", ["\u200b\u200c\u200d", "\u2060\ufeff \u200b", "\u00ad\u200e\u200f\u202a",
                                  "\u3164\u3164\u3164\u3164\u3164", " \t\u00a0\u2003\u200b\n"])
def test_invisible_only_input_counts_as_empty(text):
    got, why = check_example(UC, text, label(), jsonschema.Draft202012Validator(UC.output_schema))
    assert got is None and why == "empty_input"


def test_visible_text_with_zero_width_characters_is_kept():
    assert not is_blank("regalo\u200b para mamá") and not is_blank("日本語") and not is_blank("😀")
    assert is_blank("") and is_blank("\u200b\u2060\ufeff")


def test_invisible_input_is_rejected_by_build(db_conn, run_dir):
    write_rows(run_dir, [{"input": f"regalo número {i} para mi madre", "label_raw": label()} for i in range(5)]
               + [{"input": "\u200b" * 12, "label_raw": label()}])
    result = build_dataset(db_conn, UC, "r", run_dir)
    assert result["rejected_reasons"] == {"empty_input": 1}


# --- nothing new, nothing trained ------------------------------------------------------------------------------


def test_all_rejected_month_and_no_new_rows_month_do_not_train(db_conn, tmp_path):
    write_rows(tmp_path / "m1", [{"input": f"regalo número {i} para mi madre", "label_raw": label()}
                                 for i in range(60)])
    m1 = build_dataset(db_conn, UC, "m1", tmp_path / "m1")
    assert m1["new_rows"] == manifest_of(tmp_path / "m1")["new_rows"] > 40
    assert training_decision(manifest_of(tmp_path / "m1"), UC, force=False)[0] is True
    # Retrying the build of the same month counts the same new rows (they are this run's rows).
    assert build_dataset(db_conn, UC, "m1", tmp_path / "m1")["new_rows"] == m1["new_rows"]

    # Month 2: every row is broken.
    write_rows(tmp_path / "m2", [{"input": f"regalo {i} roto", "label_raw": "not json"} for i in range(40)])
    build_dataset(db_conn, UC, "m2", tmp_path / "m2")
    train, reason = training_decision(manifest_of(tmp_path / "m2"), UC, force=False)
    assert train is False
    assert reason.startswith("0 usable new rows this month (< data.min_new_rows=1): nothing to retrain; trigger "
                             "with force_retrain=true to train anyway"), reason
    assert training_decision(manifest_of(tmp_path / "m2"), UC, force=True)[0] is True

    # Month 3: the same rows again (nothing new), and an empty batch.
    write_rows(tmp_path / "m3", [{"input": f"regalo número {i} para mi madre", "label_raw": label()}
                                 for i in range(60)])
    build_dataset(db_conn, UC, "m3", tmp_path / "m3")
    assert manifest_of(tmp_path / "m3")["new_rows"] == 0
    assert training_decision(manifest_of(tmp_path / "m3"), UC, force=False)[0] is False
    write_rows(tmp_path / "m4", [])
    build_dataset(db_conn, UC, "m4", tmp_path / "m4")
    assert training_decision(manifest_of(tmp_path / "m4"), UC, force=False)[0] is False
    forced = training_decision(manifest_of(tmp_path / "m4"), UC, force=True)
    assert forced[0] is True and "force_retrain" in forced[1]


def test_min_new_rows_threshold_is_configurable():
    data = UC.model_dump()
    data["data"]["min_new_rows"] = 10
    uc = parse_use_case(data)
    assert training_decision({"new_rows": 9}, uc, False) == (
        False, "9 usable new rows this month (< data.min_new_rows=10): nothing to retrain; trigger with "
               "force_retrain=true to train anyway (0 rows collected, 0 rejected)")
    assert training_decision({"new_rows": 10}, uc, False)[0] is True


# --- drift ------------------------------------------------------------------------------------------------------

INTENTS = ["GIFT", "PERSONAL_USE", "BUSINESS", "COMPARISON", "URGENT"]


def balanced_month(n, prefix):
    return [{"input": f"{prefix} producto número {i} para casa", "label_raw": label(intent=INTENTS[i % 5])}
            for i in range(n)]


def skewed_month(n, prefix, share=0.9):
    return [{"input": f"{prefix} producto número {i} para casa",
             "label_raw": label(intent="GIFT" if i < share * n else INTENTS[1 + i % 4])} for i in range(n)]


def test_first_month_drift_is_not_applicable(db_conn, run_dir):
    write_rows(run_dir, balanced_month(300, "a"))
    build_dataset(db_conn, UC, "m1", run_dir)
    drift = manifest_of(run_dir)["drift"]
    assert drift["status"] == "n/a" and "first month" in drift["reason"] and drift["checks"] == []


def test_ninety_percent_one_label_month_is_drift(db_conn, tmp_path):
    write_rows(tmp_path / "m1", balanced_month(300, "a"))
    build_dataset(db_conn, UC, "m1", tmp_path / "m1")
    # The same distribution again is no drift.
    write_rows(tmp_path / "m2", balanced_month(200, "b"))
    build_dataset(db_conn, UC, "m2", tmp_path / "m2")
    assert manifest_of(tmp_path / "m2")["drift"]["status"] == "ok"
    write_rows(tmp_path / "m3", skewed_month(200, "c"))
    result = build_dataset(db_conn, UC, "m3", tmp_path / "m3")
    drift = manifest_of(tmp_path / "m3")["drift"]
    # Above the fail level, but data.drift.action defaults to warn: the outcome is a warning.
    assert result["drift"] == drift["status"] == "warn" and drift["level"] == "fail"
    assert drift["reference_rows"] == 500 and drift["batch_rows"] == 200
    intent = drift["labels"]["intent_type"]
    assert intent["top"] == {"value": "GIFT", "share": 0.9, "reference_share": 0.2}
    assert intent["psi"] > 1.0 and intent["js"] > 0.2
    assert drift["labels"]["budget_tier"]["psi"] < 0.01  # the other field did not move
    psi = next(c for c in drift["checks"] if c["metric"] == "label_psi" and c["field"] == "intent_type")
    assert psi["status"] == "fail" and "'GIFT' is 90.0% of this month's rows vs 20.0%" in psi["message"]


def test_data_and_validation_errors_are_not_retried():
    from retrain.data.validate import DataValidationError

    assert is_user_error(DatasetError("x")) and is_user_error(DataValidationError("x"))


# --- properties of the hostile-input parsers ---------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from retrain.data.dataset import _BLANK_LETTERS, _split_object  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(['{', '}', '[', ']', ',', '\\"']),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _json, max_size=6), st.booleans())
def test_top_level_splitter_agrees_with_json_loads(obj, ascii_only):
    text = json.dumps(obj, ensure_ascii=ascii_only)
    assert _split_object(text, 10_000) == json.loads(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from('{}[]",:\\ a1'), max_size=60))
def test_batch_line_parser_only_raises_value_error(text):
    try:
        parse_batch_line("[" * 3000 + text)
        parse_batch_line('{"a": ' + "[" * 3000 + text)
    except ValueError:
        pass


_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad\u200e\u200f\u202a\u202e\u2061\u180e \t\n\r\u00a0\u2003\u3000\u3164"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(_INVISIBLE)), st.text(alphabet=st.sampled_from(_INVISIBLE)),
       st.characters(categories=("Lu", "Ll", "Lo", "Nd", "So")).filter(lambda c: c not in _BLANK_LETTERS))
def test_blank_means_nothing_visible(before, after, visible):
    assert is_blank(before + after)
    assert not is_blank(before + visible + after)


def test_deep_corrected_output_from_postgres_is_rejected_end_to_end(db_conn, run_dir):
    """The issue's reproduction: rows inserted with psycopg2, collected, built (no RecursionError, month not blocked)."""
    from retrain.data.collect import collect_examples

    deep = '{"a": ' * 3000 + "1" + "}" * 3000
    with db_conn.cursor() as cur:
        for i in range(5):
            cur.execute("INSERT INTO production_examples (use_case, input, model_output, feedback) "
                        "VALUES ('product_intent', %s, %s::jsonb, 'accepted')",
                        (f"regalo número {i} para mi madre", json.dumps(label())))
        cur.execute("INSERT INTO production_examples (use_case, input, model_output, corrected_output, feedback) "
                    "VALUES ('product_intent', 'regalo muy profundo', %s::jsonb, %s::jsonb, 'corrected')",
                    (json.dumps(label()), deep))
        cur.execute("INSERT INTO production_examples (use_case, input, model_output, feedback) "
                    "VALUES ('product_intent', %s, %s::jsonb, 'accepted')",
                    ("\u200b\u200c\u200d\u2060\ufeff", json.dumps(label())))
    db_conn.commit()
    collect_examples(db_conn, "product_intent", "r", run_dir / "batch.jsonl")
    result = build_dataset(db_conn, UC, "r", run_dir)
    assert result["rejected_reasons"] == {"label_too_deep": 1, "empty_input": 1}
    assert result["counts"]["train"] + result["counts"]["val"] + result["counts"]["test"] == 5


def test_issue_reproduction_through_postgres_and_collect(db_conn, tmp_path):
    """500 conflicting copies inserted with psycopg2, then three monthly collect + build runs."""
    from psycopg2.extras import Json

    from retrain.data.collect import collect_examples

    text = text_in("train", "regalo conflictivo")

    def insert(rows):
        with db_conn.cursor() as cur:
            for model, corrected, feedback in rows:
                cur.execute("INSERT INTO production_examples (use_case, input, model_output, corrected_output, "
                            "feedback) VALUES ('product_intent', %s, %s, %s, %s)",
                            (text, Json(model), Json(corrected) if corrected else None, feedback))
        db_conn.commit()

    def month(run_id):
        run_dir = tmp_path / run_id
        run_dir.mkdir()
        collect_examples(db_conn, "product_intent", run_id, run_dir / "batch.jsonl")
        return build_dataset(db_conn, UC, run_id, run_dir)

    # Month 1: 500 copies; humans corrected two of them (PERSONAL_USE, then BUSINESS); the model's accepted
    # answers alternate and the row with the highest id is an accepted GIFT.
    rows = []
    for i in range(1, 501):
        if i in (120, 240):
            rows.append((label(intent="GIFT"), label(intent="PERSONAL_USE" if i == 120 else "BUSINESS"), "corrected"))
        else:
            rows.append((label(intent="GIFT" if i % 2 == 0 else "URGENT"), None, "accepted"))
    insert(rows)
    m1 = month("m1")
    assert stored_label(db_conn, text)[0]["intent_type"] == "BUSINESS"
    assert m1["conflicts"] == 1
    # Month 2: a new correction wins.
    insert([(label(intent="GIFT"), label(intent="COMPARISON"), "corrected")])
    month("m2")
    assert stored_label(db_conn, text) == (label(intent="COMPARISON"), True)
    # Month 3: accepted model outputs with higher ids do not replace the month-2 correction.
    insert([(label(intent="GIFT"), None, "accepted")] * 3)
    m3 = month("m3")
    assert stored_label(db_conn, text) == (label(intent="COMPARISON"), True)
    assert m3["conflicts"] == 1 and m3["new_rows"] == 0


def test_conflicts_are_all_counted_and_five_shown(db_conn, run_dir):
    rows = []
    for k in range(8):
        text = f"regalo en disputa {k} para casa"
        rows += [{"input": text, "label_raw": label(intent="BUSINESS"), "feedback": "corrected"},
                 {"input": text, "label_raw": label(intent="URGENT"), "feedback": "corrected"}]
    write_rows(run_dir, rows)
    result = build_dataset(db_conn, UC, "r", run_dir)
    conflicts = manifest_of(run_dir)["conflicts"]
    assert result["conflicts"] == conflicts["inputs"] == 8 and len(conflicts["examples"]) == 5
    assert conflicts["by_kind"] == {"human_vs_human": 8}
    assert all(e["winner"]["label"]["intent_type"] == "URGENT" for e in conflicts["examples"])
