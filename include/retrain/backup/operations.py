"""Encrypted backups of run directories to S3: backup, restore drill, restore, retention, local cleanup.

Layout in the bucket (``s3://$RETRAIN_S3_BUCKET/$RETRAIN_S3_PREFIX/``)::

    <use_case>/<run>/archive.tar.enc   header + AES-256-GCM chunks of a tar of the run's valuable files
    <use_case>/<run>/manifest.json     what is inside, hashes, and the wrapped data key (written last)

The backup id is ``<use_case>/<run>`` (run = the run id made path-safe), so a retried task writes the same keys.

Envelope encryption: every backup gets a fresh 256-bit data key. From it HKDF derives the chunk key and the
manifest MAC key. The tar stream is cut into fixed-size chunks, each sealed with AES-256-GCM under a nonce built
from a random per-backup prefix and the chunk counter; the associated data binds the archive header (format,
chunk size, nonce prefix, backup id), the chunk index and a final-chunk flag, so a modified, reordered, dropped or
truncated chunk fails authentication. The data key is wrapped either by a local master key (AES-256-GCM, from the
Airflow connection ``retrain_backup_key`` password or ``RETRAIN_BACKUP_MASTER_KEY``: 32 bytes as base64 or hex;
several comma-separated keys = rotation, the first wraps new backups) or by AWS KMS GenerateDataKey/Decrypt when
``RETRAIN_BACKUP_KMS_KEY_ID`` is set. S3 server-side encryption is requested as well (``RETRAIN_S3_SSE``:
auto|AES256|aws:kms|none). No key, plain or wrapped-by-nothing, is ever logged or returned.

Memory stays bounded whatever the file sizes: the archive is produced, encrypted and uploaded as a stream
(``RETRAIN_BACKUP_PART_MB`` parts, default 8, at most ``RETRAIN_BACKUP_UPLOAD_THREADS`` in flight, default 4),
and restore decrypts and unpacks chunk by chunk.

Every function returns a small JSON-able dict. Problems a human must fix raise :class:`BackupError` subclasses
whose message names the problem and the next step.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

FORMAT = "retrain-backup/1"
MAGIC = b"RTRNBAK1"
TAG_BYTES = 16
CHUNK_SIZE = 1 << 20  # 1 MiB of plaintext per GCM chunk: small enough to stream, large enough to be cheap
ARCHIVE_NAME = "archive.tar.enc"
MANIFEST_NAME = "manifest.json"
RECEIPT_NAME = "backup.json"  # local receipt in the run directory, used by cleanup_run
KEY_CONN_ID = "retrain_backup_key"

# What a run directory is worth keeping. Checkpoints and TensorBoard logs are large and reproducible.
INCLUDE_FILES = (
    "train.jsonl", "val.jsonl", "test.jsonl", "rejected.jsonl", "batch.jsonl", "manifest.json", "run_config.json",
    "decision.json", "validation.json", "collect.json", "summary.json",
)
INCLUDE_DIRS = ("candidate", "evaluation")
EXCLUDE_DIRS = ("candidate/checkpoints", "candidate/tb")
# Removed locally after a verified backup: the raw batch and the rejected rows (scrubbed, but still production
# text) and the split files (the frozen test set lives in the dataset_examples table, not in old run dirs).
DEFAULT_REMOVE = ("batch.jsonl", "rejected.jsonl", "train.jsonl", "val.jsonl", "test.jsonl")

_USE_CASE = re.compile(r"^[a-z][a-z0-9_]{1,62}$")
_RUN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HEADER = struct.Struct(">8sBI7sH")  # magic, version, chunk size, nonce prefix, backup id length


class BackupError(RuntimeError):
    """A backup or restore cannot proceed; the message names the problem and what to do."""


class BackupNotFoundError(BackupError):
    """The backup (or its manifest) does not exist."""


class BackupIntegrityError(BackupError):
    """The stored backup does not match what was written: modified, truncated or mixed up."""


class BackupKeyError(BackupError):
    """The data key cannot be unwrapped with the configured master key / KMS key."""


class BackupUnavailableError(BackupError):
    """S3 could not be reached even after retrying: the one backup error worth retrying later."""


# --- ids and keys ------------------------------------------------------------------------------------------


def backup_id_for(use_case: str, run_id: str) -> str:
    if not _USE_CASE.match(use_case or ""):
        raise BackupError(f"use case {use_case!r} is not a valid name (lower_snake_case, 2-63 characters)")
    run = _UNSAFE.sub("_", str(run_id)).strip("._") or "run"
    return f"{use_case}/{run[:200]}"


def _check_backup_id(backup_id: str) -> tuple[str, str]:
    parts = str(backup_id).strip().strip("/").split("/")
    if len(parts) != 2 or not _USE_CASE.match(parts[0]) or not _RUN.match(parts[1]):
        raise BackupError(
            f"backup id {backup_id!r} is malformed: it looks like '<use_case>/<run>', e.g. "
            "'product_intent/manual__2026-01-01T00_00_00_00_00' (list them with list_backups / `retrain backup list`)"
        )
    return parts[0], parts[1]


def _keys(cfg: dict, backup_id: str) -> tuple[str, str]:
    base = f"{cfg['prefix']}/{backup_id}" if cfg["prefix"] else backup_id
    return f"{base}/{ARCHIVE_NAME}", f"{base}/{MANIFEST_NAME}"


def _url(cfg: dict, key: str) -> str:
    return f"s3://{cfg['bucket']}/{key}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise BackupIntegrityError(f"the manifest's {what} is not valid base64: the manifest was modified") from None


def _hkdf(data_key: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)


def _parse_master_key(text: str, source: str) -> bytes:
    text = text.strip()
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raw = bytes.fromhex(text)
    else:
        for decode in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decode(text + "=" * (-len(text) % 4))
                break
            except (binascii.Error, ValueError):
                continue
    if raw is None or len(raw) != 32:
        raise BackupKeyError(
            f"the backup master key from {source} is not 32 bytes as base64 or 64 hex characters; generate one with "
            "`python -c \"import base64, os; print(base64.b64encode(os.urandom(32)).decode())\"` and keep it safe: "
            "backups cannot be restored without it"
        )
    return raw


def _key_id(master: bytes) -> str:
    # A fingerprint to tell keys apart in error messages; an HMAC output reveals nothing about the key.
    return "local:" + hmac.new(master, b"retrain-backup key id", hashlib.sha256).hexdigest()[:16]


_PLAINTEXT = re.compile(r'("Plaintext"\s*:\s*")[^"]*(")')


class _RedactKmsPlaintext(logging.Filter):
    """botocore logs every response body at DEBUG, and a KMS GenerateDataKey/Decrypt body holds the plaintext
    data key: a worker with DEBUG logging would write every backup's key into its task logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to break
            return True
        if "Plaintext" in msg:
            record.msg, record.args = _PLAINTEXT.sub(r"\1***\2", msg), ()
        return True


_redactor = _RedactKmsPlaintext()


def _kms(cfg: dict):
    from retrain.s3 import kms_client

    parsers = logging.getLogger("botocore.parsers")
    if _redactor not in parsers.filters:
        parsers.addFilter(_redactor)
    return kms_client(cfg)


def _mask(*secrets: str) -> None:
    """Register key material with Airflow's log masker when running inside a task (no-op elsewhere: importing
    Airflow just for this would slow the CLI and the benchmark down)."""
    import sys

    if "airflow.sdk.execution_time.task_runner" not in sys.modules:
        return
    try:
        from airflow.sdk.log import mask_secret

        for secret in secrets:
            if secret:
                mask_secret(secret)
    except Exception as exc:  # noqa: BLE001 - masking is defence in depth; nothing logs keys in the first place
        log.debug("could not register backup key material with the Airflow log masker: %s", type(exc).__name__)


def _master_keys() -> tuple[list[tuple[str, bytes]], str]:
    """[(key id, key)] with the key that wraps new backups first, and where they came from."""
    texts: list[tuple[str, str]] = []
    conn_id = os.environ.get("RETRAIN_BACKUP_KEY_CONN_ID", KEY_CONN_ID).strip()
    from retrain.s3 import _airflow_connection

    conn = _airflow_connection(conn_id)
    if conn is not None and conn.password:
        texts.append((conn.password, f"the password of Airflow connection '{conn_id}'"))
    env = os.environ.get("RETRAIN_BACKUP_MASTER_KEY", "")
    if env.strip():
        texts.append((env, "RETRAIN_BACKUP_MASTER_KEY"))
    keys: list[tuple[str, bytes]] = []
    for text, source in texts:
        for part in re.split(r"[,\s]+", text.strip()):
            if part:
                _mask(part)
                key = _parse_master_key(part, source)
                keys.append((_key_id(key), key))
    return keys, (texts[0][1] if texts else "")


def _kms_key_id() -> str | None:
    return os.environ.get("RETRAIN_BACKUP_KMS_KEY_ID", "").strip() or None


_NO_KEY = (
    "no backup encryption key is configured: set RETRAIN_BACKUP_MASTER_KEY to 32 random bytes as base64 (generate "
    "with `python -c \"import base64, os; print(base64.b64encode(os.urandom(32)).decode())\"`), or put it in the "
    "password of the Airflow connection 'retrain_backup_key', or set RETRAIN_BACKUP_KMS_KEY_ID to use AWS KMS"
)


def _wrap_aad(backup_id: str) -> bytes:
    return b"retrain-backup/1 data key|" + backup_id.encode()


def _new_data_key(cfg: dict, backup_id: str, use_case: str) -> tuple[bytes, dict]:
    """(plaintext data key, key record for the manifest). The record holds only the wrapped key."""
    kms_key = _kms_key_id()
    if kms_key:
        from retrain.s3 import error_code

        context = {"retrain:backup_id": backup_id, "retrain:use_case": use_case}
        try:
            resp = _kms(cfg).generate_data_key(KeyId=kms_key, KeySpec="AES_256", EncryptionContext=context)
        except Exception as exc:
            raise BackupKeyError(
                f"AWS KMS GenerateDataKey with key {kms_key!r} failed ({error_code(exc) or type(exc).__name__}): check "
                "RETRAIN_BACKUP_KMS_KEY_ID, that the key is enabled and that these credentials may use it"
            ) from None
        _mask(_b64(resp["Plaintext"]))
        return resp["Plaintext"], {"method": "aws-kms", "key_id": resp["KeyId"],
                                   "wrapped_key": _b64(resp["CiphertextBlob"]), "encryption_context": context}
    keys, _ = _master_keys()
    if not keys:
        raise BackupKeyError(_NO_KEY)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key_id, master = keys[0]
    data_key = os.urandom(32)
    _mask(_b64(data_key))
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(master).encrypt(nonce, data_key, _wrap_aad(backup_id))
    return data_key, {"method": "aes-256-gcm", "key_id": key_id, "wrapped_key": _b64(wrapped)}


def _unwrap_data_key(cfg: dict, record: dict, backup_id: str) -> bytes:
    method = record.get("method")
    wrapped = _unb64(str(record.get("wrapped_key", "")), "wrapped key")
    if method == "aws-kms":
        from retrain.s3 import error_code

        try:
            resp = _kms(cfg).decrypt(CiphertextBlob=wrapped, KeyId=record["key_id"],
                                     EncryptionContext=record.get("encryption_context") or {})
        except Exception as exc:
            raise BackupKeyError(
                f"AWS KMS could not decrypt the data key of backup {backup_id} "
                f"({error_code(exc) or type(exc).__name__}); it was wrapped with KMS key {record.get('key_id')}: use "
                "credentials allowed to decrypt with that key (and check it is not disabled or scheduled for deletion)"
            ) from None
        key = resp["Plaintext"]
        _mask(_b64(key))
        if len(key) != 32:
            raise BackupIntegrityError(f"KMS returned a {len(key)}-byte data key for backup {backup_id}, expected 32")
        return key
    if method != "aes-256-gcm":
        raise BackupIntegrityError(f"backup {backup_id} uses an unknown key method {method!r}: the manifest is "
                                   "corrupt or from a newer version of this tool")
    keys, source = _master_keys()
    if not keys:
        raise BackupKeyError(_NO_KEY.replace("is configured", "is configured to restore with"))
    wanted = record.get("key_id")
    match = [k for kid, k in keys if kid == wanted]
    if not match:
        have = ", ".join(kid for kid, _ in keys)
        raise BackupKeyError(
            f"wrong master key: backup {backup_id} was encrypted under master key {wanted}, but {source} holds "
            f"{have}. Set RETRAIN_BACKUP_MASTER_KEY (or the connection 'retrain_backup_key') to the key that was "
            "active when the backup was made; after a rotation list the old key after the new one, comma-separated"
        )
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(wrapped) != 12 + 32 + TAG_BYTES:
        raise BackupIntegrityError(f"the wrapped data key of backup {backup_id} has the wrong length: the manifest "
                                   "was modified; restore another backup (list_backups)")
    try:
        key = AESGCM(match[0]).decrypt(wrapped[:12], wrapped[12:], _wrap_aad(backup_id))
    except InvalidTag:
        raise BackupIntegrityError(
            f"the wrapped data key of backup {backup_id} failed authentication although the master key id matches: "
            "the manifest was modified or copied from another backup; restore another backup (list_backups)"
        ) from None
    _mask(_b64(key))
    return key


def _sse_args(kms_key: str | None) -> dict[str, str]:
    mode = os.environ.get("RETRAIN_S3_SSE", "auto").strip() or "auto"
    if mode.lower() == "none":
        return {}
    if mode == "auto":
        mode = "aws:kms" if kms_key else "AES256"
    if mode == "AES256":
        return {"ServerSideEncryption": "AES256"}
    if mode == "aws:kms":
        return {"ServerSideEncryption": "aws:kms", **({"SSEKMSKeyId": kms_key} if kms_key else {})}
    raise BackupError(f"RETRAIN_S3_SSE={mode!r} is not supported; use auto, AES256, aws:kms or none")


def _mac(manifest: dict, mac_key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(mac_key, canonical, hashlib.sha256).hexdigest()


def _header(chunk_size: int, prefix: bytes, backup_id: str) -> bytes:
    bid = backup_id.encode()
    return _HEADER.pack(MAGIC, 1, chunk_size, prefix, len(bid)) + bid


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    # STREAM-style nonce: prefix(7) | counter(4) | last-flag(1); unique per chunk under a per-backup key.
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


def _int_env(name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = -1
    if not lo <= value <= hi:
        raise BackupError(f"{name}={raw!r} must be an integer between {lo} and {hi}")
    return value


# --- choosing files ----------------------------------------------------------------------------------------


def select_files(run_dir: str | Path, include_files: Sequence[str] = INCLUDE_FILES,
                 include_dirs: Sequence[str] = INCLUDE_DIRS) -> list[tuple[str, Path, os.stat_result]]:
    """(relative posix path, absolute path, stat) of the files a backup takes, sorted; symlinks are skipped
    (they could point outside the run directory)."""
    root = Path(run_dir)
    picked: dict[str, tuple[Path, os.stat_result]] = {}
    for name in include_files:
        p = root / name
        if p.is_file() and not p.is_symlink():
            picked[name] = (p, p.stat())
    for d in include_dirs:
        base = root / d
        if not base.is_dir() or base.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            # A crashed training attempt leaves adapter.tmp/ or merged.tmp/ behind: not worth keeping.
            dirnames[:] = sorted(n for n in dirnames if f"{rel_dir}/{n}" not in EXCLUDE_DIRS
                                 and not n.endswith((".tmp", ".partial"))
                                 and not (Path(dirpath) / n).is_symlink())
            for n in filenames:
                p = Path(dirpath) / n
                if p.is_symlink() or not p.is_file() or n.endswith((".tmp", ".partial")):
                    continue
                picked[f"{rel_dir}/{n}"] = (p, p.stat())
    return [(rel, p, st) for rel, (p, st) in sorted(picked.items())]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --- upload side -------------------------------------------------------------------------------------------


class _MultipartSink:
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


class _EncryptingWriter:
    """Plaintext sink: stages CHUNK_SIZE bytes at a time in one reused buffer and seals each chunk with
    AES-256-GCM directly into the sink's part buffer (encrypt_into: no per-chunk allocation)."""

    def __init__(self, sink, enc_key: bytes, header: bytes, prefix: bytes, chunk_size: int):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(enc_key)
        self._sink, self._header, self._prefix, self._cs = sink, header, prefix, chunk_size
        self._chunk = bytearray(chunk_size)
        self._view = memoryview(self._chunk)
        self._fill = 0
        self._pos = 0
        self.chunks = 0
        sink.write(header)

    def write(self, data) -> int:
        src = memoryview(data).cast("B")
        n, off = len(src), 0
        while off < n:
            # A full chunk is sealed only once more data arrives: only finish() knows which chunk is the last.
            if self._fill == self._cs:
                self._seal(final=False)
            take = min(self._cs - self._fill, n - off)
            self._view[self._fill:self._fill + take] = src[off:off + take]
            self._fill += take
            off += take
        self._pos += n
        return n

    def _seal(self, final: bool) -> None:
        i, n = self.chunks, self._fill
        out = self._sink.reserve(n + TAG_BYTES)
        self._aead.encrypt_into(_nonce(self._prefix, i, final), self._view[:n], _aad(self._header, i, final), out)
        self._sink.commit(out)
        self.chunks += 1
        self._fill = 0

    def tell(self) -> int:
        return self._pos

    def finish(self) -> int:
        self._seal(final=True)
        return self._pos


_BLOCK = 512
_RECORD = 20 * _BLOCK  # what tar(1) pads an archive to


def _write_tar(writer: _EncryptingWriter, files) -> list[dict]:
    """Stream a POSIX (pax) tar of ``files`` into ``writer``, hashing each file as it is read. Written by hand
    (headers from tarfile) so file data moves through one reused 1 MiB buffer instead of a new bytes per read."""
    import tarfile

    buf = bytearray(1 << 20)
    view = memoryview(buf)
    entries: list[dict] = []
    for rel, path, st in files:
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o777
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        writer.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        sha = hashlib.sha256()
        left = st.st_size
        with open(path, "rb", buffering=0) as fh:
            while left:
                got = fh.readinto(view[:min(left, len(buf))])
                if not got:
                    raise BackupError(f"{path} shrank while it was being backed up: make sure no task still writes "
                                      "to the run directory, then retry")
                sha.update(view[:got])
                writer.write(view[:got])
                left -= got
        if st.st_size % _BLOCK:
            writer.write(bytes(_BLOCK - st.st_size % _BLOCK))
        entries.append({"path": rel, "bytes": st.st_size, "sha256": sha.hexdigest()})
    end = 2 * _BLOCK
    end += (-(writer.tell() + end)) % _RECORD
    writer.write(bytes(end))
    return entries


# --- download side -----------------------------------------------------------------------------------------


class _ObjectStream:
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


class _DecryptingReader(io.RawIOBase):
    """Plaintext of an archive, authenticated chunk by chunk; raises BackupIntegrityError at the first bad chunk."""

    def __init__(self, src, total: int, header: bytes, enc_key: bytes, prefix: bytes, chunk_size: int,
                 backup_id: str):
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        super().__init__()
        self._src, self._header, self._prefix, self._cs, self._bid = src, header, prefix, chunk_size, backup_id
        self._aead = AESGCM(enc_key)
        body = total - len(header)
        step = chunk_size + TAG_BYTES
        self.n_chunks = max(1, -(-body // step))
        last = body - (self.n_chunks - 1) * step
        if body < TAG_BYTES or last < TAG_BYTES:
            raise BackupIntegrityError(
                f"archive of backup {backup_id} is truncated ({total} bytes cannot hold whole chunks): restore "
                "another backup (list_backups) and re-run the backup of this run"
            )
        self._last_len = last
        self._index = 0
        self._plain = memoryview(b"")
        self.plain_bytes = 0

    def readable(self) -> bool:
        return True

    def _next_chunk(self) -> bool:
        from cryptography.exceptions import InvalidTag

        if self._index >= self.n_chunks:
            return False
        i = self._index
        final = i == self.n_chunks - 1
        want = self._last_len if final else self._cs + TAG_BYTES
        sealed = self._src.read(want)
        if len(sealed) != want:
            raise BackupIntegrityError(
                f"archive of backup {self._bid} ended early in chunk {i + 1} of {self.n_chunks}: the object is "
                "truncated; restore another backup (list_backups) and re-run the backup of this run"
            )
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, i, final), sealed, _aad(self._header, i, final))
        except InvalidTag:
            where = "the last chunk" if final else f"chunk {i + 1} of {self.n_chunks}"
            why = ("the archive was truncated or modified" if final else "the archive was modified after upload "
                   "(or chunks were reordered)")
            raise BackupIntegrityError(
                f"{where} of backup {self._bid} failed authentication: {why}. Do not use this backup: restore an "
                "older one (list_backups) and check who can write to the bucket"
            ) from None
        self._index += 1
        self._plain = memoryview(plain)
        self.plain_bytes += len(plain)
        return True

    def readinto(self, b) -> int:
        while not len(self._plain):
            if not self._next_chunk():
                return 0
        n = min(len(b), len(self._plain))
        b[:n] = self._plain[:n]
        self._plain = self._plain[n:]
        return n

    def drain(self) -> None:
        """Read (and authenticate) everything that is left, e.g. the tar padding after the end marker."""
        self._plain = memoryview(b"")
        while self._next_chunk():
            self._plain = memoryview(b"")


# --- S3 helpers --------------------------------------------------------------------------------------------


def _settings() -> dict:
    from retrain.s3 import settings

    return settings()


def _get_manifest(s3, cfg: dict, backup_id: str) -> dict:
    from botocore.exceptions import ClientError

    from retrain.s3 import is_not_found

    archive_key, manifest_key = _keys(cfg, backup_id)
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
                f"backup {backup_id} has no manifest ({_url(cfg, manifest_key)} is missing, the archive is there): "
                "the upload was interrupted or the manifest was deleted, and without it the archive cannot be "
                "decrypted (the wrapped data key lives in the manifest). Restore another backup (list_backups) or "
                "re-run backup_to_s3 for that run"
            ) from None
        use_case = backup_id.split("/", 1)[0]
        known = [b["backup_id"] for b in list_backups(use_case).get("backups", []) if b.get("complete")][:5]
        raise BackupNotFoundError(
            f"no backup {backup_id} in {_url(cfg, cfg['prefix'])}/ (missing manifest {manifest_key}); check the id "
            f"and the bucket (RETRAIN_S3_BUCKET={cfg['bucket']}). Newest backups of {use_case}: "
            f"{', '.join(known) or 'none'}"
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
    return manifest


def _open_manifest(s3, cfg: dict, backup_id: str) -> tuple[dict, bytes, bytes]:
    """(manifest, chunk key, mac key) after unwrapping the data key and checking the manifest's MAC."""
    manifest = _get_manifest(s3, cfg, backup_id)
    data_key = _unwrap_data_key(cfg, manifest.get("key") or {}, backup_id)
    enc_key = _hkdf(data_key, b"retrain-backup/1 chunks")
    mac_key = _hkdf(data_key, b"retrain-backup/1 manifest")
    if not hmac.compare_digest(str(manifest.get("mac", "")), _mac(manifest, mac_key)):
        raise BackupIntegrityError(
            f"the manifest of backup {backup_id} was modified after the backup was written (its MAC does not "
            "match): do not trust this backup; restore an older one (list_backups)"
        )
    return manifest, enc_key, mac_key


def _s3_hint(exc: BaseException) -> str | None:
    """A what-to-do message for S3 problems a human must fix (None: not one we can explain)."""
    from retrain.s3 import error_code

    name = type(exc).__name__
    cfg_hint = "RETRAIN_S3_ENDPOINT_URL / the Airflow connection 'retrain_s3'"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"):
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


def _error_class(exc: BaseException) -> type[BackupError]:
    transient = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError")
    return BackupUnavailableError if type(exc).__name__ in transient else BackupError


def _explained(fn):
    """Turn S3 failures a human must fix into a BackupError saying what to do (others propagate unchanged)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackupError:
            raise
        except Exception as exc:
            hint = _s3_hint(exc)
            if hint is None:
                raise
            raise _error_class(exc)(hint) from exc

    return wrapper


# --- public API --------------------------------------------------------------------------------------------


@_explained
def backup_run(run_dir: str | Path, *, use_case: str, run_id: str, include_files: Sequence[str] = INCLUDE_FILES,
               include_dirs: Sequence[str] = INCLUDE_DIRS) -> dict:
    """Encrypt and upload a run directory's valuable files; idempotent per (use_case, run_id).

    A retry with unchanged files reuses the existing backup; otherwise the old manifest is removed first (so a
    manifest never describes a half-written archive), the archive is overwritten, and the manifest written last.
    Writes a receipt ``backup.json`` into the run directory for cleanup_run.
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
    cfg = _settings()
    threads = _int_env("RETRAIN_BACKUP_UPLOAD_THREADS", 4, 1, 32)
    part_size = _int_env("RETRAIN_BACKUP_PART_MB", 8, 5, 1024) << 20
    s3 = s3_client(cfg, max_pool_connections=threads + 2)
    archive_key, manifest_key = _keys(cfg, backup_id)
    if os.environ.get("RETRAIN_S3_CREATE_BUCKET", "1").strip().lower() not in ("0", "false", "no"):
        ensure_bucket(s3, cfg["bucket"], cfg["region"])

    reused = _reusable(s3, cfg, backup_id, files)
    if reused is not None:
        _write_receipt(run_dir, cfg, backup_id, reused)
        log.info("backup %s already in %s with identical files: reused", backup_id, _url(cfg, archive_key))
        return _summary(cfg, reused, time.monotonic() - started, reused=True)

    kms_key = _kms_key_id()
    sse = _sse_args(kms_key)
    data_key, key_record = _new_data_key(cfg, backup_id, use_case)
    enc_key = _hkdf(data_key, b"retrain-backup/1 chunks")
    mac_key = _hkdf(data_key, b"retrain-backup/1 manifest")
    del data_key
    prefix = os.urandom(7)
    header = _header(CHUNK_SIZE, prefix, backup_id)
    total_plain = sum(st.st_size for _, _, st in files)
    # S3 allows 10,000 parts: grow the part size for very large archives instead of failing at part 10,001.
    estimate = int((total_plain + 2048 * (len(files) + 10)) * (1 + TAG_BYTES / CHUNK_SIZE)) + len(header)
    part_size = max(part_size, -(-estimate // 9000))
    sealed = CHUNK_SIZE + TAG_BYTES
    part_bytes = -(-part_size // sealed) * sealed  # whole chunks per part: buffers can be reused as they are

    _delete_keys(s3, cfg["bucket"], [manifest_key])
    try:
        sink = _MultipartSink(s3, cfg["bucket"], archive_key, part_bytes=part_bytes, first_extra=len(header),
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
        writer = _EncryptingWriter(sink, enc_key, header, prefix, CHUNK_SIZE)
        entries = _write_tar(writer, files)
        plain_bytes = writer.finish()
        parts = sink.complete()
    except BaseException as exc:
        sink.abort()
        if isinstance(exc, BackupError):
            raise
        if isinstance(exc, Exception):
            hint = _s3_hint(exc) or (f"{type(exc).__name__}: {str(exc)[:300]}; check the endpoint "
                                     f"({cfg['endpoint_url'] or 'AWS'}) and credentials")
            raise _error_class(exc)(
                f"upload of backup {backup_id} to {_url(cfg, archive_key)} failed and the partial upload was "
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
            "nonce_prefix": _b64(prefix),
            "header_bytes": len(header),
            "parts": parts,
            "sse": sse.get("ServerSideEncryption", "none"),
        },
        "files": entries,
        "key": key_record,
    }
    manifest["mac"] = _mac(manifest, mac_key)
    s3.put_object(Bucket=cfg["bucket"], Key=manifest_key, Body=json.dumps(manifest, indent=1).encode(),
                  ContentType="application/json", **sse)
    _write_receipt(run_dir, cfg, backup_id, manifest)
    seconds = time.monotonic() - started
    log.info("backup %s: %d files, %.1f MB plaintext -> %s (%d chunks, %d parts) in %.1f s", backup_id,
             len(entries), plain_bytes / 1e6, _url(cfg, archive_key), writer.chunks, parts, seconds)
    return _summary(cfg, manifest, seconds, reused=False)


def _summary(cfg: dict, manifest: dict, seconds: float, *, reused: bool) -> dict:
    a = manifest["archive"]
    _, manifest_key = _keys(cfg, manifest["backup_id"])
    return {
        "backup_id": manifest["backup_id"],
        "bucket": cfg["bucket"],
        "archive_key": a["key"],
        "manifest_key": manifest_key,
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


def _reusable(s3, cfg: dict, backup_id: str, files) -> dict | None:
    """The existing manifest when it already holds exactly these files (a retried task), else None."""
    from botocore.exceptions import ClientError

    _, manifest_key = _keys(cfg, backup_id)
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
    if any(old[rel][1] != _sha256_file(p) for rel, p, _ in files):
        return None
    # Same files; still require that this process can open it (a rotated key means: write a fresh backup).
    try:
        _open_manifest(s3, cfg, backup_id)
    except BackupError:
        return None
    return manifest


def _write_receipt(run_dir: Path, cfg: dict, backup_id: str, manifest: dict) -> None:
    receipt = {
        "backup_id": backup_id,
        "bucket": cfg["bucket"],
        "archive_key": manifest["archive"]["key"],
        "manifest_key": _keys(cfg, backup_id)[1],
        "created_at": manifest["created_at"],
        "ciphertext_sha256": manifest["archive"]["sha256"],
        "files": manifest["files"],
    }
    tmp = run_dir / (RECEIPT_NAME + ".tmp")
    tmp.write_text(json.dumps(receipt, indent=2))
    tmp.replace(run_dir / RECEIPT_NAME)


def _delete_keys(s3, bucket: str, keys: Iterable[str]) -> None:
    keys = list(keys)
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        resp = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            e = errors[0]
            raise BackupError(f"could not delete s3://{bucket}/{e.get('Key')} ({e.get('Code')}: {e.get('Message')}); "
                              "check that the credentials may delete objects in the bucket")


def _read_archive(backup_id: str, on_file: Callable[[str, Any, Any], str]) -> dict:
    """Download, authenticate and unpack a backup as a stream; ``on_file(path, tarinfo, fileobj)`` consumes each
    member and returns its SHA-256. Checks the archive size, every chunk, the ciphertext hash and every file hash
    against the (MAC-checked) manifest. Raises BackupError subclasses; returns a summary."""
    import tarfile

    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client
    from retrain.s3 import is_not_found

    started = time.monotonic()
    _check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    cfg = _settings()
    s3 = s3_client(cfg)
    manifest, enc_key, _ = _open_manifest(s3, cfg, backup_id)
    a = manifest["archive"]
    try:
        resp = s3.get_object(Bucket=cfg["bucket"], Key=a["key"])
    except ClientError as exc:
        if is_not_found(exc):
            raise BackupNotFoundError(
                f"backup {backup_id} has a manifest but its archive {_url(cfg, a['key'])} is missing (deleted by a "
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
    src = _ObjectStream(s3, cfg["bucket"], a["key"], size, resp["ETag"], resp["Body"])
    prefix = _unb64(a["nonce_prefix"], "nonce prefix")
    header = src.read(int(a["header_bytes"]))
    expected_header = _header(int(a["chunk_size"]), prefix, backup_id)
    if header != expected_header:
        raise BackupIntegrityError(f"the archive header of backup {backup_id} does not match its manifest: the "
                                   "archive was replaced or modified; restore another backup (list_backups)")
    raw = _DecryptingReader(src, size, header, enc_key, prefix, int(a["chunk_size"]), backup_id)
    if raw.n_chunks != a["chunk_count"]:
        raise BackupIntegrityError(f"archive of backup {backup_id} has {raw.n_chunks} chunks, the manifest "
                                   f"says {a['chunk_count']}: the object was modified")
    expected = {f["path"]: f for f in manifest["files"]}
    seen: dict[str, str] = {}
    with io.BufferedReader(raw, buffer_size=1 << 20) as plain:
        try:
            with tarfile.open(fileobj=plain, mode="r|", bufsize=1 << 20) as tar:
                for member in tar:
                    name = _safe_member(member, backup_id)
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
        "chunks": raw.n_chunks,
        "key_method": manifest["key"]["method"],
        "key_id": manifest["key"]["key_id"],
        "seconds": round(seconds, 3),
    }


def _safe_member(member, backup_id: str) -> str:
    """The member's normalised relative path; refuses links, devices and paths that leave the target."""
    name = member.name
    p = PurePosixPath(name)
    if (not name or "\\" in name or "\x00" in name or p.is_absolute() or ".." in p.parts
            or (p.parts and p.parts[0] in ("", "."))):
        raise BackupIntegrityError(f"archive of backup {backup_id} holds an unsafe path {name!r} (absolute or "
                                   "with '..'): refusing to unpack it")
    if not (member.isreg() or member.isdir()):
        raise BackupIntegrityError(f"archive of backup {backup_id} holds {name!r} of a type a backup never "
                                   "contains (link or device): refusing to unpack it")
    return p.as_posix()


def _hash_only(name: str, member, fobj) -> str:
    h = hashlib.sha256()
    while block := fobj.read(1 << 20):
        h.update(block)
    return h.hexdigest()


@_explained
def verify_backup(backup_id: str) -> dict:
    """The restore drill: download the archive, authenticate every chunk, and check the ciphertext hash and every
    file's hash against the manifest, all in memory (no plaintext touches the disk). Raises on any mismatch."""
    result = _read_archive(backup_id, _hash_only)
    result["verified"] = True
    log.info("backup %s verified: %d files, %d chunks, %.1f MB in %.1f s", result["backup_id"], result["files"],
             result["chunks"], result["ciphertext_bytes"] / 1e6, result["seconds"])
    return result


@_explained
def describe_backup(backup_id: str) -> dict:
    """A quick check without downloading the archive: the manifest exists, its data key unwraps with the
    configured key, its MAC holds, and the archive object has the recorded size."""
    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client

    _check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    cfg = _settings()
    s3 = s3_client(cfg)
    manifest, _, _ = _open_manifest(s3, cfg, backup_id)
    a = manifest["archive"]
    try:
        size = s3.head_object(Bucket=cfg["bucket"], Key=a["key"])["ContentLength"]
    except ClientError:
        raise BackupNotFoundError(f"backup {backup_id} has a manifest but no archive at {_url(cfg, a['key'])}: "
                                  "restore another backup (list_backups)") from None
    if size != a["bytes"]:
        raise BackupIntegrityError(f"archive of backup {backup_id} is {size} bytes, the manifest says {a['bytes']}: "
                                   "it was truncated or replaced; restore another backup (list_backups)")
    return {"backup_id": backup_id, "use_case": manifest["use_case"], "run_id": manifest["run_id"],
            "created_at": manifest["created_at"], "files": len(manifest["files"]),
            "bytes": sum(f["bytes"] for f in manifest["files"]), "ciphertext_bytes": size,
            "sha256": a["sha256"], "key_method": manifest["key"]["method"], "key_id": manifest["key"]["key_id"]}


def default_restore_dir(backup_id: str) -> Path:
    from retrain.settings import state_dir

    use_case, run = _check_backup_id(backup_id)
    return state_dir() / "restores" / use_case / run


@_explained
def restore_backup(backup_id: str, target_dir: str | Path | None = None, *, overwrite: bool = False) -> dict:
    """Download, verify and unpack a backup into ``target_dir`` (default ``$RETRAIN_HOME/restores/<id>``).

    Unpacks into a hidden temporary directory beside the target and renames it into place only after every chunk
    and every hash checked out, so a failure leaves nothing behind. An existing non-empty target is refused
    unless ``overwrite`` (then it is replaced as a whole, not merged).
    """
    _check_backup_id(backup_id)
    backup_id = backup_id.strip().strip("/")
    target = Path(target_dir) if target_dir else default_restore_dir(backup_id)
    target = target.expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise BackupError(f"restore target {target} exists and is not a directory: choose another target_dir")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise BackupError(f"restore target {target} is not empty: choose a new or empty target directory, or "
                          "replace it as a whole with --overwrite (CLI) / overwrite=true (restore_backup DAG)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    staging_real = staging.resolve()

    def write(name: str, member, fobj) -> str:
        dest = staging / name
        if not dest.resolve().is_relative_to(staging_real):  # belt and braces after _safe_member
            raise BackupIntegrityError(f"archive member {name!r} would land outside the restore directory")
        dest.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(dest, "xb") as out:
            while block := fobj.read(1 << 20):
                h.update(block)
                out.write(block)
        os.chmod(dest, (member.mode & 0o777) | 0o600)
        os.utime(dest, (member.mtime, member.mtime))
        return h.hexdigest()

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


@_explained
def list_backups(use_case: str) -> dict:
    """Backups of a use case, newest first. ``complete`` is False for an archive whose manifest is missing
    (interrupted upload); those cannot be restored."""
    from botocore.exceptions import ClientError

    from retrain.s3 import client as s3_client
    from retrain.s3 import error_code

    if not _USE_CASE.match(use_case or ""):
        raise BackupError(f"use case {use_case!r} is not a valid name (lower_snake_case, 2-63 characters)")
    cfg = _settings()
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


@_explained
def prune_backups(use_case: str, keep: int, *, stale_hours: float = 24.0) -> dict:
    """Retention: keep the newest ``keep`` complete backups of a use case and delete the older ones. Incomplete
    backups (no manifest) and abandoned multipart uploads older than ``stale_hours`` are removed as well; younger
    ones may belong to a backup that is running right now."""
    from retrain.s3 import client as s3_client

    if not isinstance(keep, int) or keep < 1:
        raise BackupError(f"keep={keep!r}: retention must keep at least 1 backup (deleting every backup is never "
                          "what a retention policy wants; delete by hand if you mean it)")
    listing = list_backups(use_case)
    cfg = _settings()
    s3 = s3_client(cfg)
    complete = [b for b in listing["backups"] if b["complete"]]
    kept, doomed = complete[:keep], complete[keep:]
    cutoff = datetime.now(timezone.utc) - timedelta(hours=stale_hours)
    stale = [b for b in listing["backups"]
             if not b["complete"] and datetime.fromisoformat(b["last_modified"]) < cutoff]
    keys = [k for b in doomed + stale for k in sorted(b["keys"], key=lambda k: not k.endswith(MANIFEST_NAME))]
    if keys:
        _delete_keys(s3, cfg["bucket"], keys)
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
    receipt_path = run_dir / RECEIPT_NAME
    if not receipt_path.is_file():
        result["skipped"] = f"no {RECEIPT_NAME} in the run directory (no backup was written from it): nothing deleted"
        log.warning("cleanup of %s skipped: %s", run_dir, result["skipped"])
        return result
    receipt = json.loads(receipt_path.read_text())
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
            if size != entry["bytes"] or _sha256_file(path) != entry["sha256"]:
                result["kept"].append({"path": rel, "reason": "changed since the backup"})
                continue
            path.unlink()
            result["removed"].append(rel)
            result["bytes_freed"] += size
    log.info("cleanup of %s: removed %s (%d bytes), kept %d", run_dir, ", ".join(result["removed"]) or "nothing",
             result["bytes_freed"], len(result["kept"]))
    return result


# --- pipeline stages (what the monthly DAG's tasks call; each takes the run directory) ---------------------


def backup_settings(uc) -> dict:
    """Backup policy of a use case: its ``backup:`` section when the config has one, else the environment
    (RETRAIN_BACKUP_ENABLED, RETRAIN_BACKUP_KEEP, RETRAIN_BACKUP_CLEANUP, RETRAIN_BACKUP_CLEANUP_FILES as
    comma-separated paths/globs relative to the run directory), else the defaults."""
    section = getattr(uc, "backup", None)

    def pick(name: str, env: str, default, cast):
        if section is not None and getattr(section, name, None) is not None:
            return getattr(section, name)
        raw = os.environ.get(env, "").strip()
        return cast(raw) if raw else default

    def flag(text: str) -> bool:
        return text.lower() not in ("0", "false", "no", "off")

    def count(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise BackupError(f"RETRAIN_BACKUP_KEEP={text!r} is not a whole number; set how many backups to keep "
                              "per use case, e.g. 6") from None

    keep = pick("keep", "RETRAIN_BACKUP_KEEP", 6, count)
    if keep < 1:
        raise BackupError(f"backup keep={keep} must be at least 1 (RETRAIN_BACKUP_KEEP or backup.keep in the use case)")
    return {
        "enabled": pick("enabled", "RETRAIN_BACKUP_ENABLED", True, flag),
        "keep": keep,
        "cleanup": pick("cleanup", "RETRAIN_BACKUP_CLEANUP", True, flag),
        "cleanup_files": tuple(pick("cleanup_files", "RETRAIN_BACKUP_CLEANUP_FILES", DEFAULT_REMOVE,
                                    lambda text: [p.strip() for p in text.split(",") if p.strip()])),
    }


def _load_run(run_dir: str | Path):
    from retrain.rundir import load_run

    return load_run(run_dir)


def _receipt(run_dir: Path) -> dict | None:
    path = Path(run_dir) / RECEIPT_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def backup_to_s3(run_dir: str | Path) -> dict:
    """Stage ``backup_to_s3``: encrypt and upload the run directory (see backup_run for the returned dict);
    ``{"skipped": reason}`` when backups are disabled for this use case."""
    uc, meta = _load_run(run_dir)
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
        uc, _ = _load_run(run_dir)
        if not backup_settings(uc)["enabled"]:
            return {"skipped": "backups are disabled", "verified": False}
        raise BackupError(f"no {RECEIPT_NAME} in {run_dir}: backup_to_s3 did not complete for this run; run it first")
    result = verify_backup(receipt["backup_id"])
    if result["sha256"] != receipt["ciphertext_sha256"]:
        raise BackupIntegrityError(
            f"backup {receipt['backup_id']} in the bucket is not the one this run wrote (ciphertext hash differs): "
            "another writer replaced it; re-run backup_to_s3"
        )
    receipt["drill"] = {"verified_at": datetime.now(timezone.utc).isoformat(), "sha256": result["sha256"]}
    tmp = run_dir / (RECEIPT_NAME + ".tmp")
    tmp.write_text(json.dumps(receipt, indent=2))
    tmp.replace(run_dir / RECEIPT_NAME)
    return result


def prune_stage(run_dir: str | Path) -> dict:
    """Stage ``prune_backups``: retention for this run's use case (keep the newest N)."""
    uc, _ = _load_run(run_dir)
    policy = backup_settings(uc)
    if not policy["enabled"]:
        return {"skipped": "backups are disabled", "use_case": uc.name}
    return prune_backups(uc.name, policy["keep"])


def cleanup_stage(run_dir: str | Path) -> dict:
    """Stage ``cleanup``: delete local training data, only if the drill verified this run's backup and the
    bucket still holds that very archive."""
    run_dir = Path(run_dir)
    uc, meta = _load_run(run_dir)
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
