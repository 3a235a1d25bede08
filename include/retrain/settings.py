"""The one place that reads the environment and Airflow connections.

Every other module asks here, so a newcomer finds every knob of a deployment in this file (and nowhere else: a
test fails if another module reads ``os.environ``). Functions, not module constants: tests and the CLI set
variables after import, and nothing here may touch a database or the network at DAG parse time.

| variable | what | default |
|---|---|---|
| ``RETRAIN_HOME`` | state directory: runs, embedded database, models, caches | ``<repo>/.state`` |
| ``RETRAIN_USE_CASES_DIR`` | use-case YAML files | ``<repo>/include/use_cases`` |
| ``RETRAIN_RETRY_DELAY_SECONDS`` | first retry delay of the DAGs' tasks | 60 |
| ``RETRAIN_DB_CONN_ID`` / ``RETRAIN_DATABASE_URL`` | examples DB + registry: Airflow connection, else URL, else embedded | ``retrain_db`` |
| ``RETRAIN_S3_CONN_ID`` | Airflow connection for S3 (empty = do not ask Airflow) | ``retrain_s3`` |
| ``RETRAIN_S3_ENDPOINT_URL``, ``RETRAIN_S3_BUCKET``, ``RETRAIN_S3_PREFIX`` | S3 endpoint (unset = AWS), bucket, key prefix | AWS, ``retrain``, ``backups`` |
| ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` | S3 credentials and region when no connection | boto3's chain, us-east-1 |
| ``RETRAIN_S3_RETRY_MODE``, ``RETRAIN_S3_MAX_ATTEMPTS`` | botocore retries | standard, 12 |
| ``RETRAIN_KMS_ENDPOINT_URL`` | KMS endpoint when not the S3 endpoint (set, even empty) | the S3 endpoint |
| ``RETRAIN_S3_SSE`` | server-side encryption on top of ours: auto, AES256, aws:kms, none | auto |
| ``RETRAIN_S3_CREATE_BUCKET`` | create the bucket if missing | 1 |
| ``RETRAIN_BACKUP_KEY_CONN_ID`` / ``RETRAIN_BACKUP_MASTER_KEY`` | backup master key(s): connection password, else variable | ``retrain_backup_key`` |
| ``RETRAIN_BACKUP_KMS_KEY_ID`` | wrap data keys with this KMS key instead | unset |
| ``RETRAIN_BACKUP_UPLOAD_THREADS``, ``RETRAIN_BACKUP_PART_MB`` | multipart upload | 4, 16 |
| ``RETRAIN_BACKUP_ENABLED``/``_KEEP``/``_CLEANUP``/``_CLEANUP_FILES`` | backup policy when the use case has no ``backup:`` | true, 6, true, batch/split files |
| ``RETRAIN_CHECKPOINT_MIRROR`` | mirror training checkpoints to S3, encrypted: auto (when S3 + a backup key are set), on, off | auto |
| ``RETRAIN_CHECKPOINT_SCRATCH`` | a worker-local directory for training checkpoints (not shared; the S3 mirror carries them to a retry elsewhere) | unset: in the run directory |
| ``RETRAIN_RESTORE_ROOTS`` | extra directories restores may write into (os.pathsep-separated) | only ``$RETRAIN_HOME/restores`` |
| ``OPENAI_API_KEY`` / ``OPENAI_BASE_URL`` | OpenAI backend when the ``openai_default`` connection is missing | unset |
| ``RETRAIN_OPENAI_POLL_SECONDS`` | how often the triggerer polls a fine-tuning job | 30 |
| ``RETRAIN_TIKTOKEN_DIR``, ``RETRAIN_TOKEN_COUNT`` | offline tiktoken files; ``estimate`` skips tiktoken | unset |
| ``RETRAIN_TRAIN_PROCESSES`` | trainer processes (accelerate); 0 = one per visible GPU | 0 |
| ``RETRAIN_STACK_API_PORT``, ``RETRAIN_STACK_ADMIN_USER`` | ``retrain stack``: API server port (0 = a free one), UI admin | 0, ``admin`` |
| ``RETRAIN_WORKER_HOSTNAME`` | the host name a Celery worker reports for its task instances (``retrain stack``) | the FQDN |
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

DB_CONN_ID = "retrain_db"
S3_CONN_ID = "retrain_s3"
BACKUP_KEY_CONN_ID = "retrain_backup_key"
OPENAI_CONN_ID = "openai_default"


class SettingsError(ValueError):
    """An environment variable holds an unusable value; the message names the variable and the fix."""


def _raw(name: str) -> str | None:
    return os.environ.get(name)


def _text(name: str, default: str = "") -> str:
    return (os.environ.get(name) or default).strip() or default


def _int(name: str, default: int, lo: int, hi: int, error: type[Exception] = SettingsError) -> int:
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise error(f"{name}={raw!r} is not an integer; set it to a number between {lo} and {hi}") from None
    if not lo <= value <= hi:
        raise error(f"{name}={value} is out of range; set it to a number between {lo} and {hi}")
    return value


def _flag(name: str, default: bool) -> bool:
    raw = (os.environ.get(name) or "").strip()
    return default if not raw else raw.lower() not in ("0", "false", "no", "off")


# --- where things live --------------------------------------------------------------------------------------


def state_dir() -> Path:
    """Where runs, the embedded database and model caches live (RETRAIN_HOME, default <repo>/.state)."""
    path = Path(os.environ.get("RETRAIN_HOME", REPO_ROOT / ".state")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    return state_dir() / "runs"


def models_root() -> Path:
    return state_dir() / "models"


def use_cases_dir() -> Path:
    return Path(os.environ.get("RETRAIN_USE_CASES_DIR", REPO_ROOT / "include" / "use_cases"))


def schema_sql_path() -> Path:
    return REPO_ROOT / "include" / "sql" / "schema.sql"


def retry_delay_seconds() -> float:
    return float(os.environ.get("RETRAIN_RETRY_DELAY_SECONDS", "60"))


# --- Airflow connections --------------------------------------------------------------------------------------


def airflow_connection(conn_id: str | None, *, required: bool = False):
    """The Airflow connection ``conn_id``, or None when it is not defined or there is no Airflow to ask (CLI,
    benchmarks). ``required`` raises Airflow's AirflowNotFoundException instead of returning None."""
    if not conn_id:
        return None
    try:
        from airflow.sdk import Connection
    except ImportError:  # the package also runs without Airflow (CLI, benchmarks)
        return None
    if required:
        return Connection.get(conn_id)
    try:
        return Connection.get(conn_id)
    except Exception as exc:  # not defined, or no Airflow context to ask: the environment decides
        log.debug("Airflow connection %s not available: %s", conn_id, exc)
        return None


async def aairflow_connection(conn_id: str | None):
    """Async lookup for triggers (the triggerer must not block its event loop)."""
    if not conn_id:
        return None
    try:
        from airflow.sdk import BaseHook

        return await BaseHook.aget_connection(conn_id)
    except Exception:  # noqa: BLE001 - not defined / no API server: the environment decides
        return None


def mask_secret(secret: str | None) -> None:
    """Register a secret with Airflow's log masker (best effort; a no-op outside a task)."""
    if not secret:
        return
    try:
        from airflow.sdk.log import mask_secret as _mask

        _mask(secret)
    except Exception:  # noqa: BLE001 - masking is defence in depth; nothing logs secrets in the first place
        pass


# --- examples database --------------------------------------------------------------------------------------


def db_conn_id() -> str:
    return os.environ.get("RETRAIN_DB_CONN_ID", DB_CONN_ID)


def database_url() -> str | None:
    """RETRAIN_DATABASE_URL (may hold a password: never log it)."""
    return os.environ.get("RETRAIN_DATABASE_URL") or None


# --- S3 and backups -------------------------------------------------------------------------------------------


def s3_env() -> dict[str, Any]:
    """The S3 knobs from the environment (retrain.s3.settings merges them with the ``retrain_s3`` connection)."""
    return {
        "conn_id": os.environ.get("RETRAIN_S3_CONN_ID", S3_CONN_ID).strip(),
        "endpoint_url": os.environ.get("RETRAIN_S3_ENDPOINT_URL") or None,
        "region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
        "access_key_id": os.environ.get("AWS_ACCESS_KEY_ID") or None,
        "secret_access_key": os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        "retry_mode": _text("RETRAIN_S3_RETRY_MODE", "standard"),
        # Present-but-empty means "no KMS endpoint override" as opposed to "follow the S3 endpoint".
        "kms_endpoint_set": "RETRAIN_KMS_ENDPOINT_URL" in os.environ,
        "kms_endpoint_url": (os.environ.get("RETRAIN_KMS_ENDPOINT_URL") or "").strip() or None,
        "bucket": _text("RETRAIN_S3_BUCKET", ""),
        "prefix": _text("RETRAIN_S3_PREFIX", "backups").strip("/") or "backups",
    }


def s3_max_attempts(error: type[Exception] = SettingsError) -> int:
    return _int("RETRAIN_S3_MAX_ATTEMPTS", 12, 1, 50, error)


def s3_sse_mode() -> str:
    return _text("RETRAIN_S3_SSE", "auto")


def s3_create_bucket() -> bool:
    return (os.environ.get("RETRAIN_S3_CREATE_BUCKET", "1").strip().lower()) not in ("0", "false", "no")


def backup_key_conn_id() -> str:
    return os.environ.get("RETRAIN_BACKUP_KEY_CONN_ID", BACKUP_KEY_CONN_ID).strip()


def backup_master_key_env() -> str:
    """RETRAIN_BACKUP_MASTER_KEY (one key, or several separated by commas/space: the first wraps new backups)."""
    return os.environ.get("RETRAIN_BACKUP_MASTER_KEY", "")


def backup_kms_key_id() -> str | None:
    return os.environ.get("RETRAIN_BACKUP_KMS_KEY_ID", "").strip() or None


def backup_int(name: str, default: int, lo: int, hi: int, error: type[Exception] = SettingsError) -> int:
    """RETRAIN_BACKUP_UPLOAD_THREADS / RETRAIN_BACKUP_PART_MB and the like, range-checked."""
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if not lo <= value <= hi:
        raise error(f"{name}={raw!r} must be an integer between {lo} and {hi}")
    return value


def backup_policy_env(name: str) -> str:
    """Raw RETRAIN_BACKUP_<NAME> policy value ('' when unset); parsed by retrain.backup."""
    return os.environ.get(f"RETRAIN_BACKUP_{name.upper()}", "").strip()


def checkpoint_mirror_mode(error: type[Exception] = SettingsError) -> str:
    """RETRAIN_CHECKPOINT_MIRROR: 'auto' (default: mirror training checkpoints to S3 when S3 and a backup key are
    configured), 'on' (mirror even with S3 left at its defaults), 'off' (never)."""
    raw = (os.environ.get("RETRAIN_CHECKPOINT_MIRROR") or "auto").strip().lower()
    mode = {"1": "on", "true": "on", "yes": "on", "0": "off", "false": "off", "no": "off"}.get(raw, raw)
    if mode not in ("auto", "on", "off"):
        raise error(f"RETRAIN_CHECKPOINT_MIRROR={raw!r} is not supported; use auto, on or off")
    return mode


def checkpoint_scratch(error: type[Exception] = SettingsError) -> Path | None:
    """RETRAIN_CHECKPOINT_SCRATCH: an absolute directory on this worker's own disk where training checkpoints are
    written (``<scratch>/<use case>/<run>/checkpoints``) instead of the shared run directory; None when unset. An
    ephemeral GPU worker needs no shared volume for checkpoints: the S3 mirror carries them to a retry elsewhere."""
    raw = (os.environ.get("RETRAIN_CHECKPOINT_SCRATCH") or "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_absolute():
        raise error(f"RETRAIN_CHECKPOINT_SCRATCH={raw!r} must be an absolute path (a directory on this worker's "
                    "own disk), or unset to keep checkpoints in the run directory")
    return path


def restore_roots() -> list[Path]:
    """Where restores may write: ``$RETRAIN_HOME/restores`` first, then the RETRAIN_RESTORE_ROOTS directories
    (os.pathsep-separated absolute paths), all resolved."""
    extra = [p.strip() for p in os.environ.get("RETRAIN_RESTORE_ROOTS", "").split(os.pathsep) if p.strip()]
    for p in extra:
        if not Path(p).expanduser().is_absolute():
            raise SettingsError(f"RETRAIN_RESTORE_ROOTS entry {p!r} is not an absolute path; list absolute "
                                f"directories separated by {os.pathsep!r}")
    return [(state_dir() / "restores").resolve(), *(Path(p).expanduser().resolve() for p in extra)]


def airflow_code_folders() -> list[Path]:
    """The DAGs and plugins folders Airflow loads code from (AIRFLOW__CORE__DAGS_FOLDER / _PLUGINS_FOLDER, and
    the repository's own), resolved: nothing may ever be unpacked into them."""
    found = [REPO_ROOT / "dags", REPO_ROOT / "plugins", REPO_ROOT / "include"]
    for name in ("AIRFLOW__CORE__DAGS_FOLDER", "AIRFLOW__CORE__PLUGINS_FOLDER"):
        if os.environ.get(name, "").strip():
            found.append(Path(os.environ[name].strip()).expanduser())
    return [p.resolve() for p in found]


# --- OpenAI ---------------------------------------------------------------------------------------------------


def _from_openai_connection(conn: Any) -> tuple[str | None, str | None]:
    extra = conn.extra_dejson or {}
    url = extra.get("base_url") or (conn.host if (conn.host or "").startswith(("http://", "https://")) else None)
    return conn.password or extra.get("api_key") or None, url


def openai_credentials(conn_id: str | None = OPENAI_CONN_ID, *, api_key: str | None = None,
                       base_url: str | None = None) -> tuple[str | None, str | None]:
    """(api_key, base_url): explicit arguments, then the Airflow connection (password or extra ``api_key``, extra
    ``base_url``), then OPENAI_API_KEY / OPENAI_BASE_URL. The key is masked in task logs; never log it."""
    key, url = api_key, base_url
    if not key or not url:
        try:
            from airflow.sdk import BaseHook

            conn = BaseHook.get_connection(conn_id) if conn_id else None
        except Exception:  # noqa: BLE001 - not defined / no API server (CLI, tests): use the environment
            conn = None
        if conn is not None:
            ckey, curl = _from_openai_connection(conn)
            key, url = key or ckey, url or curl
    key = key or os.environ.get("OPENAI_API_KEY") or None
    url = url or os.environ.get("OPENAI_BASE_URL") or None
    mask_secret(key)
    return key, url


async def aopenai_credentials(conn_id: str | None = OPENAI_CONN_ID) -> tuple[str | None, str | None]:
    key = url = None
    conn = await aairflow_connection(conn_id)
    if conn is not None:
        key, url = _from_openai_connection(conn)
    key = key or os.environ.get("OPENAI_API_KEY") or None
    url = url or os.environ.get("OPENAI_BASE_URL") or None
    mask_secret(key)
    return key, url


def openai_poll_seconds(default: float) -> float:
    return float(os.environ.get("RETRAIN_OPENAI_POLL_SECONDS") or default)


def tiktoken_dir() -> Path | None:
    raw = os.environ.get("RETRAIN_TIKTOKEN_DIR")
    return Path(raw) if raw else None


def tiktoken_cache_dir() -> str | None:
    """Where tiktoken looks for its files: TIKTOKEN_CACHE_DIR / DATA_GYM_CACHE_DIR, else a private directory
    under RETRAIN_HOME (mode 700: a predictable name under /tmp could be planted by another user)."""
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if name in os.environ:
            return os.environ[name] or None
    path = state_dir() / "cache" / "tiktoken"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(path)  # so tiktoken itself reads the same place
    return str(path)


def token_count_mode() -> str:
    return os.environ.get("RETRAIN_TOKEN_COUNT", "").lower()


# --- training processes ---------------------------------------------------------------------------------------


def train_processes() -> int:
    return int(os.environ.get("RETRAIN_TRAIN_PROCESSES", "0") or 0)


def cuda_visible_devices() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def process_rank() -> int:
    """torchrun/accelerate's RANK (0 in a single process)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for a child process (the trainer)."""
    return {**os.environ, **extra}


def export(name: str, value: str, *, only_if_unset: bool = False) -> None:
    """Set a variable for this process and its children (library knobs such as TOKENIZERS_PARALLELISM)."""
    if only_if_unset:
        os.environ.setdefault(name, value)
    else:
        os.environ[name] = value


# --- `retrain stack` (the docker-compose process list, natively) ----------------------------------------------


def stack_dir() -> Path:
    """Logs, secrets and the metadata database of `retrain stack`."""
    path = state_dir() / "stack"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stack_api_port() -> int:
    return _int("RETRAIN_STACK_API_PORT", 0, 0, 65535)


def stack_admin_user() -> str:
    return _text("RETRAIN_STACK_ADMIN_USER", "admin")


def compose_env() -> dict[str, str]:
    """The variables docker-compose.yaml interpolates (``${VAR:-default}``): this process's environment."""
    return dict(os.environ)


def openai_api_key_env() -> str:
    return os.environ.get("OPENAI_API_KEY", "")


def worker_hostname() -> str:
    """Airflow's ``[core] hostname_callable`` for the workers of `retrain stack`: RETRAIN_WORKER_HOSTNAME (two
    workers on one host need a name each), else the FQDN as Airflow's default does."""
    import socket

    return _text("RETRAIN_WORKER_HOSTNAME", "") or socket.getfqdn()
