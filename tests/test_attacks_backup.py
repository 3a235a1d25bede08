"""Hostile inputs against encrypted backups (issue 17): where a restore may write, which KMS key may unwrap a data
key, whether an older backup can be slipped back into the bucket, which master keys are accepted, and archives
whose members collide. S3 and KMS are moto's server on 127.0.0.1, the database the tests' PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import example, given, settings as hsettings, strategies as st

from retrain import settings
from retrain.backup import crypto
from retrain.backup import operations as backup

REPO = Path(__file__).resolve().parents[1]
KEY = base64.b64encode(bytes(range(32))).decode()


@pytest.fixture
def s3env(s3_server, pg_url, monkeypatch, tmp_path):
    bucket = f"atk-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("RETRAIN_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("RETRAIN_S3_BUCKET", bucket)
    monkeypatch.setenv("RETRAIN_S3_CONN_ID", "")
    monkeypatch.setenv("RETRAIN_BACKUP_KEY_CONN_ID", "")
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", KEY)
    monkeypatch.delenv("RETRAIN_BACKUP_KMS_KEY_ID", raising=False)
    monkeypatch.delenv("RETRAIN_RESTORE_ROOTS", raising=False)
    monkeypatch.delenv("RETRAIN_S3_SSE", raising=False)
    from retrain import s3

    return {"bucket": bucket, "client": s3.client(), "url": s3_server}


def small_run(run_dir: Path, text: str = "v1") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": text}]}) + "\n")
    (run_dir / "decision.json").write_text(json.dumps({"go": text}))
    return run_dir


def _dead_endpoint(monkeypatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RETRAIN_S3_MAX_ATTEMPTS", "1")


def _objects(env, bid: str) -> tuple[str, str]:
    return f"backups/{bid}/archive.tar.enc", f"backups/{bid}/" + "manifest.json"


# --- 1. restores write only under the restore root ------------------------------------------------------------


def _bad_targets(tmp_path: Path) -> dict[str, Path]:
    home = settings.state_dir()
    restores = home / "restores"
    restores.mkdir(parents=True, exist_ok=True)
    link = restores / f"link-{uuid.uuid4().hex[:8]}"
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    link.symlink_to(outside)
    return {
        "dags folder": REPO / "dags",
        "plugins folder": REPO / "plugins",
        "RETRAIN_HOME": home,
        "the restore root itself": restores,
        "models": home / "models",
        "embedded database": home / "postgres",
        "run directories": home / "runs" / "product_intent",
        "elsewhere": tmp_path / "elsewhere",
        "dot-dot": restores / ".." / "models" / "x",
        "symlink out": link / "run",
        "relative": Path("relative-dir"),
    }


@pytest.mark.parametrize("name", ["dags folder", "plugins folder", "RETRAIN_HOME", "the restore root itself",
                                  "models", "embedded database", "run directories", "elsewhere", "dot-dot",
                                  "symlink out", "relative"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_restore_outside_the_root_is_refused_before_any_download(s3env, tmp_path, monkeypatch, name, overwrite):
    _dead_endpoint(monkeypatch)  # any S3 call would fail with "cannot reach": the refusal must come first
    target = _bad_targets(tmp_path)[name]
    existed = target.exists()
    before = sorted(os.listdir(target)) if target.is_dir() else None
    with pytest.raises(backup.BackupError) as err:
        backup.restore_backup("product_intent/some_run", target, overwrite=overwrite)
    msg = str(err.value)
    assert "cannot reach" not in msg and "\n" not in msg, msg
    assert str(settings.state_dir() / "restores") in msg, msg
    assert target.exists() == existed
    if before is not None:
        assert sorted(os.listdir(target)) == before


def test_the_restore_dag_check_refuses_the_target_before_reading_s3(s3env, monkeypatch):
    _dead_endpoint(monkeypatch)
    with pytest.raises(backup.BackupError, match="restores"):
        backup.check_restore("product_intent/some_run", str(REPO / "dags"), overwrite=True)
    dag_file = (REPO / "dags" / "restore_backup.py").read_text()
    assert "check_restore" in dag_file and "restores" in dag_file


def test_extra_restore_roots_and_overwrite_only_inside(s3env, tmp_path, monkeypatch):
    run = small_run(tmp_path / "run")
    bid = backup.backup_run(run, use_case="hr_leave", run_id="root-1")["backup_id"]
    default = backup.restore_backup(bid)  # $RETRAIN_HOME/restores/<id>
    assert Path(default["target_dir"]).is_relative_to(settings.state_dir() / "restores")
    again = backup.restore_backup(bid, overwrite=True)
    assert again["target_dir"] == default["target_dir"]

    extra = tmp_path / "extra-root"
    extra.mkdir()
    elsewhere = tmp_path / "not-a-root"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine")
    monkeypatch.setenv("RETRAIN_RESTORE_ROOTS", os.pathsep.join([str(extra), str(tmp_path / "missing-root")]))
    out = backup.restore_backup(bid, extra / "r")
    assert (extra / "r" / "train.jsonl").is_file() and out["target_dir"] == str(extra / "r")
    with pytest.raises(backup.BackupError, match="restore root"):
        backup.restore_backup(bid, elsewhere, overwrite=True)
    assert (elsewhere / "precious.txt").read_text() == "mine"


def test_a_relative_restore_root_is_refused(s3env, monkeypatch):
    monkeypatch.setenv("RETRAIN_RESTORE_ROOTS", "restores-here")
    _dead_endpoint(monkeypatch)
    with pytest.raises(backup.BackupError, match="RETRAIN_RESTORE_ROOTS entry 'restores-here' is not an absolute"):
        backup.restore_backup("product_intent/some_run")


@pytest.mark.integration
def test_the_restore_dag_fails_fast_on_a_target_outside_the_root(s3env, airflow_db, tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    run = small_run(tmp_path / "run")
    bid = backup.backup_run(run, use_case="hr_leave", run_id="dag-root")["backup_id"]
    dag = DagBag(str(REPO / "dags" / "restore_backup.py")).dags["restore_backup"]
    plugins_before = sorted(os.listdir(REPO / "plugins"))
    result = dag.test(run_conf={"backup_id": bid, "target_dir": str(REPO / "plugins"), "overwrite": True})
    states = {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in result.get_task_instances()}
    tries = {ti.task_id: ti.try_number for ti in result.get_task_instances()}
    assert states == {"check_backup": "failed", "restore": "upstream_failed"}
    assert tries["check_backup"] == 1  # AirflowFailException: no retries burnt on a bad target
    assert sorted(os.listdir(REPO / "plugins")) == plugins_before


def test_cli_restore_refuses_a_target_outside_the_root(s3env, tmp_path, monkeypatch):
    _dead_endpoint(monkeypatch)
    env = {**os.environ}
    proc = subprocess.run([str(Path(sys.executable).with_name("retrain")), "backup", "restore",
                           "product_intent/some_run", "--target-dir", str(REPO / "plugins"), "--overwrite"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "restore root" in proc.stderr and "Traceback" not in proc.stderr and "cannot reach" not in proc.stderr


# --- 2. KMS: only the configured key, with the context bound to the backup ------------------------------------


def test_a_backup_wrapped_under_another_kms_key_is_refused(s3env, tmp_path, monkeypatch):
    from retrain import s3

    kms = s3.kms_client()
    ours = kms.create_key(Description="ours")["KeyMetadata"]["Arn"]
    theirs = kms.create_key(Description="attacker")["KeyMetadata"]["Arn"]
    run = small_run(tmp_path / "run")
    # The forgery: a complete, self-consistent backup whose data key came from another KMS key.
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", theirs)
    bid = backup.backup_run(run, use_case="email_intel", run_id="forged")["backup_id"]
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", ours)
    for call in (backup.verify_backup, backup.describe_backup):
        with pytest.raises(backup.BackupKeyError) as err:
            call(bid)
        msg = str(err.value)
        assert "\n" not in msg and theirs in msg and ours in msg and "RETRAIN_BACKUP_KMS_KEY_ID" in msg, msg
    # Pointing the manifest at our key does not help: KMS is asked to decrypt with our key only.
    _, manifest_key = _objects(s3env, bid)
    m = json.loads(s3env["client"].get_object(Bucket=s3env["bucket"], Key=manifest_key)["Body"].read())
    m["key"]["key_id"] = ours
    s3env["client"].put_object(Bucket=s3env["bucket"], Key=manifest_key, Body=json.dumps(m).encode())
    with pytest.raises(backup.BackupError):
        backup.verify_backup(bid)
    # Without any KMS key configured a KMS backup is not restored with whatever key the manifest names.
    monkeypatch.delenv("RETRAIN_BACKUP_KMS_KEY_ID")
    with pytest.raises(backup.BackupKeyError, match="RETRAIN_BACKUP_KMS_KEY_ID"):
        backup.describe_backup(bid)


def test_kms_decrypt_is_pinned_to_the_key_and_the_backups_context(s3env, tmp_path, monkeypatch):
    from retrain import s3

    key = s3.kms_client().create_key()["KeyMetadata"]["KeyId"]
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", key)
    bid = backup.backup_run(small_run(tmp_path / "run"), use_case="email_intel", run_id="ctx")["backup_id"]
    _, manifest_key = _objects(s3env, bid)
    m = json.loads(s3env["client"].get_object(Bucket=s3env["bucket"], Key=manifest_key)["Body"].read())
    assert set(m["key"]["encryption_context"].values()) == {bid, "email_intel"}
    calls = []
    real = s3.kms_client

    def spying(cfg=None):
        client = real(cfg)
        decrypt = client.decrypt

        def spy(**kwargs):
            calls.append(kwargs)
            return decrypt(**kwargs)

        client.decrypt = spy
        return client

    monkeypatch.setattr(s3, "kms_client", spying)
    assert backup.verify_backup(bid)["verified"]
    assert calls and all(c["KeyId"] == key for c in calls)
    assert all(set(c["EncryptionContext"].values()) == {bid, "email_intel"} for c in calls)
    # A manifest claiming another context does not get to choose what KMS checks.
    m["key"]["encryption_context"] = {}
    s3env["client"].put_object(Bucket=s3env["bucket"], Key=manifest_key, Body=json.dumps(m).encode())
    calls.clear()
    with pytest.raises(backup.BackupError):
        backup.verify_backup(bid)
    assert all(set(c["EncryptionContext"].values()) == {bid, "email_intel"} for c in calls)


# --- 3. an older version put back into the bucket is refused ---------------------------------------------------


def test_an_older_version_put_back_is_refused(s3env, tmp_path):
    run = small_run(tmp_path / "run", "v1")
    first = backup.backup_run(run, use_case="hr_leave", run_id="pinned")
    bid = first["backup_id"]
    archive_key, manifest_key = _objects(s3env, bid)
    c, b = s3env["client"], s3env["bucket"]
    old = {k: c.get_object(Bucket=b, Key=k)["Body"].read() for k in (archive_key, manifest_key)}
    receipt = json.loads((run / "backup.json").read_text())
    assert receipt["manifest_sha256"] == first["manifest_sha256"]

    small_run(run, "v2 - after a correction")
    second = backup.backup_run(run, use_case="hr_leave", run_id="pinned")
    assert second["manifest_sha256"] != first["manifest_sha256"]
    assert backup.verify_backup(bid)["verified"]
    for k, body in old.items():  # someone with write access to the bucket rolls the backup back
        c.put_object(Bucket=b, Key=k, Body=body)
    for call in (backup.verify_backup, backup.describe_backup, lambda i: backup.restore_backup(i, overwrite=True)):
        with pytest.raises(backup.BackupIntegrityError, match=f"this is not the latest version of {bid}"):
            call(bid)
    from retrain import db

    with db.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT use_case, run_id, manifest_sha256 FROM backup_versions WHERE backup_id = %s", (bid,))
        assert cur.fetchone() == ("hr_leave", "pinned", second["manifest_sha256"])


def test_a_backup_id_without_a_recorded_version_is_read_with_a_warning(s3env, tmp_path, caplog):
    from retrain import db

    bid = backup.backup_run(small_run(tmp_path / "run"), use_case="hr_leave", run_id="unpinned")["backup_id"]
    with db.connection() as conn, conn.cursor() as cur:  # a database rebuilt after a disaster knows nothing
        cur.execute("DELETE FROM backup_versions WHERE backup_id = %s", (bid,))
    assert backup.verify_backup(bid)["verified"]
    assert "has no recorded version" in caplog.text


def test_a_kms_alias_is_the_key_it_names(s3env, tmp_path, monkeypatch):
    from retrain import s3

    kms = s3.kms_client()
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName="alias/retrain-backups", TargetKeyId=key)
    kms.create_alias(AliasName="alias/someone-else", TargetKeyId=other)
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", "alias/retrain-backups")
    bid = backup.backup_run(small_run(tmp_path / "run"), use_case="email_intel", run_id="alias")["backup_id"]
    assert backup.verify_backup(bid)["verified"]
    monkeypatch.setenv("RETRAIN_BACKUP_KMS_KEY_ID", "alias/someone-else")
    with pytest.raises(backup.BackupKeyError, match="not the configured RETRAIN_BACKUP_KMS_KEY_ID"):
        backup.verify_backup(bid)


# --- 4. strict master keys ------------------------------------------------------------------------------------


def _encodings(raw: bytes) -> list[str]:
    std, url = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()
    return [std, std.rstrip("="), url, url.rstrip("="), raw.hex(), raw.hex().upper()]


@hsettings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32).filter(lambda k: len(set(k)) > 1))
@example(bytes.fromhex("fbff" * 16))  # URL-safe form is all '-' and '_' ("-_-_..."), standard form '+/+/...'
def test_every_encoding_of_a_32_byte_key_is_accepted(raw):
    for text in _encodings(raw):
        assert crypto.parse_master_key(text, "test") == raw, text


def test_a_url_safe_key_in_the_environment_encrypts_and_restores(s3env, tmp_path, monkeypatch):
    raw = bytes.fromhex("fbff" * 16)
    url = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert "-" in url and "_" in url
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", url)
    bid = backup.backup_run(small_run(tmp_path / "run"), use_case="hr_leave", run_id="urlsafe")["backup_id"]
    # The same key spelled in standard base64 (a rotation list may mix spellings) opens it.
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", base64.b64encode(raw).decode())
    assert backup.verify_backup(bid)["verified"]


@hsettings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=64).filter(lambda k: len(k) != 32))
def test_keys_of_another_length_are_refused(raw):
    for text in _encodings(raw):
        with pytest.raises(backup.BackupKeyError, match="32 bytes"):
            crypto.parse_master_key(text, "test")


@pytest.mark.parametrize("raw", [bytes(32), b"\xab" * 32, b"\xff" * 32, b"A" * 32], ids=["zero", "ab", "ff", "A"])
def test_degenerate_keys_are_refused(raw):
    for text in _encodings(raw):
        with pytest.raises(backup.BackupKeyError, match="repeat|zero"):
            crypto.parse_master_key(text, "test")


def test_mixed_or_damaged_base64_is_refused():
    raw = bytes(range(100, 132))
    std = base64.b64encode(raw).decode()
    for bad in (std[:-2] + "-_", std.replace(std[5], "*"), std + "==", " ", "", "g" * 64, std[:20]):
        with pytest.raises(backup.BackupKeyError):
            crypto.parse_master_key(bad, "test")
    with pytest.raises((binascii.Error, ValueError)):
        base64.b64decode("-_", validate=True)  # sanity: the standard alphabet really rejects URL-safe characters


# --- 5. archive members that collide -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [("a", "a/b"), ("a/b", "a")])
def test_conflicting_members_are_an_integrity_error(s3env, tmp_path, monkeypatch, order):
    run = small_run(tmp_path / "run")
    real = backup.select_files
    picked = real(run)
    monkeypatch.setattr(backup, "select_files", lambda rd, *a: [
        (name, p, s) for name, (_, p, s) in zip(order, picked)])
    bid = backup.backup_run(run, use_case="hr_leave", run_id=f"clash-{len(order[0])}")["backup_id"]
    monkeypatch.setattr(backup, "select_files", real)
    for call in (backup.verify_backup, backup.restore_backup):
        with pytest.raises(backup.BackupIntegrityError, match="conflict"):
            call(bid)
    from retrain.errors import is_user_error

    try:
        backup.restore_backup(bid)
    except backup.BackupIntegrityError as exc:
        assert is_user_error(exc)
    restores = settings.state_dir() / "restores" / "hr_leave"
    assert not [p for p in restores.iterdir() if p.name.startswith(".")] if restores.is_dir() else True
