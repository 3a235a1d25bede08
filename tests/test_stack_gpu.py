"""GPU workers are ephemeral: checkpoints on a worker's own disk, mirrored to S3, resumed by another worker.

With ``RETRAIN_CHECKPOINT_SCRATCH`` a worker writes checkpoints to its own disk instead of the shared run directory
(``RunDir.checkpoints``); the S3 mirror (retrain.train.mirror) is then the only way a retry elsewhere can resume.

* no stack: where checkpoints go with and without the setting, and a worker whose scratch is empty restores the
  newest mirrored checkpoint another worker's scratch uploaded;
* the running stack (``retrain stack``): two `gpu` workers with a scratch directory each; the one training is
  SIGKILLed once a checkpoint is mirrored and not restarted; the retry runs on the other worker, restores the
  checkpoint from S3 into its own scratch, resumes from its step, and the run ends in a decision.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_checkpoint_mirror import FP, MIRROR_LOGGER, fake_checkpoint, mirror_env  # noqa: F401 - fixture

from stack_helpers import api, stack  # noqa: F401 - fixtures
from retrain import settings
from retrain.rundir import RunDir, write_json

SCRATCH = "RETRAIN_CHECKPOINT_SCRATCH"
GPU_A, GPU_B = "airflow-worker-gpu", "airflow-worker-gpu-2"
RUN_ID = "manual__2026-12-03T10:00:00+00:00"
# As test_stack.TRAIN (not imported: that would collect its tests here too), plus force_retrain: the session's
# other runs may have trained on the same rows already.
TRAIN = {
    "max_train_steps": 4, "force_retrain": True,
    "training_overrides": {"save_steps": 2, "eval_steps": 2, "batch_size": 4, "logging_steps": 1},
}


# --- no stack needed ---------------------------------------------------------------------------------------------


def test_checkpoints_stay_in_the_run_directory_unless_a_worker_scratch_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(SCRATCH, raising=False)
    run = RunDir.for_run("product_intent", RUN_ID)
    assert run.checkpoints == run.candidate / "checkpoints" and run.fingerprint.parent == run.checkpoints

    scratch = tmp_path / "local-disk"
    monkeypatch.setenv(SCRATCH, str(scratch))
    assert run.checkpoints == scratch / "product_intent" / run.path.name / "checkpoints"
    assert run.fingerprint == run.checkpoints / "run_fingerprint.json"  # describes the checkpoints next to it
    # Inputs and outputs of the run stay on the shared volume.
    for shared in (run.train_result, run.checkpoint_mirror, run.trainer_log, run.adapter, run.merged):
        assert run.path in shared.parents, shared
    # A run directory outside the runs directory (another RETRAIN_HOME, a test): its own key, no collisions.
    a, b = RunDir(tmp_path / "x" / "run"), RunDir(tmp_path / "y" / "run")
    assert a.checkpoints.parent.parent == b.checkpoints.parent.parent == scratch
    assert a.checkpoints != b.checkpoints and a.checkpoints.parent.name.startswith("run-")
    assert run.checkpoints_under(None) == run.candidate / "checkpoints"

    monkeypatch.setenv(SCRATCH, "relative/dir")
    with pytest.raises(settings.SettingsError, match=r"RETRAIN_CHECKPOINT_SCRATCH='relative/dir' must be an absolute"):
        run.checkpoints  # noqa: B018 - the property reads the setting
    monkeypatch.setenv(SCRATCH, "  ")
    assert run.checkpoints == run.candidate / "checkpoints"


def test_a_worker_whose_scratch_lacks_the_checkpoint_restores_it_from_the_mirror(tmp_path, monkeypatch, caplog,
                                                                                 mirror_env):
    from retrain.train.mirror import mirror_for_run, restore_before_start

    caplog.set_level(logging.INFO, logger=MIRROR_LOGGER)
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "shared"))
    scratch_a, scratch_b = tmp_path / "worker-a", tmp_path / "worker-b"
    run = RunDir.for_run("product_intent", RUN_ID)
    run.candidate.mkdir(parents=True)

    # Worker A trains: its checkpoints on its own disk, mirrored.
    monkeypatch.setenv(SCRATCH, str(scratch_a))
    mirror = mirror_for_run(run, use_case="product_intent", run_id=RUN_ID, fingerprint=FP)
    assert restore_before_start(mirror) is None  # nothing mirrored yet
    write_json(run.fingerprint, FP)
    original = fake_checkpoint(run.checkpoints, 2)
    assert mirror.mirror_newest()["step"] == 2
    assert original.is_relative_to(scratch_a)
    assert not (run.candidate / "checkpoints").exists(), "checkpoints leaked onto the shared volume"

    # Worker A vanishes; the retry on worker B (same shared run directory, empty scratch) resumes from S3.
    monkeypatch.setenv(SCRATCH, str(scratch_b))
    caplog.clear()
    retry = mirror_for_run(run, use_case="product_intent", run_id=RUN_ID, fingerprint=FP)
    restored = restore_before_start(retry)
    expected = scratch_b / "product_intent" / run.path.name / "checkpoints" / "checkpoint-2"
    assert restored == expected
    assert {p.name: p.read_bytes() for p in restored.iterdir()} == {p.name: p.read_bytes() for p in original.iterdir()}
    assert json.loads((expected.parent / "run_fingerprint.json").read_text()) == FP
    assert f"resuming from mirrored checkpoint-2, restored from s3://{mirror_env}/" in caplog.text
    assert str(expected.parent) in caplog.text
    assert json.loads(run.checkpoint_mirror.read_text())["restored"]["step"] == 2


# --- the running stack -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(pg_url):
    from retrain import db
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    with db.connection(pg_url) as conn:
        db.ensure_schema(conn)
        if db.count_examples(conn, "product_intent") == 0:
            seed_examples(conn, load_use_case("product_intent"), 140, seed=11, dirty=0.0)
        conn.commit()
    return pg_url


def _wait_for_ping(stack, name: str, timeout: float = 180) -> None:
    wanted = stack.worker_names()[name]
    deadline = time.monotonic() + timeout
    while wanted not in stack.ping_workers():
        assert time.monotonic() < deadline, f"{name} does not answer a ping"
        time.sleep(2)


def _trainers(run_dir: Path) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or ())
            if "retrain.train.qlora.trainer" in cmd and str(run_dir) in cmd and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _mirrored_steps(run: RunDir) -> list[int]:
    try:
        record = json.loads(run.checkpoint_mirror.read_text())
    except (OSError, ValueError):
        return []
    return sorted(m["step"] for m in record.get("mirrored", []))


@pytest.fixture
def two_gpu_workers(stack, tmp_path_factory):
    """The stack's gpu worker restarted with scratch A; a second gpu worker (scratch B) is the test's to start.
    Afterwards: the second worker stopped, the first back to its normal environment (other tests share it)."""
    scratch = {GPU_A: tmp_path_factory.mktemp("gpu-a-disk"), GPU_B: tmp_path_factory.mktemp("gpu-b-disk")}
    stack.kill(GPU_A, signal.SIGTERM)  # idle: a warm shutdown
    stack.restart(GPU_A, env={SCRATCH: str(scratch[GPU_A])})
    _wait_for_ping(stack, GPU_A)
    try:
        yield scratch
    finally:
        stack.remove_worker(GPU_B)
        if stack.procs[GPU_A].poll() is None:
            stack.kill(GPU_A, signal.SIGTERM)
        stack.restart(GPU_A)
        _wait_for_ping(stack, GPU_A)


@pytest.mark.stack
@pytest.mark.slow  # trains through the real stack and kills a gpu worker: ~15 min on a busy 2-core host
def test_retry_on_another_gpu_worker_resumes_from_the_mirrored_checkpoint(stack, api, seeded, two_gpu_workers):
    scratch = two_gpu_workers
    run_id = api.trigger(TRAIN)["dag_run_id"]
    rd = RunDir.for_run("product_intent", run_id)
    ti = api.wait_task(run_id, "train_qlora", {"running"}, timeout=600)
    assert (ti["queue"], ti["hostname"], ti["pool"]) == ("gpu", GPU_A, "gpu")
    # Started now, so that the first try cannot land on it: a second machine joining with a disk of its own.
    stack.add_worker(GPU_B, queues=("gpu",), env={SCRATCH: str(scratch[GPU_B])})

    deadline = time.monotonic() + 1800
    while not _mirrored_steps(rd):
        assert time.monotonic() < deadline, "no checkpoint mirrored"
        assert api.task_instances(run_id)["train_qlora"]["state"] == "running", api.diagnose(run_id)
        time.sleep(1)
    killed_at = _mirrored_steps(rd)[-1]
    on_a = rd.checkpoints_under(scratch[GPU_A])
    assert (on_a / f"checkpoint-{killed_at}").is_dir(), "checkpoints are written to worker A's own disk"
    assert not list(rd.checkpoints_under(None).glob("checkpoint-*")), "checkpoints on the shared volume"
    first_trainers = {p.pid for p in _trainers(rd.path)}
    assert first_trainers, "the trainer runs as its own process"
    stack.kill(GPU_A, signal.SIGKILL)  # the rented instance is gone, and it does not come back
    deadline = time.monotonic() + 60
    while [p for p in _trainers(rd.path) if p.pid in first_trainers]:
        assert time.monotonic() < deadline, "the killed worker's trainer is still running"
        time.sleep(1)

    # evaluate_candidate alone took 34 min at a load average of 17 on 2 cores (the first run of this test timed out
    # at 2400 s while evaluating, after the retry had resumed and trained correctly).
    done = api.wait(run_id, timeout=5400)
    assert done["state"] == "success", api.diagnose(run_id)
    tries = api.tries(run_id, "train_qlora")
    assert [(t["try_number"], t["hostname"]) for t in tries] == [(1, GPU_A), (2, GPU_B)], tries
    assert tries[0]["state"] in ("failed", "up_for_retry") and tries[1]["state"] == "success", tries
    log = api.task_log(run_id, "train_qlora", 2)
    m = re.search(r"resuming from mirrored checkpoint-(\d+), restored from s3://\S+ into (\S+)", log)
    assert m, log[-3000:]
    restored_step, restored_into = int(m.group(1)), Path(m.group(2))
    assert restored_step >= killed_at and restored_into == rd.checkpoints_under(scratch[GPU_B])
    result = json.loads(rd.train_result.read_text())
    assert result["resumed_from_step"] == restored_step and result["steps"] == TRAIN["max_train_steps"], result
    assert result["checkpoints_dir"] == str(rd.checkpoints_under(scratch[GPU_B]))
    assert (restored_into / f"checkpoint-{restored_step}" / "trainer_state.json").is_file()
    assert not list(rd.checkpoints_under(None).glob("checkpoint-*")), "checkpoints on the shared volume"
    assert not _trainers(rd.path), "a trainer process outlived its run"
    decision = json.loads(rd.decision.read_text())
    assert decision["decision"] in ("GO", "NO-GO")
    hosts = {t: (ti["state"], ti.get("queue"), ti.get("hostname")) for t, ti in api.task_instances(run_id).items()}
    print(f"\n[figures] two gpu workers, no shared checkpoint disk: {GPU_A} killed after checkpoint-{killed_at} was "
          f"mirrored; try 2 on {GPU_B} restored checkpoint-{restored_step} from S3 into {restored_into} and resumed "
          f"from step {result['resumed_from_step']}; decision {decision['decision']}; tries "
          f"{[(t['try_number'], t['state'], t['hostname']) for t in tries]}; (state, queue, hostname) per task:\n"
          + "\n".join(f"  {t:20s} {h}" for t, h in hosts.items()), file=sys.stderr)
