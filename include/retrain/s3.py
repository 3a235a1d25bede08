"""S3 access for backups: where the bucket is, and a boto3 client that rides out a briefly unavailable server.

Settings come from the Airflow connection ``retrain_s3`` (type aws: login/password = access key id/secret, extras
``endpoint_url`` and ``region_name``) when it exists, field by field falling back to the environment:
``RETRAIN_S3_ENDPOINT_URL`` (MinIO, moto, LocalStack; unset = AWS), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``. Without credentials anywhere boto3's own chain (instance profile, ~/.aws) applies.

Other knobs: ``RETRAIN_S3_BUCKET`` (default ``retrain``), ``RETRAIN_S3_PREFIX`` (default ``backups``),
``RETRAIN_S3_CONN_ID`` (default ``retrain_s3``; empty = do not ask Airflow), ``RETRAIN_S3_RETRY_MODE``
(standard|adaptive, default standard), ``RETRAIN_S3_MAX_ATTEMPTS`` (default 12, i.e. up to ~30 s of backoff),
``RETRAIN_KMS_ENDPOINT_URL`` (set, even to empty, when KMS is not served by the S3 endpoint, e.g. MinIO + AWS KMS).

boto3 is imported inside functions: DAG files import this package at parse time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from retrain import settings as _settings

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "retrain_s3"
DEFAULT_BUCKET = "retrain"
DEFAULT_PREFIX = "backups"


class S3ConfigError(ValueError):
    """The S3 settings are unusable; the message says which setting and how to fix it."""


def settings() -> dict[str, Any]:
    """Resolved S3 settings. Holds the secret key under ``_secret``: never log or return the whole dict."""
    env = _settings.s3_env()
    conn_id = env["conn_id"]
    conn = _settings.airflow_connection(conn_id)
    extra: dict[str, Any] = {}
    if conn is not None:
        try:
            extra = dict(conn.extra_dejson or {})
        except Exception:  # malformed extra JSON: say so rather than silently using the environment
            raise S3ConfigError(
                f"Airflow connection '{conn_id}' has an extra field that is not valid JSON; fix it in "
                "Admin > Connections (e.g. {\"endpoint_url\": \"http://minio:9000\", \"region_name\": \"us-east-1\"})"
            ) from None
    endpoint = (extra.get("endpoint_url") or (extra.get("service_config") or {}).get("s3", {}).get("endpoint_url")
                or env["endpoint_url"])
    region = extra.get("region_name") or env["region"] or "us-east-1"
    key_id = (conn.login if conn is not None else None) or extra.get("aws_access_key_id") or env["access_key_id"]
    secret = (conn.password if conn is not None else None) or extra.get("aws_secret_access_key") \
        or env["secret_access_key"]
    if bool(key_id) != bool(secret):
        raise S3ConfigError(
            "S3 credentials are half set (an access key id without a secret or the reverse): set both "
            f"login and password of the Airflow connection '{conn_id}', or both AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY"
        )
    mode = env["retry_mode"]
    if mode not in ("standard", "adaptive"):
        raise S3ConfigError(f"RETRAIN_S3_RETRY_MODE={mode!r} is not supported; use 'standard' or 'adaptive'")
    if env["kms_endpoint_set"]:
        kms_endpoint = env["kms_endpoint_url"]
    else:
        # A local emulator (moto, LocalStack) serves KMS on the same port as S3.
        kms_endpoint = extra.get("kms_endpoint_url") or endpoint
    return {
        "source": f"airflow connection '{conn_id}'" if conn is not None else "environment",
        "endpoint_url": endpoint,
        "kms_endpoint_url": kms_endpoint,
        "region": region,
        "bucket": env["bucket"] or extra.get("bucket_name") or DEFAULT_BUCKET,
        "prefix": env["prefix"] or DEFAULT_PREFIX,
        "access_key_id": key_id,
        "_secret": secret,
        "retry_mode": mode,
        "max_attempts": _settings.s3_max_attempts(S3ConfigError),
    }


def describe(cfg: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings without secrets (for logs and task results)."""
    cfg = cfg or settings()
    return {k: cfg[k] for k in ("source", "endpoint_url", "region", "bucket", "prefix", "retry_mode", "max_attempts")}


def _boto_config(cfg: dict[str, Any], max_pool_connections: int):
    from botocore.config import Config

    return Config(
        region_name=cfg["region"],
        signature_version="s3v4",
        # Path-style works with every S3 implementation (MinIO and moto need it for dotted or local hosts).
        # No SigV4 payload hash: everything we upload is AES-GCM-authenticated end to end (and carries a CRC32
        # checksum header), so hashing every part again for the signature only burns CPU. botocore skips it
        # over HTTPS already; this extends that to plain-HTTP endpoints (local MinIO/moto).
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        # 'standard' retries connection errors, 5xx and throttling with jittered exponential backoff; enough
        # attempts that a restarting MinIO (a few seconds) does not fail a multi-GB upload.
        retries={"mode": cfg["retry_mode"], "max_attempts": cfg["max_attempts"]},
        connect_timeout=10,
        read_timeout=120,
        max_pool_connections=max_pool_connections,
    )


_session_lock = threading.Lock()
_session = None


def _make_client(service: str, **kwargs):
    # One boto3 Session per process: a new Session re-parses botocore's endpoint data (~0.5 s) every time.
    # Sessions are not thread-safe, so client creation is serialised; the clients themselves are thread-safe.
    global _session
    import boto3

    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client(service, **kwargs)


def client(cfg: dict[str, Any] | None = None, *, max_pool_connections: int = 10):
    """A boto3 S3 client for the configured endpoint (thread-safe: one client serves all upload threads)."""
    cfg = cfg or settings()
    return _make_client(
        "s3",
        endpoint_url=cfg["endpoint_url"],
        aws_access_key_id=cfg["access_key_id"],
        aws_secret_access_key=cfg["_secret"],
        config=_boto_config(cfg, max_pool_connections),
    )


def kms_client(cfg: dict[str, Any] | None = None):
    cfg = cfg or settings()
    return _make_client(
        "kms",
        endpoint_url=cfg["kms_endpoint_url"],
        aws_access_key_id=cfg["access_key_id"],
        aws_secret_access_key=cfg["_secret"],
        config=_boto_config(cfg, 2),
    )


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    return str((response.get("Error") or {}).get("Code", ""))


def is_not_found(exc: BaseException) -> bool:
    return error_code(exc) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket")


def ensure_bucket(s3, bucket: str, region: str) -> bool:
    """Create the bucket if it does not exist (local MinIO/moto start empty). Returns True when it was created."""
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise S3ConfigError(
                f"cannot access bucket '{bucket}' ({error_code(exc) or exc}): check the credentials and that they "
                "may read and write it (RETRAIN_S3_BUCKET, Airflow connection retrain_s3)"
            ) from None
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":  # us-east-1 rejects an explicit location constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as exc:
        if error_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    log.info("created bucket %s", bucket)
    return True
