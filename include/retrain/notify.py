"""Failure alerts: Airflow notifiers for a JSON webhook, a Slack-compatible webhook and e-mail.

Use them as ``on_failure_callback`` (never ``on_retry_callback``): in Airflow 3 the task runner calls
``on_failure_callback`` only when the task ends FAILED, i.e. after its last retry, and ``on_retry_callback`` while it
is UP_FOR_RETRY (airflow/sdk/execution_time/task_runner.py, ``finalize``). A task killed from outside (heartbeat
timeout) gets the same callback from the DAG processor, without an exception in the context.

Everything is configured through Airflow connections, looked up when a task fails, never when the DAG file is
parsed (the DAG processor re-parses every few seconds and must not touch the secrets backend):

* ``retrain_alert_webhook``  any HTTP endpoint; receives the alert as a JSON object (see ``alert_payload``).
* ``retrain_alert_slack``    a Slack incoming webhook (or Mattermost/Rocket.Chat/...); receives ``{"text": ...}``.
* ``retrain_alert_email``    an SMTP server (conn type ``smtp``): host, port, login/password, and in extra
  ``to`` (list or comma-separated), ``from_email``, ``disable_ssl``, ``disable_tls``, ``timeout``.

A webhook URL is taken from the connection's extra ``url``, else its host if that is a full URL, else rebuilt from
the connection's parts, so ``AIRFLOW_CONN_RETRAIN_ALERT_SLACK='https://hooks.slack.com/services/T/B/X'`` works
as-is. Extra ``headers`` (a mapping) is sent with every request; a password alone is sent as a bearer token, a
login and password as basic auth.

This module is imported by DAG files: only the standard library and ``airflow.sdk`` at top level.
"""

from __future__ import annotations

import base64
import json
import logging
import smtplib
import ssl
import urllib.error
import urllib.request
from datetime import datetime, timezone
from email.message import EmailMessage
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)

WEBHOOK_CONN_ID = "retrain_alert_webhook"
SLACK_CONN_ID = "retrain_alert_slack"
EMAIL_CONN_ID = "retrain_alert_email"
HTTP_TIMEOUT_S = 10.0
_MAX_ERROR_CHARS = 500


class AlertConfigError(ValueError):
    """An alert connection exists but cannot be used as configured; the message says which field to fix."""


# --------------------------------------------------------------------------------------------------------------
# What an alert says


def _first_line(exc: Any) -> str:
    if exc is None:
        return "no exception recorded (the task was killed or timed out from outside; see the log)"
    text = str(exc).strip()
    lines = [part.strip() for part in text.splitlines() if part.strip()]
    first = lines[0] if lines else ""
    if first.endswith(":") and len(lines) > 1:
        # "use case 'x' is invalid:" followed by one "- field: why" line per error: the fields are the message.
        first = f"{first} {'; '.join(line.lstrip('- ') for line in lines[1:])}"
    if isinstance(exc, BaseException):
        line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    else:  # the DAG processor path may hand over a plain message
        line = first or "unknown error"
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 1] + "…"


def _log_url(ti: Any, dag_id: str, run_id: str, task_id: str, try_number: int | None) -> str | None:
    url = getattr(ti, "log_url", None)
    if url:
        return str(url)
    # Not every TI flavour has log_url; rebuild the same link the Airflow 3 UI uses.
    from urllib.parse import quote

    from airflow.sdk.configuration import conf

    base = conf.get("api", "base_url", fallback="http://localhost:8080/").rstrip("/")
    url = f"{base}/dags/{dag_id}/runs/{quote(run_id)}/tasks/{task_id}"
    return url + (f"?try_number={try_number}" if try_number else "")


def alert_payload(context: dict) -> dict:
    """The facts of one task failure as a flat, JSON-able dict (the JSON webhook body)."""
    ti = context.get("ti") or context.get("task_instance")
    dag = context.get("dag")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or "?"
    task_id = getattr(ti, "task_id", None) or getattr(context.get("task"), "task_id", None) or "?"
    run_id = getattr(ti, "run_id", None) or context.get("run_id") or "?"
    try_number = getattr(ti, "try_number", None)
    max_tries = getattr(ti, "max_tries", None)
    map_index = getattr(ti, "map_index", None)
    exc = context.get("exception")
    return {
        "event": "task_failed",
        "dag_id": dag_id,
        "task_id": task_id,
        "run_id": run_id,
        "map_index": map_index if map_index is not None and map_index >= 0 else None,
        "try_number": try_number,
        # max_tries counts retries, so the last attempt is number max_tries + 1.
        "attempts_allowed": max_tries + 1 if isinstance(max_tries, int) else None,
        "error": _first_line(exc),
        "error_type": type(exc).__name__ if isinstance(exc, BaseException) else None,
        "log_url": _log_url(ti, dag_id, run_id, task_id, try_number),
        "failed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # Which process sent it: the worker that ran the last try (or the DAG processor for a task killed from
        # outside). An operator looking for the log on a cluster needs the machine.
        "sent_by": _sender(),
    }


def _sender() -> str:
    from retrain.settings import worker_hostname

    return worker_hostname()


def alert_title(p: dict) -> str:
    task = p["task_id"] + (f"[{p['map_index']}]" if p.get("map_index") is not None else "")
    attempts = ""
    if p.get("try_number"):
        of = f"/{p['attempts_allowed']}" if p.get("attempts_allowed") else ""
        attempts = f" (attempt {p['try_number']}{of})"
    return f"Airflow task failed: {p['dag_id']}.{task}{attempts}"


def alert_text(p: dict) -> str:
    return "\n".join(
        [
            alert_title(p),
            f"Run: {p['run_id']}",
            f"Error: {p['error']}",
            f"Log: {p['log_url']}",
            *([f"Sent by: {p['sent_by']}"] if p.get("sent_by") else []),
        ]
    )


# --------------------------------------------------------------------------------------------------------------
# Connections


def _get_connection(conn_id: str, missing_ok: bool):
    from airflow.sdk.exceptions import AirflowNotFoundException

    from retrain.settings import airflow_connection

    try:
        return airflow_connection(conn_id, required=True)
    except AirflowNotFoundException:
        if missing_ok:
            log.debug("alert connection %s is not defined: channel skipped", conn_id)
            return None
        raise AlertConfigError(
            f"Airflow connection '{conn_id}' is not defined: create it (UI Admin > Connections, or "
            f"AIRFLOW_CONN_{conn_id.upper()}) or remove this notifier from on_failure_callback"
        ) from None


def _extra(conn) -> dict:
    try:
        extra = conn.extra_dejson
    except Exception:  # malformed JSON in extra: treat as absent rather than losing the alert
        return {}
    return extra if isinstance(extra, dict) else {}


def webhook_url(conn) -> str:
    """The URL a webhook connection points at (see the module docstring for the precedence)."""
    extra = _extra(conn)
    for key in ("url", "webhook_url", "endpoint"):
        if extra.get(key):
            return str(extra[key])
    host = (conn.host or "").strip()
    if host.startswith(("http://", "https://")):
        return host
    if not host:
        raise AlertConfigError(
            f"connection '{conn.conn_id}' has no URL: set its host to the full webhook URL "
            f"(e.g. https://hooks.slack.com/services/...) or put {{\"url\": ...}} in its extra"
        )
    scheme = extra.get("scheme") or (conn.conn_type if conn.conn_type in ("http", "https") else "https")
    port = f":{conn.port}" if conn.port else ""
    path = (conn.schema or "").lstrip("/")
    return f"{scheme}://{host}{port}/{path}"


def _headers(conn) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": "retrain-alerts/1"}
    extra_headers = _extra(conn).get("headers")
    if isinstance(extra_headers, dict):
        headers.update({str(k): str(v) for k, v in extra_headers.items()})
    if conn.login and conn.password:
        token = base64.b64encode(f"{conn.login}:{conn.password}".encode()).decode()
        headers.setdefault("Authorization", f"Basic {token}")
    elif conn.password:
        headers.setdefault("Authorization", f"Bearer {conn.password}")
    return headers


def post_json(url: str, body: dict, headers: dict[str, str], timeout: float = HTTP_TIMEOUT_S) -> int:
    """POST ``body`` as JSON; returns the HTTP status or raises naming the endpoint (without its secret path)."""
    from urllib.parse import urlsplit

    where = "{0.scheme}://{0.netloc}".format(urlsplit(url))  # webhook paths are secrets: keep them out of logs
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        # No retry on purpose: a retried POST that the receiver already processed would be a duplicate alert.
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - URL comes from a connection
            return resp.status
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode(errors="replace").strip()
        raise RuntimeError(
            f"alert webhook at {where} answered HTTP {exc.code}: {detail or exc.reason}. "
            f"Check the URL/credentials in the connection"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"alert webhook at {where} is unreachable: {reason}. Check the connection's URL") from None


# --------------------------------------------------------------------------------------------------------------
# Notifiers


class _ConnNotifier(BaseNotifier):
    """Base for notifiers configured by one Airflow connection, resolved when the callback fires."""

    default_conn_id = ""

    def __init__(self, conn_id: str | None = None, *, missing_ok: bool = False):
        super().__init__()
        self.conn_id = conn_id or self.default_conn_id
        # default_notifiers() sets this: a channel whose connection does not exist is simply not used.
        self.missing_ok = missing_ok

    def notify(self, context) -> None:
        conn = _get_connection(self.conn_id, self.missing_ok)
        if conn is None:
            return
        payload = alert_payload(context)
        self.send(conn, payload)
        log.info("failure alert for %s.%s sent through '%s'", payload["dag_id"], payload["task_id"], self.conn_id)

    def send(self, conn, payload: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class JsonWebhookNotifier(_ConnNotifier):
    """POSTs ``alert_payload(context)`` as a JSON object, plus ``"text"`` with the human-readable message."""

    default_conn_id = WEBHOOK_CONN_ID

    def send(self, conn, payload: dict) -> None:
        post_json(webhook_url(conn), {**payload, "text": alert_text(payload)}, _headers(conn))


class SlackWebhookNotifier(_ConnNotifier):
    """POSTs ``{"text": ...}``: the body every Slack-compatible incoming webhook accepts."""

    default_conn_id = SLACK_CONN_ID

    def send(self, conn, payload: dict) -> None:
        p = payload
        text = "\n".join(
            [
                f":red_circle: *{alert_title(p)}*",
                f"*Run:* `{p['run_id']}`",
                f"*Error:* {p['error']}",
                f"*Log:* <{p['log_url']}|open the task log>",
            ]
        )
        post_json(webhook_url(conn), {"text": text}, _headers(conn))


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


class EmailNotifier(_ConnNotifier):
    """Sends a plain-text e-mail through the SMTP server of an ``smtp`` connection (smtplib, no provider)."""

    default_conn_id = EMAIL_CONN_ID

    def __init__(self, conn_id: str | None = None, *, to: list[str] | str | None = None, missing_ok: bool = False):
        super().__init__(conn_id, missing_ok=missing_ok)
        self.to = to

    def send(self, conn, payload: dict) -> None:
        extra = _extra(conn)
        to = self.to or extra.get("to") or extra.get("recipients")
        recipients = [a.strip() for a in (to.split(",") if isinstance(to, str) else to or []) if a and a.strip()]
        if not recipients:
            raise AlertConfigError(
                f"connection '{conn.conn_id}' names no recipient: put {{\"to\": \"ops@example.com\"}} in its extra"
            )
        if not conn.host:
            raise AlertConfigError(f"connection '{conn.conn_id}' has no host: set it to the SMTP server's name")
        sender = extra.get("from_email") or conn.login or "airflow@localhost"
        msg = EmailMessage()
        msg["Subject"] = payload.get("title") or alert_title(payload)
        msg["From"] = sender
        msg["To"] = ", ".join(recipients)
        msg.set_content((payload.get("text") or alert_text(payload)) + "\n\n" + json.dumps(payload, indent=2) + "\n")

        timeout = float(extra.get("timeout", 30))
        # Same defaults as Airflow's smtp provider: implicit TLS unless disable_ssl, else STARTTLS unless disable_tls.
        use_ssl = not _as_bool(extra.get("disable_ssl", False))
        port = conn.port or (465 if use_ssl else 25)
        context = ssl.create_default_context()
        try:
            if use_ssl:
                server = smtplib.SMTP_SSL(conn.host, port, timeout=timeout, context=context)
            else:
                server = smtplib.SMTP(conn.host, port, timeout=timeout)
            with server:
                if not use_ssl and not _as_bool(extra.get("disable_tls", False)):
                    server.starttls(context=context)
                if conn.login and conn.password:
                    server.login(conn.login, conn.password)
                server.send_message(msg, from_addr=sender, to_addrs=recipients)
        except (smtplib.SMTPException, OSError) as exc:
            raise RuntimeError(
                f"could not send the alert e-mail through {conn.host}:{port} ({type(exc).__name__}: {exc}). "
                f"Check connection '{conn.conn_id}' (host, port, disable_ssl/disable_tls, login)"
            ) from None


def default_notifiers() -> list[BaseNotifier]:
    """The failure notifiers for every alert channel; each one is used only if its connection exists.

    Safe at parse time: builds objects, reads no connection. Put the result in
    ``default_args["on_failure_callback"]``.
    """
    return [
        JsonWebhookNotifier(WEBHOOK_CONN_ID, missing_ok=True),
        SlackWebhookNotifier(SLACK_CONN_ID, missing_ok=True),
        EmailNotifier(EMAIL_CONN_ID, missing_ok=True),
    ]


def send_message(event: dict, title: str, text: str) -> list[str]:
    """A one-off ops message that is not a task failure (e.g. a gate override), through every alert channel whose
    connection exists. Returns the channels used; with none configured the message is a WARNING log line. A channel
    that fails is logged and skipped: the message must not fail the stage that sends it."""
    payload = {**event, "title": title, "text": text}
    sent = []
    for conn_id in (WEBHOOK_CONN_ID, SLACK_CONN_ID, EMAIL_CONN_ID):
        try:
            conn = _get_connection(conn_id, missing_ok=True)
            if conn is None:
                continue
            if conn_id == WEBHOOK_CONN_ID:
                post_json(webhook_url(conn), payload, _headers(conn))
            elif conn_id == SLACK_CONN_ID:
                post_json(webhook_url(conn), {"text": f"*{title}*\n{text}"}, _headers(conn))
            else:
                EmailNotifier(conn_id).send(conn, payload)
            sent.append(conn_id)
        except Exception as exc:  # noqa: BLE001 - one broken channel must not hide the message on the others
            log.warning("ops message '%s' not sent through '%s': %s", title, conn_id, exc)
    log.warning("%s%s", text, f" (sent through {', '.join(sent)})" if sent else " (no alert channel configured)")
    return sent
