"""Backup key material: master keys, KMS data keys, HKDF, the manifest MAC and the chunk nonces.

Envelope encryption: every backup gets a fresh 256-bit data key. From it HKDF derives the chunk key and the
manifest MAC key. The tar stream is cut into fixed-size chunks, each sealed with AES-256-GCM under a nonce built
from a random per-backup prefix and the chunk counter; the associated data binds the archive header (format,
chunk size, nonce prefix, backup id), the chunk index and a final-chunk flag, so a modified, reordered, dropped or
truncated chunk fails authentication. The data key is wrapped either by a local master key (AES-256-GCM, from the
Airflow connection ``retrain_backup_key`` password or ``RETRAIN_BACKUP_MASTER_KEY``: exactly 32 bytes as standard
or URL-safe base64, padded or not, or 64 hex characters; several comma-separated keys = rotation, the first wraps
new backups) or by AWS KMS GenerateDataKey/Decrypt when ``RETRAIN_BACKUP_KMS_KEY_ID`` is set. KMS decrypts only
with that configured key and only under the encryption context of the backup being read (its id and use case),
whatever the manifest claims. No key, plain or wrapped-by-nothing, is ever logged or returned.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import sys

from retrain import settings
from retrain.backup.common import (
    MAGIC,
    TAG_BYTES,
    BackupError,
    BackupIntegrityError,
    BackupKeyError,
    b64,
    unb64,
)

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">8sBI7sH")  # magic, version, chunk size, nonce prefix, backup id length
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_STD_B64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL_B64 = re.compile(r"[A-Za-z0-9_-]+={0,2}")
_GENERATE = "`python -c \"import base64, os; print(base64.b64encode(os.urandom(32)).decode())\"`"


def hkdf(data_key: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(data_key)


def chunk_key(data_key: bytes) -> bytes:
    return hkdf(data_key, b"retrain-backup/1 chunks")


def manifest_mac_key(data_key: bytes) -> bytes:
    return hkdf(data_key, b"retrain-backup/1 manifest")


# --- master keys -------------------------------------------------------------------------------------------


def _decode_key(text: str) -> bytes | None:
    """32 bytes from 64 hex characters or from standard / URL-safe base64 (padding optional), else None."""
    if _HEX64.fullmatch(text):
        return bytes.fromhex(text)
    if _STD_B64.fullmatch(text):
        alphabet = None
    elif _URL_B64.fullmatch(text):
        alphabet = b"-_"
    else:
        return None
    body = text.rstrip("=")
    if len(text) - len(body) > (-len(body)) % 4:  # more padding than the length calls for
        return None
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=alphabet, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Non-canonical trailing bits (a different text for the same bytes) are refused: one key, one spelling.
    if raw and b64(raw).rstrip("=") != body.replace("-", "+").replace("_", "/"):
        return None
    return raw


def parse_master_key(text: str, source: str) -> bytes:
    raw = _decode_key(text.strip())
    if raw is None or len(raw) != 32:
        raise BackupKeyError(
            f"the backup master key from {source} is not 32 bytes as base64 (standard or URL-safe) or 64 hex "
            f"characters; generate one with {_GENERATE} and keep it safe: backups cannot be restored without it"
        )
    if len(set(raw)) == 1:
        what = "all zero bytes" if raw[0] == 0 else f"one byte (0x{raw[0]:02x}) repeated 32 times"
        raise BackupKeyError(
            f"the backup master key from {source} is {what}: that is a placeholder, not a key; generate a random "
            f"one with {_GENERATE}"
        )
    return raw


def key_id(master: bytes) -> str:
    # A fingerprint to tell keys apart in error messages; an HMAC output reveals nothing about the key.
    return "local:" + hmac.new(master, b"retrain-backup key id", hashlib.sha256).hexdigest()[:16]


def mask(*secrets: str) -> None:
    """Register key material with Airflow's log masker when running inside a task (no-op elsewhere: importing
    Airflow just for this would slow the CLI and the benchmark down)."""
    if "airflow.sdk.execution_time.task_runner" not in sys.modules:
        return
    for secret in secrets:
        settings.mask_secret(secret)


def master_keys() -> tuple[list[tuple[str, bytes]], str]:
    """[(key id, key)] with the key that wraps new backups first, and where they came from."""
    texts: list[tuple[str, str]] = []
    conn_id = settings.backup_key_conn_id()
    conn = settings.airflow_connection(conn_id)
    if conn is not None and conn.password:
        texts.append((conn.password, f"the password of Airflow connection '{conn_id}'"))
    env = settings.backup_master_key_env()
    if env.strip():
        texts.append((env, "RETRAIN_BACKUP_MASTER_KEY"))
    keys: list[tuple[str, bytes]] = []
    for text, source in texts:
        for part in re.split(r"[,\s]+", text.strip()):
            if part:
                mask(part)
                key = parse_master_key(part, source)
                keys.append((key_id(key), key))
    return keys, (texts[0][1] if texts else "")


_NO_KEY = (
    "no backup encryption key is configured: set RETRAIN_BACKUP_MASTER_KEY to 32 random bytes as base64 (generate "
    f"with {_GENERATE}), or put it in the password of the Airflow connection 'retrain_backup_key', or set "
    "RETRAIN_BACKUP_KMS_KEY_ID to use AWS KMS"
)


def _wrap_aad(backup_id: str) -> bytes:
    return b"retrain-backup/1 data key|" + backup_id.encode()


# --- KMS ---------------------------------------------------------------------------------------------------


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
    from retrain import s3

    parsers = logging.getLogger("botocore.parsers")
    if _redactor not in parsers.filters:
        parsers.addFilter(_redactor)
    return s3.kms_client(cfg)


def kms_context(backup_id: str) -> dict[str, str]:
    """The encryption context a backup's data key is bound to (derived from the id, never read back)."""
    return {"retrain:backup_id": backup_id, "retrain:use_case": backup_id.split("/", 1)[0]}


def _same_kms_key(cfg: dict, configured: str, recorded: str) -> bool:
    """Whether the manifest's key (an ARN, as GenerateDataKey returns it) is the configured key (id, ARN or
    alias)."""
    if not recorded:
        return False
    if recorded == configured or recorded.endswith(f":key/{configured}"):
        return True
    if "alias/" in configured:
        try:
            return _kms(cfg).describe_key(KeyId=configured)["KeyMetadata"]["Arn"] == recorded
        except Exception:  # noqa: BLE001 - the alias cannot be resolved: a mismatch, reported by the caller
            return False
    return False


def new_data_key(cfg: dict, backup_id: str, use_case: str) -> tuple[bytes, dict]:
    """(plaintext data key, key record for the manifest). The record holds only the wrapped key."""
    kms_key = settings.backup_kms_key_id()
    if kms_key:
        from retrain.s3 import error_code

        context = kms_context(backup_id)
        try:
            resp = _kms(cfg).generate_data_key(KeyId=kms_key, KeySpec="AES_256", EncryptionContext=context)
        except Exception as exc:
            raise BackupKeyError(
                f"AWS KMS GenerateDataKey with key {kms_key!r} failed ({error_code(exc) or type(exc).__name__}): check "
                "RETRAIN_BACKUP_KMS_KEY_ID, that the key is enabled and that these credentials may use it"
            ) from None
        mask(b64(resp["Plaintext"]))
        return resp["Plaintext"], {"method": "aws-kms", "key_id": resp["KeyId"],
                                   "wrapped_key": b64(resp["CiphertextBlob"]), "encryption_context": context}
    keys, _ = master_keys()
    if not keys:
        raise BackupKeyError(_NO_KEY)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kid, master = keys[0]
    data_key = os.urandom(32)
    mask(b64(data_key))
    nonce = os.urandom(12)
    wrapped = nonce + AESGCM(master).encrypt(nonce, data_key, _wrap_aad(backup_id))
    return data_key, {"method": "aes-256-gcm", "key_id": kid, "wrapped_key": b64(wrapped)}


def _unwrap_kms(cfg: dict, record: dict, wrapped: bytes, backup_id: str) -> bytes:
    from retrain.s3 import error_code

    configured = settings.backup_kms_key_id()
    recorded = str(record.get("key_id") or "")
    if not configured:
        raise BackupKeyError(
            f"backup {backup_id} is wrapped with AWS KMS key {recorded}, but RETRAIN_BACKUP_KMS_KEY_ID is not set: "
            "set it to the key your backups are made with (a backup is decrypted with the configured key only)"
        )
    if not _same_kms_key(cfg, configured, recorded):
        raise BackupKeyError(
            f"backup {backup_id} names AWS KMS key {recorded}, not the configured RETRAIN_BACKUP_KMS_KEY_ID "
            f"{configured}: refusing it (a backup wrapped under another key is not one this deployment wrote)"
        )
    try:
        resp = _kms(cfg).decrypt(CiphertextBlob=wrapped, KeyId=configured, EncryptionContext=kms_context(backup_id))
    except Exception as exc:
        raise BackupKeyError(
            f"AWS KMS could not decrypt the data key of backup {backup_id} "
            f"({error_code(exc) or type(exc).__name__}) with key {configured} (the manifest names {recorded}): use "
            "credentials allowed to decrypt with that key (and check it is not disabled or scheduled for deletion)"
        ) from None
    key = resp["Plaintext"]
    mask(b64(key))
    if len(key) != 32:
        raise BackupIntegrityError(f"KMS returned a {len(key)}-byte data key for backup {backup_id}, expected 32")
    return key


def unwrap_data_key(cfg: dict, record: dict, backup_id: str) -> bytes:
    method = record.get("method")
    wrapped = unb64(str(record.get("wrapped_key", "")), "wrapped key")
    if method == "aws-kms":
        return _unwrap_kms(cfg, record, wrapped, backup_id)
    if method != "aes-256-gcm":
        raise BackupIntegrityError(f"backup {backup_id} uses an unknown key method {method!r}: the manifest is "
                                   "corrupt or from a newer version of this tool")
    keys, source = master_keys()
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
    mask(b64(key))
    return key


# --- server-side encryption, MAC, chunk framing -------------------------------------------------------------


def sse_args(kms_key: str | None) -> dict[str, str]:
    mode = settings.s3_sse_mode()
    if mode.lower() == "none":
        return {}
    if mode == "auto":
        mode = "aws:kms" if kms_key else "AES256"
    if mode == "AES256":
        return {"ServerSideEncryption": "AES256"}
    if mode == "aws:kms":
        return {"ServerSideEncryption": "aws:kms", **({"SSEKMSKeyId": kms_key} if kms_key else {})}
    raise BackupError(f"RETRAIN_S3_SSE={mode!r} is not supported; use auto, AES256, aws:kms or none")


def mac(manifest: dict, mac_key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "mac"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hmac.new(mac_key, canonical, hashlib.sha256).hexdigest()


def header(chunk_size: int, prefix: bytes, backup_id: str) -> bytes:
    bid = backup_id.encode()
    return _HEADER.pack(MAGIC, 1, chunk_size, prefix, len(bid)) + bid


def nonce(prefix: bytes, index: int, final: bool) -> bytes:
    # STREAM-style nonce: prefix(7) | counter(4) | last-flag(1); unique per chunk under a per-backup key.
    return prefix + struct.pack(">IB", index, 1 if final else 0)


def aad(hdr: bytes, index: int, final: bool) -> bytes:
    return hdr + struct.pack(">QB", index, 1 if final else 0)

hmac_equal = hmac.compare_digest
