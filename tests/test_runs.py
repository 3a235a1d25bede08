"""pipeline_runs: one row per run, stage durations merged, fields never erased by later stages, retries idempotent."""

from __future__ import annotations

import pytest

from retrain import db
from retrain.registry import runs


@pytest.fixture
def conn(db_conn):
    db.ensure_schema(db_conn)
    db.ensure_schema(db_conn)  # idempotent: the second call must not fail
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE pipeline_runs")
    db_conn.commit()
    return db_conn


def _count(conn) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pipeline_runs")
        return cur.fetchone()[0]


def test_stages_accumulate_into_one_row_and_retries_do_not_duplicate(conn):
    key = {"use_case": "product_intent", "run_id": "manual__2026-01-01T00:00:00+00:00"}
    runs.record_stage(conn, **key, stage="prepare_run", seconds=0.4, run_dir="/tmp/r", status="running")
    runs.record_stage(conn, **key, stage="collect_examples", seconds=12.5, rows_collected=600)
    # A retry of the same stage with a different duration replaces that stage's entry, keeps everything else.
    runs.record_stage(conn, **key, stage="collect_examples", seconds=11.0, rows_collected=600)
    runs.record_stage(conn, **key, stage="build_dataset", seconds=3.0, rows_rejected=7)
    runs.record_stage(conn, **key, stage="validate_dataset", seconds=8.25,
                      validation={"success": True, "failed": []})
    row = runs.record_stage(
        conn, **key, stage="decide", seconds=0.1,
        metrics={"baseline": {"score": 0.41}, "candidate": {"score": 0.9}},
        **runs.decision_fields({"decision": "GO", "checks": [
            {"name": "min_score", "passed": True, "reason": "0.900 ≥ 0.85"},
            {"name": "min_relative_improvement", "passed": True, "reason": "+119% ≥ +10%"}]}),
        model_version=2,
    )
    again = runs.record_stage(conn, **key, stage="decide", seconds=0.1)  # a cleared task re-run
    assert _count(conn) == 1
    assert row["stages"] == {"prepare_run": 0.4, "collect_examples": 11.0, "build_dataset": 3.0,
                             "validate_dataset": 8.25, "decide": 0.1}
    assert again["stages"] == row["stages"] and again["total_seconds"] == pytest.approx(22.75)
    assert list(again["stages"]) == ["prepare_run", "collect_examples", "build_dataset", "validate_dataset",
                                     "decide"]  # the order they ran in, not jsonb's key order
    assert (again["rows_collected"], again["rows_rejected"], again["run_dir"]) == (600, 7, "/tmp/r")
    assert again["validation"] == {"success": True, "failed": []}
    assert again["decision"] == "GO" and again["model_version"] == 2
    assert again["decision_reasons"] == ["0.900 ≥ 0.85", "+119% ≥ +10%"]
    assert again["metrics"]["candidate"]["score"] == 0.9 and again["status"] == "running"

    runs.record_stage(conn, **key, stage="backup_to_s3", seconds=4, backup_id="bk-123", status="success")
    latest = runs.latest_runs(conn, use_case="product_intent")
    assert len(latest) == 1 and latest[0]["backup_id"] == "bk-123" and latest[0]["status"] == "success"


def test_latest_runs_newest_first_and_per_use_case(conn):
    for i in range(3):
        runs.record_stage(conn, use_case="hr_leave", run_id=f"r{i}", stage="collect_examples", seconds=1)
    runs.record_stage(conn, use_case="email_intel", run_id="e1", stage="collect_examples", seconds=1)
    assert [r["run_id"] for r in runs.latest_runs(conn, use_case="hr_leave")] == ["r2", "r1", "r0"]
    assert [r["run_id"] for r in runs.latest_runs(conn, limit=2)] == ["e1", "r2"]


def test_bad_fields_are_rejected_before_touching_the_table(conn):
    key = {"use_case": "hr_leave", "run_id": "x", "stage": "s", "seconds": 1}
    with pytest.raises(TypeError, match=r"unknown field\(s\) \['rows'\]; allowed: status"):
        runs.record_stage(conn, **key, rows=3)
    with pytest.raises(ValueError, match="rows_collected must be a non-negative integer"):
        runs.record_stage(conn, **key, rows_collected=-1)
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        runs.record_stage(conn, **key, status="done")
    with pytest.raises(ValueError, match="pass the per-check explanations as decision_reasons"):
        runs.record_stage(conn, **key, decision={"decision": "GO"})
    with pytest.raises(ValueError, match="seconds must be a non-negative number"):
        runs.record_stage(conn, use_case="hr_leave", run_id="x", stage="s", seconds=-2)
    assert _count(conn) == 0


def _check(name, passed, reason, required=True):
    return {"name": name, "value": 0.5, "threshold": 0.1, "passed": passed, "required": required, "reason": reason}


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        # retrain.evaluate.gate.decide's shape; the significance rule is informational here and must not read as a reason.
        ({"decision": "NO-GO", "failed": ["min_relative_improvement"], "summary": "NO-GO: ...", "checks": [
            _check("min_score", True, "intent_type accuracy 0.910 >= minimum 0.850"),
            _check("min_relative_improvement", False, "+2.0% relative to the production model < required +10.0%"),
            _check("require_significance", False, "not significant (info only)", required=False)]},
         {"decision": "NO-GO", "decision_reasons": ["+2.0% relative to the production model < required +10.0%"]}),
        ({"decision": "GO", "failed": [], "summary": "GO: all 2 required checks passed", "checks": [
            _check("min_score", True, "accuracy 0.910 >= minimum 0.850"),
            _check("min_json_validity", True, "100.0% valid JSON >= 95.0%"),
            _check("require_significance", False, "not significant (info only)", required=False)]},
         {"decision": "GO", "decision_reasons": ["accuracy 0.910 >= minimum 0.850", "100.0% valid JSON >= 95.0%"]}),
        ({"go": False, "reason": "candidate is not better"},
         {"decision": "NO-GO", "decision_reasons": ["candidate is not better"]}),
        ({"decision": "no_go", "checks": {"json_validity": {"pass": False, "reason": "0.80 < 0.95"}}},
         {"decision": "NO-GO", "decision_reasons": ["0.80 < 0.95"]}),
        (None, {}),
    ],
)
def test_decision_fields_understand_the_gate_shapes(decision, expected):
    assert runs.decision_fields(decision) == expected


def test_failure_recorder_marks_the_run_failed_with_task_and_error(conn):
    class TI:
        dag_id, task_id, run_id, try_number, max_tries, map_index = "retrain_hr_leave", "train", "r9", 3, 2, -1
        log_url = "http://x/log"

    runs.record_stage(conn, use_case="hr_leave", run_id="r9", stage="collect_examples", seconds=2, rows_collected=5)
    runs.failure_recorder("hr_leave")({"ti": TI(), "exception": MemoryError("CUDA out of memory\nmore")})
    row = runs.latest_runs(conn, use_case="hr_leave")[0]
    assert row["status"] == "failed" and row["error"] == "train: MemoryError: CUDA out of memory"
    assert row["stages"] == {"collect_examples": 2.0} and row["rows_collected"] == 5


def test_failure_recorder_as_on_failure_callback_of_a_real_run(conn, airflow_db):
    """Wired like the DAG will be: a stage records its figures, a later task fails, the row says so."""
    from datetime import datetime
    from types import SimpleNamespace

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import sync_bag_to_db
    from airflow.sdk import dag, task

    @dag(dag_id="runs_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         default_args={"retries": 0, "on_failure_callback": [runs.failure_recorder("hr_leave")]})
    def runs_probe():
        @task
        def collect_examples(run_id=None):
            from retrain import db

            with db.connection() as c:
                runs.record_stage(c, use_case="hr_leave", run_id=run_id, stage="collect_examples", seconds=1.5,
                                  rows_collected=42, status="running")

        @task
        def train_candidate():
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\ntraceback details")

        collect_examples() >> train_candidate()

    probe = runs_probe()
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(SimpleNamespace(dags={probe.dag_id: probe}, import_errors={}, bundle_path=None,
                                   dag_warnings=set(), file_last_changed={}), "dags-folder", None)
    dag_run = probe.test()

    row = runs.latest_runs(conn, use_case="hr_leave")[0]
    assert row["run_id"] == dag_run.run_id
    assert row["status"] == "failed" and row["rows_collected"] == 42
    assert row["error"] == "train_candidate: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert row["stages"] == {"collect_examples": 1.5}


def test_timed_stage_records_a_prepared_run_even_when_the_stage_fails(conn):
    from retrain import stages

    run = stages.prepare_run("hr_leave", "timed-1", {})
    with runs.timed_stage(run["run_dir"], "collect_examples") as found:
        found["rows_collected"] = 17
    with pytest.raises(RuntimeError, match="boom"):
        with runs.timed_stage(run["run_dir"], "build_dataset", rows_rejected=2):
            raise RuntimeError("boom")
    with pytest.raises(TypeError, match="unknown field"):  # a caller's typo is a bug, not bookkeeping noise
        runs.record_run_stage(run["run_dir"], "validate_dataset", 1.0, validated=True)
    row = runs.latest_runs(conn, use_case="hr_leave")[0]
    assert row["run_id"] == "timed-1" and row["run_dir"] == run["run_dir"]
    assert list(row["stages"]) == ["collect_examples", "build_dataset"] and row["stages"]["collect_examples"] >= 0
    assert (row["rows_collected"], row["rows_rejected"]) == (17, 2)


def test_record_run_stage_is_best_effort_when_the_database_is_down(tmp_path, monkeypatch):
    (tmp_path / "run_config.json").write_text('{"run_id": "r", "use_case": {"name": "hr_leave"}}')
    monkeypatch.setenv("RETRAIN_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert runs.record_run_stage(tmp_path, "collect_examples", 1.0, rows_collected=3) is None
