"""Encrypted backups of run directories to S3: backup, restore drill, restore, retention, local cleanup.

The pieces live beside this module: :mod:`~retrain.backup.common` (format, errors, ids),
:mod:`~retrain.backup.crypto` (keys, KMS, MAC, nonces), :mod:`~retrain.backup.archive` (tar and the chunked
AES-256-GCM stream), :mod:`~retrain.backup.transport` (S3 upload/download and error hints),
:mod:`~retrain.backup.versions` (the latest manifest digest per backup id, in the database) and
:mod:`~retrain.backup.policy` (retention policy and where restores may write). This module holds the operations
and the pipeline stages that call them.

Every function returns a small JSON-able dict. Problems a human must fix raise :class:`BackupError` subclasses
whose message names the problem and the next step.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from retrain import settings
from retrain.backup import crypto, versions
from retrain.backup.archive import (
    DecryptingReader,
    EncryptingWriter,
    MemberTree,
    hash_stream,
    safe_member,
    select_files,
    write_tar,
)
from retrain.backup.common import (  # noqa: F401 - re-exported: callers import them from here
    ARCHIVE_NAME,
    CHUNK_SIZE,
    DEFAULT_REMOVE,
    FORMAT,
    INCLUDE_DIRS,
    INCLUDE_FILES,
    MANIFEST_NAME,
    RECEIPT_NAME,
    TAG_BYTES,
    USE_CASE_RE,
    BackupError,
    BackupIntegrityError,
    BackupKeyError,
    BackupNotFoundError,
    BackupUnavailableError,
    b64,
    backup_id_for,
    check_backup_id,
    object_keys,
    s3_url,
    unb64,
)
from retrain.backup.policy import backup_settings, restore_target  # noqa: F401 - backup_settings re-exported
from retrain.backup.transport import (
    MultipartSink,
    ObjectStream,
    delete_keys,
    error_class,
    explained,
    get_manifest,
    s3_hint,
    s3_settings,
)
from retrain.rundir import RunDir, load_run, sha256_file, write_json

log = logging.getLogger(__name__)


def _known_backups(use_case: str) -> list[str]:
    return [b["backup_id"] for b in list_backups(use_case).get("backups", []) if b.get("complete")]


def _open_manifest(s3, cfg: dict, backup_id: str) -> tuple[dict, bytes, str]:
    """(manifest, chunk key, manifest digest) after unwrapping the data key, checking the manifest's MAC and
    checking that it is the latest version written under this id."""
    manifest, raw = get_manifest(s3, cfg, backup_id, _known_backups)
    data_key = crypto.unwrap_data_key(cfg, manifest.get("key") or {}, backup_id)
    enc_key = crypto.chunk_key(data_key)
    mac_key = crypto.manifest_mac_key(data_key)
    if not crypto.hmac_equal(str(manifest.get("mac", "")), crypto.mac(manifest, mac_key)):
        raise BackupIntegrityError(
            f"the manifest of backup {backup_id} was modified after the backup was written (its MAC does not "
            "match): do not trust this backup; restore an older one (list_backups)"
        )
    digest = versions.manifest_digest(raw)
    versions.check(backup_id, digest)
    return manifest, enc_key, digest


# --- public API --------------------------------------------------------------------------------------------


@explained
def backup_run(run_dir: str | Path, *, use_case: str, run_id: str, include_files: Sequence[str] = INCLUDE_FILES,
               include_dirs: Sequence[str] = INCLUDE_DIRS) -> dict:
    """Encrypt and upload a run directory's valuable files; idempotent per (use_case, run_id).

    A retry with unchanged files reuses the existing backup; otherwise the old manifest is removed first (so a
    manifest never describes a half-written archive), the archive is overwritten, and the manifest written last.
    Records the manifest digest as the latest version of this backup id (database and the run directory's
    receipt, which cleanup_run reads).
    """
    from retrain.s3 import ensure_bucket, error_code
    from retrain.s3 import client as s3_client

    started = time.monotonic()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BackupError(f"run directory {run_dir} does not exist: nothing to back up (check the run_dir passed "
                          "by the previous task)")
    backup_id = backup_id_for(use_case, run_id)
    files = select_files(run_dir, include_files, include_dirs)
    if not files:
        raise BackupError(f"nothing to back up in {run_dir}: none of {', '.join(include_files[:6])}, ... or "
                          f"{'/, '.join(include_dirs)}/ exist; run the dataset stages first")
    cfg = s3_settings()
    threads = settings.backup_int("RETRAIN_BACKUP_UPLOAD_THREADS", 4, 1, 32, BackupError)
    part_size = settings.backup_int("RETRAIN_BACKUP_PART_MB", 8, 5, 1024, BackupError) << 20
    s3 = s3_client(cfg, max_pool_connections=threads + 2)
    archive_key, manifest_key = object_keys(cfg, backup_id)
    if settings.s3_create_bucket():
        ensure_bucket(s3, cfg["bucket"], cfg["region"])

    reusable = _reusable(s3, cfg, backup_id, files)
    if reusable is not None:
        reused, digest = reusable
        versions.record(backup_id, use_case, str(run_id), digest)
        _write_receipt(run_dir, cfg, backup_id, reused, digest)
        log.info("backup %s already in %s with identical files: reused", backup_id, s3_url(cfg, archive_key))
        return _summary(cfg, reused, digest, time.monotonic() - started, reused=True)

    kms_key = settings.backup_kms_key_id()
    sse = crypto.sse_args(kms_key)
    data_key, key_record = crypto.new_data_key(cfg, backup_id, use_case)
    enc_key = crypto.chunk_key(data_key)
    mac_key = crypto.manifest_mac_key(data_key)
    del data_key
    prefix = os.urandom(7)
    header = crypto.header(CHUNK_SIZE, prefix, backup_id)
    total_plain = sum(st.st_size for _, _, st in files)
    # S3 allows 10,000 parts: grow the part size for very large archives instead of failing at part 10,001.
    estimate = int((total_plain + 2048 * (len(files) + 10)) * (1 + TAG_BYTES / CHUNK_SIZE)) + len(header)
    part_size = max(part_size, -(-estimate // 9000))
    sealed = CHUNK_SIZE + TAG_BYTES
    part_bytes = -(-part_size // sealed) * sealed  # whole chunks per part: buffers can be reused as they are

    delete_keys(s3, cfg["bucket"], [manifest_key])
    try:
        sink = MultipartSink(s3, cfg["bucket"], archive_key, part_bytes=part_bytes, first_extra=len(header),
                             threads=threads,
                             extra={**sse, "Metadata": {"retrain-backup-id": backup_id, "retrain-format": FORMAT}})
    except Exception as exc:
        code = error_code(exc)
        if sse and code in ("NotImplemented", "InvalidRequest", "InvalidArgument", "KMS.NotFoundException",
                            "KMSNotConfigured"):
            raise BackupError(
                f"the S3 server refused server-side encryption {sse['ServerSideEncryption']} ({code}): enable SSE "
                "on the server, or set RETRAIN_S3_SSE=none (the archive is still encrypted before upload)"
            ) from None
        raise
    try:
        writer = EncryptingWriter(sink, enc_key, header, prefix, CHUNK_SIZE)
        entries = write_tar(writer, files)
        plain_bytes = writer.finish()
        parts = sink.complete()
    except BaseException as exc:
        sink.abort()
        if isinstance(exc, BackupError):
            raise
        if isinstance(exc, Exception):
            hint = s3_hint(exc) or (f"{type(exc).__name__}: {str(exc)[:300]}; check the endpoint "
                                     f"({cfg['endpoint_url'] or 'AWS'}) and credentials")
            raise error_class(exc)(
                f"upload of backup {backup_id} to {s3_url(cfg, archive_key)} failed and the partial upload was "
                f"aborted: {hint}. Retrying the task is safe (it reuses the same keys)"
            ) from exc
        raise

    manifest = {
        "format": FORMAT,
        "backup_id": backup_id,
        "use_case": use_case,
        "run_id": str(run_id),
        "created_at": datetime.now(timezone.utc).isoformat(),
        "host": socket.gethostname(),
        "archive": {
            "key": archive_key,
            "bytes": sink.size,
            "sha256": sink.sha256.hexdigest(),
            "plaintext_bytes": plain_bytes,
            "cipher": "AES-256-GCM",
            "chunk_size": CHUNK_SIZE,
            "chunk_count": writer.chunks,
            "nonce_prefix": b64(prefix),
            "header_bytes": len(header),
            "parts": parts,
            "sse": sse.get("ServerSideEncryption", "none"),
        },
        "files": entries,
        "key": key_record,
    }
    manifest["mac"] = crypto.mac(manifest, mac_key)
    body = json.dumps(manifest, indent=1).encode()
    digest = versions.manifest_digest(body)
    # Pinned before the upload: once the manifest is readable, nothing older can pass for the latest version.
    versions.record(backup_id, use_case, str(run_id), digest)
    s3.put_object(Bucket=cfg["bucket"], Key=manifest_key, Body=body, ContentType="application/json", **sse)
    _write_receipt(run_dir, cfg, backup_id, manifest, digest)
    seconds = time.monotonic() - started
    log.info("backup %s: %d files, %.1f MB plaintext -> %s (%d chunks, %d parts) in %.1f s", backup_id,
             len(entries), plain_bytes / 1e6, s3_url(cfg, archive_key), writer.chunks, parts, seconds)
    return _summary(cfg, manifest, digest, seconds, reused=False)


def _summary(cfg: dict, manifest: dict, digest: str, seconds: float, *, reused: bool) -> dict:
    a = manifest["archive"]
    _, manifest_key = object_keys(cfg, manifest["backup_id"])
    return {
        "backup_id": manifest["backup_id"],
        "bucket": cfg["bucket"],
        "archive_key": a["key"],
        "manifest_key": manifest_key,
        "manifest_sha256": digest,
        "files": len(manifest["files"]),
        "bytes": sum(f["bytes"] for f in manifest["files"]),
        "ciphertext_bytes": a["bytes"],
        "sha256": a["sha256"],
        "chunks": a["chunk_count"],
        "key_method": manifest["key"]["method"],
        "key_id": manifest["key"]["key_id"],
        "sse": a.get("sse"),
        "created_at": manifest["created_at"],
        "reused": reused,
        "seconds": round(seconds, 3),
        "mb_per_s": round(a["plaintext_bytes"] / 1e6 / seconds, 1) if seconds > 0 and not reused else None,
    }


def _reusable(s3, cfg: dict, backup_id: str, files) -> tuple[dict, str] | None:
    """(existing manifest, its digest) when it already holds exactly these files (a retried task), else None."""
    from botocore.exceptions import ClientError

    _, manifest_key = object_keys(cfg, backup_id)
    try:
        manifest = json.loads(s3.get_object(Bucket=cfg["bucket"], Key=manifest_key)["Body"].read())
        head = s3.head_object(Bucket=cfg["bucket"], Key=manifest["archive"]["key"])
    except (ClientError, ValueError, KeyError, TypeError):
        return None
    try:
        old = {f["path"]: (f["bytes"], f["sha256"]) for f in manifest["files"]}
        if manifest.get("format") != FORMAT or head["ContentLength"] != manifest["archive"]["bytes"]:
            return None
    except (KeyError, TypeError):
        return None
    if sorted(old) != [rel for rel, _, _ in files] or any(old[rel][0] != st.st_size for rel, _, st in files):
        return None
    if any(old[rel][1] != sha256_file(p) for rel, p, _ in files):
        return None
    # Same files; still require that this process can open it (a rotated key means: write a fresh backup).
    # An older version put back (not the pinned one) is not reused either: a fresh backup replaces it.
    try:
        _, _, digest = _open_manifest(s3, cfg, backup_id)
    except BackupError:
        return None
    return manifest, digest


def _write_receipt(run_dir: Path, cfg: dict, backup_id: str, manifest: dict, digest: str) -> None:
    receipt = {
        "backup_id": backup_id,
        "bucket": cfg["bucket"],
        "archive_key": manifest["archive"]["key"],
        "manifest_key": object_keys(cfg, backup_id)[1],
        "manifest_sha256": digest,
        "created_at": manifest["created_at"],
        "ciphertext_sha256": manifest["archive"]["sha256"],
        "files": manifest["files"],
    }
    write_json(RunDir(run_dir).backup_receipt, receipt)


def _read_archive(backup_id: str, on_file: Callable[[str, Any, Any], str]) -> dict:
    """Download, authenticate and unpack a backup as a stream; ``on_file(path, tarinfo, fileobj)`` consumes each
    member and returns its SHA-256. Checks the archive size, every chunk, the ciphertext hash and every file hash
    against the (MAC-checked) manifest. Raises BackupError subclasses; returns a summary."""
    import tarfile

    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client
    from retrain.s3 import is_not_found

    started = time.monotonic()
    check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    cfg = s3_settings()
    s3 = s3_client(cfg)
    manifest, enc_key, digest = _open_manifest(s3, cfg, backup_id)
    a = manifest["archive"]
    try:
        resp = s3.get_object(Bucket=cfg["bucket"], Key=a["key"])
    except ClientError as exc:
        if is_not_found(exc):
            raise BackupNotFoundError(
                f"backup {backup_id} has a manifest but its archive {s3_url(cfg, a['key'])} is missing (deleted by a "
                "prune or by hand): restore another backup (list_backups)"
            ) from None
        raise
    size = int(resp["ContentLength"])
    if size != a["bytes"]:
        resp["Body"].close()
        kind = "truncated" if size < a["bytes"] else "longer than written"
        raise BackupIntegrityError(
            f"archive of backup {backup_id} is {kind}: {size} bytes in the bucket, {a['bytes']} in the manifest. "
            "Do not use it: restore another backup (list_backups) and re-run the backup of this run"
        )
    src = ObjectStream(s3, cfg["bucket"], a["key"], size, resp["ETag"], resp["Body"])
    prefix = unb64(a["nonce_prefix"], "nonce prefix")
    header = src.read(int(a["header_bytes"]))
    expected_header = crypto.header(int(a["chunk_size"]), prefix, backup_id)
    if header != expected_header:
        raise BackupIntegrityError(f"the archive header of backup {backup_id} does not match its manifest: the "
                                   "archive was replaced or modified; restore another backup (list_backups)")
    raw = DecryptingReader(src, size, header, enc_key, prefix, int(a["chunk_size"]), backup_id)
    if raw.n_chunks != a["chunk_count"]:
        raise BackupIntegrityError(f"archive of backup {backup_id} has {raw.n_chunks} chunks, the manifest "
                                   f"says {a['chunk_count']}: the object was modified")
    expected = {f["path"]: f for f in manifest["files"]}
    seen: dict[str, str] = {}
    members = MemberTree(backup_id)
    with io.BufferedReader(raw, buffer_size=1 << 20) as plain:
        try:
            with tarfile.open(fileobj=plain, mode="r|", bufsize=1 << 20) as tar:
                for member in tar:
                    name = safe_member(member, backup_id)
                    members.add(name, member.isdir())
                    if member.isdir():
                        continue
                    if name not in expected or name in seen:
                        raise BackupIntegrityError(f"archive of backup {backup_id} holds {name!r}, which its "
                                                   "manifest does not list (or twice)")
                    fobj = tar.extractfile(member)
                    seen[name] = on_file(name, member, fobj)
        except tarfile.TarError as exc:
            # Chunks authenticated, yet the tar is broken: written by a buggy or foreign producer.
            raise BackupIntegrityError(f"archive of backup {backup_id} decrypts but is not a valid tar ({exc}): "
                                       "restore another backup (list_backups)") from None
        raw.drain()
    if src.sha256.hexdigest() != a["sha256"]:
        raise BackupIntegrityError(f"SHA-256 of the archive of backup {backup_id} does not match the manifest: "
                                   "the object was modified; restore another backup (list_backups)")
    missing = sorted(set(expected) - set(seen))
    if missing:
        raise BackupIntegrityError(f"archive of backup {backup_id} lacks {', '.join(missing[:5])} listed in its "
                                   "manifest: restore another backup (list_backups)")
    bad = [n for n, h in seen.items() if h != expected[n]["sha256"]]
    if bad:
        raise BackupIntegrityError(f"SHA-256 of {', '.join(bad[:5])} in backup {backup_id} differs from the "
                                   "manifest: restore another backup (list_backups)")
    seconds = time.monotonic() - started
    return {
        "backup_id": backup_id,
        "use_case": manifest["use_case"],
        "run_id": manifest["run_id"],
        "created_at": manifest["created_at"],
        "files": len(seen),
        "bytes": sum(expected[n]["bytes"] for n in seen),
        "ciphertext_bytes": size,
        "sha256": a["sha256"],
        "manifest_sha256": digest,
        "chunks": raw.n_chunks,
        "key_method": manifest["key"]["method"],
        "key_id": manifest["key"]["key_id"],
        "seconds": round(seconds, 3),
    }


@explained
def verify_backup(backup_id: str) -> dict:
    """The restore drill: download the archive, authenticate every chunk, and check the ciphertext hash and every
    file's hash against the manifest, all in memory (no plaintext touches the disk). Raises on any mismatch."""
    result = _read_archive(backup_id, lambda name, member, fobj: hash_stream(fobj))
    result["verified"] = True
    log.info("backup %s verified: %d files, %d chunks, %.1f MB in %.1f s", result["backup_id"], result["files"],
             result["chunks"], result["ciphertext_bytes"] / 1e6, result["seconds"])
    return result


@explained
def describe_backup(backup_id: str) -> dict:
    """A quick check without downloading the archive: the manifest exists, its data key unwraps with the
    configured key, its MAC holds, it is the latest version recorded for its id, and the archive object has the
    recorded size."""
    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client

    check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    cfg = s3_settings()
    s3 = s3_client(cfg)
    manifest, _, digest = _open_manifest(s3, cfg, backup_id)
    a = manifest["archive"]
    try:
        size = s3.head_object(Bucket=cfg["bucket"], Key=a["key"])["ContentLength"]
    except ClientError:
        raise BackupNotFoundError(f"backup {backup_id} has a manifest but no archive at {s3_url(cfg, a['key'])}: "
                                  "restore another backup (list_backups)") from None
    if size != a["bytes"]:
        raise BackupIntegrityError(f"archive of backup {backup_id} is {size} bytes, the manifest says {a['bytes']}: "
                                   "it was truncated or replaced; restore another backup (list_backups)")
    return {"backup_id": backup_id, "use_case": manifest["use_case"], "run_id": manifest["run_id"],
            "created_at": manifest["created_at"], "files": len(manifest["files"]),
            "bytes": sum(f["bytes"] for f in manifest["files"]), "ciphertext_bytes": size,
            "sha256": a["sha256"], "manifest_sha256": digest, "key_method": manifest["key"]["method"],
            "key_id": manifest["key"]["key_id"]}


def default_restore_dir(backup_id: str) -> Path:
    return restore_target(backup_id, None, overwrite=True)


def check_restore(backup_id: str, target_dir: str | Path | None = None, *, overwrite: bool = False) -> dict:
    """What the restore_backup DAG checks first: the target is allowed (before any S3 request), then
    describe_backup (the manifest, key, MAC, version and archive size)."""
    target = restore_target(backup_id, target_dir, overwrite=overwrite)
    result = describe_backup(backup_id)
    result["target_dir"] = str(target)
    return result


@explained
def restore_backup(backup_id: str, target_dir: str | Path | None = None, *, overwrite: bool = False) -> dict:
    """Download, verify and unpack a backup into ``target_dir`` (default ``$RETRAIN_HOME/restores/<id>``).

    The target must lie under the restore root (``$RETRAIN_HOME/restores``, or a RETRAIN_RESTORE_ROOTS
    directory); anything else is refused before the first download. Unpacks into a hidden temporary directory
    beside the target and renames it into place only after every chunk and every hash checked out, so a failure
    leaves nothing behind. An existing non-empty target is refused unless ``overwrite`` (then it is replaced as a
    whole, not merged).
    """
    check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    target = restore_target(backup_id, target_dir, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    staging_real = staging.resolve()

    def write(name: str, member, fobj) -> str:
        dest = staging / name
        if not dest.resolve().is_relative_to(staging_real):  # belt and braces after _safe_member
            raise BackupIntegrityError(f"archive member {name!r} would land outside the restore directory")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            out = open(dest, "xb")
        except (FileExistsError, NotADirectoryError, IsADirectoryError):  # MemberTree already refuses these
            raise BackupIntegrityError(f"archive member {name!r} of backup {backup_id} conflicts with another "
                                       "member: refusing it; restore another backup (list_backups)") from None
        with out:
            digest = hash_stream(fobj, out)
        os.chmod(dest, (member.mode & 0o777) | 0o600)
        os.utime(dest, (member.mtime, member.mtime))
        return digest

    old: Path | None = None
    try:
        result = _read_archive(backup_id, write)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, old / "x")
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and (old / "x").exists() and not target.exists():
            os.rename(old / "x", target)  # put the previous contents back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    result.update(target_dir=str(target), restored=True)
    log.info("backup %s restored into %s (%d files, %.1f MB)", backup_id, target, result["files"],
             result["bytes"] / 1e6)
    return result


@explained
def list_backups(use_case: str) -> dict:
    """Backups of a use case, newest first. ``complete`` is False for an archive whose manifest is missing
    (interrupted upload); those cannot be restored."""
    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client
    from retrain.s3 import error_code

    if not USE_CASE_RE.match(use_case or ""):
        raise BackupError(f"use case {use_case!r} is not a valid name (lower_snake_case, 2-63 characters)")
    cfg = s3_settings()
    s3 = s3_client(cfg)
    base = f"{cfg['prefix']}/{use_case}/" if cfg["prefix"] else f"{use_case}/"
    groups: dict[str, dict[str, Any]] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=cfg["bucket"], Prefix=base):
            for obj in page.get("Contents", []):
                rest = obj["Key"][len(base):]
                if "/" not in rest:
                    continue
                run, name = rest.split("/", 1)
                g = groups.setdefault(run, {"keys": [], "last_modified": obj["LastModified"]})
                g["keys"].append(obj["Key"])
                g["last_modified"] = max(g["last_modified"], obj["LastModified"])
                if name == MANIFEST_NAME:
                    g["manifest"] = obj["Key"]
    except ClientError as exc:
        if error_code(exc) == "NoSuchBucket":
            return {"use_case": use_case, "bucket": cfg["bucket"], "count": 0, "backups": []}
        raise
    backups = []
    for run, g in groups.items():
        entry: dict[str, Any] = {"backup_id": f"{use_case}/{run}", "complete": False,
                                 "last_modified": g["last_modified"].isoformat(), "keys": g["keys"]}
        if "manifest" in g:
            try:
                m = json.loads(s3.get_object(Bucket=cfg["bucket"], Key=g["manifest"])["Body"].read())
                entry.update(complete=True, run_id=m["run_id"], created_at=m["created_at"], files=len(m["files"]),
                             bytes=sum(f["bytes"] for f in m["files"]), ciphertext_bytes=m["archive"]["bytes"],
                             key_id=m["key"]["key_id"])
            except (ClientError, ValueError, KeyError, TypeError):
                entry["error"] = "unreadable manifest"
        backups.append(entry)
    backups.sort(key=lambda b: b.get("created_at") or b["last_modified"], reverse=True)
    return {"use_case": use_case, "bucket": cfg["bucket"], "count": len(backups), "backups": backups}


@explained
def prune_backups(use_case: str, keep: int, *, stale_hours: float = 24.0) -> dict:
    """Retention: keep the newest ``keep`` complete backups of a use case and delete the older ones. Incomplete
    backups (no manifest) and abandoned multipart uploads older than ``stale_hours`` are removed as well; younger
    ones may belong to a backup that is running right now."""
    from retrain.s3 import client as s3_client

    if not isinstance(keep, int) or keep < 1:
        raise BackupError(f"keep={keep!r}: retention must keep at least 1 backup (deleting every backup is never "
                          "what a retention policy wants; delete by hand if you mean it)")
    listing = list_backups(use_case)
    cfg = s3_settings()
    s3 = s3_client(cfg)
    complete = [b for b in listing["backups"] if b["complete"]]
    kept, doomed = complete[:keep], complete[keep:]
    cutoff = datetime.now(timezone.utc) - timedelta(hours=stale_hours)
    stale = [b for b in listing["backups"]
             if not b["complete"] and datetime.fromisoformat(b["last_modified"]) < cutoff]
    keys = [k for b in doomed + stale for k in sorted(b["keys"], key=lambda k: not k.endswith(MANIFEST_NAME))]
    if keys:
        delete_keys(s3, cfg["bucket"], keys)
    aborted = 0
    base = f"{cfg['prefix']}/{use_case}/" if cfg["prefix"] else f"{use_case}/"
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=cfg["bucket"], Prefix=base):
        for up in page.get("Uploads", []):
            if up["Initiated"] < cutoff:
                s3.abort_multipart_upload(Bucket=cfg["bucket"], Key=up["Key"], UploadId=up["UploadId"])
                aborted += 1
    result = {"use_case": use_case, "keep": keep, "kept": [b["backup_id"] for b in kept],
              "deleted": [b["backup_id"] for b in doomed], "deleted_incomplete": [b["backup_id"] for b in stale],
              "aborted_uploads": aborted}
    log.info("retention for %s: kept %d, deleted %d (+%d incomplete, %d stale uploads)", use_case, len(kept),
             len(doomed), len(stale), aborted)
    return result


def cleanup_run(run_dir: str | Path, *, verified: bool, remove: Sequence[str] = DEFAULT_REMOVE) -> dict:
    """Delete local training data once a verified backup holds it.

    Only files that the backup receipt (``backup.json``, written by backup_run) lists with the same size and
    SHA-256 are deleted, so a file changed after the backup is kept. With ``verified=False`` nothing is deleted.
    ``remove`` holds paths or glob patterns relative to the run directory.
    """
    run_dir = Path(run_dir)
    result: dict[str, Any] = {"run_dir": str(run_dir), "removed": [], "kept": [], "bytes_freed": 0}
    if not verified:
        result["skipped"] = "the backup was not verified: nothing deleted (run verify_backup first)"
        log.warning("cleanup of %s skipped: backup not verified", run_dir)
        return result
    receipt = RunDir(run_dir).read_backup_receipt()
    if receipt is None:
        result["skipped"] = f"no {RECEIPT_NAME} in the run directory (no backup was written from it): nothing deleted"
        log.warning("cleanup of %s skipped: %s", run_dir, result["skipped"])
        return result
    result["backup_id"] = receipt["backup_id"]
    backed_up = {f["path"]: f for f in receipt["files"]}
    root = run_dir.resolve()
    for pattern in remove:
        for path in sorted(run_dir.glob(pattern)):
            if not path.is_file() or path.is_symlink() or not path.resolve().is_relative_to(root):
                continue
            rel = path.relative_to(run_dir).as_posix()
            entry = backed_up.get(rel)
            if entry is None:
                result["kept"].append({"path": rel, "reason": "not in the backup"})
                continue
            size = path.stat().st_size
            if size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                result["kept"].append({"path": rel, "reason": "changed since the backup"})
                continue
            path.unlink()
            result["removed"].append(rel)
            result["bytes_freed"] += size
    log.info("cleanup of %s: removed %s (%d bytes), kept %d", run_dir, ", ".join(result["removed"]) or "nothing",
             result["bytes_freed"], len(result["kept"]))
    return result


# --- pipeline stages (what the monthly DAG's tasks call; each takes the run directory) ---------------------


def _receipt(run_dir: str | Path) -> dict | None:
    return RunDir(run_dir).read_backup_receipt()


def backup_to_s3(run_dir: str | Path) -> dict:
    """Stage ``backup_to_s3``: encrypt and upload the run directory (see backup_run for the returned dict);
    ``{"skipped": reason}`` when backups are disabled for this use case."""
    uc, meta = load_run(run_dir)
    policy = backup_settings(uc)
    if not policy["enabled"]:
        return {"skipped": "backups are disabled (backup.enabled / RETRAIN_BACKUP_ENABLED)", "backup_id": None}
    return backup_run(run_dir, use_case=uc.name, run_id=meta["run_id"])


def drill_backup(run_dir: str | Path) -> dict:
    """Stage ``verify_backup``: the restore drill on the backup this run just wrote (its id comes from the
    receipt). Records the verified ciphertext hash in the receipt, which cleanup requires."""
    run_dir = Path(run_dir)
    receipt = _receipt(run_dir)
    if receipt is None:
        uc, _ = load_run(run_dir)
        if not backup_settings(uc)["enabled"]:
            return {"skipped": "backups are disabled", "verified": False}
        raise BackupError(f"no {RECEIPT_NAME} in {run_dir}: backup_to_s3 did not complete for this run; run it first")
    result = verify_backup(receipt["backup_id"])
    if result["sha256"] != receipt["ciphertext_sha256"]:
        raise BackupIntegrityError(
            f"backup {receipt['backup_id']} in the bucket is not the one this run wrote (ciphertext hash differs): "
            "another writer replaced it; re-run backup_to_s3"
        )
    if receipt.get("manifest_sha256") not in (None, result["manifest_sha256"]):
        raise BackupIntegrityError(
            f"backup {receipt['backup_id']} in the bucket is not the version this run wrote (manifest digest "
            "differs): another writer replaced it; re-run backup_to_s3"
        )
    receipt["drill"] = {"verified_at": datetime.now(timezone.utc).isoformat(), "sha256": result["sha256"]}
    write_json(RunDir(run_dir).backup_receipt, receipt)
    return result


def prune_stage(run_dir: str | Path) -> dict:
    """Stage ``prune_backups``: retention for this run's use case (keep the newest N)."""
    uc, _ = load_run(run_dir)
    policy = backup_settings(uc)
    if not policy["enabled"]:
        return {"skipped": "backups are disabled", "use_case": uc.name}
    return prune_backups(uc.name, policy["keep"])


def cleanup_stage(run_dir: str | Path) -> dict:
    """Stage ``cleanup``: delete local training data, only if the drill verified this run's backup and the
    bucket still holds that very archive."""
    run_dir = Path(run_dir)
    uc, meta = load_run(run_dir)
    policy = backup_settings(uc)
    if not policy["cleanup"]:
        return {"run_dir": str(run_dir), "removed": [], "kept": [], "bytes_freed": 0,
                "skipped": "cleanup is disabled (backup.cleanup / RETRAIN_BACKUP_CLEANUP)"}
    receipt = _receipt(run_dir) or {}
    drill = receipt.get("drill") or {}
    own_id = backup_id_for(uc.name, meta["run_id"])
    # A receipt copied along with a run directory describes another run's backup: it licenses nothing here.
    verified = (bool(drill) and drill.get("sha256") == receipt.get("ciphertext_sha256")
                and receipt.get("backup_id") == own_id)
    if verified:
        # The drill may be hours old (a cleared task, a paused DAG): before the local copy goes, make sure that a
        # prune or another writer has not removed or replaced the archive it verified.
        try:
            current = describe_backup(own_id)
        except BackupNotFoundError as exc:
            raise BackupNotFoundError(f"nothing deleted locally: the backup the restore drill verified is gone. "
                                      f"{exc}") from None
        if current["sha256"] != drill["sha256"]:
            raise BackupIntegrityError(
                f"backup {own_id} in the bucket is no longer the archive the restore drill verified (its ciphertext "
                "hash changed since): nothing deleted. Clear backup_to_s3 of this run to back it up and drill again"
            )
    return cleanup_run(run_dir, verified=verified, remove=policy["cleanup_files"])
