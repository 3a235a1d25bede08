"""Version pinning: the database remembers the manifest digest of the latest backup under each backup id.

Whoever can write to the bucket could put an older, validly encrypted manifest + archive back under the same id
(rolling a run back to data it no longer holds). backup_run records the SHA-256 of the manifest bytes it wrote
in the ``backup_versions`` table (and in the run directory's receipt); verify, describe and restore compare the
manifest they download with it and refuse any other. A backup id the table does not know (a database rebuilt
after a disaster) is read with a warning: there is nothing to compare with.
"""

from __future__ import annotations

import hashlib
import logging

from retrain.backup.common import BackupIntegrityError

log = logging.getLogger(__name__)


def manifest_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _run(sql: str, args: tuple, *, fetch: bool = False):
    """One statement on the configured database. An unreachable database raises retrain.db.DatabaseError (a
    transient error: the task's retries apply); the version is never skipped silently."""
    from retrain import db

    with db.connection() as conn:
        db.ensure_schema_once(conn)  # a fresh connection: the DDL is committed right away
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchone() if fetch else None


def record(backup_id: str, use_case: str, run_id: str, digest: str) -> None:
    """Pin ``digest`` as the latest version of ``backup_id``."""
    _run("INSERT INTO backup_versions (backup_id, use_case, run_id, manifest_sha256) VALUES (%s, %s, %s, %s) "
         "ON CONFLICT (backup_id) DO UPDATE SET use_case = EXCLUDED.use_case, run_id = EXCLUDED.run_id, "
         "manifest_sha256 = EXCLUDED.manifest_sha256, created_at = now()",
         (backup_id, use_case, str(run_id), digest))


def pinned(backup_id: str) -> str | None:
    row = _run("SELECT manifest_sha256 FROM backup_versions WHERE backup_id = %s", (backup_id,), fetch=True)
    return row[0] if row else None


def check(backup_id: str, digest: str) -> None:
    """Refuse a manifest that is not the latest version written under ``backup_id``."""
    want = pinned(backup_id)
    if want is None:
        log.warning("backup %s has no recorded version in the database (rebuilt after a disaster?): its manifest "
                    "cannot be checked against the latest version", backup_id)
        return
    if want != digest:
        raise BackupIntegrityError(
            f"this is not the latest version of {backup_id}: the manifest in the bucket (sha256 {digest[:12]}...) is "
            f"not the one last written (sha256 {want[:12]}...), an older backup was put back; do not use it, and "
            "re-run backup_to_s3 for that run or restore another backup (list_backups)"
        )
