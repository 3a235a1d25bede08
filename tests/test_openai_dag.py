"""The real `retrain_product_intent` DAG with backend `openai`, end to end through the deferral (issue 5).

What is a test double here, and only that: tests/fake_openai.py stands in for OpenAI's service (files, fine-tuning
jobs, events, chat completions) on 127.0.0.1, and moto stands in for S3. Everything else is the real thing: the
DAG from dags/, dag.test() (which runs the trigger in-process the way the triggerer would), the real `openai`
client in the operator, the trigger and the inference layer, the embedded PostgreSQL, Great Expectations, the
registry, the gate, the encrypted backup and its restore drill.

For the evaluation to mean something, the fake's "fine-tuned" model answers from what its job's training file
taught it (exact recall of seen prompts, nearest neighbours for unseen ones: fake_openai.LearnedModel) and never
sees the test set, while the base model does not know the task and always gives the same answer. So the GO
below is earned on the frozen test set, not scripted.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import registry_rows, run_no_go_month, states
from fake_openai import FakeOpenAI
from retrain.schemas.use_case import load_use_case
from retrain.rundir import RunDir
from retrain.registry.deploy import use_case_models_dir
from retrain.data.synthetic import generate_rows, seed_examples

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
UC = load_use_case("product_intent")
BASE = UC.training.openai_base_model
ROWS, SEED = 600, 41
# An untuned base model: valid JSON in the right shape, but the same guess for every query.
BASE_ANSWER = json.dumps({"intent_type": "PERSONAL_USE", "budget_tier": "unspecified", "category": "unspecified",
                          "recipient": "self", "context_tags": ["personal"], "priority_features": ["good_reviews"]})
ALL_TASKS = ("prepare_run", "collect_examples", "build_dataset", "validate_dataset", "report_dataset",
             "choose_backend", "train_openai", "register_candidate", "evaluate_candidate", "decide", "deploy_model",
             "backup_to_s3", "verify_backup", "prune_backups", "cleanup")


@pytest.fixture
def fake(monkeypatch, backup_env):
    server = FakeOpenAI(polls_per_state=1, base_model_answer=BASE_ANSWER)
    base_url, stop = server.start()
    # Credentials and the server's URL from the Airflow connection (what production uses), not the environment:
    # training, the trigger and evaluation must all read it the same way.
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "generic", "password": server.api_key, "extra": {"base_url": base_url}}))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("RETRAIN_OPENAI_POLL_SECONDS", "0.05")  # the fake moves one state per poll
    yield server
    stop()


def test_openai_backend_runs_end_to_end_through_the_deferral(db_conn, dagbag, fake, task_log):
    seed_examples(db_conn, UC, ROWS, seed=SEED, dirty=0.01)
    dag = dagbag.dags["retrain_product_intent"]
    task_log.clear()

    run = dag.test(logical_date=None, run_conf={"backend": "openai"})  # no logical date: no data interval
    out = task_log()
    st = states(run)
    assert {t: st[t] for t in ALL_TASKS} == dict.fromkeys(ALL_TASKS, "success"), out[-5000:]
    assert st["train_qlora"] == "skipped" and st["reject_candidate"] == "skipped"
    assert str(run.state).endswith("success")
    run_dir = RunDir.for_run("product_intent", run.run_id).path

    # upload -> job -> deferral -> model id
    (job,) = fake.jobs.values()
    assert job["status"] == "succeeded" and job["model"] == BASE
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": "auto"}
    assert {f["filename"]: f["purpose"] for f in fake.files.values()} == {"train.jsonl": "fine-tune",
                                                                         "val.jsonl": "fine-tune"}
    model_id = job["fine_tuned_model"]
    assert model_id.startswith(f"ft:{BASE}:")
    assert "[DAG TEST] running trigger in line" in out  # the task really deferred and the trigger polled
    assert fake.count("GET", "/v1/fine_tuning/jobs/{id}") >= 3
    # OpenAI's events reached the task log, in order, and the run directory.
    assert out.index("[openai info] Validating training file") < out.index("[openai info] Fine-tuning job started") \
        < out.index("[openai info] The job has successfully completed")
    events = (run_dir / "candidate" / "openai_events.jsonl").read_text()
    assert f"New fine-tuned model created: {model_id}" in events
    train_result = json.loads((run_dir / "candidate" / "train_result.json").read_text())
    assert train_result["model_id"] == model_id and train_result["job_id"] == job["id"]
    assert train_result["base_url"] == fake.base_url

    # register_candidate: the fine-tuned model id is the artifact, and it went to production on GO.
    (row,) = registry_rows(db_conn)
    assert (row["backend"], row["artifact"], row["base_model"], row["status"]) == ("openai", model_id, BASE,
                                                                                   "production")
    assert row["run_id"] == run.run_id and row["decision"]["decision"] == "GO"

    # evaluate_candidate: both models answered every test example through chat completions.
    models = json.loads((run_dir / "evaluation" / "models.json").read_text())
    assert models["baseline"]["model"] == BASE and models["baseline"]["baseline_kind"] == "base_model"
    assert models["candidate"]["model"] == model_id
    n_test = sum(1 for _ in open(run_dir / "evaluation" / "predictions_candidate.jsonl"))
    assert n_test > 30 and fake.count("POST", "/v1/chat/completions") == 2 * n_test
    for name in ("baseline", "candidate"):
        preds = [json.loads(ln) for ln in open(run_dir / "evaluation" / f"predictions_{name}.jsonl")]
        assert [p["error"] for p in preds] == [None] * n_test

    # decide: a GO earned on the frozen test set.
    decision = json.loads((run_dir / "decision.json").read_text())
    assert decision["decision"] == "GO", decision["summary"]
    assert decision["baseline_kind"] == "base_model"
    assert decision["candidate_score"] >= 0.85 > 0.5 > decision["baseline_score"]
    assert (run_dir / "evaluation" / "report.html").is_file()
    # deploy_model: an OpenAI production model has no files to serve, only a pointer to its id.
    pointer = json.loads((use_case_models_dir("product_intent") / "production.json").read_text())
    assert (pointer["kind"], pointer["model"], pointer["version"]) == ("openai", model_id, row["version"])

    # backup -> drill -> prune -> cleanup ran on this run's outputs; the local training data is gone.
    assert (run_dir / "backup.json").is_file() and not (run_dir / "train.jsonl").exists()

    # No plaintext personal data left the machine: scan exactly the bytes OpenAI received.
    sent = fake.uploaded_bytes().decode("utf-8")
    planted = {p for r in generate_rows(UC, ROWS, seed=SEED, dirty=0.01) for p in r["pii"]}
    assert len(planted) > 100 and len(sent) > 20_000
    assert [p for p in planted if p in sent] == []
    assert "[EMAIL]" in sent and "[PHONE]" in sent  # the rows that carried personal data went, scrubbed
    # The key reached the server on every request and nowhere else: not the log, not the run directory.
    assert set(fake.auth_headers) == {f"Bearer {fake.api_key}"}
    assert fake.api_key not in out
    assert not [p for p in run_dir.rglob("*") if p.is_file() and fake.api_key in p.read_text(errors="replace")]

    # Next month: the fine-tuned production model is now the baseline (through the same server), and a new
    # candidate trained on the grown dataset is about as good, so the gate says NO-GO (a decision, not a failure).
    seed_examples(db_conn, UC, 300, seed=SEED + 1, dirty=0.01, start=datetime.now(timezone.utc))
    models2, rows = run_no_go_month(db_conn, dag, {"backend": "openai"}, task_log)
    assert models2["baseline"]["model"] == model_id
    assert len(fake.jobs) == 2
    assert rows[2]["artifact"] == next(j["fine_tuned_model"] for j in fake.jobs.values() if j["id"] != job["id"])
    sent = fake.uploaded_bytes().decode("utf-8")  # both months' uploads
    planted |= {p for r in generate_rows(UC, 300, seed=SEED + 1, dirty=0.01) for p in r["pii"]}
    assert [p for p in planted if p in sent] == []


def test_cost_gate_refuses_an_oversized_run_before_anything_is_uploaded(db_conn, dagbag, fake, task_log):
    seed_examples(db_conn, UC, 300, seed=SEED + 2, dirty=0.0)
    dag = dagbag.dags["retrain_product_intent"]
    task_log.clear()
    run = dag.test(logical_date=None, run_conf={"backend": "openai", "max_cost_usd": 0.0001})
    out = task_log()
    st = states(run)
    assert st["validate_dataset"] == "success" and st["train_openai"] == "failed", out[-5000:]
    assert {st[t] for t in ("register_candidate", "evaluate_candidate", "decide", "backup_to_s3")} == \
        {"upstream_failed"}
    report = json.loads((RunDir.for_run("product_intent", run.run_id).path / "candidate" /
                         "openai_format_check.json").read_text())
    estimate = report["estimate"]["estimated_usd"]
    assert estimate > 0.0001
    # The message gives the estimate and the limit, and what to do about it.
    assert f"the estimated cost is ${estimate:.4f}, over the limit max_cost_usd=$0.0001" in out
    assert "Raise max_cost_usd in the trigger form" in out
    # Refused before any request that costs or leaks anything: no file, no job on the server.
    assert fake.files == {} and fake.jobs == {}
    assert fake.count("POST", "/v1/files") == 0 and fake.count("POST", "/v1/fine_tuning/jobs") == 0
    assert registry_rows(db_conn) == []


def test_killing_the_deferred_task_of_the_real_dag_cancels_the_job(dagbag, fake, tmp_path, monkeypatch):
    """The DAG's own train_openai defers; the trigger it hands over is rebuilt from its serialized kwargs (as the
    triggerer does) and run by Airflow's TriggerRunner. "Mark failed" / "clear" in the UI cancels that asyncio
    task with Airflow's user-action message, which makes the runner call on_kill: the job must be cancelled on
    the server. A triggerer shutdown (a plain cancel) must leave the job running."""
    import copy

    from airflow.jobs import triggerer_job_runner as tjr
    from airflow.sdk.exceptions import TaskDeferred

    from test_openai_ft import make_run

    monkeypatch.setenv("AIRFLOW_DISABLE_GREENBACK_PORTAL", "true")
    fake.polls_per_state = 10_000  # the job stays in validating_files while the trigger polls
    op = copy.copy(dagbag.dags["retrain_product_intent"].get_task("train_openai"))
    runner = tjr.TriggerRunner()

    def defer(run_id: str):
        op.run_dir, op.max_cost_usd = str(make_run(tmp_path / run_id, run_id=run_id)), 10.0
        with pytest.raises(TaskDeferred) as exc:
            op.execute({})
        path, kwargs = exc.value.trigger.serialize()
        assert path == "retrain.train.openai.trigger.OpenAIFineTuneTrigger" and "key" not in json.dumps(kwargs)
        return exc.value.trigger.__class__(**kwargs)

    async def run_then_cancel(trigger, trigger_id: int, message: str | None) -> None:
        runner.triggers[trigger_id] = {"task": None, "name": f"t{trigger_id}", "events": 0}
        task = asyncio.ensure_future(runner.run_trigger(trigger_id, trigger))
        while fake.count("GET", "/v1/fine_tuning/jobs/{id}") < 3 * trigger_id:
            await asyncio.sleep(0.01)
        task.cancel(message)
        with pytest.raises(asyncio.CancelledError):
            await task

    killed = defer("killed")
    asyncio.run(run_then_cancel(killed, 1, tjr._USER_ACTION_CANCEL_MSG))
    assert fake.jobs[killed.job_id]["status"] == "cancelled"
    assert fake.count("POST", "/v1/fine_tuning/jobs/{id}/cancel") == 1

    restarted = defer("restarted")
    asyncio.run(run_then_cancel(restarted, 2, None))
    assert fake.jobs[restarted.job_id]["status"] == "validating_files"
    assert fake.count("POST", "/v1/fine_tuning/jobs/{id}/cancel") == 1


# --- sweeps on the openai backend: one fine-tuning job per candidate, the same cost gate and selection -----------

# c1 trains 1 epoch, c2 2 epochs, both at learning-rate multiplier 2.0 (grid order: epochs first).
OPENAI_SWEEP = {"space": {"epochs": [1, 2], "openai_learning_rate_multiplier": [2.0]}, "max_candidates": 2}


# The sweep tests trigger like the UI's plain "Trigger" (no logical date, so no data interval bounding collection:
# the rows seeded just now are collected).
@pytest.fixture
def openai_sweep_dag(tmp_path, monkeypatch, airflow_db):
    """The DAG file read from a use-case directory whose product_intent.yaml has a sweep: section. A fixture, so that
    it is parsed before task_log hooks into the logging that parsing configures (list it before task_log)."""
    import yaml
    from airflow.dag_processing.dagbag import DagBag

    data = yaml.safe_load((REPO / "include" / "use_cases" / "product_intent.yaml").read_text())
    data["sweep"] = OPENAI_SWEEP
    directory = tmp_path / "use_cases"
    directory.mkdir()
    (directory / "product_intent.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(directory))
    return DagBag(str(REPO / "dags" / "retrain_use_cases.py")).dags["retrain_product_intent"]


def test_openai_sweep_runs_one_job_per_candidate_and_selects_on_validation(db_conn, openai_sweep_dag, fake,
                                                                         task_log):
    from conftest import registry_rows, states

    # The hyper-parameters matter: a 1-epoch job's model learns nothing (answers like the base model), so the
    # candidate planned FIRST is the worse one and a selection by plan order or by anything but validation fails.
    fake.learned_share = lambda hp: 0.0 if hp["n_epochs"] == 1 else 1.0
    # The first poll of a job is refused (not a transient error): its task fails, retries, and must re-attach to
    # the job it created instead of creating a second one.
    fake.fail_first("GET /v1/fine_tuning/jobs/{id}", 1, 401)
    dag = openai_sweep_dag
    seed_examples(db_conn, UC, ROWS, seed=SEED + 5, dirty=0.0)
    task_log.clear()
    run = dag.test(logical_date=None, run_conf={"backend": "openai", "sweep": "on"})
    out = task_log()
    st = states(run)
    for task in ("plan_openai_sweep", "train_openai_sweep", "select_openai_candidate", "register_candidate",
                 "evaluate_candidate", "decide"):
        assert st[task] == "success", (task, out[-6000:])
    assert {st[t] for t in ("train_qlora", "train_openai", "plan_sweep", "train_sweep", "select_candidate")} == \
        {"skipped"}
    tis = [ti for ti in run.get_task_instances() if ti.task_id == "train_openai_sweep"]
    assert sorted(ti.map_index for ti in tis) == [0, 1]
    assert sorted(ti.try_number for ti in tis) == [1, 2]  # one candidate's task was retried ...

    # ... and still exactly one job per candidate, keyed by the candidate's run id, with its hyper-parameters.
    assert fake.count("POST", "/v1/fine_tuning/jobs") == 2 and len(fake.jobs) == 2
    jobs = {j["metadata"]["retrain_run_id"]: j for j in fake.jobs.values()}
    assert set(jobs) == {f"{run.run_id}#sweep-c1", f"{run.run_id}#sweep-c2"}
    assert jobs[f"{run.run_id}#sweep-c1"]["hyperparameters"] == {"n_epochs": 1, "batch_size": 8,
                                                                  "learning_rate_multiplier": 2.0}
    assert jobs[f"{run.run_id}#sweep-c2"]["hyperparameters"]["n_epochs"] == 2
    assert "re-attaching to fine-tuning job" in out
    winner_model = jobs[f"{run.run_id}#sweep-c2"]["fine_tuned_model"]
    loser_model = jobs[f"{run.run_id}#sweep-c1"]["fine_tuned_model"]

    # Selected on the validation split (chat completions by both candidates' models), the report written.
    rd = RunDir.for_run("product_intent", run.run_id)
    report = json.loads(rd.sweep_report_json.read_text())
    scores = {r["name"]: r["primary_score"] for r in report["candidates"]}
    assert report["winner"] == "c2" and scores["c2"] > scores["c1"], scores
    assert report["optimizer_steps"] is None and "One OpenAI fine-tuning job per candidate" in \
        rd.sweep_report_md.read_text()
    result = rd.read_train_result()
    assert (result["backend"], result["model_id"], result["sweep_candidate"]) == ("openai", winner_model, "c2")

    # The winner is the run's candidate; the other is registered not_selected with its validation score.
    rows = {r["run_id"]: r for r in registry_rows(db_conn)}
    assert rows[run.run_id]["artifact"] == winner_model and rows[run.run_id]["status"] in ("production", "rejected")
    loser = rows[f"{run.run_id}#sweep-c1"]
    assert (loser["status"], loser["backend"], loser["artifact"]) == ("not_selected", "openai", loser_model)
    assert loser["metrics"]["validation"]["primary_score"] == scores["c1"]
    models = json.loads((rd.evaluation / "models.json").read_text())
    assert models["candidate"]["model"] == winner_model


def test_openai_sweep_cost_gate_is_the_sum_and_runs_before_any_upload(db_conn, openai_sweep_dag, fake, task_log):
    import re

    from conftest import states

    dag = openai_sweep_dag
    seed_examples(db_conn, UC, 300, seed=SEED + 6, dirty=0.0)
    # Price the data first (the format check writes the one-epoch estimate), then set the limit between the most
    # expensive candidate (2 epochs) and the sum (1 + 2 epochs): each job alone would fit, the sweep does not.
    task_log.clear()
    run = dag.test(logical_date=None, run_conf={"backend": "openai", "sweep": "on", "max_cost_usd": 0.0001})
    out = task_log()
    assert states(run)["plan_openai_sweep"] == "failed", out[-5000:]
    match = re.search(r"the estimated costs sum to \$([0-9.]+), over the limit max_cost_usd=\$0\.0001 "
                      r"\(c1 \$([0-9.]+), c2 \$([0-9.]+)\)", out)
    assert match, out[-5000:]
    total, c1, c2 = map(float, match.groups())
    assert c2 == pytest.approx(2 * c1, abs=2e-4) and total == pytest.approx(c1 + c2, abs=2e-4) and c1 > 0

    limit = round((c2 + total) / 2, 4)
    task_log.clear()
    run = dag.test(logical_date=None, run_conf={"backend": "openai", "sweep": "on", "max_cost_usd": limit,
                                                "force_retrain": True})
    out = task_log()
    st = states(run)
    assert st["plan_openai_sweep"] == "failed", out[-5000:]
    assert {st[t] for t in ("train_openai_sweep", "select_openai_candidate", "register_candidate")} == \
        {"upstream_failed"}
    shown = f"{limit:.2f}" if limit >= 1 else f"{limit:.4f}"
    assert f"the estimated costs sum to ${total:.4f}, over the limit max_cost_usd=${shown}" in out
    assert "Raise max_cost_usd, or sweep fewer candidates" in out
    # Refused before anything left the machine or cost anything: no file, no job.
    assert fake.files == {} and fake.jobs == {} and fake.count("POST", "/v1/files") == 0
    assert not (RunDir.for_run("product_intent", run.run_id).sweep / "c1").exists()
