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
