"""The running stack (retrain.cli.stack) for tests, and a small client of its REST API.

Import the fixtures into a test module (``from stack_helpers import stack, api``): the stack starts once per
session, on the session's embedded examples database (conftest's ``pg_url``), and stops at the end. Tests talk to
Airflow only through the REST API (``/auth/token``, ``/api/v2/...``) and look at the shared state directory (run
directories) the way an operator would.
"""

from __future__ import annotations

import json
import sys
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
                         "Accept": "text/plain" if raw else "application/json"})
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


@pytest.fixture(scope="session")
def stack(pg_url):
    """The docker-compose.yaml process list, natively, on the session's examples database."""
    import signal

    from retrain.cli.stack import Stack, StackError

    def interrupt(signum, frame):  # `timeout pytest ...` / CI cancelling: tear the stack down, leave no orphans
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        s = Stack(extra_env=STACK_ENV, out=sys.stderr)
        s.start(timeout=300)
    except (StackError, FileNotFoundError) as exc:
        signal.signal(signal.SIGTERM, previous)
        if "redis-server" in str(exc) or "moto_server" in str(exc):
            pytest.skip(f"a stack binary is not installed: {exc}")
        raise
    try:
        yield s
    finally:
        s.stop()
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="session")
def api(stack) -> Api:
    client = Api(stack.api_url, *stack.admin)
    client.unpause()
    return client
