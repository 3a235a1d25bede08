"""The CLI as a newcomer meets it: `make ui` without an activated virtualenv, one-line errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from retrain.cli import main as cli


def test_ui_puts_this_interpreters_bin_first_on_path(monkeypatch, tmp_path):
    # `airflow standalone` spawns scheduler, api-server, triggerer and dag-processor as a bare `airflow`: without
    # .venv/bin on PATH all four died with FileNotFoundError and port 8080 never answered.
    seen = {}

    class FakePopen:
        def __init__(self, argv, env=None):
            seen["argv"], seen["env"] = argv, env

        def wait(self):
            return 0

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setattr(cli, "ensure_airflow_db", lambda: None)
    monkeypatch.setattr(cli, "ensure_local_services", lambda: {})
    monkeypatch.setattr(cli.subprocess, "Popen", FakePopen)
    assert cli.cmd_ui(None) == 0
    bin_dir = str(Path(sys.executable).parent)
    assert seen["argv"][0] == str(Path(bin_dir) / "airflow")
    assert seen["env"]["PATH"].split(os.pathsep)[0] == bin_dir
