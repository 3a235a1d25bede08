"""Attack: a malformed database URL must never carry its password into the CLI output or a task log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from retrain import db

SECRET = "s3cr3tPassw0rd"
MALFORMED = [
    f"postgresql://admin:{SECRET}@db.example:notaport/examples",        # bad port
    f"postgresql://admin:{SECRET}@[::1/examples",                        # broken IPv6 literal
    f"postgres://admin:{SECRET}@localhost:5432/examples?sslmode=bogus",  # bad option value
    f"host=localhost password={SECRET} dbname",                           # key=value without '='
    f"host=localhost password='{SECRET}' port=abc",                       # quoted password, bad port
    f"postgresql://admin:{SECRET}@localhost:1/examples?connect_timeout=x",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_connect_masks_the_password_of_a_malformed_url(url):
    with pytest.raises(db.DatabaseError) as err:
        db.connect(url)
    message = str(err.value)
    assert SECRET not in message and "cannot connect to PostgreSQL" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained psycopg2 error to print


@pytest.mark.parametrize("url", MALFORMED[:4])
def test_cli_prints_one_line_without_the_password(url, tmp_path):
    env = {**os.environ, "RETRAIN_DATABASE_URL": url, "RETRAIN_HOME": str(tmp_path), "RETRAIN_DB_CONN_ID": ""}
    proc = subprocess.run([sys.executable, "-m", "retrain.cli.main", "seed", "--use-case", "product_intent",
                           "--rows", "1"], capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert SECRET not in out, out
    assert "Traceback" not in out, out


def test_a_stage_logs_no_password(monkeypatch, caplog, tmp_path):
    from retrain import stages

    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path))
    monkeypatch.setenv("RETRAIN_DATABASE_URL", MALFORMED[0])
    monkeypatch.setenv("RETRAIN_DB_CONN_ID", "")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(db.DatabaseError) as err:
        stages.prepare_run("product_intent", "attack-1", {})
    assert SECRET not in str(err.value) and SECRET not in caplog.text
