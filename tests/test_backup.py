"""Encrypted backups against a real S3 API server (moto's ThreadedMotoServer on 127.0.0.1) with the real boto3.

Covers: byte-identical round trip through multipart upload; nothing readable in the bucket; tampered, truncated,
wrong-key, missing-manifest, modified-manifest and path-traversal backups refused with no partial files; the KMS
path; retries while the server restarts; idempotent retries; retention; cleanup; the restore_backup DAG.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from retrain.backup import archive, crypto
from retrain.backup import operations as backup
from retrain.schemas.use_case import load_use_case
from retrain.data.synthetic import generate_rows

REPO = Path(__file__).resolve().parents[1]
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = bytes(range(64, 96)).hex()  # hex form


class Moto:
    """A moto server that a test can stop and start again on the same port (moto's state lives in-process)."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()
        # ThreadedMotoServer.stop() leaves the socket listening; close it so clients get "connection refused".
        self.server._server.server_close()


@pytest.fixture(scope="session")
def moto():
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Moto()
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "RETRAIN_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      RETRAIN_S3_ENDPOINT_URL=server.url)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3env(moto, monkeypatch, pg_url, tmp_path):
    """A fresh bucket and the local master key A; small parts so a ~12 MB file spans several parts. Restores may
    write under the test's tmp_path; backup versions are pinned in the tests' PostgreSQL."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("RETRAIN_S3_BUCKET", bucket)
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", KEY_A)
    monkeypatch.setenv("RETRAIN_BACKUP_PART_MB", "5")
    monkeypatch.setenv("RETRAIN_RESTORE_ROOTS", str(tmp_path))
    monkeypatch.delenv("RETRAIN_BACKUP_KMS_KEY_ID", raising=False)
    monkeypatch.delenv("RETRAIN_S3_SSE", raising=False)
    from retrain import s3

    return {"bucket": bucket, "client": s3.client()}


def _uc():
    return load_use_case("product_intent")


def make_run(run_dir: Path, seed: int = 1, rows: int = 200, big_mb: int = 12, run_id: str = "r") -> dict:
    """A run directory in the documented layout. The JSONL files hold the raw, unscrubbed synthetic inputs on
    purpose: encryption must keep even personal data that scrubbing missed out of the bucket."""
    uc = _uc()
    data = list(generate_rows(uc, rows, seed=seed, dirty=0.0))
    planted = sorted({p for r in data for p in r["pii"]})
    with open(run_dir / "batch.jsonl", "w", encoding="utf-8") as fh:
        for i, r in enumerate(data):
            fh.write(json.dumps({"source_id": i, "input": r["input"], "label_raw": r["model_output"],
                                 "split": "train"}, ensure_ascii=False) + "\n")
    for split, part in (("train", data[:150]), ("val", data[150:175]), ("test", data[175:])):
        with open(run_dir / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for r in part:
                msgs = [{"role": "system", "content": uc.system_prompt},
                        {"role": "user", "content": uc.render_input(r["input"])},
                        {"role": "assistant", "content": json.dumps(r["model_output"], ensure_ascii=False)}]
                fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    (run_dir / "rejected.jsonl").write_text("")
    (run_dir / "manifest.json").write_text(json.dumps({"use_case": uc.name, "counts": {"train": 150}}))
    (run_dir / "run_config.json").write_text(json.dumps(
        {"run_id": run_id, "params": {}, "use_case": uc.model_dump(mode="json")}))
    (run_dir / "decision.json").write_text(json.dumps({"go": True}))
    adapter = run_dir / "candidate" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(big_mb << 20))
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    merged = run_dir / "candidate" / "merged"  # a model-like binary: what deploy serves and a restore must return
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(os.urandom(1 << 20) + bytes(1000) + b"\xff" * 777)
    (merged / "config.json").write_text('{"model_type": "llama"}')
    (run_dir / "candidate" / "merged.tmp").mkdir()  # left by a crashed merge: not worth a backup
    (run_dir / "candidate" / "merged.tmp" / "model.safetensors").write_bytes(b"half")
    (run_dir / "candidate" / "checkpoints" / "checkpoint-10").mkdir(parents=True)
    (run_dir / "candidate" / "checkpoints" / "checkpoint-10" / "optimizer.pt").write_bytes(b"x" * 1000)
    (run_dir / "evaluation").mkdir()
    (run_dir / "evaluation" / "report.html").write_text("<html>report</html>")
    (run_dir / "evaluation" / "metrics.json").write_text('{"accuracy": 0.9}')
    lines = [ln for f in ("batch", "train", "val", "test") for ln in (run_dir / f"{f}.jsonl").read_text().splitlines()]
    return {"planted": planted, "lines": lines}


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def expected_tree(run_dir: Path) -> dict[str, str]:
    t = tree(run_dir)
    return {k: v for k, v in t.items() if not k.startswith(("candidate/checkpoints/", "candidate/merged.tmp/"))
            and k != backup.RECEIPT_NAME}


@pytest.fixture
def backed_up(s3env, run_dir):
    info = make_run(run_dir)
    result = backup.backup_run(run_dir, use_case="product_intent", run_id="scheduled__2026-11-01T03:00:00+00:00")
    return {**s3env, **info, "run_dir": run_dir, "result": result, "backup_id": result["backup_id"]}


def _keys(env, bid):
    prefix = f"backups/{bid}/"
    return prefix + backup.ARCHIVE_NAME, prefix + backup.MANIFEST_NAME


def _rewrite(env, key, change):
    s3 = env["client"]
    body = s3.get_object(Bucket=env["bucket"], Key=key)["Body"].read()
    s3.put_object(Bucket=env["bucket"], Key=key, Body=change(body))


def assert_no_leftovers(parent: Path, before: set[str]):
    assert set(os.listdir(parent)) == before, "a failed restore left files behind"


# --- round trip ---------------------------------------------------------------------------------------------


def test_round_trip_is_byte_identical_through_multipart(backed_up, tmp_path):
    r, run_dir = backed_up["result"], backed_up["run_dir"]
    assert r["backup_id"] == "product_intent/scheduled__2026-11-01T03_00_00_00_00"
    assert r["files"] == 14 and r["bytes"] > 13 << 20 and not r["reused"]
    archive_key, manifest_key = _keys(backed_up, r["backup_id"])
    s3 = backed_up["client"]
    head = s3.head_object(Bucket=backed_up["bucket"], Key=archive_key)
    assert head["ServerSideEncryption"] == "AES256" and head["ContentLength"] == r["ciphertext_bytes"]
    assert "-3" in head["ETag"]  # a multipart ETag: 12+ MB in 5 MiB parts = 3 parts
    manifest = json.loads(s3.get_object(Bucket=backed_up["bucket"], Key=manifest_key)["Body"].read())
    assert manifest["archive"]["sha256"] == hashlib.sha256(
        s3.get_object(Bucket=backed_up["bucket"], Key=archive_key)["Body"].read()).hexdigest()
    assert {f["path"] for f in manifest["files"]} == set(expected_tree(run_dir))
    assert manifest["key"]["method"] == "aes-256-gcm" and manifest["key"]["key_id"].startswith("local:")
    # Every field the issue lists: files with sizes and plaintext SHA-256, ciphertext SHA-256, chunk count, key id,
    # run id.
    assert manifest["run_id"] == "scheduled__2026-11-01T03:00:00+00:00" and manifest["use_case"] == "product_intent"
    for f in manifest["files"]:
        local = run_dir / f["path"]
        assert f["bytes"] == local.stat().st_size and f["sha256"] == hashlib.sha256(local.read_bytes()).hexdigest()
    a = manifest["archive"]
    assert a["bytes"] == r["ciphertext_bytes"] and a["chunk_count"] == r["chunks"] and a["cipher"] == "AES-256-GCM"
    assert a["plaintext_bytes"] >= r["bytes"] and manifest["key"]["key_id"] == r["key_id"] and manifest["mac"]
    body = r["ciphertext_bytes"] - manifest["archive"]["header_bytes"]
    assert r["chunks"] == manifest["archive"]["chunk_count"] == -(-body // ((1 << 20) + 16))  # 1 MiB + tag each

    drill = backup.verify_backup(r["backup_id"])
    assert drill["verified"] and drill["sha256"] == r["sha256"] and drill["files"] == 14

    target = tmp_path / "restored" / "run"
    out = backup.restore_backup(r["backup_id"], target)
    assert out["restored"] and Path(out["target_dir"]) == target
    assert tree(target) == expected_tree(run_dir)  # byte-identical, checkpoints left out
    for rel in ("candidate/merged/model.safetensors", "candidate/adapter/adapter_model.safetensors", "train.jsonl"):
        assert (target / rel).read_bytes() == (run_dir / rel).read_bytes()
    assert os.listdir(target.parent) == ["run"]  # the staging directory was renamed, not copied

    listing = backup.list_backups("product_intent")
    assert [b["backup_id"] for b in listing["backups"]] == [r["backup_id"]] and listing["backups"][0]["complete"]


def test_bucket_never_holds_plaintext_or_personal_data(backed_up):
    planted, lines = backed_up["planted"], backed_up["lines"]
    assert len(planted) >= 20 and len(lines) >= 400
    # Sanity: the plaintext really does contain the planted values (else the check below proves nothing).
    plain = "\n".join(lines)
    assert all(p in plain for p in planted)
    s3 = backed_up["client"]
    objects = s3.list_objects_v2(Bucket=backed_up["bucket"])["Contents"]
    assert len(objects) == 2
    blobs = [s3.get_object(Bucket=backed_up["bucket"], Key=o["Key"])["Body"].read() for o in objects]
    for blob in blobs:
        assert not [p for p in planted if p.encode() in blob]
        assert not [ln for ln in lines if ln.encode() in blob]
        assert b'"messages"' not in blob and b'"role"' not in blob
    manifest = json.loads(next(b for b, o in zip(blobs, objects) if o["Key"].endswith("manifest.json")))
    text = json.dumps(manifest)
    assert KEY_A not in text and bytes(range(32)).hex() not in text
    assert set(manifest["key"]) == {"method", "key_id", "wrapped_key"}
    assert len(base64.b64decode(manifest["key"]["wrapped_key"])) == 12 + 32 + 16  # nonce + sealed data key
    # The receipt left in the run directory has hashes, never key material.
    receipt = (backed_up["run_dir"] / backup.RECEIPT_NAME).read_text()
    assert KEY_A not in receipt and "wrapped_key" not in receipt


# --- refusals -----------------------------------------------------------------------------------------------


def _restore_fails(backup_id, tmp_path, exc_type, *needles):
    parent = tmp_path / "restores"
    parent.mkdir(exist_ok=True)
    before = set(os.listdir(parent))
    with pytest.raises(exc_type) as err:
        backup.restore_backup(backup_id, parent / "target")
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg
    assert not (parent / "target").exists()
    assert_no_leftovers(parent, before)
    return msg


def test_tampered_byte_is_refused_and_leaves_nothing(backed_up, tmp_path):
    bid = backed_up["backup_id"]
    archive_key, _ = _keys(backed_up, bid)

    def flip(body: bytes) -> bytes:
        b = bytearray(body)
        b[len(b) // 2] ^= 0x01  # in the middle of the 12 MB adapter: files before it unpack fine first
        return bytes(b)

    _rewrite(backed_up, archive_key, flip)
    msg = _restore_fails(bid, tmp_path, backup.BackupIntegrityError, "failed authentication", "modified",
                         "restore an older one")
    assert "chunk" in msg
    with pytest.raises(backup.BackupIntegrityError, match="failed authentication"):
        backup.verify_backup(bid)


def test_truncated_object_is_refused(backed_up, tmp_path):
    bid = backed_up["backup_id"]
    archive_key, _ = _keys(backed_up, bid)
    _rewrite(backed_up, archive_key, lambda body: body[: len(body) - 5000])
    _restore_fails(bid, tmp_path, backup.BackupIntegrityError, "truncated", "list_backups")
    with pytest.raises(backup.BackupIntegrityError, match="truncated"):
        backup.describe_backup(bid)


def test_truncation_and_reordering_are_caught_by_the_chunk_format_itself():
    """Even with the size check bypassed, dropping the last whole chunk or swapping two chunks fails the AEAD."""
    data_key = os.urandom(32)
    prefix = os.urandom(7)
    header = crypto.header(1024, prefix, "product_intent/x")

    class Sink:  # the writer's sink protocol, collecting everything in memory
        def __init__(self):
            self.buf = bytearray()

        def write(self, d):
            self.buf += d

        def reserve(self, n):
            return memoryview(bytearray(n))

        def commit(self, view):
            self.buf += view

    sink = Sink()
    w = archive.EncryptingWriter(sink, data_key, header, prefix, 1024)
    w.write(os.urandom(4096 + 100))
    w.finish()
    assert w.chunks == 5
    blob = bytes(sink.buf)
    step = 1024 + 16
    body = blob[len(header):]

    def read_all(b: bytes):
        import io

        src = io.BytesIO(header + b)
        src.read(len(header))
        r = archive.DecryptingReader(src, len(header) + len(b), header, data_key, prefix, 1024, "product_intent/x")
        out = b""
        while chunk := r.read(65536):
            out += chunk
        return out

    assert len(read_all(body)) == 4196
    with pytest.raises(backup.BackupIntegrityError, match="last chunk"):
        read_all(body[: 4 * step])  # the final chunk dropped exactly at a boundary
    swapped = body[step:2 * step] + body[:step] + body[2 * step:]
    with pytest.raises(backup.BackupIntegrityError, match="chunk 1 of 5"):
        read_all(swapped)


def test_wrong_master_key_is_refused(backed_up, tmp_path, monkeypatch):
    bid = backed_up["backup_id"]
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", KEY_B)
    msg = _restore_fails(bid, tmp_path, backup.BackupKeyError, "wrong master key", backed_up["result"]["key_id"],
                         "RETRAIN_BACKUP_MASTER_KEY")
    assert KEY_B not in msg and KEY_A not in msg
    # Rotation: new key first, old key after it -> the old backup still restores.
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", f"{KEY_B},{KEY_A}")
    assert backup.verify_backup(bid)["verified"]
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", "too-short")
    with pytest.raises(backup.BackupKeyError, match="32 bytes"):
        backup.describe_backup(bid)


def test_missing_manifest_is_refused(backed_up, tmp_path):
    bid = backed_up["backup_id"]
    _, manifest_key = _keys(backed_up, bid)
    backed_up["client"].delete_object(Bucket=backed_up["bucket"], Key=manifest_key)
    _restore_fails(bid, tmp_path, backup.BackupNotFoundError, "has no manifest", "re-run backup_to_s3")
    listing = backup.list_backups("product_intent")
    assert listing["backups"][0]["complete"] is False
    _restore_fails("product_intent/no_such_run", tmp_path, backup.BackupNotFoundError, "no backup")
    with pytest.raises(backup.BackupError, match="malformed"):
        backup.restore_backup("../etc", tmp_path / "x")


def test_modified_manifest_is_refused(backed_up, tmp_path):
    bid = backed_up["backup_id"]
    _, manifest_key = _keys(backed_up, bid)

    def edit(body: bytes) -> bytes:
        m = json.loads(body)
        m["files"][0]["sha256"] = "0" * 64
        return json.dumps(m).encode()

    _rewrite(backed_up, manifest_key, edit)
    _restore_fails(bid, tmp_path, backup.BackupIntegrityError, "manifest", "modified")


def test_path_traversal_in_an_archive_is_refused(s3env, run_dir, tmp_path, monkeypatch):
    """A backup whose tar holds '../escape.txt' (validly encrypted and listed in a valid manifest) is refused."""
    (run_dir / "train.jsonl").write_text('{"messages": []}\n')
    real_select = backup.select_files
    monkeypatch.setattr(backup, "select_files", lambda rd, *a: [
        ("../escape.txt", p, st) for _, p, st in real_select(rd, *a)])
    bid = backup.backup_run(run_dir, use_case="hr_leave", run_id="evil")["backup_id"]
    monkeypatch.setattr(backup, "select_files", real_select)
    _restore_fails(bid, tmp_path, backup.BackupIntegrityError, "unsafe path")
    assert not (tmp_path / "escape.txt").exists()


def test_restore_refuses_a_non_empty_target(backed_up, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore_backup(backed_up["backup_id"], target)
    assert os.listdir(target) == ["keep.txt"]
    out = backup.restore_backup(backed_up["backup_id"], target, overwrite=True)
    assert out["files"] == 14 and not (target / "keep.txt").exists()
    assert tree(target) == expected_tree(backed_up["run_dir"])


# --- KMS, retries, idempotency, retention, cleanup ---------------------------------------------------------------


def test_kms_envelope_and_sse_kms(s3env, run_dir, tmp_path, monkeypatch):
    from retrain import s3

    key_id = s3.kms_client().create_key(Description="retrain backups")["KeyMetadata"]["KeyId"]
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", key_id)
    monkeypatch.delenv("RETRAIN_BACKUP_MASTER_KEY")
    make_run(run_dir, big_mb=1)
    r = backup.backup_run(run_dir, use_case="email_intel", run_id="kms-1")
    assert r["key_method"] == "aws-kms" and key_id in r["key_id"] and r["sse"] == "aws:kms"
    archive_key, manifest_key = _keys(s3env, r["backup_id"])
    head = s3env["client"].head_object(Bucket=s3env["bucket"], Key=archive_key)
    assert head["ServerSideEncryption"] == "aws:kms"
    manifest = json.loads(s3env["client"].get_object(Bucket=s3env["bucket"], Key=manifest_key)["Body"].read())
    assert manifest["key"]["encryption_context"]["retrain:backup_id"] == r["backup_id"]
    # Restore goes through KMS Decrypt (with the configured key only) with no local master key at all.
    out = backup.restore_backup(r["backup_id"], tmp_path / "kms")
    assert tree(tmp_path / "kms") == expected_tree(run_dir) and out["key_method"] == "aws-kms"


def test_upload_survives_a_briefly_unavailable_server(s3env, run_dir, moto, caplog):
    make_run(run_dir, big_mb=6)
    caplog.set_level(logging.DEBUG, logger="botocore.retries.standard")
    moto.stop()
    restarter = threading.Timer(1.0, moto.start)
    restarter.start()
    started = time.monotonic()
    try:
        r = backup.backup_run(run_dir, use_case="product_intent", run_id="flaky")
    finally:
        restarter.join()
    assert time.monotonic() - started >= 0.9
    assert any("Retry needed" in rec.getMessage() for rec in caplog.records)
    assert backup.verify_backup(r["backup_id"])["verified"]


def test_unreachable_s3_fails_with_a_clear_retryable_error(s3env, run_dir, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once the socket is closed
    monkeypatch.setenv("RETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("RETRAIN_S3_MAX_ATTEMPTS", "2")
    (run_dir / "train.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(backup.BackupUnavailableError, match="cannot reach the S3 endpoint.*RETRAIN_S3_ENDPOINT_URL"):
        backup.backup_run(run_dir, use_case="hr_leave", run_id="offline")
    assert not (run_dir / backup.RECEIPT_NAME).exists()


def test_a_retried_backup_reuses_or_overwrites_the_same_keys(s3env, run_dir):
    make_run(run_dir, big_mb=1)
    first = backup.backup_run(run_dir, use_case="hr_leave", run_id="manual__1")
    again = backup.backup_run(run_dir, use_case="hr_leave", run_id="manual__1")
    assert again["reused"] and again["sha256"] == first["sha256"] and again["backup_id"] == first["backup_id"]
    (run_dir / "decision.json").write_text(json.dumps({"go": False}))
    changed = backup.backup_run(run_dir, use_case="hr_leave", run_id="manual__1")
    assert not changed["reused"] and changed["sha256"] != first["sha256"]
    keys = [o["Key"] for o in s3env["client"].list_objects_v2(Bucket=s3env["bucket"])["Contents"]]
    assert len(keys) == 2  # overwritten in place, no duplicates
    assert s3env["client"].list_multipart_uploads(Bucket=s3env["bucket"]).get("Uploads", []) == []
    assert backup.verify_backup(first["backup_id"])["sha256"] == changed["sha256"]


def test_retention_keeps_the_newest_n(s3env, run_dir):
    (run_dir / "train.jsonl").write_text('{"messages": []}\n')
    ids = [backup.backup_run(run_dir, use_case="email_intel", run_id=f"m{i}")["backup_id"] for i in range(4)]
    backup.backup_run(run_dir, use_case="hr_leave", run_id="other")  # another use case is never touched
    with pytest.raises(backup.BackupError, match="at least 1"):
        backup.prune_backups("email_intel", 0)
    result = backup.prune_backups("email_intel", keep=2)
    assert result["kept"] == [ids[3], ids[2]] and sorted(result["deleted"]) == sorted(ids[:2])
    assert [b["backup_id"] for b in backup.list_backups("email_intel")["backups"]] == [ids[3], ids[2]]
    assert backup.list_backups("hr_leave")["count"] == 1
    assert backup.prune_backups("email_intel", keep=2)["deleted"] == []


def test_cleanup_only_after_a_verified_backup(backed_up):
    run_dir = backed_up["run_dir"]
    skipped = backup.cleanup_run(run_dir, verified=False)
    assert skipped["removed"] == [] and "not verified" in skipped["skipped"] and (run_dir / "batch.jsonl").exists()
    (run_dir / "val.jsonl").write_text("changed after the backup\n")
    result = backup.cleanup_run(run_dir, verified=True)
    assert sorted(result["removed"]) == ["batch.jsonl", "rejected.jsonl", "test.jsonl", "train.jsonl"]
    assert result["kept"] == [{"path": "val.jsonl", "reason": "changed since the backup"}]
    assert (run_dir / "val.jsonl").exists() and (run_dir / "candidate" / "adapter").is_dir()
    assert result["bytes_freed"] > 0


def test_pipeline_stages_backup_drill_prune_cleanup(s3env, run_dir, monkeypatch):
    monkeypatch.setenv("RETRAIN_BACKUP_KEEP", "1")
    make_run(run_dir, big_mb=1, run_id="scheduled__2026-12-01T03:00:00+00:00")
    older = backup.backup_run(run_dir, use_case="product_intent", run_id="scheduled__2026-11-01T03:00:00+00:00")
    made = backup.backup_to_s3(run_dir)
    assert made["backup_id"] == "product_intent/scheduled__2026-12-01T03_00_00_00_00"
    # Cleanup before the drill deletes nothing: only a verified backup licenses deleting local data.
    early = backup.cleanup_stage(run_dir)
    assert early["removed"] == [] and "not verified" in early["skipped"]
    drill = backup.drill_backup(run_dir)
    assert drill["verified"] and drill["sha256"] == made["sha256"]
    assert backup.prune_stage(run_dir) == {"use_case": "product_intent", "keep": 1, "kept": [made["backup_id"]],
                                          "deleted": [older["backup_id"]], "deleted_incomplete": [],
                                          "aborted_uploads": 0}
    done = backup.cleanup_stage(run_dir)
    assert sorted(done["removed"]) == sorted(f for f in backup.DEFAULT_REMOVE if "*" not in f)  # globs: tenants' splits
    assert (run_dir / "manifest.json").exists() and (run_dir / "decision.json").exists()
    monkeypatch.setenv("RETRAIN_BACKUP_ENABLED", "0")
    assert backup.backup_to_s3(run_dir)["skipped"]


def test_cleanup_needs_a_drill_of_this_runs_backup_still_in_the_bucket(s3env, run_dir, tmp_path):
    make_run(run_dir, big_mb=1, run_id="manual__a")
    backup.backup_to_s3(run_dir)
    backup.drill_backup(run_dir)
    # Another run's directory holding a copy of this verified receipt (same dataset files): nothing is deleted.
    other = tmp_path / "other"
    other.mkdir()
    make_run(other, big_mb=1, run_id="manual__b")
    shutil.copy(run_dir / backup.RECEIPT_NAME, other / backup.RECEIPT_NAME)
    foreign = backup.cleanup_stage(other)
    assert foreign["removed"] == [] and "not verified" in foreign["skipped"] and (other / "batch.jsonl").exists()

    # Another writer replaced this run's backup after the drill: cleanup refuses and deletes nothing.
    backup.backup_run(other, use_case="product_intent", run_id="manual__a")
    with pytest.raises(backup.BackupIntegrityError, match="no longer the archive the restore drill verified"):
        backup.cleanup_stage(run_dir)
    # ... or deleted it.
    bid = backup.backup_id_for("product_intent", "manual__a")
    s3env["client"].delete_objects(Bucket=s3env["bucket"], Delete={"Objects": [{"Key": k} for k in _keys(s3env, bid)]})
    with pytest.raises(backup.BackupNotFoundError, match="nothing deleted locally"):
        backup.cleanup_stage(run_dir)
    assert all((run_dir / f).exists() for f in backup.DEFAULT_REMOVE if "*" not in f)


def test_cleanup_files_are_configurable(s3env, run_dir, monkeypatch):
    from retrain.schemas.use_case import ConfigError, parse_use_case

    make_run(run_dir, big_mb=1, run_id="manual__c")
    backup.backup_to_s3(run_dir)
    backup.drill_backup(run_dir)
    monkeypatch.setenv("RETRAIN_BACKUP_CLEANUP_FILES", "batch.jsonl, rejected.jsonl")
    assert sorted(backup.cleanup_stage(run_dir)["removed"]) == ["batch.jsonl", "rejected.jsonl"]
    assert (run_dir / "train.jsonl").exists()

    base = _uc().model_dump(mode="json")
    uc = parse_use_case({**base, "backup": {"cleanup": False, "keep": 2}})
    monkeypatch.setenv("RETRAIN_BACKUP_CLEANUP", "1")  # the use case's own setting wins over the environment
    assert backup.backup_settings(uc) | {"cleanup_files": None} == {"enabled": True, "keep": 2, "cleanup": False,
                                                                    "cleanup_files": None}
    with pytest.raises(ConfigError, match="backup.cleanup_files"):
        parse_use_case({**base, "backup": {"cleanup_files": ["../../etc/passwd"]}})
    monkeypatch.setenv("RETRAIN_BACKUP_KEEP", "six")
    with pytest.raises(backup.BackupError, match="RETRAIN_BACKUP_KEEP='six' is not a whole number"):
        backup.backup_settings(_uc())


def test_kms_wrapped_key_under_the_wrong_kms_key_is_refused(s3env, run_dir, tmp_path, monkeypatch):
    from retrain import s3

    kms = s3.kms_client()
    key_id = kms.create_key(Description="retrain backups")["KeyMetadata"]["KeyId"]
    other = kms.create_key(Description="another team")["KeyMetadata"]["KeyId"]
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", key_id)
    make_run(run_dir, big_mb=1)
    bid = backup.backup_run(run_dir, use_case="email_intel", run_id="kms-2")["backup_id"]
    _, manifest_key = _keys(s3env, bid)

    def point_at_other_key(body: bytes) -> bytes:
        m = json.loads(body)
        m["key"]["key_id"] = other
        return json.dumps(m).encode()

    _rewrite(s3env, manifest_key, point_at_other_key)
    msg = _restore_fails(bid, tmp_path, backup.BackupKeyError, "names AWS KMS key", other, key_id)
    assert "RETRAIN_BACKUP_KMS_KEY_ID" in msg and "\n" not in msg


@pytest.mark.parametrize("method", ["local", "kms"])
def test_no_key_material_in_logs_or_task_results(s3env, run_dir, tmp_path, monkeypatch, caplog, pg_url, method):
    """Every log record at DEBUG (botocore logs whole response bodies there, KMS data keys included) and every
    value the DAG's backup tasks return to XCom is free of master keys and data keys, in any encoding."""
    from retrain import s3, stages

    seen: list[bytes] = []
    real_new, real_unwrap = crypto.new_data_key, crypto.unwrap_data_key

    def new(*args, **kwargs):
        key, record = real_new(*args, **kwargs)
        seen.append(key)
        return key, record

    def unwrap(*args, **kwargs):
        key = real_unwrap(*args, **kwargs)
        seen.append(key)
        return key

    monkeypatch.setattr(crypto, "new_data_key", new)
    monkeypatch.setattr(crypto, "unwrap_data_key", unwrap)
    if method == "kms":
        monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", s3.kms_client().create_key()["KeyMetadata"]["KeyId"])
    make_run(run_dir, big_mb=1, rows=60, run_id=f"keys-{method}")
    caplog.set_level(logging.DEBUG)
    results = [stages.backup(run_dir), stages.verify_backup(run_dir), stages.prune_backups(run_dir),
               stages.cleanup(run_dir)]
    bid = results[0]["backup_id"]
    results += [backup.describe_backup(bid), backup.restore_backup(bid, tmp_path / "r"),
                backup.list_backups("product_intent")]
    assert results[1]["verified"] and results[3]["removed"]
    assert len(seen) >= 4 and all(len(k) == 32 for k in seen)
    secrets = {KEY_A, bytes(range(32)).hex(), base64.b64encode(bytes(range(32))).decode()}
    for k in seen:
        secrets |= {base64.b64encode(k).decode(), k.hex(), repr(k)[2:-1]}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "Response body" in logged  # botocore really logged at DEBUG: the check below means something
    if method == "kms":
        assert '"Plaintext": "***"' in logged or '"Plaintext":"***"' in logged
    returned = json.dumps(results, default=str)
    assert [s for s in secrets if s in logged] == [] and [s for s in secrets if s in returned] == []


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    # No Airflow connections to ask: the settings come from the environment (faster start, same code path).
    full_env = {**os.environ, "RETRAIN_S3_CONN_ID": "", "RETRAIN_BACKUP_KEY_CONN_ID": "", **env}
    return subprocess.run([str(Path(sys.executable).with_name("retrain")), "backup", *args], capture_output=True,
                          text=True, env=full_env, timeout=300)


def test_cli_restore_is_byte_identical_and_fails_with_clear_errors(backed_up, tmp_path):
    bid, run_dir = backed_up["backup_id"], backed_up["run_dir"]
    target = tmp_path / "cli" / "run"
    proc = _cli("restore", bid, "--target-dir", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert out["restored"] and out["target_dir"] == str(target) and out["files"] == 14
    assert tree(target) == expected_tree(run_dir)

    proc = _cli("restore", bid, "--target-dir", str(target))
    assert proc.returncode == 1 and "is not empty" in proc.stderr and "--overwrite" in proc.stderr
    proc = _cli("restore", bid, "--target-dir", str(tmp_path / "cli" / "k"), RETRAIN_BACKUP_MASTER_KEY=KEY_B)
    assert proc.returncode == 1 and "error: wrong master key" in proc.stderr and KEY_B not in proc.stderr

    archive_key, _ = _keys(backed_up, bid)
    _rewrite(backed_up, archive_key, lambda b: b[:5000] + bytes([b[5000] ^ 0x80]) + b[5001:])
    proc = _cli("restore", bid, "--target-dir", str(tmp_path / "cli" / "t"))
    assert proc.returncode == 1 and "failed authentication" in proc.stderr and "list_backups" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path / "cli")) == ["run"]  # no partial target, no staging directory


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dag_run.get_task_instances()}


@pytest.mark.integration
def test_monthly_dag_ends_with_a_drilled_backup_that_restore_backup_restores(airflow_db, db_conn, s3env,
                                                                              monkeypatch, tmp_path):
    """The whole monthly DAG (OpenAI backend against the local fake server, S3 = moto): backup, drill, prune and
    cleanup succeed; then the restore_backup DAG brings back exactly the files that were backed up."""
    from airflow.dag_processing.dagbag import DagBag

    from fake_openai import FakeOpenAI
    from retrain.rundir import RunDir
    from retrain.data.synthetic import seed_examples

    fake = FakeOpenAI(polls_per_state=1)
    base_url, stop = fake.start()
    monkeypatch.setenv("OPENAI_API_KEY", fake.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("RETRAIN_OPENAI_POLL_SECONDS", "0.05")
    monkeypatch.delenv("AIRFLOW_CONN_OPENAI_DEFAULT", raising=False)
    bag = DagBag(str(REPO / "dags"))
    try:
        seed_examples(db_conn, _uc(), 600, seed=41, dirty=0.01)
        run = bag.dags["retrain_product_intent"].test(run_conf={"backend": "openai"})
    finally:
        stop()
    st = _states(run)
    assert {t: st[t] for t in ("train_openai", "register_candidate", "evaluate_candidate", "backup_to_s3",
                               "verify_backup", "prune_backups", "cleanup")} == dict.fromkeys(
        ["train_openai", "register_candidate", "evaluate_candidate", "backup_to_s3", "verify_backup",
         "prune_backups", "cleanup"], "success"), st
    run_dir = RunDir.for_run("product_intent", run.run_id).path
    receipt = json.loads((run_dir / backup.RECEIPT_NAME).read_text())
    assert receipt["drill"]["sha256"] == receipt["ciphertext_sha256"]
    assert not (run_dir / "batch.jsonl").exists()  # cleanup ran, after the drill
    backed = {f["path"]: f["sha256"] for f in receipt["files"]}
    assert {"train.jsonl", "test.jsonl", "manifest.json", "decision.json", "candidate/train_result.json",
            "evaluation/report.html", "evaluation/metrics.json"} <= set(backed)

    target = tmp_path / "restored"
    restore = bag.dags["restore_backup"].test(run_conf={"backup_id": receipt["backup_id"],
                                                        "target_dir": str(target)})
    assert _states(restore) == {"check_backup": "success", "restore": "success"}
    assert tree(target) == backed  # byte-identical to what the run backed up, deleted files included
    for rel in backed:
        if (run_dir / rel).exists():
            assert (target / rel).read_bytes() == (run_dir / rel).read_bytes()


# --- the DAG ----------------------------------------------------------------------------------------------


def test_restore_dag_parses_without_heavy_imports():
    code = (
        "import json, sys\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "before = set(sys.modules)\n"
        "bag = DagBag(sys.argv[1])\n"
        "new = sorted({m.split('.')[0] for m in set(sys.modules) - before})\n"
        "d = bag.dags['restore_backup']\n"
        "print(json.dumps({'errors': {k: str(v) for k, v in bag.import_errors.items()}, 'new': new,\n"
        "  'schedule': str(d.schedule), 'tags': sorted(d.tags), 'doc': bool(d.doc_md and 'check_backup' in d.doc_md),\n"
        "  'tasks': [t.task_id for t in d.topological_sort()], 'retries': [t.retries for t in d.tasks]}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "dags" / "restore_backup.py")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == {} and report["schedule"] == "None" and report["doc"]
    assert report["tasks"] == ["check_backup", "restore"] and min(report["retries"]) >= 1
    assert {"backup", "ops"} <= set(report["tags"])
    assert not {"boto3", "botocore", "cryptography", "retrain"} & set(report["new"]), report["new"]


@pytest.mark.integration
def test_restore_dag_restores_and_refuses_a_tampered_backup(backed_up, airflow_db, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(REPO / "dags" / "restore_backup.py")).dags["restore_backup"]
    bid = backed_up["backup_id"]
    target = tmp_path / "via_dag"
    run = dag.test(run_conf={"backup_id": bid, "target_dir": str(target)})
    states = {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in run.get_task_instances()}
    assert states == {"check_backup": "success", "restore": "success"}
    assert tree(target) == expected_tree(backed_up["run_dir"])

    archive_key, _ = _keys(backed_up, bid)
    _rewrite(backed_up, archive_key, lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]))
    bad_target = tmp_path / "tampered"
    run = dag.test(run_conf={"backup_id": bid, "target_dir": str(bad_target)})
    states = {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in run.get_task_instances()}
    assert states == {"check_backup": "success", "restore": "failed"}
    assert not bad_target.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
