"""Failure alerts, end to end: a DAG whose task fails after two retries, run with dag.test(), sends exactly one
alert per channel (JSON webhook, Slack-compatible webhook, e-mail) to real local receivers; a task that fails once
and then succeeds sends none. Plus the connection rules of the notifiers.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
from datetime import datetime, timedelta
from email import message_from_bytes
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from retrain import notify


class HttpReceiver:
    """A webhook endpoint on 127.0.0.1 that records every request; answers with ``status``."""

    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        self.status = status
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok" if receiver.status < 400 else b"invalid_token")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def on(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]


class SmtpSink:
    """The smallest SMTP server smtplib talks to (no TLS, no auth): records each message's envelope and bytes.

    Python 3.12 removed ``smtpd`` and aiosmtpd is not a dependency, so this speaks the handful of verbs smtplib
    sends: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT.
    """

    def __init__(self):
        self.messages: list[dict] = []
        sink = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, line: str):
                self.wfile.write(line.encode() + b"\r\n")

            def handle(self):
                self.reply("220 sink ESMTP")
                env = {"from": None, "to": []}
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    verb = line.decode(errors="replace").strip()
                    cmd = verb.split(" ", 1)[0].upper()
                    if cmd in ("EHLO", "HELO"):
                        self.reply("250 sink")
                    elif cmd == "MAIL":
                        env = {"from": verb.split(":", 1)[1].strip(" <>"), "to": []}
                        self.reply("250 OK")
                    elif cmd == "RCPT":
                        env["to"].append(verb.split(":", 1)[1].strip(" <>"))
                        self.reply("250 OK")
                    elif cmd == "DATA":
                        self.reply("354 end with .")
                        data = []
                        while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                            data.append(chunk[1:] if chunk.startswith(b"..") else chunk)
                        sink.messages.append({**env, "data": b"".join(data)})
                        self.reply("250 queued")
                    elif cmd in ("RSET", "NOOP"):
                        self.reply("250 OK")
                    elif cmd == "QUIT":
                        self.reply("221 bye")
                        return
                    else:
                        self.reply("502 not implemented")

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dag_run.get_task_instances()}


def _alert_dag(counter_dir: Path):
    """A DAG wired like the platform's: default_notifiers() as the on_failure_callback of every task."""
    from airflow.sdk import dag, task

    @dag(
        dag_id="alert_probe",
        schedule=None,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        default_args={
            "retries": 2,
            "retry_delay": timedelta(seconds=0),
            "on_failure_callback": notify.default_notifiers(),
        },
    )
    def alert_probe():
        @task
        def always_fails():
            attempts = counter_dir / "always_fails"
            attempts.write_text(str(int(attempts.read_text() or 0) + 1) if attempts.exists() else "1")
            raise RuntimeError("warehouse unreachable: connection refused\nsecond line of detail")

        @task
        def fails_once():
            marker = counter_dir / "fails_once"
            if not marker.exists():
                marker.write_text("1")
                raise RuntimeError("transient hiccup")
            return "ok"

        always_fails()
        fails_once()

    return alert_probe()


def _run(dag):
    """dag.test() for a DAG that lives in this file rather than in dags/: register it in the metadata DB first
    (dag.test() only creates runs for serialized DAGs; the tasks themselves run from the in-memory objects)."""
    from types import SimpleNamespace

    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = SimpleNamespace(dags={dag.dag_id: dag}, import_errors={}, bundle_path=None, dag_warnings=set(),
                          file_last_changed={})
    sync_bag_to_db(bag, "dags-folder", None)
    return dag.test()


def test_one_alert_per_channel_after_the_last_retry_and_none_on_retry(airflow_db, tmp_path, monkeypatch):
    with HttpReceiver() as http, SmtpSink() as smtp:
        monkeypatch.setenv("AIRFLOW_CONN_RETRAIN_ALERT_WEBHOOK", f"http://127.0.0.1:{http.port}/hook")
        monkeypatch.setenv("AIRFLOW_CONN_RETRAIN_ALERT_SLACK", json.dumps(
            {"conn_type": "http", "extra": {"url": f"http://127.0.0.1:{http.port}/services/T0/B0/secret"}}))
        monkeypatch.setenv("AIRFLOW_CONN_RETRAIN_ALERT_EMAIL", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port,
            "extra": {"to": "ops@example.com, ml@example.com", "from_email": "airflow@example.com",
                      "disable_ssl": True, "disable_tls": True},
        }))
        run = _run(_alert_dag(tmp_path))

    assert _states(run) == {"always_fails": "failed", "fails_once": "success"}
    assert (tmp_path / "always_fails").read_text() == "3"  # first try + 2 retries really ran

    hooks = http.on("/hook")
    assert len(hooks) == 1, [r["body"] for r in http.requests]
    alert = json.loads(hooks[0]["body"])
    assert hooks[0]["headers"]["Content-Type"] == "application/json"
    assert alert["event"] == "task_failed"
    assert (alert["dag_id"], alert["task_id"], alert["run_id"]) == ("alert_probe", "always_fails", run.run_id)
    assert alert["try_number"] == 3 and alert["attempts_allowed"] == 3
    assert alert["error"] == "RuntimeError: warehouse unreachable: connection refused"
    assert alert["error_type"] == "RuntimeError"
    # The log link points at this task instance's final attempt in the Airflow UI.
    assert "/dags/alert_probe/runs/" in alert["log_url"] and alert["log_url"].endswith(
        "/tasks/always_fails?try_number=3")
    assert "attempt 3/3" in alert["text"] and alert["log_url"] in alert["text"]

    slack = http.on("/services/T0/B0/secret")
    assert len(slack) == 1
    body = json.loads(slack[0]["body"])
    assert list(body) == ["text"]
    assert "alert_probe.always_fails" in body["text"] and run.run_id in body["text"]
    assert "RuntimeError: warehouse unreachable" in body["text"] and alert["log_url"] in body["text"]
    assert "second line" not in body["text"]

    # The task that failed once and then succeeded alerted nobody.
    assert not any(b"fails_once" in r["body"] for r in http.requests)
    assert len(http.requests) == 2

    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert mail["from"] == "airflow@example.com" and mail["to"] == ["ops@example.com", "ml@example.com"]
    msg = message_from_bytes(mail["data"], policy=email_policy)
    assert msg["Subject"] == "Airflow task failed: alert_probe.always_fails (attempt 3/3)"
    text = msg.get_content()
    assert f"Run: {run.run_id}" in text and "Error: RuntimeError: warehouse unreachable" in text
    assert alert["log_url"] in text


def test_default_notifiers_skip_channels_without_a_connection(airflow_db, tmp_path, monkeypatch):
    """No alert connection defined: failures still fail normally and no callback error hides the real one."""
    for var in ("WEBHOOK", "SLACK", "EMAIL"):
        monkeypatch.delenv(f"AIRFLOW_CONN_RETRAIN_ALERT_{var}", raising=False)
    with HttpReceiver() as http:
        run = _run(_alert_dag(tmp_path))
    assert _states(run)["always_fails"] == "failed"
    assert http.requests == []


def test_default_notifiers_do_not_read_connections_when_built():
    # Outside any task there is no way to reach a connection: building must not try (parse-time safety).
    notifiers = notify.default_notifiers()
    assert [type(n).__name__ for n in notifiers] == ["JsonWebhookNotifier", "SlackWebhookNotifier", "EmailNotifier"]
    assert [n.conn_id for n in notifiers] == ["retrain_alert_webhook", "retrain_alert_slack", "retrain_alert_email"]
    assert all(n.missing_ok for n in notifiers)


def test_webhook_url_comes_from_extra_host_or_parts():
    from airflow.sdk import Connection

    assert notify.webhook_url(Connection(conn_id="a", uri="https://hooks.slack.com/services/T/B/X")) == \
        "https://hooks.slack.com/services/T/B/X"
    assert notify.webhook_url(Connection(conn_id="b", conn_type="http", host="127.0.0.1", port=81,
                                         schema="api/hook")) == "http://127.0.0.1:81/api/hook"
    assert notify.webhook_url(Connection(conn_id="c", conn_type="generic", host="https://example.org/x")) == \
        "https://example.org/x"
    assert notify.webhook_url(Connection(conn_id="d", conn_type="http", host="ignored",
                                         extra=json.dumps({"url": "https://example.org/y"}))) == "https://example.org/y"
    with pytest.raises(notify.AlertConfigError, match="connection 'e' has no URL"):
        notify.webhook_url(Connection(conn_id="e", conn_type="http"))


def _context(exc):
    class TI:
        dag_id, task_id, run_id, try_number, max_tries, map_index = "d", "t", "r1", 2, 1, -1
        log_url = "http://airflow.example/dags/d/runs/r1/tasks/t?try_number=2"

    return {"ti": TI(), "exception": exc}


def test_a_rejecting_receiver_is_reported_without_leaking_the_secret_path():
    from airflow.sdk import Connection

    with HttpReceiver(status=403) as http:
        conn = Connection(conn_id="s", uri=f"http://127.0.0.1:{http.port}/services/SECRET")
        with pytest.raises(RuntimeError) as exc:
            notify.SlackWebhookNotifier("s").send(conn, notify.alert_payload(_context(ValueError("x"))))
    msg = str(exc.value)
    assert f"127.0.0.1:{http.port} answered HTTP 403: invalid_token" in msg and "SECRET" not in msg
    assert len(http.requests) == 1  # not retried: a retry could duplicate an alert


def test_alert_payload_without_an_exception_says_what_happened():
    p = notify.alert_payload(_context(None))
    assert p["error"].startswith("no exception recorded") and p["error_type"] is None
    assert p["map_index"] is None and p["attempts_allowed"] == 2
    assert notify.alert_title(p) == "Airflow task failed: d.t (attempt 2/2)"


def test_email_without_recipients_names_the_extra_to_set():
    from airflow.sdk import Connection

    conn = Connection(conn_id="mail", conn_type="smtp", host="127.0.0.1", port=1)
    with pytest.raises(notify.AlertConfigError, match=r"connection 'mail' names no recipient.*\"to\""):
        notify.EmailNotifier("mail").send(conn, notify.alert_payload(_context(ValueError("x"))))


def test_unreachable_smtp_server_error_names_host_and_connection():
    from airflow.sdk import Connection

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = Connection(conn_id="mail", conn_type="smtp", host="127.0.0.1", port=port,
                      extra=json.dumps({"to": "a@b.c", "disable_ssl": True, "disable_tls": True, "timeout": 5}))
    with pytest.raises(RuntimeError, match=rf"through 127.0.0.1:{port} .*Check connection 'mail'"):
        notify.EmailNotifier("mail").send(conn, notify.alert_payload(_context(ValueError("x"))))


def test_a_multi_line_config_error_keeps_the_field_names():
    from retrain.notify import alert_payload

    exc = ValueError("use case 'product_intent' with run parameters is invalid:\n"
                     "  - thresholds.min_score: Input should be less than or equal to 1\n"
                     "Fix the file (or the trigger parameter) and run again.")
    payload = alert_payload({"exception": exc, "dag_run": None, "ti": None})
    assert "thresholds.min_score" in payload["error"] and "\n" not in payload["error"]
