"""Checkpoints that survive an ephemeral GPU worker: mirrored to S3 (encrypted like backups), pruned, restored.

A real moto S3 server and the tiny random Llama of test_train: the first tests drive the mirror directly with
hand-made checkpoint directories (fast, hostile: tampering, copying, other settings), the last ones train for
real through the launcher, kill the trainer, wipe the worker's disk and resume on "another worker".
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import airflow.sdk  # noqa: F401 - imported (and its logging configured) before caplog attaches, as in a worker
import pytest
from test_train import FAST, _one_thread_for_tiny_models, make_run_dir, tiny_model  # noqa: F401 - fixtures

from retrain.rundir import RunDir, write_json

MIRROR_LOGGER = "retrain.train.mirror"
MASTER_KEY = base64.b64encode(bytes(range(32))).decode()
SECRET = "mirror-secret-Zq81xTr"
FP = {"spec": "abc", "base_model": "tiny", "train_sha256": "1" * 64, "val_sha256": "2" * 64}


@pytest.fixture
def mirror_env(backup_env, monkeypatch):
    """backup_env (moto bucket + master key) with a recognisable S3 secret, mirroring in its default mode."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("RETRAIN_CHECKPOINT_MIRROR", raising=False)
    return backup_env


def _s3():
    from retrain import s3

    return s3.client(s3.settings())


def _objects(bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = _s3()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _mirrored_steps(bucket: str) -> list[int]:
    return sorted({int(m[1]) for k in _objects(bucket) if k.endswith("manifest.json")
                   and (m := re.search(r"/checkpoint-(\d+)/manifest\.json$", k))})


def fake_checkpoint(checkpoints: Path, step: int, best: int | None = None) -> Path:
    """A directory is_complete_checkpoint accepts: weights, optimizer, scheduler, RNG, trainer state."""
    d = checkpoints / f"checkpoint-{step}"
    d.mkdir(parents=True)
    header = json.dumps({"base_model.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}})
    (d / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + os.urandom(16))
    (d / "optimizer.pt").write_bytes(b"OPTIMIZER-STATE-" + os.urandom(64))
    (d / "scheduler.pt").write_bytes(b"SCHEDULER-STATE")
    (d / "rng_state.pth").write_bytes(b"RNG-STATE")
    state = {"global_step": step, "log_history": [{"loss": 1.5, "step": step}],
             "best_model_checkpoint": str(checkpoints / f"checkpoint-{best}") if best else None}
    (d / "trainer_state.json").write_text(json.dumps(state))
    return d


def _mirror(tmp_path: Path, fingerprint: dict = FP, keep: int = 2, run_id: str = "manual__2026-12-01T00:00:00+00:00"):
    from retrain.train.mirror import mirror_for_run

    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(run.fingerprint, fingerprint)
    return mirror_for_run(run, use_case="product_intent", run_id=run_id, fingerprint=fingerprint, keep=keep)


# --- the mirror on hand-made checkpoints ---------------------------------------------------------------------


def test_mirror_knobs_are_validated_and_do_not_invalidate_checkpoints():
    from retrain.schemas.training import TrainingSpecError, parse_spec

    with pytest.raises(TrainingSpecError, match=r"mirror_keep: Input should be greater than or equal to 1"):
        parse_spec({"mirror_keep": 0})
    with pytest.raises(TrainingSpecError, match=r"checkpoint_mirror: Input should be a valid boolean"):
        parse_spec({"checkpoint_mirror": "sometimes"})
    # Switching mirroring or its retention for a retry keeps the checkpoints resumable (same fingerprint).
    assert parse_spec({}).fingerprint() == parse_spec({"checkpoint_mirror": False, "mirror_keep": 5}).fingerprint()


def test_mirror_is_off_without_s3_or_when_switched_off(tmp_path, monkeypatch, caplog, mirror_env):
    from retrain.train.mirror import mirror_for_run

    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    run = RunDir(tmp_path / "run")
    monkeypatch.setenv("RETRAIN_CHECKPOINT_MIRROR", "off")
    assert mirror_for_run(run, use_case="product_intent", run_id="r", fingerprint=FP) is None
    monkeypatch.delenv("RETRAIN_CHECKPOINT_MIRROR")
    assert mirror_for_run(run, use_case="product_intent", run_id="r", fingerprint=FP, enabled=False) is None
    monkeypatch.delenv("RETRAIN_BACKUP_MASTER_KEY")
    assert mirror_for_run(run, use_case="product_intent", run_id="r", fingerprint=FP) is None
    monkeypatch.setenv("RETRAIN_BACKUP_MASTER_KEY", MASTER_KEY)
    for name in ("RETRAIN_S3_ENDPOINT_URL", "RETRAIN_S3_BUCKET"):
        monkeypatch.delenv(name)
    assert mirror_for_run(run, use_case="product_intent", run_id="r", fingerprint=FP) is None
    monkeypatch.setenv("RETRAIN_CHECKPOINT_MIRROR", "sometimes")
    assert mirror_for_run(run, use_case="product_intent", run_id="r", fingerprint=FP) is None
    lines = [r.getMessage() for r in caplog.records if r.name == MIRROR_LOGGER]
    assert len(lines) == 5 and all(ln.startswith("checkpoint mirror: off (") for ln in lines), lines
    assert "RETRAIN_CHECKPOINT_MIRROR=off" in lines[0] and "checkpoint_mirror is false" in lines[1]
    assert "no backup encryption key" in lines[2] and "S3 is not configured" in lines[3]
    assert "RETRAIN_CHECKPOINT_MIRROR='sometimes' is not supported" in lines[4]
    assert not run.checkpoint_mirror.exists()


def test_uploads_are_encrypted_recorded_and_pruned_to_the_newest_few(tmp_path, mirror_env, caplog):
    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    mirror = _mirror(tmp_path)
    assert mirror is not None and mirror.base == "backups/checkpoints/product_intent/manual__2026-12-01T00_00_00_00_00"
    ckpts = mirror.run.checkpoints
    for step in (2, 4, 6, 8):
        fake_checkpoint(ckpts, step, best=4)
        assert mirror.mirror_newest()["step"] == step
        assert mirror.mirror_newest() is None  # already mirrored: nothing uploaded twice
    # The newest two, plus the best one the trainer tracks (it must survive for load_best_model_at_end).
    assert _mirrored_steps(mirror_env) == [4, 6, 8]
    objects = _objects(mirror_env)
    assert all(k.startswith(mirror.base + "/checkpoint-") for k in objects)
    plaintext = [(ckpts / "checkpoint-8" / f).read_bytes() for f in ("optimizer.pt", "adapter_model.safetensors")]
    for key, body in objects.items():
        if key.endswith("archive.tar.enc"):
            assert body.startswith(b"RTRNBAK1")  # the backups' stream format
            for needle in (b"lora_A", b"global_step", b"log_history", b"OPTIMIZER-STATE", b"trainer_state",
                           b"safetensors", *(p[:24] for p in plaintext)):
                assert needle not in body, (key, needle)
        else:
            manifest = json.loads(body)
            assert manifest["format"] == "retrain-checkpoint/1" and manifest["fingerprint"] == FP
            assert manifest["key"]["method"] == "aes-256-gcm" and "wrapped_key" in manifest["key"]
            assert b"log_history" not in body and b"OPTIMIZER-STATE" not in body
    record = json.loads(mirror.run.checkpoint_mirror.read_text())
    assert [m["step"] for m in record["mirrored"]] == [4, 6, 8] and record["pruned"] == [2]
    assert record["last_error"] is None and record["keep"] == 2
    assert "pruned checkpoint-2" in caplog.text
    assert MASTER_KEY not in caplog.text and SECRET not in caplog.text


def test_restore_verifies_and_refuses_tampered_copied_or_foreign_checkpoints(tmp_path, mirror_env, caplog):
    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    mirror = _mirror(tmp_path, keep=3)
    ckpts = mirror.run.checkpoints
    for step in (2, 4, 6):
        fake_checkpoint(ckpts, step)
        mirror.mirror_newest()
    original = {p.name: (ckpts / "checkpoint-4" / p.name).read_bytes() for p in (ckpts / "checkpoint-4").iterdir()}
    shutil.rmtree(ckpts)  # the other worker's disk
    client, base = _s3(), mirror.base
    # checkpoint-6: one flipped byte in the archive. checkpoint-8: a copy of checkpoint-2 under another step
    # (manifest and archive), which the id bound into the key wrapping and the header refuses.
    key6 = f"{base}/checkpoint-6/archive.tar.enc"
    body = bytearray(client.get_object(Bucket=mirror_env, Key=key6)["Body"].read())
    body[len(body) // 2] ^= 1
    client.put_object(Bucket=mirror_env, Key=key6, Body=bytes(body))
    for leaf in ("archive.tar.enc", "manifest.json"):
        client.copy_object(Bucket=mirror_env, CopySource={"Bucket": mirror_env, "Key": f"{base}/checkpoint-2/{leaf}"},
                           Key=f"{base}/checkpoint-8/{leaf}")

    restored = mirror.restore(None)
    assert restored == ckpts / "checkpoint-4"
    assert {p.name: p.read_bytes() for p in restored.iterdir()} == original
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")], "staging directories left behind"
    text = caplog.text
    assert re.search(r"mirrored checkpoint-8 cannot be used \(.*copied from another run or step", text)
    assert re.search(r"mirrored checkpoint-6 cannot be used \(.*failed authentication", text)
    assert "resuming from mirrored checkpoint-4" in text
    assert json.loads(mirror.run.checkpoint_mirror.read_text())["restored"]["step"] == 4
    # The local copy is as new as the mirror now: nothing is downloaded again.
    caplog.clear()
    assert mirror.restore(4) is None and "resuming" not in caplog.text

    # Another run of the same use case: its own prefix, nothing to resume.
    other = _mirror(tmp_path / "other", run_id="manual__other")
    assert other.restore(None) is None
    # Same run, other settings or data: the mirrored checkpoints are not resumed, and are pruned at its first save.
    changed = {**FP, "train_sha256": "3" * 64}
    foreign = _mirror(tmp_path / "changed", fingerprint=changed)
    caplog.clear()
    assert foreign.restore(None) is None
    assert "mirrored checkpoint-4 was computed from other settings or data (train_sha256 changed): not resumed" \
        in caplog.text
    fake_checkpoint(foreign.run.checkpoints, 2)
    foreign.mirror_newest()
    assert _mirrored_steps(mirror_env) == [2]
    assert json.loads(_objects(mirror_env, f"{base}/checkpoint-2/manifest.json")[
        f"{base}/checkpoint-2/manifest.json"])["fingerprint"] == changed


def test_a_replaced_manifest_is_refused_when_the_run_recorded_another(tmp_path, mirror_env, caplog):
    """checkpoint_mirror.json pins each mirrored manifest's digest: an older upload put back is not resumed."""
    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    mirror = _mirror(tmp_path)
    ckpts = mirror.run.checkpoints
    fake_checkpoint(ckpts, 2)
    mirror.mirror_newest()
    key = f"{mirror.base}/checkpoint-2/manifest.json"
    first = _objects(mirror_env, key)[key]
    archive = _objects(mirror_env, key.replace("manifest.json", "archive.tar.enc"))
    record = json.loads(mirror.run.checkpoint_mirror.read_text())
    record["mirrored"] = []  # upload the same step again (a retried save): a new data key, a new manifest
    write_json(mirror.run.checkpoint_mirror, record)
    mirror.mirror_newest()
    client = _s3()
    client.put_object(Bucket=mirror_env, Key=key, Body=first)  # put the first version back
    for k, v in archive.items():
        client.put_object(Bucket=mirror_env, Key=k, Body=v)
    shutil.rmtree(ckpts)
    assert mirror.restore(None) is None
    assert "is not the version this run uploaded" in caplog.text


def test_s3_errors_are_warnings_and_the_next_save_retries(tmp_path, mirror_env, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    mirror = _mirror(tmp_path)
    fake_checkpoint(mirror.run.checkpoints, 2)
    real = mirror.upload
    calls = []

    def flaky(path):
        calls.append(path.name)
        if len(calls) == 1:
            raise ConnectionError("the network went away")
        return real(path)

    monkeypatch.setattr(mirror, "upload", flaky)
    mirror.start()
    mirror.notify()
    deadline = time.monotonic() + 30
    while "upload of checkpoint-2 failed" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "training continues, the next save retries" in caplog.text
    assert json.loads(mirror.run.checkpoint_mirror.read_text())["last_error"]["checkpoint"] == "checkpoint-2"
    fake_checkpoint(mirror.run.checkpoints, 4)
    mirror.notify()
    mirror.close(catch_up=True)
    assert calls == ["checkpoint-2", "checkpoint-4"] and _mirrored_steps(mirror_env) == [4]
    assert json.loads(mirror.run.checkpoint_mirror.read_text())["last_error"] is None


# --- real training through the launcher ----------------------------------------------------------------------


def _launcher_text(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name in ("retrain.train.launch", MIRROR_LOGGER))


def _secrets_absent(*texts: str) -> None:
    for text in texts:
        for secret in (MASTER_KEY, SECRET, bytes(range(32)).hex()):
            assert secret not in text


def test_training_mirrors_checkpoints_and_another_worker_resumes_from_them(tiny_model, tmp_path, mirror_env, caplog):
    """Train, kill the trainer mid-run, lose the worker's checkpoints, retry: the retry resumes from the mirror."""
    from retrain.train.launch import TrainingFailed, train_qlora
    from retrain.train.qlora.checkpoints import checkpoint_step, latest_complete_checkpoint

    caplog.set_level(logging.INFO)
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model))
    overrides = {**FAST, "adapter": "lora", "max_steps": 30, "eval_steps": 2, "save_steps": 2,
                 "early_stopping_patience": None, "learning_rate": 1e-3, "mirror_keep": 2}
    run = RunDir(run_dir)
    failure: list[BaseException] = []

    def first_run() -> None:
        try:
            train_qlora(str(run_dir), extra_overrides=overrides)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and thread.is_alive():
        try:
            mirrored = json.loads(run.checkpoint_mirror.read_text()).get("mirrored", [])
        except (OSError, ValueError):
            mirrored = []
        if len(mirrored) >= 2 and run.trainer_pid.is_file():
            os.kill(int(run.trainer_pid.read_text()), signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    thread.join(240)
    assert killed and failure and isinstance(failure[0], TrainingFailed), "the trainer finished before the kill"
    first_log = _launcher_text(caplog)
    assert "checkpoint mirror: on, s3://" in first_log
    # The failed try mirrored its newest checkpoint before giving up (catch-up), and pruned to the newest two
    # (plus the best, which may be older).
    local_newest = checkpoint_step(latest_complete_checkpoint(run.checkpoints))
    steps = _mirrored_steps(mirror_env)
    assert steps[-1] == local_newest and 2 <= len(steps) <= 3, (steps, local_newest)
    best = json.loads((run.checkpoints / f"checkpoint-{local_newest}" / "trainer_state.json").read_text())
    best_step = checkpoint_step(Path(best["best_model_checkpoint"] or "none"))
    assert all(s == best_step for s in steps[:-2]), (steps, best_step)  # the newest two, plus the best one
    for key, body in _objects(mirror_env).items():
        if key.endswith("archive.tar.enc"):
            assert b"global_step" not in body and b"lora_A" not in body and b"__metadata__" not in body

    # "Another worker": the local checkpoints are gone (the run directory's inputs are on the shared volume).
    shutil.rmtree(run.checkpoints)
    caplog.clear()
    result = train_qlora(str(run_dir), extra_overrides=overrides)
    text = _launcher_text(caplog)
    assert f"resuming from mirrored checkpoint-{local_newest}" in text
    assert f"resuming from checkpoint-{local_newest} (step {local_newest})" in text
    first_step = int(re.search(r"\[train\] step (\d+)/30", text)[1])
    assert first_step > local_newest, "training restarted from step 0 instead of resuming"
    assert result["resumed_from_step"] == local_newest and result["steps"] == 30
    assert result["eval_loss_initial"] is not None  # the trainer state (step-0 evaluation) came back too
    record = json.loads(run.checkpoint_mirror.read_text())
    assert record["restored"]["step"] == local_newest and record["mirrored"][-1]["step"] > local_newest
    # No key material, no S3 secret in the task log, the trainer's log or the record.
    _secrets_absent(first_log, text, run.trainer_log.read_text(), run.checkpoint_mirror.read_text())

    # A retry with other settings on a fresh worker does not resume the mirrored checkpoints.
    shutil.rmtree(run.candidate)
    caplog.clear()
    other = {**overrides, "learning_rate": 2e-3, "max_steps": 2}
    result = train_qlora(str(run_dir), extra_overrides=other)
    text = _launcher_text(caplog)
    assert re.search(r"mirrored checkpoint-\d+ was computed from other settings or data \(spec changed\): "
                     r"not resumed", text), text
    assert "resuming from" not in text and result["resumed_from_step"] is None and result["steps"] == 2


def test_unreachable_s3_does_not_fail_training(tiny_model, tmp_path, mirror_env, monkeypatch, caplog):
    from retrain.train.launch import train_qlora

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RETRAIN_S3_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("RETRAIN_S3_MAX_ATTEMPTS", "1")  # no backoff: the test is about training going on
    caplog.set_level(logging.INFO)
    run_dir = make_run_dir(tmp_path / "run", str(tiny_model), n=60)
    started = time.monotonic()
    result = train_qlora(str(run_dir), extra_overrides={**FAST, "max_steps": 4, "eval_steps": 2, "save_steps": 2})
    assert result["steps"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == MIRROR_LOGGER and r.levelno == logging.WARNING]
    assert any("cannot list" in w and "starting from the local checkpoints" in w for w in warnings), warnings
    assert any(re.search(r"upload of checkpoint-\d failed \(cannot reach the S3 endpoint", w) for w in warnings), warnings
    assert json.loads(RunDir(run_dir).checkpoint_mirror.read_text())["last_error"]["error"]
    _secrets_absent(caplog.text)
    assert time.monotonic() - started < 120
