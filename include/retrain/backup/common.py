"""What every part of the backup code shares: the format constants, the errors, and backup ids and object keys.

Layout in the bucket (``s3://$RETRAIN_S3_BUCKET/$RETRAIN_S3_PREFIX/``)::

    <use_case>/<run>/archive.tar.enc   header + AES-256-GCM chunks of a tar of the run's valuable files
    <use_case>/<run>/manifest.json     what is inside, hashes, and the wrapped data key (written last)

The backup id is ``<use_case>/<run>`` (run = the run id made path-safe), so a retried task writes the same keys.
"""

from __future__ import annotations

import base64
import binascii
import re

from retrain.rundir import SPLITS, RunDir

FORMAT = "retrain-backup/1"
MAGIC = b"RTRNBAK1"
TAG_BYTES = 16
CHUNK_SIZE = 1 << 20  # 1 MiB of plaintext per GCM chunk: small enough to stream, large enough to be cheap
ARCHIVE_NAME = "archive.tar.enc"
# The manifest's S3 object name (not a run-directory file, so RunDir does not own it; kept for existing backups).
MANIFEST_NAME = "manifest" + ".json"
RECEIPT_NAME = RunDir.BACKUP_RECEIPT  # local receipt in the run directory, used by cleanup_run

_RELATIVE = RunDir("")  # paths relative to a run directory
_SPLIT_FILES = tuple(_RELATIVE.split(s).name for s in SPLITS)
# What a run directory is worth keeping. Checkpoints and TensorBoard logs are large and reproducible.
INCLUDE_FILES = (
    *_SPLIT_FILES, RunDir.REJECTED, RunDir.BATCH, RunDir.MANIFEST, RunDir.RUN_CONFIG, RunDir.DECISION,
    RunDir.VALIDATION, RunDir.COLLECT, RunDir.SUMMARY, RunDir.TENANTS_MANIFEST,
)
# tenants/: a generation use case's per-tenant sub-runs (splits, adapters, evaluation), one backup for the run.
INCLUDE_DIRS = (RunDir.CANDIDATE, RunDir.EVALUATION, RunDir.TENANTS)
EXCLUDE_DIRS = tuple(p.as_posix() for p in (_RELATIVE.checkpoints_under(None), _RELATIVE.tensorboard))
# Removed locally after a verified backup: the raw batch and the rejected rows (scrubbed, but still production
# text) and the split files (the frozen test set lives in the dataset_examples table, not in old run dirs).
DEFAULT_REMOVE = (RunDir.BATCH, RunDir.REJECTED, *_SPLIT_FILES, *(f"{RunDir.TENANTS}/*/{f}" for f in _SPLIT_FILES))

USE_CASE_RE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
_RUN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class BackupError(RuntimeError):
    """A backup or restore cannot proceed; the message names the problem and what to do."""


class BackupNotFoundError(BackupError):
    """The backup (or its manifest) does not exist."""


class BackupIntegrityError(BackupError):
    """The stored backup does not match what was written: modified, truncated, rolled back or mixed up."""


class BackupKeyError(BackupError):
    """The data key cannot be unwrapped with the configured master key / KMS key."""


class BackupUnavailableError(BackupError):
    """S3 could not be reached even after retrying: the one backup error worth retrying later."""


def backup_id_for(use_case: str, run_id: str) -> str:
    if not USE_CASE_RE.match(use_case or ""):
        raise BackupError(f"use case {use_case!r} is not a valid name (lower_snake_case, 2-63 characters)")
    run = _UNSAFE.sub("_", str(run_id)).strip("._") or "run"
    return f"{use_case}/{run[:200]}"


def check_backup_id(backup_id: str) -> tuple[str, str]:
    parts = str(backup_id).strip().strip("/").split("/")
    if len(parts) != 2 or not USE_CASE_RE.match(parts[0]) or not _RUN.match(parts[1]):
        raise BackupError(
            f"backup id {backup_id!r} is malformed: it looks like '<use_case>/<run>', e.g. "
            "'product_intent/manual__2026-01-01T00_00_00_00_00' (list them with list_backups / `retrain backup list`)"
        )
    return parts[0], parts[1]


def object_keys(cfg: dict, backup_id: str) -> tuple[str, str]:
    """(archive key, manifest key) of a backup in the bucket."""
    base = f"{cfg['prefix']}/{backup_id}" if cfg["prefix"] else backup_id
    return f"{base}/{ARCHIVE_NAME}", f"{base}/{MANIFEST_NAME}"


def s3_url(cfg: dict, key: str) -> str:
    return f"s3://{cfg['bucket']}/{key}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise BackupIntegrityError(f"the manifest's {what} is not valid base64: the manifest was modified") from None
