"""A monthly run collects its month, not "everything up to now" (issue 18), against a real PostgreSQL server.

The DAG's schedule is ``0 3 1 * *``: the run of the tick T collects the rows changed before T (its
data_interval_end) that no earlier run collected. Rows changed at or after T belong to the next run and stay
behind, and the watermark never passes them. A manual run without a data interval keeps collecting up to now. A
retried try re-reads exactly the window its first try recorded. prepare_run records the run's type, logical date
and data interval in run_config.json, and collect_examples reads the bound from there.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from psycopg2.extras import Json

from retrain.data.collect import collect_examples

UC = "product_intent"
OCT, NOV, DEC = (datetime(2026, m, 1, 3, tzinfo=timezone.utc) for m in (10, 11, 12))  # the cron ticks
JAN = datetime(2027, 1, 1, 3, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


def add(conn, updated_at: datetime, text: str | None = None) -> int:
    """One accepted example last changed at ``updated_at`` (as if written then: the touch trigger fires on UPDATE)."""
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO production_examples (use_case, input, model_output, feedback, created_at, updated_at) "
            "VALUES (%s, %s, %s, 'accepted', %s, %s) RETURNING id",
            (UC, text or f"row changed at {updated_at.isoformat()}", Json({"intent_type": "GIFT"}), updated_at,
             updated_at))
        (row_id,) = cur.fetchone()
    conn.commit()
    return row_id


def collect(conn, tmp_path, run_id: str, interval=None, **kw) -> tuple[dict, list[int]]:
    out = tmp_path / f"{run_id}.jsonl"
    result = collect_examples(conn, UC, run_id, out, data_interval=interval, **kw)
    return result, [json.loads(line)["source_id"] for line in out.read_text().splitlines()]


def watermark(conn) -> tuple[datetime, int]:
    with conn.cursor() as cur:
        cur.execute("SELECT row_updated_at, id FROM collection_watermarks WHERE use_case = %s", (UC,))
        return cur.fetchone()


@pytest.fixture
def months(db_conn):
    """Rows changed in October, November and December 2026, the edges included (a tick belongs to the new month)."""
    rows = {
        "oct": [add(db_conn, OCT), add(db_conn, datetime(2026, 10, 17, 12, tzinfo=timezone.utc)),
                add(db_conn, NOV - US)],
        "nov": [add(db_conn, NOV), add(db_conn, datetime(2026, 11, 15, tzinfo=timezone.utc)), add(db_conn, DEC - US)],
        "dec": [add(db_conn, DEC), add(db_conn, datetime(2026, 12, 2, tzinfo=timezone.utc))],
    }
    # Inserted out of order: ids do not follow time, the window must follow (updated_at, id).
    rows["oct"].append(add(db_conn, datetime(2026, 10, 31, tzinfo=timezone.utc)))
    return rows


def test_the_november_run_collects_exactly_novembers_rows_and_leaves_december(db_conn, tmp_path, months):
    october, got_oct = collect(db_conn, tmp_path, "scheduled__2026-11-01", (OCT, NOV))
    assert sorted(got_oct) == sorted(months["oct"])
    november, got_nov = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, DEC))
    assert sorted(got_nov) == sorted(months["nov"])  # the row at NOV exactly is November's; DEC - 1 µs too
    # The watermark stopped at November's last row: December's rows (DEC exactly included) were not passed.
    assert watermark(db_conn) == (DEC - US, months["nov"][2])
    assert november["window"]["before"] == "2026-12-01T03:00:00Z"
    assert november["window"]["data_interval_start"] == "2026-11-01T03:00:00Z"
    assert november["window"]["to_updated_at"] == "2026-12-01T02:59:59.999999Z"
    with db_conn.cursor() as cur:
        cur.execute("SELECT data_interval_start, data_interval_end, rows_collected FROM collection_runs "
                    "WHERE use_case = %s AND run_id = %s", (UC, "scheduled__2026-12-01"))
        assert cur.fetchone() == (NOV, DEC, 3)
    # December's rows are the next run's (a manual run without an interval: everything up to now).
    manual, got_dec = collect(db_conn, tmp_path, "manual__now")
    assert sorted(got_dec) == sorted(months["dec"])
    assert manual["window"]["before"] is None and manual["window"]["data_interval_end"] is None


def test_a_retry_rereads_the_same_window_whatever_arrived_since(db_conn, tmp_path, months):
    collect(db_conn, tmp_path, "scheduled__2026-11-01", (OCT, NOV))
    first, ids = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, DEC))
    before = (tmp_path / "scheduled__2026-12-01.jsonl").read_bytes()
    add(db_conn, datetime(2026, 12, 3, tzinfo=timezone.utc))  # arrives between the try and its retry
    retry, again = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, DEC))
    assert retry["replayed"] and not first["replayed"]
    assert again == ids and (tmp_path / "scheduled__2026-12-01.jsonl").read_bytes() == before
    assert retry["window"] == first["window"]
    # Even a retry handed another interval (a cleared task of an edited run) re-reads what was recorded.
    other, same = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, JAN))
    assert same == ids and other["window"] == first["window"]


def test_a_month_no_run_collected_is_not_lost_and_a_past_interval_behind_the_watermark_is_empty(
        db_conn, tmp_path, months):
    # No October run: November's run starts at the watermark, not at its interval's start.
    _, got = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, DEC))
    assert sorted(got) == sorted(months["oct"] + months["nov"])
    # A run for October after that finds nothing left and does not move the watermark back.
    mark = watermark(db_conn)
    late, nothing = collect(db_conn, tmp_path, "manual__2026-11-01", (OCT, NOV))
    assert nothing == [] and late["rows"] == 0 and watermark(db_conn) == mark


def test_the_bound_holds_with_a_sample_limit(db_conn, tmp_path, months):
    _, got = collect(db_conn, tmp_path, "scheduled__2026-11-01", (OCT, NOV), sample_limit=100)
    assert sorted(got) == sorted(months["oct"])
    _, first_two = collect(db_conn, tmp_path, "scheduled__2026-12-01", (NOV, DEC), sample_limit=2)
    assert first_two == months["nov"][:2]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(days=st.lists(st.integers(0, 119), min_size=1, max_size=25),
       runs=st.lists(st.sampled_from([NOV, DEC, JAN, None]), min_size=1, max_size=4))
def test_every_row_is_collected_once_by_the_first_run_whose_bound_it_is_before(db_conn, tmp_path, days, runs):
    """Any sequence of monthly and manual runs: each row once, never at or after its run's bound."""
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE production_examples, collection_watermarks, collection_runs RESTART IDENTITY")
    db_conn.commit()
    start = datetime(2026, 9, 15, tzinfo=timezone.utc)
    changed = {add(db_conn, start + timedelta(days=d, hours=d % 24)): start + timedelta(days=d, hours=d % 24)
               for d in days}
    seen: list[int] = []
    for n, end in enumerate([*runs, None]):  # a last manual run takes whatever is left
        interval = None if end is None else (end - timedelta(days=30), end)
        _, got = collect(db_conn, tmp_path, f"run-{n}", interval)
        assert end is None or all(changed[i] < end for i in got)
        seen += got
    assert sorted(seen) == sorted(changed)


def test_prepare_run_records_the_schedule_and_collect_is_bounded_by_it(db_conn, months, monkeypatch, tmp_path):
    from retrain import stages
    from retrain.rundir import RunDir

    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "state"))
    scheduled = {"run_type": "DagRunType.SCHEDULED", "logical_date": DEC, "data_interval_start": DEC,
                 "data_interval_end": DEC}
    run = stages.prepare_run(UC, "scheduled__2026-12-01T03:00:00+00:00", {}, schedule=scheduled)
    config = json.loads(RunDir(run["run_dir"]).run_config.read_text())
    assert {k: config[k] for k in stages.SCHEDULE_FIELDS} == {
        "run_type": "scheduled", "logical_date": "2026-12-01T03:00:00Z",
        "data_interval_start": "2026-12-01T03:00:00Z", "data_interval_end": "2026-12-01T03:00:00Z"}
    assert stages.collect(run["run_dir"])["rows"] == len(months["oct"] + months["nov"])
    window = json.loads(RunDir(run["run_dir"]).collect.read_text())["window"]
    assert window["before"] == "2026-12-01T03:00:00Z"

    # A manual run triggered without a logical date: no interval recorded, collected up to now.
    manual = stages.prepare_run(UC, "manual__now", {}, schedule={"run_type": "manual", "logical_date": None,
                                                                  "data_interval_start": None,
                                                                  "data_interval_end": None})
    config = json.loads(RunDir(manual["run_dir"]).run_config.read_text())
    assert config["run_type"] == "manual" and config["data_interval_end"] is None
    assert stages.collect(manual["run_dir"])["rows"] == len(months["dec"])


def test_the_dag_task_passes_the_dag_runs_interval_to_prepare_run(dagbag, monkeypatch):
    """The DAG file's wiring: prepare_run gets Airflow's dag_run dates (run_schedule), not a guess."""
    from types import SimpleNamespace

    from retrain import dagtasks, stages

    seen = {}
    monkeypatch.setattr(stages, "prepare_run", lambda *a, **kw: seen.update(kw) or {})
    dag_run = SimpleNamespace(run_type="manual", logical_date=NOV, data_interval_start=NOV, data_interval_end=NOV,
                              run_after=NOV, triggering_user_name="alice")
    dagbag.dags["retrain_product_intent"].get_task("prepare_run").python_callable(
        params={}, run_id="manual__2026-11-01", dag_run=dag_run)
    assert seen["schedule"] == dagtasks.run_schedule(dag_run) == {
        "run_type": "manual", "logical_date": NOV, "data_interval_start": NOV, "data_interval_end": NOV}
