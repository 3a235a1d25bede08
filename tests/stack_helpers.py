"""The running stack (retrain.cli.stack) for tests, and a small client of its REST API.

Import the fixtures into a test module (``from stack_helpers import stack, api``): the stack starts once per
session, on the session's embedded examples database (conftest's ``pg_url``), and stops at the end. Tests talk to
Airflow only through the REST API (``/auth/token``, ``/api/v2/...``) and look at the shared state directory (run
directories) the way an operator would.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

DAG_ID = "retrain_product_intent"
TERMINAL = {"success", "failed"}
# Short enough to see a killed worker's task retried within a test; Airflow's default is 300 s.
STACK_ENV = {
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    "RETRAIN_RETRY_DELAY_SECONDS": "1",
}


# The fake OpenAI's untuned base model: valid JSON in the right shape, the same guess for every query (as in
# tests/test_openai_dag.py), so an evaluation of the fine-tuned model against it means something.
OPENAI_BASE_ANSWER = json.dumps({"intent_type": "PERSONAL_USE", "budget_tier": "unspecified",
                                 "category": "unspecified", "recipient": "self", "context_tags": ["personal"],
                                 "priority_features": ["good_reviews"]})


class AlertReceiver:
    """A local alert webhook (what Slack or an on-call tool is in production): a stdlib HTTP server on 127.0.0.1
    that keeps every POST's JSON body with the time it arrived. Its URL carries a secret path, as real webhook URLs
    do, so a test can check that the path never ends up in what the platform logs or sends."""

    def __init__(self):
        import secrets
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.received: list[dict] = []
        self.path = f"/hooks/{secrets.token_urlsafe(12)}"
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = {"unparsed": body.decode(errors="replace")}
                receiver.received.append({"at": time.time(), "path": self.path, "payload": payload,
                                          "user_agent": self.headers.get("User-Agent")})
                self.send_response(200 if self.path == receiver.path else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # keep the test output clean
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}{self.path}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="alert-receiver", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        """The stack's alert configuration: the `retrain_alert_webhook` connection (retrain.notify)."""
        return {"AIRFLOW_CONN_RETRAIN_ALERT_WEBHOOK": json.dumps({"conn_type": "http", "host": self.url})}

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def openai_env(fake) -> dict[str, str]:
    """The stack's OpenAI configuration pointed at tests/fake_openai.py: the `openai_default` connection (key and
    base_url, what production uses), polled every second."""
    return {"AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps({"conn_type": "generic", "password": fake.api_key,
                                                       "extra": {"base_url": fake.base_url}}),
            "RETRAIN_OPENAI_POLL_SECONDS": "1"}


class ApiError(RuntimeError):
    pass


class Api:
    """Airflow's public REST API with a JWT from /auth/token (renewed on 401)."""

    def __init__(self, base_url: str, username: str, password: str):
        self.base, self.username, self.password = base_url.rstrip("/"), username, password
        self._token: str | None = None

    def token(self) -> str:
        body = json.dumps({"username": self.username, "password": self.password}).encode()
        req = urllib.request.Request(f"{self.base}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self._token = json.loads(resp.read())["access_token"]
        return self._token

    def request(self, method: str, path: str, body: dict | None = None, *, raw: bool = False):
        for attempt in (1, 2):
            req = urllib.request.Request(
                f"{self.base}{path}", method=method, data=None if body is None else json.dumps(body).encode(),
                headers={"Authorization": f"Bearer {self._token or self.token()}", "Content-Type": "application/json",
                         "Accept": "application/x-ndjson" if raw else "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    data = resp.read()
                    return data.decode() if raw else (json.loads(data) if data else None)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 1:
                    self._token = None
                    continue
                raise ApiError(f"{method} {path} -> {exc.code}: {exc.read().decode()[:2000]}") from None
        raise AssertionError("unreachable")

    def get(self, path: str, **params):
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        return self.request("GET", path + query)

    # -- DAG runs
    def unpause(self, dag_id: str = DAG_ID) -> dict:
        return self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, conf: dict, *, dag_id: str = DAG_ID, logical_date: str | None = None) -> dict:
        return self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": logical_date, "conf": conf})

    def run(self, run_id: str, dag_id: str = DAG_ID) -> dict:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}")

    def task_instances(self, run_id: str, dag_id: str = DAG_ID) -> dict[str, dict]:
        data = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances",
                        limit=100)
        return {ti["task_id"]: ti for ti in data["task_instances"]}

    def tries(self, run_id: str, task_id: str, dag_id: str = DAG_ID) -> list[dict]:
        data = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                        f"/taskInstances/{task_id}/tries")
        return data["task_instances"]

    def task_log(self, run_id: str, task_id: str, try_number: int, dag_id: str = DAG_ID) -> str:
        """One try's log as Airflow 3 serves it: one JSON event per line (text/plain is refused with 406)."""
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id, safe='')}"
                                   f"/taskInstances/{task_id}/logs/{try_number}?full_content=true", raw=True)

    def diagnose(self, run_id: str, dag_id: str = DAG_ID) -> str:
        """Task states and the errors of failed tasks (from their logs), for an assertion message."""
        import re

        tis = self.task_instances(run_id, dag_id)
        lines = [f"{t}: {ti['state']} on {ti.get('hostname')} ({ti.get('queue')})" for t, ti in tis.items()]
        for t, ti in tis.items():
            if ti["state"] in ("failed", "up_for_retry"):
                try:
                    text = self.task_log(run_id, t, ti["try_number"], dag_id)
                except ApiError as exc:
                    text = str(exc)
                errors = re.findall(r'"exc_value":\s*"((?:[^"\\]|\\.)*)"', text) or [text[-1500:]]
                lines.append(f"{t} try {ti['try_number']}: {errors[-1][:1500]}")
        return "\n".join(lines)

    def wait(self, run_id: str, *, timeout: float, until=TERMINAL, dag_id: str = DAG_ID) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id, dag_id)
            if run["state"] in until:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"{run_id} still {run['state']} after {timeout:.0f}s:\n"
                                     f"{self.diagnose(run_id, dag_id)}")
            time.sleep(2)

    def wait_task(self, run_id: str, task_id: str, states: set[str], *, timeout: float, dag_id: str = DAG_ID) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ti = self.task_instances(run_id, dag_id).get(task_id) or {}
            if ti.get("state") in states:
                return ti
            if self.run(run_id, dag_id)["state"] in TERMINAL or time.monotonic() > deadline:
                raise AssertionError(f"{task_id} of {run_id} is {ti.get('state')}, never reached {states}:\n"
                                     f"{self.diagnose(run_id, dag_id)}")
            time.sleep(1)


_RUNNING: list = []  # the session's stack, once started


@pytest.fixture(scope="session")
def stack(pg_url):
    """The docker-compose.yaml process list, natively, on the session's examples database. Started first, their
    URLs in the stack's environment: ``stack.alert_receiver`` gets the failure alerts, ``stack.fake_openai``
    (tests/fake_openai.py in a thread; its knobs can be turned while it runs) stands in for OpenAI."""
    if _RUNNING:  # pytest makes one session fixture per module that imports it: they all share the first stack
        yield _RUNNING[0]
        return
    import signal

    from fake_openai import FakeOpenAI
    from retrain.cli.stack import Stack, StackError

    def interrupt(signum, frame):  # `timeout pytest ...` / CI cancelling: tear the stack down, leave no orphans
        raise KeyboardInterrupt

    alert_receiver = AlertReceiver()
    fake_openai = FakeOpenAI(polls_per_state=1, base_model_answer=OPENAI_BASE_ANSWER)
    _, stop_openai = fake_openai.start()
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        s = Stack(extra_env={**STACK_ENV, **alert_receiver.env(), **openai_env(fake_openai)}, out=sys.stderr)
        s.alert_receiver, s.fake_openai = alert_receiver, fake_openai
        s.start(timeout=300)
    except (StackError, FileNotFoundError) as exc:
        signal.signal(signal.SIGTERM, previous)
        alert_receiver.stop()
        stop_openai()
        if "redis-server" in str(exc) or "moto_server" in str(exc):
            pytest.skip(f"a stack binary is not installed: {exc}")
        raise
    _RUNNING.append(s)
    try:
        yield s
    finally:
        _RUNNING.clear()
        s.stop()
        alert_receiver.stop()
        stop_openai()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def api(stack) -> Api:
    client = Api(stack.api_url, *stack.admin)
    client.unpause()
    return client
