"""The platform run the way production runs it: `retrain stack` (retrain.cli.stack) starts docker-compose.yaml's
process list natively - CeleryExecutor with a Redis broker and a PostgreSQL metadata DB, api-server, scheduler,
dag-processor, triggerer, a default and a `gpu` Celery worker, an S3 server - and the tests drive the monthly DAG
through the REST API only, as a user or another system would.

* the compose file and the native process list cannot drift apart (no stack needed);
* a dry run: the data stages run on the default worker;
* the monthly schedule and max_active_runs=1: a run for the 2026-11-01 03:00 logical date collects the rows
  changed before that tick (October's) and leaves the later ones; a second trigger waits queued until the first is
  done, then collects the rest;
* a task that fails on every try (the examples DB refuses its collection record): tries 1..3, no alert while
  up_for_retry, exactly one alert from the worker after the last one, naming DAG, task, run and error, no secret;
* the OpenAI backend (tests/fake_openai.py): train_openai defers to the real triggerer, which is SIGKILLed and
  restarted while the job runs; the new triggerer re-attaches to the same job (one job), the task succeeds;
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
    assert done["state"] == "success", api.diagnose(run["dag_run_id"])
    for task in DATA_STAGES:
        assert hosts[task] == ("success", "default", "airflow-worker"), (task, hosts[task])
    assert hosts["train_qlora"][0] == "skipped" and hosts["train_qlora"][1] == "gpu"


def _months_of_rows(pg_url) -> dict[str, set[int]]:
    """A clean examples DB with ROWS rows last changed in October 2026, in November (the first one exactly at the
    Nov 1 03:00 tick) and now; updated_at set directly, as the app's writes at those times would have."""
    from conftest import TABLES
    from retrain import db
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    october, november = range(1, 111), range(111, 126)
    with db.connection(pg_url) as conn, conn.cursor() as cur:
        cur.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
        seed_examples(conn, load_use_case("product_intent"), ROWS, seed=SEED, dirty=0.0)
        # The touch trigger fires on content changes only: a direct update of updated_at keeps the given time.
        cur.execute("UPDATE production_examples SET updated_at = timestamptz '2026-10-01 03:00Z' + (id - 1) * "
                    "interval '6 hours' WHERE id = ANY(%s)", (list(october),))
        cur.execute("UPDATE production_examples SET updated_at = timestamptz '2026-11-01 03:00Z' + (id - 111) * "
                    "interval '1 day' WHERE id = ANY(%s)", (list(november),))
        conn.commit()
    return {"october": set(october), "november": set(november), "now": set(range(126, ROWS + 1))}


def _collected(run_id: str) -> tuple[set[int], int, dict, dict]:
    """(ids written to the batch, rows read = written + skipped for their label, window, run_config)."""
    rd = RunDir.for_run("product_intent", run_id)
    ids = {json.loads(line)["source_id"] for line in rd.batch.read_text().splitlines()}
    collect = json.loads(rd.collect.read_text())
    return ids, collect["rows"] + sum(collect["skipped"].values()), collect["window"], json.loads(
        rd.run_config.read_text())


def _iso_z(value: str | None) -> str | None:
    return None if value is None else datetime.fromisoformat(value).astimezone(timezone.utc).isoformat().replace(
        "+00:00", "Z")


@pytest.mark.stack
def test_monthly_run_for_a_logical_date_and_a_second_trigger_waits_for_it(stack, api, seeded, pg_url):
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

    months = _months_of_rows(pg_url)
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
    # The run's interval is November's 03:00 cron point (a trigger timetable: start = end = the tick); the run took
    # the rows changed before it, i.e. October's, and left November's (the one exactly at the tick included).
    assert datetime.fromisoformat(a["data_interval_end"]) == datetime(2026, 11, 1, 3, tzinfo=timezone.utc)
    ids, read, window, run_config = _collected(first_id)
    assert run_config["run_id"] == first_id
    assert {k: run_config[k] for k in ("run_type", "logical_date", "data_interval_start", "data_interval_end")} == {
        "run_type": a["run_type"], "logical_date": "2026-11-01T03:00:00Z",
        "data_interval_start": _iso_z(a["data_interval_start"]), "data_interval_end": "2026-11-01T03:00:00Z"}
    assert window["before"] == "2026-11-01T03:00:00Z" and window["to_updated_at"] < "2026-11-01T03:00:00Z"
    # Every October row was read (those whose label cannot be trusted are counted, not written), no other.
    assert ids <= months["october"] and read == len(months["october"]), (sorted(ids - months["october"]), read)
    # The second trigger has no logical date: no data interval, collected up to now, i.e. the rest.
    ids2, read2, window2, config2 = _collected(second_id)
    assert config2["run_type"] == "manual" and config2["data_interval_end"] == _iso_z(b["data_interval_end"])
    rest = months["november"] | months["now"]
    assert ids2 <= rest and read2 == len(rest) and window2["from_updated_at"] == window["to_updated_at"]
    summary = json.loads(RunDir.for_run("product_intent", first_id).summary.read_text())
    assert summary["collection_window"] == window
    recorded = {k: run_config[k] for k in ("run_type", "logical_date", "data_interval_start", "data_interval_end")}
    print(f"\n[figures] monthly run {first_id}: {recorded}; read {read} rows (all of October), {len(ids)} with a "
          f"trusted label, window {window}; then {second_id}: read {read2} rows (November's and today's)",
          file=sys.stderr)


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


# --- one alert from the real worker ------------------------------------------------------------------------------


@pytest.fixture
def refused_run(pg_url):
    """A run whose collection the examples DB refuses on every try: a CHECK constraint on collection_runs that only
    this run id violates (what a DBA's constraint or a broken migration looks like to the platform). Not an error a
    retry is known to be futile for (retrain.errors), so the task keeps its retries. Removed afterwards."""
    from psycopg2 import sql

    from retrain import db

    run_id = f"manual__alert_proof_{int(time.time())}"
    add = sql.SQL("ALTER TABLE collection_runs ADD CONSTRAINT stack_alert_proof CHECK (run_id <> {}) NOT VALID")
    with db.connection(pg_url) as conn, conn.cursor() as cur:
        cur.execute("ALTER TABLE collection_runs DROP CONSTRAINT IF EXISTS stack_alert_proof")
        cur.execute(add.format(sql.Literal(run_id)))
        conn.commit()
    try:
        yield run_id
    finally:
        with db.connection(pg_url) as conn, conn.cursor() as cur:
            cur.execute("ALTER TABLE collection_runs DROP CONSTRAINT IF EXISTS stack_alert_proof")
            conn.commit()


@pytest.mark.stack
def test_a_task_failing_its_last_retry_sends_exactly_one_alert_from_the_worker(stack, api, seeded, refused_run):
    run_id, task = refused_run, "collect_examples"
    alert_receiver, fake_openai = stack.alert_receiver, stack.fake_openai
    before = len(alert_receiver.received)
    api.request("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                {"dag_run_id": run_id, "logical_date": None, "conf": {"dry_run": True}})
    seen: list[tuple[int, str, float]] = []  # (try, state, when) as the API showed them
    deadline = time.monotonic() + 300
    while True:
        ti = api.task_instances(run_id).get(task) or {}
        state, try_number = ti.get("state"), ti.get("try_number")
        if state and (not seen or seen[-1][:2] != (try_number, state)):
            seen.append((try_number, state, time.time()))
        if state == "up_for_retry":  # a retry is no failure yet: nobody is paged
            assert alert_receiver.received[before:] == [], (seen, alert_receiver.received[before:])
        if state == "failed":
            break
        assert time.monotonic() < deadline, f"{task} never failed: {seen}\n{api.diagnose(run_id)}"
        time.sleep(0.3)
    # Polled every 0.3 s, an up_for_retry of ~2 s is seen (and was checked above); the history has every try.
    assert {t for t, s, _ in seen if s == "up_for_retry"} and {t for t, s, _ in seen} <= {1, 2, 3}, seen
    tries = api.tries(run_id, task)
    assert [t["try_number"] for t in tries] == [1, 2, 3], tries
    assert [t["state"] for t in tries][-1] == "failed" and {t["hostname"] for t in tries} == {"airflow-worker"}, tries
    # The alert is sent by the last try's task process on the worker, after it failed; nothing comes later.
    deadline = time.monotonic() + 60
    while not alert_receiver.received[before:]:
        assert time.monotonic() < deadline, "no alert after the last try failed"
        time.sleep(0.5)
    assert api.wait(run_id, timeout=120)["state"] == "failed"
    time.sleep(10)
    alerts = alert_receiver.received[before:]
    assert len(alerts) == 1, alerts
    (alert,) = alerts
    payload = alert["payload"]
    assert alert["path"] == alert_receiver.path and alert["user_agent"] == "retrain-alerts/1"
    assert (payload["event"], payload["dag_id"], payload["task_id"], payload["run_id"]) == (
        "task_failed", DAG_ID, task, run_id)
    assert (payload["try_number"], payload["attempts_allowed"]) == (3, 3)
    assert payload["error_type"] == "CheckViolation" and "stack_alert_proof" in payload["error"], payload
    assert payload["sent_by"] == "airflow-worker", payload  # the default worker's task process, not the scheduler
    # Not sent while tries 1 and 2 waited for their retry: it arrived after the last try had started.
    assert alert["at"] >= datetime.fromisoformat(tries[2]["start_date"]).timestamp(), (alert["at"], tries[2])
    for fact in (DAG_ID, task, run_id, "CheckViolation", "attempt 3/3", "Sent by: airflow-worker"):
        assert fact in payload["text"], (fact, payload["text"])
    secrets = [stack.env[k] for k in ("RETRAIN_DATABASE_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                                      "RETRAIN_BACKUP_MASTER_KEY", "AIRFLOW__CORE__FERNET_KEY",
                                      "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY")]
    secrets += [stack.admin[1], fake_openai.api_key, alert_receiver.path]
    assert not [s for s in secrets if s and s in json.dumps(payload)], "a secret is in the alert"
    # The worker's log of the last try says it sent the alert; the earlier tries' logs do not.
    logs = {n: api.task_log(run_id, task, n) for n in (1, 2, 3)}
    sent = f"failure alert for {DAG_ID}.{task} sent through 'retrain_alert_webhook'"
    assert [n for n, text in logs.items() if sent in text] == [3], {n: t[-1500:] for n, t in logs.items()}
    when = [(t, s, datetime.fromtimestamp(at, timezone.utc).strftime("%H:%M:%S.%f")[:-4]) for t, s, at in seen]
    print(f"\n[figures] alert proof {run_id}: (try, state, seen at) {when}; one alert at "
          f"{datetime.fromtimestamp(alert['at'], timezone.utc).strftime('%H:%M:%S.%f')[:-4]}, payload {payload}:\n"
          f"{payload['text']}", file=sys.stderr)


# --- the OpenAI backend through the real triggerer ---------------------------------------------------------------


def _job_polls(fake) -> int:
    return fake.count("GET", "/v1/fine_tuning/jobs/{id}")


def _wait_for(what: str, cond, timeout: float, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, what
        time.sleep(step)
    return value


@pytest.mark.stack
def test_openai_run_defers_through_the_triggerer_and_survives_its_restart(stack, api, seeded):
    fake_openai = stack.fake_openai
    jobs_before = set(fake_openai.jobs)
    creates_before = fake_openai.count("POST", "/v1/fine_tuning/jobs")
    fake_openai.polls_per_state = 10**9  # the job stays in validating_files until the test lets it go on
    times: dict[str, float] = {}
    try:
        run = api.trigger({"backend": "openai", "force_retrain": True})
        run_id = run["dag_run_id"]
        api.wait_task(run_id, "train_openai", {"deferred"}, timeout=400)
        times["deferred"] = time.time()
        (job_id,) = set(fake_openai.jobs) - jobs_before
        polls = _job_polls(fake_openai)
        _wait_for("the triggerer never polled the job", lambda: _job_polls(fake_openai) > polls + 1, 60)

        stack.kill("airflow-triggerer")  # SIGKILL to its process group while the task waits in it
        times["triggerer_killed"] = time.time()
        assert api.task_instances(run_id)["train_openai"]["state"] == "deferred"
        time.sleep(3)
        polls = _job_polls(fake_openai)
        time.sleep(4)
        assert _job_polls(fake_openai) == polls, "something still polls the job with the triggerer dead"
        stack.restart("airflow-triggerer")
        times["triggerer_restarted"] = time.time()
        # The new triggerer takes the trigger over (once the dead one's heartbeat is stale) and polls the same job.
        _wait_for("the restarted triggerer never polled the job", lambda: _job_polls(fake_openai) > polls,
                  180)
        times["polled_again"] = time.time()
        assert api.task_instances(run_id)["train_openai"]["state"] == "deferred"
    finally:
        fake_openai.polls_per_state = 1  # the next poll finishes the job
    api.wait_task(run_id, "train_openai", {"success"}, timeout=300)
    times["train_openai_success"] = time.time()
    done = api.wait(run_id, timeout=900)
    times["run_done"] = time.time()
    tis = api.task_instances(run_id)
    assert done["state"] == "success", api.diagnose(run_id)
    assert tis["train_openai"]["state"] == "success" and tis["train_qlora"]["state"] == "skipped"
    # Exactly one fine-tuning job: the restart re-attached to it rather than creating a second one.
    assert set(fake_openai.jobs) - jobs_before == {job_id}
    assert fake_openai.count("POST", "/v1/fine_tuning/jobs") == creates_before + 1
    rd = RunDir.for_run("product_intent", run_id)
    result = json.loads(rd.train_result.read_text())
    assert job_id in json.dumps(result) and fake_openai.jobs[job_id]["status"] == "succeeded"
    decision = json.loads(rd.decision.read_text())
    assert decision["decision"] in ("GO", "NO-GO")
    tries = api.tries(run_id, "train_openai")
    assert [t["try_number"] for t in tries] == [1], tries  # resumed by the trigger, not retried
    hosts = _hosts(api, run_id)
    print(f"\n[figures] openai run {run_id}: job {job_id} (one job; {_job_polls(fake_openai)} polls); "
          f"train_openai deferred -> success (seen at): "
          f"{ {k: datetime.fromtimestamp(v, timezone.utc).strftime('%H:%M:%S') for k, v in times.items()} }, TI "
          f"start {tis['train_openai']['start_date']} end {tis['train_openai']['end_date']}; decision "
          f"{decision['decision']}; (state, queue, hostname) per task:\n"
          + "\n".join(f"  {t:20s} {h}" for t, h in hosts.items()), file=sys.stderr)
