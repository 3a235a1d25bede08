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


# --- issue 16: scrub decoded values; late corrections ------------------------------------------------------------

def test_pii_after_json_escapes_is_scrubbed_and_lines_stay_json(db_conn, tmp_path):
    from retrain.data.scrub import find_pii_in_value

    insert(db_conn, [
        ("call me\tat 612 345 678", {"recipient": "dad\n4111 1111 1111 1111"}, None, "accepted"),
        ("x", {"note": "line\nana@example.com", "q": "say \"hi\" to +34 612 345 678"}, None, "accepted"),
        ("y", {"intent_type": "GIFT"}, {"intent_type": "GIFT", "to": "tab\tjosé@correo.es"}, "corrected"),
    ])
    collect_examples(db_conn, "product_intent", "r", tmp_path / "b.jsonl")
    text = (tmp_path / "b.jsonl").read_text()
    rows = read(tmp_path / "b.jsonl")  # every line parses
    assert "4111" not in text and "612" not in text and "ana@" not in text and "josé" not in text
    assert rows[0]["input"] == "call me\tat [PHONE]"
    assert rows[0]["label_raw"] == {"recipient": "dad\n[CARD]"}
    assert rows[1]["label_raw"] == {"note": "line\n[EMAIL]", "q": "say \"hi\" to [PHONE]"}
    assert rows[2]["label_raw"] == {"intent_type": "GIFT", "to": "tab\t[EMAIL]"}
    for row in rows:
        assert find_pii_in_value(row) == []


def test_batch_lines_keep_their_fields_and_add_updated_at(db_conn, tmp_path):
    from datetime import datetime as dt

    insert(db_conn, [("gift for mum", {"intent_type": "GIFT"}, None, "accepted")])
    collect_examples(db_conn, "product_intent", "r", tmp_path / "b.jsonl")
    (row,) = read(tmp_path / "b.jsonl")
    assert list(row) == ["source_id", "input", "label_raw", "feedback", "split", "updated_at", "tenant"]
    assert row["updated_at"].endswith("Z") and dt.fromisoformat(row["updated_at"]).tzinfo is not None


def _correct(conn, source_id, label):
    with conn.cursor() as cur:
        cur.execute("UPDATE production_examples SET corrected_output = %s, feedback = 'corrected' WHERE id = %s",
                    (Json(label), source_id))
    conn.commit()


def test_late_correction_is_collected_once_and_retries_replay_the_same_window(db_conn, tmp_path):
    insert(db_conn, [("gift for mum", {"intent_type": "GIFT"}, None, "accepted"),
                     ("laptop for work", {"intent_type": "GIFT"}, None, "accepted")])
    first = collect_examples(db_conn, "product_intent", "m1", tmp_path / "m1.jsonl")
    assert first["rows"] == 2
    m1 = read(tmp_path / "m1.jsonl")

    _correct(db_conn, 2, {"intent_type": "BUSINESS"})  # a human fixes it after the month was collected
    # A late row with an old created_at is still collected.
    with db_conn.cursor() as cur:
        cur.execute("INSERT INTO production_examples (use_case, input, model_output, feedback, created_at) VALUES "
                    "('product_intent', 'late row', '{\"intent_type\": \"GIFT\"}', 'accepted', '2020-01-01')")
    db_conn.commit()

    retry = collect_examples(db_conn, "product_intent", "m1", tmp_path / "m1-retry.jsonl")
    assert retry["replayed"]
    # The retry replays m1's window; the corrected row left it (it is newer now) and goes to the next run.
    assert [r["source_id"] for r in read(tmp_path / "m1-retry.jsonl")] == [1]

    second = collect_examples(db_conn, "product_intent", "m2", tmp_path / "m2.jsonl")
    m2 = read(tmp_path / "m2.jsonl")
    assert sorted(r["source_id"] for r in m2) == [2, 3]
    corrected = next(r for r in m2 if r["source_id"] == 2)
    assert corrected["label_raw"] == {"intent_type": "BUSINESS"} and corrected["feedback"] == "corrected"
    assert corrected["updated_at"] > next(r for r in m1 if r["source_id"] == 2)["updated_at"]

    again = collect_examples(db_conn, "product_intent", "m2", tmp_path / "m2-retry.jsonl")
    assert again["replayed"] and read(tmp_path / "m2-retry.jsonl") == m2
    third = collect_examples(db_conn, "product_intent", "m3", tmp_path / "m3.jsonl")
    assert third["rows"] == 0  # exactly once

    # An update that changes nothing the collector reads does not bring the row back.
    with db_conn.cursor() as cur:
        cur.execute("UPDATE production_examples SET created_at = created_at WHERE id = 1")
    db_conn.commit()
    assert collect_examples(db_conn, "product_intent", "m4", tmp_path / "m4.jsonl")["rows"] == 0


def test_watermark_of_the_id_only_collector_continues_where_it_stopped(db_conn, tmp_path):
    """Rows that predate updated_at sort at the epoch; an old watermark (id only) resumes after its id."""
    insert(db_conn, [(f"query {i}", {"intent_type": "GIFT"}, None, "accepted") for i in range(4)])
    with db_conn.cursor() as cur:
        cur.execute("UPDATE production_examples SET updated_at = 'epoch'")  # as the migration leaves them
        cur.execute("INSERT INTO collection_watermarks (use_case, created_at, id, run_id) "
                    "VALUES ('product_intent', now(), 2, 'old')")
    db_conn.commit()
    res = collect_examples(db_conn, "product_intent", "new", tmp_path / "n.jsonl")
    assert [r["source_id"] for r in read(tmp_path / "n.jsonl")] == [3, 4] and res["rows"] == 2


def test_schema_is_idempotent(db_conn):
    from retrain import db

    db.ensure_schema(db_conn)
    db.ensure_schema(db_conn)
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'production_examples_touch'")
        assert cur.fetchone()[0] == 1
