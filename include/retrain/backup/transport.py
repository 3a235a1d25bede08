"""Moving backups in and out of S3: the multipart sink, the resumable object stream, the manifest download, and
turning S3 failures a human must fix into a :class:`BackupError` that says what to do.

Uploads go out as a stream (``RETRAIN_BACKUP_PART_MB`` parts, at most ``RETRAIN_BACKUP_UPLOAD_THREADS`` in
flight), so memory stays about (threads + 1) x part size whatever the archive size.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from retrain.backup.common import (
    FORMAT,
    BackupError,
    BackupIntegrityError,
    BackupNotFoundError,
    BackupUnavailableError,
    object_keys,
    s3_url,
)

log = logging.getLogger(__name__)


def s3_settings() -> dict:
    from retrain import s3

    return s3.settings()


class MultipartSink:
    """Turns sealed chunks into multipart-upload parts with bounded, allocation-free memory.

    Every part holds a whole number of sealed chunks and is encrypted straight into one of ``threads + 1``
    reusable part buffers; a buffer returns to the pool when its upload finishes. The producer blocks when all
    buffers are busy, so memory is about (threads + 1) x part size whatever the archive size, and no large
    buffer is allocated (and page-faulted in) per part.
    """

    def __init__(self, s3, bucket: str, key: str, *, part_bytes: int, first_extra: int, threads: int,
                 extra: dict[str, Any]):
        import queue
        from concurrent.futures import ThreadPoolExecutor

        self._s3, self._bucket, self._key = s3, bucket, key
        # CRC32 per part (botocore computes it anyway) and a composite CRC32 for the object, like s3transfer;
        # without it S3 implementations default to a full-object CRC64NVME recomputed over the whole archive at
        # completion (moto spends more CPU on that than on receiving the parts).
        self._upload_id = s3.create_multipart_upload(
            Bucket=bucket, Key=key, ContentType="application/octet-stream", ChecksumAlgorithm="CRC32", **extra
        )["UploadId"]
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="backup-upload")
        self._part_bytes = part_bytes
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(threads + 1):
            self._free.put(bytearray(part_bytes))
        self._cur = bytearray(first_extra + part_bytes)  # part 1 also carries the archive header
        self._pos = 0
        self._futures: list = []
        self.sha256 = hashlib.sha256()
        self.size = 0

    def reserve(self, n: int) -> memoryview:
        """A writable view of the next n bytes of the object (n never exceeds a part)."""
        if self._pos + n > len(self._cur):
            self._submit()
        return memoryview(self._cur)[self._pos:self._pos + n]

    def commit(self, view: memoryview) -> None:
        self.sha256.update(view)
        self.size += len(view)
        self._pos += len(view)

    def write(self, data: bytes) -> None:
        view = self.reserve(len(data))
        view[:] = data
        self.commit(view)

    def _submit(self) -> None:
        self._raise_failed()
        buf, n = self._cur, self._pos
        # Parts hold whole chunks, so only the first (header) and last parts are not pool-sized.
        body = buf if n == len(buf) else bytes(memoryview(buf)[:n])
        pooled = buf if len(buf) == self._part_bytes else None
        if body is not buf and pooled is not None:
            self._free.put(pooled)
            pooled = None
        number = len(self._futures) + 1
        self._futures.append(self._pool.submit(self._upload, number, body, pooled))
        self._cur = self._free.get()  # blocks while every buffer is in flight: the memory bound
        self._pos = 0

    def _raise_failed(self) -> None:
        for fut in self._futures:  # surface a failed part now instead of after encrypting everything else
            if fut.done() and fut.exception() is not None:
                raise fut.exception()

    def _upload(self, number: int, body, pooled: bytearray | None) -> dict:
        try:
            resp = self._s3.upload_part(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                        PartNumber=number, Body=body)
            part = {"PartNumber": number, "ETag": resp["ETag"]}
            for k in ("ChecksumCRC32", "ChecksumCRC32C", "ChecksumCRC64NVME", "ChecksumSHA1", "ChecksumSHA256"):
                if resp.get(k):
                    part[k] = resp[k]
            return part
        finally:
            if pooled is not None:  # also on failure, so the producer never waits for a buffer forever
                self._free.put(pooled)

    def complete(self) -> int:
        if self._pos or not self._futures:
            self._submit()
        parts = [f.result() for f in self._futures]
        self._pool.shutdown(wait=True)
        self._s3.complete_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                                           MultipartUpload={"Parts": parts})
        return len(parts)

    def abort(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        try:
            self._s3.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=self._upload_id)
        except Exception as exc:  # best effort: prune_backups also aborts stale uploads
            log.warning("could not abort multipart upload %s: %s", self._key, exc)


class ObjectStream:
    """Sequential reader of one object that resumes with a Range request if the connection drops mid-way
    (botocore retries the request, not a body that breaks while streaming)."""

    def __init__(self, s3, bucket: str, key: str, size: int, etag: str, body):
        self._s3, self._bucket, self._key, self._size, self._etag = s3, bucket, key, size, etag
        self._body = body
        self.pos = 0
        self.sha256 = hashlib.sha256()

    def read(self, n: int) -> bytes:
        out = bytearray()
        resumes = 0
        while len(out) < n and self.pos < self._size:
            try:
                data = self._body.read(min(n - len(out), 1 << 20))
            except Exception as exc:  # urllib3/botocore streaming errors: reopen at the current offset
                resumes += 1
                if resumes > 5:
                    raise BackupError(
                        f"download of {self._key} keeps failing at byte {self.pos} ({type(exc).__name__}): check the "
                        "S3 endpoint and network, then retry"
                    ) from None
                log.warning("download of %s interrupted at byte %d (%s); resuming", self._key, self.pos, exc)
                time.sleep(min(2 ** resumes * 0.2, 5))
                self._body = self._s3.get_object(Bucket=self._bucket, Key=self._key, IfMatch=self._etag,
                                                 Range=f"bytes={self.pos}-")["Body"]
                continue
            if not data:
                break
            out += data
            self.pos += len(data)
        self.sha256.update(out)
        return bytes(out)


def get_manifest(s3, cfg: dict, backup_id: str, known: Callable[[str], list[str]]) -> tuple[dict, bytes]:
    """(parsed manifest, its raw bytes) of a backup; ``known(use_case)`` names existing backups for the message
    when there is none."""
    from botocore.exceptions import ClientError

    from retrain.s3 import is_not_found

    archive_key, manifest_key = object_keys(cfg, backup_id)
    try:
        raw = s3.get_object(Bucket=cfg["bucket"], Key=manifest_key)["Body"].read()
    except ClientError as exc:
        if not is_not_found(exc):
            raise
        try:
            s3.head_object(Bucket=cfg["bucket"], Key=archive_key)
            has_archive = True
        except ClientError:
            has_archive = False
        if has_archive:
            raise BackupNotFoundError(
                f"backup {backup_id} has no manifest ({s3_url(cfg, manifest_key)} is missing, the archive is there): "
                "the upload was interrupted or the manifest was deleted, and without it the archive cannot be "
                "decrypted (the wrapped data key lives in the manifest). Restore another backup (list_backups) or "
                "re-run backup_to_s3 for that run"
            ) from None
        use_case = backup_id.split("/", 1)[0]
        raise BackupNotFoundError(
            f"no backup {backup_id} in {s3_url(cfg, cfg['prefix'])}/ (missing manifest {manifest_key}); check the id "
            f"and the bucket (RETRAIN_S3_BUCKET={cfg['bucket']}). Newest backups of {use_case}: "
            f"{', '.join(known(use_case)[:5]) or 'none'}"
        ) from None
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise BackupIntegrityError(f"the manifest of backup {backup_id} is not valid JSON: it was modified or "
                                   "truncated; restore another backup (list_backups)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupIntegrityError(
            f"the manifest of backup {backup_id} is not a {FORMAT} manifest (format "
            f"{manifest.get('format') if isinstance(manifest, dict) else '?'!r}): it was modified or written by "
            "another tool"
        )
    if manifest.get("backup_id") != backup_id:
        raise BackupIntegrityError(f"the manifest at {manifest_key} describes backup {manifest.get('backup_id')!r}, "
                                   f"not {backup_id}: it was copied from another backup")
    return manifest, raw


def delete_keys(s3, bucket: str, keys: Iterable[str]) -> None:
    keys = list(keys)
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        resp = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            e = errors[0]
            raise BackupError(f"could not delete s3://{bucket}/{e.get('Key')} ({e.get('Code')}: {e.get('Message')}); "
                              "check that the credentials may delete objects in the bucket")


# --- explaining S3 failures ----------------------------------------------------------------------------------

_TRANSIENT = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError")


def s3_hint(exc: BaseException) -> str | None:
    """A what-to-do message for S3 problems a human must fix (None: not one we can explain)."""
    from retrain.s3 import error_code

    name = type(exc).__name__
    cfg_hint = "RETRAIN_S3_ENDPOINT_URL / the Airflow connection 'retrain_s3'"
    if name in _TRANSIENT:
        return (f"cannot reach the S3 endpoint ({exc}) even after retrying: check that the server is up and "
                f"{cfg_hint}, then retry")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return ("no S3 credentials: set login/password of the Airflow connection 'retrain_s3' or "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    code = error_code(exc)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"):
        return (f"S3 refused the request ({code}): check the credentials in {cfg_hint} and that they may read, "
                "write and delete under the backup prefix")
    if code == "NoSuchBucket":
        return ("the backup bucket does not exist: create it, or set RETRAIN_S3_BUCKET to an existing bucket "
                "(backup_run creates it unless RETRAIN_S3_CREATE_BUCKET=0)")
    return None


def error_class(exc: BaseException) -> type[BackupError]:
    return BackupUnavailableError if type(exc).__name__ in _TRANSIENT else BackupError


def explained(fn):
    """Turn S3 failures a human must fix into a BackupError saying what to do (others propagate unchanged)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackupError:
            raise
        except Exception as exc:
            hint = s3_hint(exc)
            if hint is None:
                raise
            raise error_class(exc)(hint) from exc

    return wrapper
