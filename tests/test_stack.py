"""The platform run the way production runs it: `retrain stack` (retrain.cli.stack) starts docker-compose.yaml's
process list natively - CeleryExecutor with a Redis broker and a PostgreSQL metadata DB, api-server, scheduler,
dag-processor, triggerer, a default and a `gpu` Celery worker, an S3 server - and the tests drive the monthly DAG
through the REST API only, as a user or another system would.

* the compose file and the native process list cannot drift apart (no stack needed);
* a dry run: the data stages run on the default worker;
* the monthly schedule and max_active_runs=1: a run for the 2026-11-01 03:00 logical date and a second trigger,
  which waits queued until the first is done;
* a real run: data stages on the default worker, train_qlora on the gpu worker; the gpu worker is SIGKILLed in the
  middle of training and restarted, the task is retried there and resumes from the newest checkpoint, no trainer
  process is left over, and the run ends in a decision.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from datetime import datetime, timezone

import psutil
import pytest

from stack_helpers import DAG_ID, api, stack  # noqa: F401 - fixtures
from retrain.cli import stack as native
from retrain.rundir import RunDir

DATA_STAGES = ("prepare_run", "collect_examples", "build_dataset", "validate_dataset", "report_dataset",
               "choose_backend")
ROWS, SEED = 140, 11
TRAIN = {
    "max_train_steps": 4,
    # A checkpoint every 2 steps (the worker is killed after the first one; checkpoints must be evaluated ones),
    # half-size batches: the smallest run that still crashes mid-training and resumes.
    "training_overrides": {"save_steps": 2, "eval_steps": 2, "batch_size": 4, "logging_steps": 1},
}  # the YAML's thresholds: 4 steps give a NO-GO, which is a successful run too (only a decision is required)


# --- no stack needed ---------------------------------------------------------------------------------------------


def test_every_compose_service_has_a_native_process_and_the_gpu_worker_matches_the_pool():
    compose = native.load_compose()
    services = {s.name: s for s in native.airflow_services(compose, {})}
    infra = set(native.INFRA)
    tools = {n for n, s in compose["services"].items() if set(s.get("profiles") or ()) & native.TOOL_PROFILES}
    assert set(compose["services"]) == set(services) | infra | tools
    assert {n: s.argv[1:] for n, s in services.items() if not s.queues} == {
        "airflow-apiserver": ["api-server"], "airflow-scheduler": ["scheduler"],
        "airflow-dag-processor": ["dag-processor"], "airflow-triggerer": ["triggerer"]}
    assert services["airflow-worker"].queues == ("default",)
    gpu = services["airflow-worker-gpu"]
    assert gpu.queues == ("gpu",) and gpu.argv[1:3] == ["celery", "worker"]
    # The gpu worker runs as many training tasks at once as the gpu pool has slots, with or without an override.
    for env in ({}, {"RETRAIN_GPU_POOL_SLOTS": "3"}):
        assert native.gpu_pool_slots(compose, env) == native.airflow_services(compose, env)[-1].concurrency
    assert native.gpu_pool_slots(compose, {"RETRAIN_GPU_POOL_SLOTS": "3"}) == 3
    # Queue overrides apply natively too (a host without GPUs trains on the CPU worker).
    cpu = {s.name: s for s in native.airflow_services(compose, {"RETRAIN_CPU_WORKER_QUEUES": "default,gpu"})}
    assert cpu["airflow-worker"].queues == ("default", "gpu")


def test_a_compose_service_without_a_native_process_refuses_to_start():
    compose = native.load_compose()
    compose["services"]["airflow-flower"] = {"command": "celery flower", "environment": {}}
    native.airflow_services(compose, {})  # an Airflow command: runs natively as `airflow celery flower`
    compose["services"]["vector-db"] = {"image": "qdrant/qdrant"}
    with pytest.raises(native.StackError, match="'vector-db' has no native equivalent"):
        native.airflow_services(compose, {})


def test_every_airflow_setting_of_the_compose_file_has_a_native_value(tmp_path):
    compose = native.load_compose()
    env = native.native_env(compose, tmp_path, native.Ports(), "postgresql://u@/postgres?host=/s", "postgresql://x")
    assert set(native.common_env(compose)) <= set(env) | set(native.NOT_NATIVE)
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://127.0.0.1:")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
    compose["x-airflow-common"]["environment"]["AIRFLOW__CORE__NEW_THING"] = "x"
    with pytest.raises(native.StackError, match="AIRFLOW__CORE__NEW_THING"):
        native.native_env(compose, tmp_path, native.Ports(), "postgresql://u@/postgres?host=/s", "postgresql://x")


def test_compose_interpolation():
    env = {"A": "1", "EMPTY": ""}
    assert native.interpolate("${A:-9} ${B:-default} ${EMPTY:-d} $${HOSTNAME} ${A}", env) == "1 default d ${HOSTNAME} 1"


# --- the running stack -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded(db_conn_module):
    return ROWS


@pytest.fixture(scope="module")
def db_conn_module(pg_url):
    from retrain import db
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    with db.connection(pg_url) as conn:
        db.ensure_schema(conn)
        if db.count_examples(conn, "product_intent") == 0:
            seed_examples(conn, load_use_case("product_intent"), ROWS, seed=SEED, dirty=0.0)
        conn.commit()
    return pg_url


def _hosts(api, run_id: str) -> dict[str, tuple[str, str, str]]:
    return {t: (ti["state"], ti.get("queue"), ti.get("hostname")) for t, ti in api.task_instances(run_id).items()}


@pytest.mark.stack
def test_dry_run_runs_the_data_stages_on_the_default_worker(stack, api, seeded):
    assert stack.ready_seconds is not None and stack.ready_seconds < 240
    health = stack.health()
    assert all(health[k]["status"] == "healthy" for k in ("metadatabase", "scheduler", "triggerer", "dag_processor"))
    assert set(stack.worker_names().values()) <= stack.ping_workers()

    run = api.trigger({"dry_run": True})
    done = api.wait(run["dag_run_id"], timeout=240)
    hosts = _hosts(api, run["dag_run_id"])
    assert done["state"] == "success", api.diagnose(run_id)
    for task in DATA_STAGES:
        assert hosts[task] == ("success", "default", "airflow-worker"), (task, hosts[task])
    assert hosts["train_qlora"][0] == "skipped" and hosts["train_qlora"][1] == "gpu"


@pytest.mark.stack
def test_monthly_run_for_a_logical_date_and_a_second_trigger_waits_for_it(stack, api, seeded):
    dag = api.get(f"/api/v2/dags/{DAG_ID}")
    now = datetime.now(timezone.utc)
    first_of_next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, 3, tzinfo=timezone.utc)
    assert datetime.fromisoformat(dag["next_dagrun_logical_date"]) == first_of_next_month, dag
    assert dag["timetable_summary"] == "0 3 1 * *" and dag["max_active_runs"] == 1
    # Unpausing made the scheduler create the latest monthly run itself (catchup=False: only that one).
    this_month = datetime(now.year, now.month, 1, 3, tzinfo=timezone.utc)
    if now < this_month:
        this_month = datetime(now.year - (now.month == 1), (now.month - 2) % 12 + 1, 1, 3, tzinfo=timezone.utc)
    scheduled = [r for r in api.get(f"/api/v2/dags/{DAG_ID}/dagRuns", limit=100)["dag_runs"]
                 if r["run_type"] == "scheduled"]
    assert [datetime.fromisoformat(r["logical_date"]) for r in scheduled] == [this_month], scheduled

    first = api.trigger({"dry_run": True}, logical_date="2026-11-01T03:00:00Z")
    second = api.trigger({"dry_run": True})
    first_id, second_id = first["dag_run_id"], second["dag_run_id"]
    assert datetime.fromisoformat(first["logical_date"]) == datetime(2026, 11, 1, 3, tzinfo=timezone.utc)
    seen_waiting = False
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        a, b = api.run(first_id), api.run(second_id)
        if a["state"] == "running":
            assert b["state"] == "queued", (a["state"], b["state"])  # max_active_runs=1
            seen_waiting = True
        if a["state"] in ("success", "failed") and b["state"] in ("success", "failed"):
            break
        time.sleep(1)
    assert seen_waiting
    assert (a["state"], b["state"]) == ("success", "success")
    assert datetime.fromisoformat(b["start_date"]) >= datetime.fromisoformat(a["end_date"])
    # The run's interval is November's 03:00 cron point; what it collected is recorded in the run directory.
    assert datetime.fromisoformat(a["data_interval_end"]) == datetime(2026, 11, 1, 3, tzinfo=timezone.utc)
    run_config = json.loads(RunDir.for_run("product_intent", first_id).run_config.read_text())
    assert run_config["run_id"] == first_id


def _trainers(run_dir) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or ())
        if "retrain.train.qlora.trainer" in cmd and str(run_dir) in cmd:
            out.append(proc)
    return out


def _complete_checkpoints(run: RunDir) -> list[int]:
    root = run.checkpoints
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


@pytest.mark.stack
@pytest.mark.slow  # trains through the real stack and kills the gpu worker: ~10 min idle on 2 cores (make test-all)
def test_real_run_trains_on_the_gpu_worker_survives_its_crash_and_resumes(stack, api, seeded):
    run = api.trigger(TRAIN)
    run_id = run["dag_run_id"]
    rd = RunDir.for_run("product_intent", run_id)
    ti = api.wait_task(run_id, "train_qlora", {"running"}, timeout=300)
    assert (ti["queue"], ti["hostname"], ti["pool"]) == ("gpu", "airflow-worker-gpu", "gpu")

    # Crash the gpu worker once training has written a checkpoint: its whole process group, at once.
    deadline = time.monotonic() + 900
    while not _complete_checkpoints(rd):
        assert time.monotonic() < deadline, "no checkpoint written"
        assert api.task_instances(run_id)["train_qlora"]["state"] == "running"
        time.sleep(1)
    killed_at = _complete_checkpoints(rd)[-1]
    first_trainers = {p.pid for p in _trainers(rd.path)}
    assert first_trainers, "the trainer runs as its own process"
    stack.kill("airflow-worker-gpu", signal.SIGKILL)
    # Nothing of the first try keeps training once its worker is gone.
    deadline = time.monotonic() + 60
    while [p for p in _trainers(rd.path) if p.pid in first_trainers and p.is_running()
           and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, "the killed worker's trainer is still running"
        time.sleep(1)
    stack.restart("airflow-worker-gpu")

    done = api.wait(run_id, timeout=1800)
    hosts = _hosts(api, run_id)
    assert done["state"] == "success", api.diagnose(run_id)
    for task in DATA_STAGES:
        assert hosts[task][1:] == ("default", "airflow-worker"), (task, hosts[task])
    assert hosts["train_qlora"] == ("success", "gpu", "airflow-worker-gpu")
    for task in ("register_candidate", "evaluate_candidate", "decide", "backup_to_s3", "cleanup"):
        assert hosts[task] == ("success", "default", "airflow-worker"), (task, hosts[task])
    tries = api.tries(run_id, "train_qlora")
    assert [t["try_number"] for t in tries] == [1, 2], tries
    assert tries[0]["state"] in ("failed", "up_for_retry") and tries[1]["state"] == "success", tries
    assert {t["hostname"] for t in tries} == {"airflow-worker-gpu"}, tries

    result = json.loads(rd.train_result.read_text())
    assert result["steps"] == TRAIN["max_train_steps"]
    assert result["resumed_from_step"] == killed_at or result["resumed_from_step"] >= killed_at, result
    assert f"resuming from checkpoint-{result['resumed_from_step']}" in rd.trainer_log.read_text()
    assert not _trainers(rd.path), "a trainer process outlived its run"
    decision = json.loads(rd.decision.read_text())
    assert decision["decision"] in ("GO", "NO-GO")
    print(f"\n[figures] stack ready in {stack.ready_seconds}s; killed after checkpoint-{killed_at}, resumed from step "
          f"{result['resumed_from_step']}; decision {decision['decision']}; (state, queue, hostname) per task:\n"
          + "\n".join(f"  {t:20s} {h}" for t, h in hosts.items()), file=sys.stderr)
    assert (hosts["deploy_model"][0], hosts["reject_candidate"][0]) in (("success", "skipped"),
                                                                        ("skipped", "success"))
