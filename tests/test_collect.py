"""collect_examples against a real PostgreSQL server: watermark, replay, label choice, scrubbing, bounded fetch."""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone

from psycopg2.extras import Json

from retrain.data.collect import collect_examples, input_hash, pick_label, split_for

T0 = datetime(2026, 10, 1, tzinfo=timezone.utc)


def insert(conn, rows, use_case="product_intent"):
    with conn.cursor() as cur:
        for i, (text, model_output, corrected, feedback) in enumerate(rows):
            cur.execute(
                "INSERT INTO production_examples (use_case, input, model_output, corrected_output, feedback, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (use_case, text, Json(model_output) if model_output is not None else None,
                 Json(corrected) if corrected is not None else None, feedback, T0 + timedelta(minutes=len(rows) and i)),
            )
    conn.commit()


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pick_label_prefers_human_correction_and_skips_rejected():
    assert pick_label("accepted", {"a": 1}, None) == ({"a": 1}, None)
    assert pick_label("corrected", {"a": 1}, {"a": 2}) == ({"a": 2}, None)
    assert pick_label("rejected", {"a": 1}, None) == (None, "rejected")
    assert pick_label("corrected", {"a": 1}, None) == (None, "corrected_without_fix")
    assert pick_label("accepted", None, None) == (None, "accepted_without_output")


def test_split_is_stable_and_roughly_proportional():
    hashes = [input_hash(f"query number {i}") for i in range(5000)]
    splits = [split_for(h, 0.8, 0.1) for h in hashes]
    assert splits == [split_for(h, 0.8, 0.1) for h in hashes]
    assert 0.77 < splits.count("train") / 5000 < 0.83
    assert 0.08 < splits.count("test") / 5000 < 0.12
    # normalisation: case and whitespace do not move an example between splits
    assert input_hash("Gift  for MOM") == input_hash("gift for mom")


def test_collect_is_incremental_and_replays_the_same_window(db_conn, tmp_path):
    insert(db_conn, [
        ("regalo para mi madre, escribe a ana.garcia@example.com", {"intent_type": "GIFT"}, None, "accepted"),
        ("cheap laptop", {"intent_type": "GIFT"}, {"intent_type": "PERSONAL_USE"}, "corrected"),
        ("spam spam", {"intent_type": "URGENT"}, None, "rejected"),
    ])
    first = collect_examples(db_conn, "product_intent", "run-1", tmp_path / "b1.jsonl")
    rows = read(tmp_path / "b1.jsonl")
    assert first["rows"] == 2 and first["skipped"] == {"rejected": 1} and not first["replayed"]
    assert rows[0]["input"] == "regalo para mi madre, escribe a [EMAIL]"
    assert rows[1]["label_raw"] == {"intent_type": "PERSONAL_USE"}
    assert "ana.garcia" not in (tmp_path / "b1.jsonl").read_text()

    insert(db_conn, [("new query after the first run", {"intent_type": "BUSINESS"}, None, "accepted")])
    # A retry of run-1 (same run id) replays exactly its window: the new row is not picked up twice.
    again = collect_examples(db_conn, "product_intent", "run-1", tmp_path / "b1-retry.jsonl")
    assert again["replayed"] and again["rows"] == 2
    assert read(tmp_path / "b1-retry.jsonl") == rows

    for row in rows:  # the collector's inlined split is the documented split_for(input_hash(...))
        assert row["split"] == split_for(input_hash(row["input"]), 0.8, 0.1)

    second = collect_examples(db_conn, "product_intent", "run-2", tmp_path / "b2.jsonl")
    assert second["rows"] == 1
    assert read(tmp_path / "b2.jsonl")[0]["input"] == "new query after the first run"

    third = collect_examples(db_conn, "product_intent", "run-3", tmp_path / "b3.jsonl")
    assert third["rows"] == 0 and (tmp_path / "b3.jsonl").read_text() == ""
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM collection_runs WHERE use_case = 'product_intent'")
        assert cur.fetchone()[0] == 3


def test_sample_limit_moves_the_watermark_only_past_collected_rows(db_conn, tmp_path):
    insert(db_conn, [(f"query {i}", {"intent_type": "GIFT"}, None, "accepted") for i in range(10)])
    a = collect_examples(db_conn, "product_intent", "a", tmp_path / "a.jsonl", sample_limit=4)
    b = collect_examples(db_conn, "product_intent", "b", tmp_path / "b.jsonl")
    assert a["rows"] == 4 and b["rows"] == 6
    ids = [r["source_id"] for r in read(tmp_path / "a.jsonl") + read(tmp_path / "b.jsonl")]
    assert ids == list(range(1, 11))


def test_use_cases_do_not_see_each_other(db_conn, tmp_path):
    insert(db_conn, [("an email body long enough", {"intent": "quote_request"}, None, "accepted")], "email_intel")
    insert(db_conn, [("gift for dad", {"intent_type": "GIFT"}, None, "accepted")], "product_intent")
    res = collect_examples(db_conn, "email_intel", "r", tmp_path / "e.jsonl")
    assert res["rows"] == 1 and read(tmp_path / "e.jsonl")[0]["label_raw"] == {"intent": "quote_request"}


def test_sql_injection_text_is_data(db_conn, tmp_path):
    evil = "'); DROP TABLE production_examples; -- regalo"
    insert(db_conn, [(evil, {"intent_type": "GIFT"}, None, "accepted")])
    collect_examples(db_conn, "product_intent", "r", tmp_path / "x.jsonl")
    assert read(tmp_path / "x.jsonl")[0]["input"] == evil
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM production_examples")
        assert cur.fetchone()[0] == 1


def test_empty_table_collects_nothing_without_error(db_conn, tmp_path):
    res = collect_examples(db_conn, "hr_leave", "r", tmp_path / "x.jsonl")
    assert res["rows"] == 0 and res["skipped"] == {}


def test_parallel_scrubbing_writes_the_same_file_as_serial(db_conn, tmp_path, monkeypatch):
    from retrain.data import collect
    from retrain.schemas.use_case import load_use_case
    from retrain.data.synthetic import seed_examples

    seed_examples(db_conn, load_use_case("product_intent"), 3000, seed=4)
    serial = collect_examples(db_conn, "product_intent", "serial", tmp_path / "serial.jsonl")
    with db_conn.cursor() as cur:  # forget the watermark so the same rows are collected again
        cur.execute("TRUNCATE collection_watermarks, collection_runs")
    db_conn.commit()
    monkeypatch.setattr(collect, "PARALLEL_MIN_ROWS", 100)
    monkeypatch.setattr(collect, "FETCH_ROWS", 500)
    assert collect._workers_for({"from_id": 0, "to_id": 3000}) >= 1 or os.cpu_count() == 1
    parallel = collect_examples(db_conn, "product_intent", "parallel", tmp_path / "parallel.jsonl")
    assert (tmp_path / "serial.jsonl").read_bytes() == (tmp_path / "parallel.jsonl").read_bytes()
    assert serial["scrubbed"] == parallel["scrubbed"] and serial["skipped"] == parallel["skipped"]
    assert serial["scrubbed"]  # the synthetic traffic plants personal data
