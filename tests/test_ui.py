"""The Airflow UI page (plugins/retrain_ui.py) served by a real `airflow api-server` over HTTP, against a
prepared registry in a real PostgreSQL server; then rendered by headless Chromium, with screenshots kept in
tests/artifacts/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import pytest
from psycopg2.extras import Json

from retrain import db
from retrain.registry import runs
from retrain.rundir import RunDir
from retrain.settings import runs_dir

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)

GO_RUN = "scheduled__2026-02-01T03:00:00+00:00"
NOGO_RUN = "scheduled__2026-03-01T03:00:00+00:00"
FAILED_RUN = "manual__2026-03-04T10:00:00+00:00"
# The shape retrain.evaluate.metrics.compare writes and the registry stores.
COMPARISON = {"primary_score": {"baseline": 0.41, "candidate": 0.912, "delta": 0.502, "higher_is_better": True},
              "json_validity": {"baseline": 0.93, "candidate": 1.0, "delta": 0.07, "higher_is_better": True},
              "latency_p95": {"baseline": 0.84, "candidate": 0.31, "delta": -0.53, "higher_is_better": False}}
EVIL = "<script>alert('x')</script> latency p95 1.9s > 1.25 × baseline"


def _png(width: int = 4, height: int = 3) -> bytes:
    """A valid RGB PNG (standard library only) standing in for an evaluation plot."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([200, 30, 30]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def registry(pg_url):
    """model_versions and pipeline_runs rows plus run directories with report files, as the pipeline leaves them."""
    from retrain import db

    with db.connection(pg_url) as conn:
        db.ensure_schema(conn)
        with conn.cursor() as cur:
            cur.execute("TRUNCATE model_versions, pipeline_runs RESTART IDENTITY")
            rows = [
                ("product_intent", 1, "qlora", "smollm2-135m-instruct", "/models/product_intent/v1", "manual__2026-01",
                 {"score": 0.81}, {"decision": "GO"}, "retired"),
                ("product_intent", 2, "qlora", "smollm2-135m-instruct", "/models/product_intent/v2", GO_RUN,
                 COMPARISON,
                 {"decision": "GO", "checks": [{"name": "min_score", "passed": True, "reason": "0.912 ≥ 0.85"}]},
                 "production"),
                ("product_intent", 3, "qlora", "smollm2-135m-instruct", "/models/product_intent/v3", NOGO_RUN,
                 {"score": 0.915}, {"decision": "NO-GO", "checks": [
                     {"name": "min_relative_improvement", "passed": False, "reason": "+0.3% < +10% over v2"}]},
                 "rejected"),
                ("email_intel", 1, "openai", "gpt-4.1-mini-2025-04-14", "ft:gpt-4.1-mini:org::abc123", "manual__x",
                 {"score": 0.88}, {}, "candidate"),
            ]
            for r in rows:
                cur.execute(
                    "INSERT INTO model_versions (use_case, version, backend, base_model, artifact, run_id, metrics, "
                    "decision, status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (*r[:6], Json(r[6]), Json(r[7]), r[8]))
        conn.commit()

        go = {"use_case": "product_intent", "run_id": GO_RUN}
        runs.record_stage(conn, **go, stage="collect_examples", seconds=14.2, rows_collected=612,
                          run_dir=str(RunDir.for_run("product_intent", GO_RUN).path))
        runs.record_stage(conn, **go, stage="build_dataset", seconds=3.1, rows_rejected=9)
        runs.record_stage(conn, **go, stage="validate_dataset", seconds=7.9, validation={"success": True, "failed": []})
        runs.record_stage(conn, **go, stage="train_candidate", seconds=401.0)
        runs.record_stage(conn, **go, stage="evaluate", seconds=88.0, metrics=COMPARISON)
        runs.record_stage(conn, **go, stage="decide", seconds=0.2, model_version=2,
                          **runs.decision_fields({"decision": "GO", "checks": [
                              {"name": "min_score", "passed": True, "required": True, "reason": "score 0.912 ≥ 0.85"},
                              {"name": "min_relative_improvement", "passed": True, "required": True,
                               "reason": "+122% ≥ +10%"},
                              {"name": "require_significance", "passed": False, "required": False,
                               "reason": "not significant (info only)"}]}))
        runs.record_stage(conn, **go, stage="backup_to_s3", seconds=5.0, backup_id="product_intent/2026-02-01/bk-7f3a",
                          status="success")

        nogo = {"use_case": "product_intent", "run_id": NOGO_RUN}
        runs.record_stage(conn, **nogo, stage="collect_examples", seconds=9.0, rows_collected=305)
        runs.record_stage(conn, **nogo, stage="decide", seconds=0.2, status="no_go",
                          metrics={"baseline": {"score": 0.912}, "candidate": {"score": 0.915}},
                          **runs.decision_fields({"decision": "NO-GO", "checks": [
                              {"name": "min_score", "passed": True, "reason": "score 0.915 ≥ 0.85"},
                              {"name": "min_relative_improvement", "passed": False,
                               "reason": "+0.3% < +10% over production v2"},
                              {"name": "max_p95_latency_regression", "passed": False, "reason": EVIL}]}))

        runs.record_stage(conn, use_case="hr_leave", run_id=FAILED_RUN, stage="collect_examples", seconds=2.0,
                          rows_collected=120)
        runs.record_stage(conn, use_case="hr_leave", run_id=FAILED_RUN, stage="validate_dataset", seconds=4.0,
                          status="failed", validation={"success": False, "failed": ["a", "b"]},
                          error="validate_dataset: DataValidationError: 2 expectations failed")

    for run_id in (GO_RUN, NOGO_RUN):
        ev = RunDir.for_run("product_intent", run_id).path / "evaluation"
        ev.mkdir(parents=True, exist_ok=True)
        (ev / "report.html").write_text(f"<html><body><h1>Evaluation report {run_id}</h1>"
                                        f"<img src='confusion.png'></body></html>")
        (ev / "confusion.png").write_bytes(_png())
        (ev.parent / "train.jsonl").write_text('{"messages": []}\n')
    outside = runs_dir().parent / "secret.html"
    outside.write_text("<h1>not for the UI</h1>")
    link = RunDir.for_run("product_intent", GO_RUN).path / "evaluation" / "escape.html"
    if not link.exists():
        link.symlink_to(outside)
    return pg_url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def api_server(airflow_db, registry, tmp_path_factory):
    """`airflow api-server` on a free port, with every user an admin (simple auth manager)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("api-server") / "api-server.log"
    env = {
        **os.environ,  # AIRFLOW_HOME, plugins folder, RETRAIN_HOME and RETRAIN_DATABASE_URL from conftest/pg_url
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__BASE_URL": base,
        "AIRFLOW__API__WORKERS": "1",
    }
    airflow = Path(sys.executable).with_name("airflow")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(airflow), "api-server", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api-server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/api/v2/monitor/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"api-server did not answer within 180 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        yield base
    finally:
        # Only the process group this fixture started (the server and its uvicorn worker).
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _get(url: str, token: str | None = None, follow: bool = True):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    opener = urllib.request.build_opener() if follow else urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.fixture(scope="module")
def token(api_server) -> str:
    status, _, body = _get(f"{api_server}/auth/token")
    assert status in (200, 201), body
    return json.loads(body)["access_token"]


def test_page_checks_airflow_credentials(api_server):
    # With simple_auth_manager_all_admins Airflow's own middleware logs every request in as admin, so a request
    # without credentials passes here; a forged token shows that the page really validates what it is given.
    forged = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJldmUifQ.c2lnbmF0dXJl"
    status, headers, _ = _get(f"{api_server}/retrain/", forged, follow=False)
    assert status == 307
    location = urllib.parse.unquote(headers["location"])
    assert location.startswith("/auth/token/login?next=") and location.endswith("/retrain/")
    assert _get(f"{api_server}/retrain/api/overview", forged)[0] == 401
    assert _get(f"{api_server}/retrain/files/product_intent/x.html", forged, follow=False)[0] == 307
    assert _get(f"{api_server}/retrain/api/overview")[0] == 200


def test_page_lists_use_cases_production_history_runs_decisions_and_reports(api_server, token):
    status, headers, body = _get(f"{api_server}/retrain/", token)
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'none'" in headers["content-security-policy"]
    # Use cases, each with its DAG and production model (or none).
    for uc in ("product_intent", "email_intel", "hr_leave"):
        assert f'id="uc-{uc}"' in html and f"retrain_{uc}" in html
    card = html[html.index('id="uc-product_intent"'):html.index("<h2>Latest runs</h2>")]
    assert ">v2</span>" in card and "/models/product_intent/v2" in card
    assert "none yet" in html[html.index('id="uc-hr_leave"'):html.index('id="uc-product_intent"')]
    # Registry history: every version with its status.
    registry = html[html.index("<h2>Model registry</h2>"):]
    for version, status_ in (("v3", "rejected"), ("v2", "production"), ("v1", "retired")):
        assert f"<b>{version}</b>" in registry and f">{status_}</span>" in registry
    assert "ft:gpt-4.1-mini:org::abc123" in registry and "+0.3% &lt; +10% over v2" in registry
    # Latest runs: decisions with their reasons, figures, backup id, links to the reports.
    runs_html = html[html.index("<h2>Latest runs</h2>"):html.index("<h2>Model registry</h2>")]
    assert runs_html.index(FAILED_RUN) < runs_html.index(NOGO_RUN) < runs_html.index(GO_RUN)  # newest first
    assert ">GO</span>" in runs_html and ">NO-GO</span>" in runs_html
    assert "+0.3% &lt; +10% over production v2" in runs_html
    assert "score 0.912 ≥ 0.85" in runs_html and "612 collected" in runs_html and "9 rejected" in runs_html
    assert "0.410 → <b>0.912</b>" in runs_html and "0.840 → <b>0.310</b>" in runs_html
    assert runs_html.index("primary_score") < runs_html.index("json_validity") < runs_html.index("latency_p95")
    assert "train_candidate 6m 41s" in runs_html and "info only" not in runs_html
    assert "product_intent/2026-02-01/bk-7f3a" in runs_html
    assert "validate_dataset: DataValidationError: 2 expectations failed" in runs_html
    assert "failed (2 expectations)" in runs_html
    go_dir = RunDir.for_run("product_intent", GO_RUN).path.relative_to(runs_dir()).as_posix()
    assert f'href="/retrain/files/{go_dir}/evaluation/report.html"' in runs_html
    # Production text in a reason is shown, never executed.
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_json_overview_and_dag_tab_scope(api_server, token):
    status, _, body = _get(f"{api_server}/retrain/api/overview?use_case=product_intent", token)
    data = json.loads(body)
    assert status == 200 and data["error"] is None
    assert [u["name"] for u in data["use_cases"]] == ["product_intent"]
    assert data["use_cases"][0]["production"]["version"] == 2
    assert [r["run_id"] for r in data["runs"]] == [NOGO_RUN, GO_RUN]
    assert data["runs"][0]["decision_reasons"][0] == "+0.3% < +10% over production v2"
    assert [v["version"] for v in data["registry"]] == [3, 2, 1]

    html = _get(f"{api_server}/retrain/?dag_id=retrain_hr_leave", token)[2].decode()
    assert FAILED_RUN in html and GO_RUN not in html and 'id="uc-product_intent"' not in html
    html = _get(f"{api_server}/retrain/?dag_id=some_etl", token)[2].decode()
    assert "some_etl is not a retraining DAG" in html and "<table>" not in html


def test_a_run_airflow_failed_is_shown_failed_not_running(api_server, token, pg_url):
    """pipeline_runs only knows the stages that recorded themselves; a run failed or marked failed in Airflow
    (worker lost, timeout, "mark failed" in the UI) must not stay "running" on the page."""
    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunType

    run_id = "manual__2026-04-01T10:00:00+00:00"
    with db.connection(pg_url) as conn:
        runs.record_stage(conn, use_case="email_intel", run_id=run_id, stage="collect_examples", seconds=3.0,
                          status="running")
    with create_session() as session:
        session.add(DagRun(dag_id="retrain_email_intel", run_id=run_id, run_type=DagRunType.MANUAL,
                           state=DagRunState.FAILED, logical_date=pendulum.datetime(2026, 4, 1, 10)))
    status, _, body = _get(f"{api_server}/retrain/api/overview?use_case=email_intel", token)
    row = next(r for r in json.loads(body)["runs"] if r["run_id"] == run_id)
    assert status == 200 and row["status"] == "failed" and row["airflow_state"] == "failed"


def test_report_files_are_served_only_from_the_runs_directory(api_server, token):
    rel = RunDir.for_run("product_intent", GO_RUN).path.relative_to(runs_dir()).as_posix()
    status, headers, body = _get(f"{api_server}/retrain/files/{rel}/evaluation/report.html", token)
    assert status == 200 and b"Evaluation report" in body and headers["content-type"].startswith("text/html")
    assert "sandbox" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
    status, headers, body = _get(f"{api_server}/retrain/files/{rel}/evaluation/confusion.png", token)
    assert status == 200 and headers["content-type"] == "image/png" and body.startswith(b"\x89PNG")
    # Not datasets, nothing outside runs/ (by '..', encoded '..' or a symlink), nothing missing.
    for path, why in ((f"{rel}/train.jsonl", b"only report files"),
                      ("..%2Fsecret.html", b"only files under"),
                      (f"{rel}/..%2F..%2F..%2Fsecret.html", b"only files under"),
                      (f"{rel}/evaluation/escape.html", b"only files under"),
                      (f"{rel}/evaluation/gone.html", b"does not exist")):
        status, _, body = _get(f"{api_server}/retrain/files/{path}", token)
        assert status == 404 and why in body, (path, body)


def test_ui_registers_the_page_in_the_navigation(api_server, token):
    status, _, body = _get(f"{api_server}/api/v2/plugins", token)
    assert status == 200
    plugin = next(p for p in json.loads(body)["plugins"] if p["name"] == "retrain_ui")
    views = {v["url_route"]: v for v in plugin["external_views"]}
    assert views["llm-retraining"]["destination"] == "nav" and views["llm-retraining"]["href"] == "/retrain/"
    assert views["retrain-registry"]["destination"] == "dag"
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/retrain"


def _screenshot(url: str, out: Path, budget_ms: int, size: str = "1280,900") -> None:
    profile = out.parent / f".chromium-{out.stem}"
    shutil.rmtree(profile, ignore_errors=True)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--screenshot={out}",
           f"--window-size={size}", "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert out.is_file(), f"chromium wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="headless screenshot needs Debian's chromium (apt-get install -y "
                                              "chromium); the HTTP tests above still cover the page")
def test_headless_chromium_renders_the_page_and_the_airflow_nav_view(api_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The browser starts logged out: the page sends it through Airflow's login (all admins here) and back.
    page = ARTIFACTS / "retrain_ui_page.png"
    page.unlink(missing_ok=True)
    _screenshot(f"{api_server}/retrain/", page, 5000)
    assert _png_size(page) == (1280, 900)
    # A blank or error page compresses to a few KB; tables of text do not.
    assert page.stat().st_size > 40_000, page.stat().st_size

    # The whole page, down to the registry history, for people reviewing the artifacts.
    full = ARTIFACTS / "retrain_ui_page_full.png"
    full.unlink(missing_ok=True)
    _screenshot(f"{api_server}/retrain/", full, 5000, size="1280,2000")
    assert _png_size(full) == (1280, 2000)

    # The same page inside the Airflow UI, through the navigation entry the plugin registers.
    embedded = ARTIFACTS / "retrain_ui_in_airflow.png"
    embedded.unlink(missing_ok=True)
    nxt = urllib.parse.quote("/plugin/llm-retraining", safe="")
    _screenshot(f"{api_server}/auth/token/login?next={nxt}", embedded, 20000)
    assert _png_size(embedded) == (1280, 900) and embedded.stat().st_size > 40_000


def test_unreachable_database_is_explained_on_the_page(monkeypatch, tmp_path):
    """Rendered in-process: the page still answers, naming the problem and what to check."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrain_ui_under_test", REPO / "plugins" / "retrain_ui.py")
    ui = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui)
    monkeypatch.setenv("RETRAIN_DATABASE_URL", f"postgresql://nobody@127.0.0.1:{_free_port()}/none")
    data = ui.overview()
    assert "cannot connect to PostgreSQL from RETRAIN_DATABASE_URL" in data["error"]
    assert data["runs"] == [] and {u["name"] for u in data["use_cases"]} >= {"product_intent", "hr_leave"}
    html = ui.render_page(data)
    assert "The registry database cannot be read" in html and "RETRAIN_DATABASE_URL" in html
    assert 'id="uc-product_intent"' in html  # the use cases still show: they come from the YAML files
