"""Mirror training checkpoints to S3, encrypted, so a retry on another (ephemeral) GPU worker can resume.

GPU workers may be rented instances that vanish with their disk. The launcher (``retrain.train.launch``, in the
Airflow task's process, where the ``retrain_s3`` and ``retrain_backup_key`` connections resolve) runs a
:class:`CheckpointMirror`:

- **upload**: when the trainer reports ``[save] checkpoint-N`` (printed after the checkpoint is written
  completely), a background thread of the launcher uploads the newest complete checkpoint, so the trainer never
  waits on S3. Each checkpoint is one object, a tar sealed with the backups' chunked AES-256-GCM stream under a
  fresh data key wrapped by the backup master key or KMS key (``retrain.backup.crypto`` / ``archive`` /
  ``transport``: the same code, the same keys, nothing re-implemented), plus a manifest written last (files,
  hashes, the run's fingerprint, the wrapped key, a MAC). Keys::

      <prefix>/checkpoints/<use_case>/<run>/checkpoint-<N>/archive.tar.enc
      <prefix>/checkpoints/<use_case>/<run>/checkpoint-<N>/manifest.json

  The checkpoint id bound into the archive header, the key wrapping and the KMS encryption context is
  ``<use_case>/<run>/checkpoint-<N>``: an object copied from another run or step does not decrypt. After an
  upload the mirror keeps the newest ``mirror_keep`` checkpoints of the run's current fingerprint (plus the best
  one the trainer tracks) and deletes the others. What was mirrored is recorded in ``candidate/
  checkpoint_mirror.json`` (``RunDir.checkpoint_mirror``).
- **restore**: before the trainer starts, if the mirror holds a newer checkpoint than the local disk for the same
  fingerprint (settings, base model, data), it is downloaded, authenticated chunk by chunk, checked file by file
  and renamed into the local checkpoints directory (``RunDir.checkpoints``: ``candidate/checkpoints/``, or the
  worker's own ``RETRAIN_CHECKPOINT_SCRATCH``); the trainer then resumes from it as from a local one.

Mirroring never fails a training run: S3 not configured, no backup key or ``RETRAIN_CHECKPOINT_MIRROR=off`` is
one log line; an upload or prune error is a WARNING, and the next save tries again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain import settings
from retrain.backup import crypto
from retrain.backup.archive import (
    DecryptingReader,
    EncryptingWriter,
    MemberTree,
    hash_stream,
    safe_member,
    select_files,
    write_tar,
)
from retrain.backup.common import (
    ARCHIVE_NAME,
    CHUNK_SIZE,
    MANIFEST_NAME,
    TAG_BYTES,
    BackupError,
    BackupIntegrityError,
    backup_id_for,
    b64,
    unb64,
)
from retrain.backup.transport import MultipartSink, ObjectStream, delete_keys, s3_hint
from retrain.rundir import RunDir, read_json, write_json
from retrain.train.qlora.checkpoints import (
    checkpoint_step,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    prepare_checkpoint_dir,
)

log = logging.getLogger(__name__)

FORMAT = "retrain-checkpoint/1"
# Fewer botocore attempts than backups (12): a save must not hold the uploader for half a minute per call when S3
# is down; the next save retries anyway.
MAX_ATTEMPTS = 3
STALE_UPLOAD_HOURS = 1.0


def _why(exc: BaseException) -> str:
    """One line about an S3/backup failure: the backups' what-to-do hint when there is one. Never key material:
    exceptions from the backup code carry none, and botocore's carry endpoints and error codes."""
    if isinstance(exc, BackupError):
        return str(exc)
    return s3_hint(exc) or f"{type(exc).__name__}: {str(exc)[:300]}"


def _step_name(step: int) -> str:
    return f"checkpoint-{step}"


def _diff(a: dict, b: dict) -> str:
    return ", ".join(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)) or "unknown"


# --- configuration ---------------------------------------------------------------------------------------------


def _credentials_resolvable(cfg: dict) -> bool:
    if cfg.get("access_key_id"):
        return True
    try:  # boto3's own chain: instance profile, ~/.aws
        import boto3

        return boto3.session.Session().get_credentials() is not None
    except Exception:  # noqa: BLE001 - an unreadable ~/.aws is "no credentials" here
        return False


def _key_configured() -> str | None:
    """Why checkpoints cannot be encrypted (None: a master key or a KMS key is configured)."""
    if settings.backup_kms_key_id():
        return None
    try:
        keys, _ = crypto.master_keys()
    except BackupError as exc:
        return f"the backup master key is unusable ({exc})"
    return None if keys else "no backup encryption key is configured (RETRAIN_BACKUP_MASTER_KEY / KMS)"


def mirror_for_run(run: RunDir, *, use_case: str, run_id: str, fingerprint: dict, enabled: bool = True,
                   keep: int = 2) -> CheckpointMirror | None:
    """The run's mirror, or None (with one log line saying why) when mirroring is off or S3 is not set up.

    Never raises: a broken S3 setting turns mirroring off for this run with a warning.
    """
    try:
        mode = settings.checkpoint_mirror_mode()
        if mode == "off" or not enabled:
            why = "RETRAIN_CHECKPOINT_MIRROR=off" if mode == "off" else "training.checkpoint_mirror is false"
            log.info("checkpoint mirror: off (%s); checkpoints stay on this worker's disk", why)
            return None
        env = settings.s3_env()
        explicit = bool(env["endpoint_url"] or env["bucket"])
        if not explicit and mode == "auto" and "airflow.sdk" in sys.modules:
            # Inside an Airflow worker the connection may hold the whole S3 setup. Outside one (the CLI, tests) it
            # is not asked: importing Airflow just for this would reconfigure the process's logging.
            explicit = settings.airflow_connection(env["conn_id"]) is not None
        if mode == "auto" and not explicit:
            log.info("checkpoint mirror: off (S3 is not configured: no RETRAIN_S3_ENDPOINT_URL, RETRAIN_S3_BUCKET or "
                     "Airflow connection '%s'); checkpoints stay on this worker's disk", env["conn_id"])
            return None
        from retrain import s3

        cfg = s3.settings()
        if not _credentials_resolvable(cfg):
            log.info("checkpoint mirror: off (no S3 credentials resolvable); checkpoints stay on this worker's disk")
            return None
        why = _key_configured()
        if why:
            log.info("checkpoint mirror: off (%s); checkpoints stay on this worker's disk", why)
            return None
        cfg = {**cfg, "max_attempts": min(cfg["max_attempts"], MAX_ATTEMPTS)}
        mirror = CheckpointMirror(run, cfg, use_case=use_case, run_id=run_id, fingerprint=fingerprint, keep=keep)
    except Exception as exc:  # noqa: BLE001 - mirroring must never fail a training run
        log.warning("checkpoint mirror: off (%s); checkpoints stay on this worker's disk", _why(exc))
        return None
    log.info("checkpoint mirror: on, s3://%s/%s/ (encrypted like backups, newest %d kept)", cfg["bucket"],
             mirror.base, keep)
    return mirror


# --- the mirror ------------------------------------------------------------------------------------------------


class CheckpointMirror:
    """Upload, prune and restore one run's checkpoints (see the module docstring)."""

    def __init__(self, run: RunDir, cfg: dict, *, use_case: str, run_id: str, fingerprint: dict, keep: int = 2):
        from retrain.s3 import client

        self.run, self.cfg, self.use_case, self.run_id = run, cfg, use_case, str(run_id)
        self.fingerprint, self.keep = dict(fingerprint), max(1, int(keep))
        self.run_key = backup_id_for(use_case, self.run_id).split("/", 1)[1]  # the run id made key-safe
        parts = [cfg["prefix"], "checkpoints", use_case, self.run_key]
        self.base = "/".join(p for p in parts if p)
        self.bucket = cfg["bucket"]
        self.threads = settings.backup_int("RETRAIN_BACKUP_UPLOAD_THREADS", 4, 1, 32, BackupError)
        self.s3 = client(cfg, max_pool_connections=self.threads + 2)
        self._bucket_checked = False
        self._lock = threading.Lock()  # record file and the S3 calls of one mirror: one writer at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._upload_more = True
        self._thread: threading.Thread | None = None

    # --- names ---------------------------------------------------------------------------------------------
    def checkpoint_id(self, step: int) -> str:
        """Bound into the archive header, the data-key wrapping and the KMS encryption context."""
        return f"{self.use_case}/{self.run_key}/{_step_name(step)}"

    def keys(self, step: int) -> tuple[str, str]:
        base = f"{self.base}/{_step_name(step)}"
        return f"{base}/{ARCHIVE_NAME}", f"{base}/{MANIFEST_NAME}"

    # --- the record in the run directory --------------------------------------------------------------------
    def _read_record(self) -> dict:
        """The record; its ``mirrored`` list only when it was written for the current fingerprint (checkpoints of
        other settings are pruned, and must not count as mirrored)."""
        try:
            data = read_json(self.run.checkpoint_mirror)
        except (OSError, ValueError):
            data = {}
        data = data if isinstance(data, dict) else {}
        if data.get("fingerprint") != self.fingerprint:
            data["mirrored"] = []
        return data

    def _update_record(self, **changes: Any) -> dict:
        rec = self._read_record()
        rec.update({"bucket": self.bucket, "prefix": self.base, "use_case": self.use_case, "run_id": self.run_id,
                    "keep": self.keep, "fingerprint": self.fingerprint, **changes})
        rec.setdefault("mirrored", [])
        write_json(self.run.checkpoint_mirror, rec)
        return rec

    # --- listing and pruning --------------------------------------------------------------------------------
    def listing(self) -> dict[int, dict]:
        """step -> {"keys": [...], "manifest": key or None, "last_modified": datetime} of the run's mirror."""
        from botocore.exceptions import ClientError

        from retrain.s3 import error_code

        out: dict[int, dict] = {}
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.base + "/"):
                for obj in page.get("Contents", []):
                    rest = obj["Key"][len(self.base) + 1:]
                    if "/" not in rest:
                        continue
                    name, leaf = rest.split("/", 1)
                    step = checkpoint_step(Path(name))
                    if step is None:
                        continue
                    g = out.setdefault(step, {"keys": [], "manifest": None, "last_modified": obj["LastModified"]})
                    g["keys"].append(obj["Key"])
                    g["last_modified"] = max(g["last_modified"], obj["LastModified"])
                    if leaf == MANIFEST_NAME:
                        g["manifest"] = obj["Key"]
        except ClientError as exc:
            if error_code(exc) == "NoSuchBucket":
                return {}
            raise
        return out

    def _manifest_json(self, key: str) -> dict | None:
        try:
            data = json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except Exception:  # noqa: BLE001 - unreadable: treated like a checkpoint of other settings
            return None
        return data if isinstance(data, dict) else None

    def prune(self, best: str | None = None) -> list[int]:
        """Keep the newest ``keep`` mirrored checkpoints of the current fingerprint (and ``best``); delete the
        rest, incomplete uploads of older steps and abandoned multipart uploads. Returns the deleted steps."""
        listing = self.listing()
        current = []
        for step, g in listing.items():
            m = self._manifest_json(g["manifest"]) if g["manifest"] else None
            if m is not None and m.get("fingerprint") == self.fingerprint:
                current.append(step)
        keep = set(sorted(current, reverse=True)[: self.keep])
        if best is not None and checkpoint_step(Path(best)) in current:
            keep.add(checkpoint_step(Path(best)))
        newest = max(keep, default=None)
        doomed = []
        for step, g in listing.items():
            if step in keep:
                continue
            if g["manifest"] is None and (newest is None or step > newest):
                continue  # an upload that may still be running (or the next one); a later prune removes it
            doomed.append(step)
        # Manifest first: a half-deleted checkpoint is incomplete, never a manifest without its archive.
        keys = [k for s in sorted(doomed) for k in sorted(listing[s]["keys"], key=lambda k: not k.endswith(MANIFEST_NAME))]
        if keys:
            delete_keys(self.s3, self.bucket, keys)
        cutoff = datetime.now(timezone.utc).timestamp() - STALE_UPLOAD_HOURS * 3600
        for page in self.s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                             Prefix=self.base + "/"):
            for up in page.get("Uploads", []):
                if up["Initiated"].timestamp() < cutoff:
                    self.s3.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"])
        return sorted(doomed)

    # --- upload ---------------------------------------------------------------------------------------------
    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        from retrain.s3 import ensure_bucket

        if settings.s3_create_bucket():
            ensure_bucket(self.s3, self.bucket, self.cfg["region"])
        self._bucket_checked = True

    def upload(self, ckpt: Path) -> dict:
        """Encrypt and upload one complete checkpoint directory (synchronously); returns its record entry."""
        started = time.monotonic()
        step = checkpoint_step(ckpt)
        if step is None or not is_complete_checkpoint(ckpt):
            raise BackupError(f"{ckpt} is not a complete checkpoint: not mirrored")
        self._ensure_bucket()
        cid = self.checkpoint_id(step)
        files = select_files(ckpt.parent, include_files=(), include_dirs=(ckpt.name,))
        best = None
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            best = Path(state["best_model_checkpoint"]).name if state.get("best_model_checkpoint") else None
        except (OSError, ValueError, TypeError):
            pass
        kms_key = settings.backup_kms_key_id()
        sse = crypto.sse_args(kms_key)
        data_key, key_record = crypto.new_data_key(self.cfg, cid, self.use_case)
        enc_key, mac_key = crypto.chunk_key(data_key), crypto.manifest_mac_key(data_key)
        del data_key
        prefix = os.urandom(7)
        header = crypto.header(CHUNK_SIZE, prefix, cid)
        # Part sizing as in backup_run: whole sealed chunks per part, at most ~9,000 parts.
        part_size = settings.backup_int("RETRAIN_BACKUP_PART_MB", 8, 5, 1024, BackupError) << 20
        total_plain = sum(st.st_size for _, _, st in files)
        estimate = int((total_plain + 2048 * (len(files) + 10)) * (1 + TAG_BYTES / CHUNK_SIZE)) + len(header)
        part_size = max(part_size, -(-estimate // 9000))
        sealed = CHUNK_SIZE + TAG_BYTES
        part_bytes = -(-part_size // sealed) * sealed
        archive_key, manifest_key = self.keys(step)
        delete_keys(self.s3, self.bucket, [manifest_key])  # a re-upload: never a manifest over a half-written archive
        sink = MultipartSink(self.s3, self.bucket, archive_key, part_bytes=part_bytes, first_extra=len(header),
                             threads=self.threads, extra={**sse, "Metadata": {"retrain-checkpoint-id": cid,
                                                                               "retrain-format": FORMAT}})
        try:
            writer = EncryptingWriter(sink, enc_key, header, prefix, CHUNK_SIZE)
            entries = write_tar(writer, files)
            plain_bytes = writer.finish()
            sink.complete()
        except BaseException:
            sink.abort()
            raise
        manifest = {
            "format": FORMAT,
            "checkpoint_id": cid,
            "use_case": self.use_case,
            "run_id": self.run_id,
            "step": step,
            "fingerprint": self.fingerprint,
            "best_checkpoint": best,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "host": socket.gethostname(),
            "archive": {
                "key": archive_key, "bytes": sink.size, "sha256": sink.sha256.hexdigest(),
                "plaintext_bytes": plain_bytes, "cipher": "AES-256-GCM", "chunk_size": CHUNK_SIZE,
                "chunk_count": writer.chunks, "nonce_prefix": b64(prefix), "header_bytes": len(header),
                "sse": sse.get("ServerSideEncryption", "none"),
            },
            "files": entries,
            "key": key_record,
        }
        manifest["mac"] = crypto.mac(manifest, mac_key)
        body = json.dumps(manifest, indent=1).encode()
        self.s3.put_object(Bucket=self.bucket, Key=manifest_key, Body=body, ContentType="application/json", **sse)
        return {"step": step, "archive_key": archive_key, "manifest_key": manifest_key,
                "manifest_sha256": hashlib.sha256(body).hexdigest(), "files": len(entries), "bytes": plain_bytes,
                "ciphertext_bytes": sink.size, "best_checkpoint": best, "key_id": key_record["key_id"],
                "seconds": round(time.monotonic() - started, 3), "uploaded_at": manifest["created_at"]}

    def mirror_newest(self) -> dict | None:
        """Upload the newest complete local checkpoint unless it is mirrored already, then prune. Raises on
        failure (the caller logs a warning)."""
        with self._lock:
            newest = latest_complete_checkpoint(self.run.checkpoints)
            if newest is None:
                return None
            step = checkpoint_step(newest)
            rec = self._read_record()
            if any(m.get("step") == step for m in rec.get("mirrored", [])):
                return None
            local_fp = None
            try:
                local_fp = read_json(self.run.fingerprint)
            except (OSError, ValueError):
                pass
            if local_fp is not None and local_fp != self.fingerprint:
                raise BackupError(f"{newest.name} belongs to other settings or data ({_diff(local_fp, self.fingerprint)})")
            entry = self.upload(newest)
            try:
                deleted = self.prune(entry["best_checkpoint"])
            except Exception as exc:  # noqa: BLE001 - uploaded all the same; the next save prunes again
                log.warning("checkpoint mirror: pruning s3://%s/%s/ failed (%s); the next save retries", self.bucket,
                            self.base, _why(exc))
                deleted = []
            mirrored = [m for m in rec.get("mirrored", []) if m.get("step") not in deleted and m.get("step") != step]
            mirrored = sorted([*mirrored, entry], key=lambda m: m["step"])
            self._update_record(mirrored=mirrored, last_error=None,
                                pruned=sorted({*rec.get("pruned", []), *deleted}))
        log.info("checkpoint mirror: %s uploaded (%d files, %.1f MB, encrypted) in %.1f s%s", newest.name,
                 entry["files"], entry["bytes"] / 1e6, entry["seconds"],
                 f"; pruned {', '.join(_step_name(s) for s in deleted)}" if deleted else "")
        return entry

    # --- background uploads (the launcher) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="checkpoint-mirror", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """The trainer finished writing a checkpoint."""
        self._wake.set()

    def close(self, *, catch_up: bool, timeout: float = 300.0) -> None:
        """Stop the uploader. ``catch_up``: first mirror the newest checkpoint if it is not yet (the trainer
        failed: a retry may run elsewhere); otherwise only the upload in flight finishes."""
        self._upload_more = catch_up
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("checkpoint mirror: an upload is still running after %.0f s; not waiting for it", timeout)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            stopping = self._stop.is_set()
            if not stopping or self._upload_more:
                self._sync_once()
            if stopping:
                return

    def _sync_once(self) -> None:
        try:
            self.mirror_newest()
        except Exception as exc:  # noqa: BLE001 - mirroring must never fail a training run
            newest = latest_complete_checkpoint(self.run.checkpoints)
            name = newest.name if newest else "the newest checkpoint"
            log.warning("checkpoint mirror: upload of %s failed (%s); training continues, the next save retries",
                        name, _why(exc))
            try:
                with self._lock:
                    self._update_record(last_error={"checkpoint": name, "error": _why(exc)[:500],
                                                    "at": datetime.now(timezone.utc).isoformat()})
            except OSError:
                pass

    # --- restore -----------------------------------------------------------------------------------------------
    def _open(self, step: int, manifest_key: str) -> tuple[dict, bytes, str]:
        """(manifest, chunk key, manifest digest) of a mirrored checkpoint, after unwrapping its data key (bound to
        this run and step) and checking the manifest's MAC."""
        cid = self.checkpoint_id(step)
        raw = self.s3.get_object(Bucket=self.bucket, Key=manifest_key)["Body"].read()
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise BackupIntegrityError(f"the manifest of mirrored {_step_name(step)} is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackupIntegrityError(f"the manifest of mirrored {_step_name(step)} is not a {FORMAT} manifest")
        if manifest.get("checkpoint_id") != cid or manifest.get("step") != step:
            raise BackupIntegrityError(f"the manifest at {manifest_key} describes {manifest.get('checkpoint_id')!r}, "
                                       f"not {cid}: it was copied from another run or step")
        data_key = crypto.unwrap_data_key(self.cfg, manifest.get("key") or {}, cid)
        enc_key, mac_key = crypto.chunk_key(data_key), crypto.manifest_mac_key(data_key)
        del data_key
        if not crypto.hmac_equal(str(manifest.get("mac", "")), crypto.mac(manifest, mac_key)):
            raise BackupIntegrityError(f"the manifest of mirrored {_step_name(step)} was modified after upload "
                                       "(its MAC does not match)")
        return manifest, enc_key, hashlib.sha256(raw).hexdigest()

    def download(self, step: int, manifest: dict, enc_key: bytes) -> Path:
        """Download, authenticate and unpack a mirrored checkpoint into the local checkpoints directory (through a
        hidden staging directory renamed into place only once every chunk and file hash checked out)."""
        import tarfile

        cid, name = self.checkpoint_id(step), _step_name(step)
        a = manifest["archive"]
        resp = self.s3.get_object(Bucket=self.bucket, Key=a["key"])
        size = int(resp["ContentLength"])
        if size != a["bytes"]:
            resp["Body"].close()
            raise BackupIntegrityError(f"mirrored {name} is {size} bytes in the bucket, {a['bytes']} in its manifest")
        src = ObjectStream(self.s3, self.bucket, a["key"], size, resp["ETag"], resp["Body"])
        prefix = unb64(a["nonce_prefix"], "nonce prefix")
        header = src.read(int(a["header_bytes"]))
        if header != crypto.header(int(a["chunk_size"]), prefix, cid):
            raise BackupIntegrityError(f"the archive header of mirrored {name} does not match its manifest")
        raw = DecryptingReader(src, size, header, enc_key, prefix, int(a["chunk_size"]), cid)
        if raw.n_chunks != a["chunk_count"]:
            raise BackupIntegrityError(f"mirrored {name} has {raw.n_chunks} chunks, its manifest says {a['chunk_count']}")
        expected = {f["path"]: f for f in manifest["files"]}
        checkpoints = self.run.checkpoints
        checkpoints.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.mirror-", dir=checkpoints))
        try:
            seen: dict[str, str] = {}
            members = MemberTree(cid)
            with io.BufferedReader(raw, buffer_size=1 << 20) as plain:
                try:
                    with tarfile.open(fileobj=plain, mode="r|", bufsize=1 << 20) as tar:
                        for member in tar:
                            rel = safe_member(member, cid)
                            members.add(rel, member.isdir())
                            if member.isdir():
                                continue
                            if rel not in expected or rel in seen or not rel.startswith(name + "/"):
                                raise BackupIntegrityError(f"mirrored {name} holds {rel!r}, which its manifest does "
                                                           "not list (or twice)")
                            seen[rel] = _write_member(staging / rel, tar.extractfile(member))
                except tarfile.TarError as exc:
                    raise BackupIntegrityError(f"mirrored {name} decrypts but is not a valid tar ({exc})") from None
                raw.drain()
            if src.sha256.hexdigest() != a["sha256"]:
                raise BackupIntegrityError(f"SHA-256 of mirrored {name} does not match its manifest")
            missing = sorted(set(expected) - set(seen))
            bad = sorted(n for n, h in seen.items() if h != expected[n]["sha256"])
            if missing or bad:
                raise BackupIntegrityError(f"mirrored {name}: files missing ({', '.join(missing[:3])}) or with another "
                                           f"hash ({', '.join(bad[:3])}) than its manifest lists")
            unpacked = staging / name
            if not is_complete_checkpoint(unpacked):
                raise BackupIntegrityError(f"mirrored {name} is not a complete checkpoint after unpacking")
            target = checkpoints / name
            if target.exists():
                shutil.rmtree(target)  # an incomplete local copy (a complete one would not be replaced)
            os.rename(unpacked, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def restore(self, local_step: int | None) -> Path | None:
        """Before the trainer starts: download the newest mirrored checkpoint of this run and fingerprint when it
        is newer than ``local_step`` (the newest complete local one). Returns its local path, or None. Never
        raises: a mirrored checkpoint that cannot be used is skipped with a warning."""
        try:
            listing = self.listing()
        except Exception as exc:  # noqa: BLE001
            log.warning("checkpoint mirror: cannot list s3://%s/%s/ (%s); starting from the local checkpoints",
                        self.bucket, self.base, _why(exc))
            return None
        pinned = {m.get("step"): m.get("manifest_sha256") for m in self._read_record().get("mirrored", [])}
        for step in sorted((s for s, g in listing.items() if g["manifest"]), reverse=True):
            name = _step_name(step)
            if local_step is not None and step <= local_step:
                log.info("checkpoint mirror: the local checkpoint-%d is as new as the mirror's newest usable one",
                         local_step)
                return None
            started = time.monotonic()
            try:
                manifest, enc_key, digest = self._open(step, listing[step]["manifest"])
                if manifest.get("fingerprint") != self.fingerprint:
                    log.warning("checkpoint mirror: mirrored %s was computed from other settings or data (%s "
                                "changed): not resumed", name, _diff(manifest.get("fingerprint") or {}, self.fingerprint))
                    continue
                if pinned.get(step) not in (None, digest):
                    raise BackupIntegrityError(f"mirrored {name} is not the version this run uploaded (manifest "
                                               "digest differs from checkpoint_mirror.json): it was replaced")
                path = self.download(step, manifest, enc_key)
            except Exception as exc:  # noqa: BLE001 - an unusable mirror copy: try the next older one
                log.warning("checkpoint mirror: mirrored %s cannot be used (%s); trying an older one", name, _why(exc))
                continue
            seconds = time.monotonic() - started
            best = manifest.get("best_checkpoint")
            best_step = checkpoint_step(Path(best)) if best else None
            if best_step is not None and best_step != step and best_step in listing \
                    and not is_complete_checkpoint(self.run.checkpoints / best):
                try:  # the best checkpoint, so load_best_model_at_end still finds it
                    m, k, _ = self._open(best_step, listing[best_step]["manifest"])
                    if m.get("fingerprint") == self.fingerprint:
                        self.download(best_step, m, k)
                except Exception as exc:  # noqa: BLE001
                    log.warning("checkpoint mirror: the best checkpoint %s could not be restored (%s)", best, _why(exc))
            if not self.run.fingerprint.is_file():
                write_json(self.run.fingerprint, self.fingerprint)
            log.info("checkpoint mirror: resuming from mirrored checkpoint-%d, restored from s3://%s/%s/ into %s "
                     "(downloaded, decrypted and verified in %.1f s)", step, self.bucket, self.base, path.parent,
                     seconds)
            with self._lock:
                rec = self._read_record()
                # Mirrored already: a failure before the next save must not upload (and briefly unpublish) it again.
                mirrored = [m for m in rec.get("mirrored", []) if m.get("step") != step]
                a = manifest["archive"]
                mirrored.append({"step": step, "archive_key": a["key"], "manifest_key": listing[step]["manifest"],
                                 "manifest_sha256": digest, "files": len(manifest["files"]),
                                 "bytes": a["plaintext_bytes"], "ciphertext_bytes": a["bytes"],
                                 "best_checkpoint": best, "uploaded_at": manifest.get("created_at")})
                self._update_record(mirrored=sorted(mirrored, key=lambda m: m["step"]),
                                    restored={"step": step, "manifest_sha256": digest, "seconds": round(seconds, 3),
                                              "at": datetime.now(timezone.utc).isoformat(),
                                              "host": socket.gethostname()})
            return path
        return None


def _write_member(dest: Path, fobj) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "xb") as out:
        return hash_stream(fobj, out)


def restore_before_start(mirror: CheckpointMirror) -> Path | None:
    """Discard local checkpoints of other settings (as the trainer would), then restore from the mirror when it
    holds a newer checkpoint of this fingerprint. Never raises."""
    try:
        local = prepare_checkpoint_dir(mirror.run.checkpoints, mirror.run.fingerprint, mirror.fingerprint, "auto")
        return mirror.restore(checkpoint_step(local) if local else None)
    except Exception as exc:  # noqa: BLE001 - mirroring must never fail a training run
        log.warning("checkpoint mirror: restore skipped (%s); training starts from the local checkpoints", _why(exc))
        return None
