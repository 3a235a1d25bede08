"""OpenAI fine-tuning backend against a local OpenAI-compatible server (tests/fake_openai.py).

The real `openai` client does every request. Covered: the format check and the cost gate (nothing uploaded when
they refuse), the happy path through the trigger, OpenAI's own message on failed/cancelled jobs, backoff on
429/5xx, idempotent re-attach on retry (no second job on the server), cancellation from on_kill (operator and
trigger), no planted personal data in the uploaded bytes, and a DAG run through the deferral with dag.test().
"""

from __future__ import annotations

import asyncio
import json
import math
from datetime import datetime
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI
from retrain.schemas.run_params import RunParams
from retrain.schemas.use_case import load_use_case
from retrain.data.scrub import scrub_text
from retrain.data.synthetic import generate_rows
from retrain.train.openai import tokens
from retrain.train.openai.checks import check_chat_jsonl, run_key
from retrain.train.openai.job import (
    CostLimitExceeded,
    FineTuneJobFailed,
    FormatCheckError,
    OpenAIFineTuneError,
    finish_job,
    prepare_openai_job,
)

UC = load_use_case("product_intent")
MODEL = "gpt-4o-mini-2024-07-18"


@pytest.fixture
def fake(monkeypatch):
    server = FakeOpenAI(polls_per_state=1)
    base_url, stop = server.start()
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.delenv("AIRFLOW_CONN_OPENAI_DEFAULT", raising=False)
    yield server
    stop()


def _messages(text: str, label: dict) -> dict:
    return {"messages": [
        {"role": "system", "content": UC.system_prompt},
        {"role": "user", "content": UC.render_input(text)},
        {"role": "assistant", "content": json.dumps(label, ensure_ascii=False)},
    ]}


def make_run(root: Path, *, n: int = 60, params: dict | None = None, run_id: str = "manual__2026-05-01",
             train_lines: list[str] | None = None) -> Path:
    """A run directory as build_dataset leaves it (scrubbed synthetic rows), without the database."""
    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"run_id": run_id, "params": {**RunParams().model_dump(), **(params or {})},
            "use_case": UC.model_dump(mode="json")}
    (run_dir / "run_config.json").write_text(json.dumps(meta))
    rows = [r for r in generate_rows(UC, n, seed=7, dirty=0.0) if r["feedback"] != "rejected"]
    lines = [json.dumps(_messages(scrub_text(r["input"]), r["corrected_output"] or r["model_output"]),
                        ensure_ascii=False) for r in rows]
    cut = max(1, len(lines) // 10)
    (run_dir / "train.jsonl").write_text("\n".join(train_lines if train_lines is not None else lines[cut:]) + "\n")
    (run_dir / "val.jsonl").write_text("\n".join(lines[:cut]) + "\n")
    (run_dir / "test.jsonl").write_text("\n".join(lines[:cut]) + "\n")
    return run_dir


def trigger_for(job_id: str, **kw):
    from retrain.train.openai.trigger import OpenAIFineTuneTrigger

    return OpenAIFineTuneTrigger(job_id=job_id, conn_id=None, poll_interval=0.01, max_backoff=0.05, **kw)


def drive(trigger) -> list:
    """Run the trigger the way the triggerer does: iterate its async run() to the end."""
    async def go():
        return [event async for event in trigger.run()]

    return asyncio.run(go())


# --- format check, tokens, cost -------------------------------------------------------------------------


def test_format_check_lists_every_problem_and_uploads_nothing(fake, tmp_path):
    good = [json.dumps(_messages(f"regalo barato para mi madre {i}", {"intent_type": "GIFT"})) for i in range(5)]
    bad = [
        "{not json",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}),
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
        json.dumps({"messages": [{"role": "user", "content": "write to ana.garcia@gmail.com"},
                                 {"role": "assistant", "content": "ok"}]}),
        json.dumps({"messages": [{"role": "user", "content": "word " * 400_000},
                                 {"role": "assistant", "content": "x"}]}),
    ]
    run_dir = make_run(tmp_path, train_lines=good + bad)
    with pytest.raises(FormatCheckError) as exc:
        prepare_openai_job(run_dir)
    msg = str(exc.value)
    for expected in ("line 6: not valid JSON", "line 7: message 0 has role 'robot'",
                     "line 8: message 0 (user) has empty", "line 9: has no assistant message",
                     "line 10: message 0 (user) contains unscrubbed EMAIL", "line 11: has ",
                     "over the 65536-token limit", "OpenAI needs at least 10"):
        assert expected in msg, (expected, msg)
    assert "ana.garcia@gmail.com" not in msg  # personal data is reported by type, never by value
    report = json.loads((run_dir / "candidate" / "openai_format_check.json").read_text())
    assert report["format"]["train"]["problem_counts"] == {
        "invalid_json": 1, "bad_role": 1, "empty_content": 1, "no_assistant": 1, "personal_data": 1,
        "too_long": 1, "too_few_examples": 1}
    assert fake.count("POST", "/v1/files") == 0 and not fake.jobs


def test_token_count_fallback_is_labelled_and_close_to_chars(monkeypatch, tmp_path):
    tokens.token_counter.cache_clear()
    monkeypatch.setenv("RETRAIN_TOKEN_COUNT", "estimate")
    try:
        counter = tokens.token_counter(MODEL)
        assert counter.method == "estimate:chars/3.5" and not counter.exact
        assert counter.count("x" * 35) == 10 and counter.count("x" * 36) == 11
        path = tmp_path / "one.jsonl"
        ex = _messages("un regalo para mi hermana", {"intent_type": "GIFT"})
        path.write_text(json.dumps(ex) + "\n")
        rep = check_chat_jsonl(path, model=MODEL, counter=counter, min_examples=None)
        # Cookbook framing: 3 per message + 3 priming, plus the role and content strings.
        expected = 3 + sum(3 + math.ceil(len(m["role"]) / 3.5) + math.ceil(len(m["content"]) / 3.5)
                           for m in ex["messages"])
        assert rep["ok"] and rep["tokens"] == expected and rep["tokenizer"] == "estimate:chars/3.5"
    finally:
        tokens.token_counter.cache_clear()


def test_token_count_is_exact_when_an_encoding_file_is_available():
    tokens.token_counter.cache_clear()
    counter = tokens.token_counter(MODEL)
    tokens.token_counter.cache_clear()
    if not counter.exact:
        # No internet and no local copy: the fallback must say so, and say how to get exact counts.
        assert "ESTIMATE" in counter.note and "RETRAIN_TIKTOKEN_DIR" in counter.note
        pytest.skip("tiktoken's o200k_base file is not available offline here (see the note above)")
    assert counter.method == "tiktoken:o200k_base"
    assert counter.count("hello world") == 2


def test_tiktoken_cache_is_private_to_the_state_directory(monkeypatch, tmp_path):
    """tiktoken's default cache is a predictable name under /tmp that another user could create first; ours is
    $RETRAIN_HOME/cache/tiktoken, mode 700, and tiktoken is pointed at it too (issue 17)."""
    import os
    import stat

    home = tmp_path / "home"
    monkeypatch.setenv("RETRAIN_HOME", str(home))
    for name in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        monkeypatch.setenv(name, "unset-me")  # so monkeypatch restores the variable's absence afterwards
        monkeypatch.delenv(name)
    monkeypatch.delenv("RETRAIN_TOKEN_COUNT", raising=False)
    import tiktoken.registry

    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # tiktoken keeps loaded encodings per process
    tokens.token_counter.cache_clear()
    try:
        counter = tokens.token_counter(MODEL)
    finally:
        tokens.token_counter.cache_clear()
    cache = home.resolve() / "cache" / "tiktoken"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)
    assert cache.is_dir() and stat.S_IMODE(cache.stat().st_mode) == 0o700
    if counter.exact:  # seeded from a local copy (or downloaded): the encoding sits in the private cache
        assert tokens.cached_encoding_path(cache, "o200k_base").is_file()
    # An explicit TIKTOKEN_CACHE_DIR still wins (an operator's shared, pre-seeded cache).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "shared"))
    from retrain import settings

    assert settings.tiktoken_cache_dir() == str(tmp_path / "shared")


def test_cost_gate_refuses_with_the_estimate_and_the_limit(fake, tmp_path):
    run_dir = make_run(tmp_path, params={"max_cost_usd": 0.0001})
    with pytest.raises(CostLimitExceeded) as exc:
        prepare_openai_job(run_dir)
    est = exc.value.estimate
    assert est["estimated_usd"] > 0.0001
    assert est["billed_tokens"] == est["billed_tokens_per_epoch"] * 3 and est["usd_per_1m_training_tokens"] == 3.0
    msg = str(exc.value)
    assert f"${est['estimated_usd']:.4f}" in msg and "max_cost_usd=$0.0001" in msg and "Raise max_cost_usd" in msg
    assert fake.count("POST", "/v1/files") == 0 and not fake.jobs
    # The operator argument wins over the run's param: the same run passes with a realistic limit.
    assert prepare_openai_job(run_dir, max_cost_usd=5)["status"] == "validating_files"


def test_unknown_model_has_no_price_so_it_is_refused(fake, tmp_path):
    run_dir = make_run(tmp_path)
    with pytest.raises(OpenAIFineTuneError, match="no fine-tuning price is known for model 'llama-3'"):
        prepare_openai_job(run_dir, model="llama-3")


def test_missing_key_says_how_to_configure_it(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(OpenAIFineTuneError, match="create the Airflow connection 'openai_default'"):
        prepare_openai_job(make_run(tmp_path))


# --- jobs ------------------------------------------------------------------------------------------------


def test_happy_path_prepare_trigger_model_id(fake, tmp_path, caplog, capsys):
    run_dir = make_run(tmp_path)
    caplog.set_level("INFO")
    job = prepare_openai_job(run_dir)
    assert job["status"] == "validating_files" and not job["reattached"] and job["attempt"] == 1
    server_job = fake.jobs[job["job_id"]]
    assert server_job["model"] == MODEL and server_job["user_provided_suffix"] == "product-intent"
    assert server_job["hyperparameters"] == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": "auto"}
    assert server_job["seed"] == 42
    assert server_job["metadata"]["retrain_run_key"] == run_key("product_intent", "manual__2026-05-01")
    # Exactly the run's files left the machine, byte for byte, with purpose fine-tune.
    uploaded = {f["filename"]: f for f in fake.files.values()}
    assert uploaded["train.jsonl"]["bytes"] == (run_dir / "train.jsonl").read_bytes()
    assert uploaded["val.jsonl"]["bytes"] == (run_dir / "val.jsonl").read_bytes()
    assert {f["purpose"] for f in uploaded.values()} == {"fine-tune"}
    assert server_job["training_file"] != server_job["validation_file"]

    events = drive(trigger_for(job["job_id"]))
    assert len(events) == 1 and events[0].payload["status"] == "succeeded"
    result = finish_job(run_dir, events[0].payload)
    model_id = fake.jobs[job["job_id"]]["fine_tuned_model"]
    assert result["model_id"] == model_id and model_id.startswith("ft:gpt-4o-mini-2024-07-18:")
    saved = json.loads((run_dir / "candidate" / "train_result.json").read_text())
    assert saved["backend"] == "openai" and saved["model_id"] == model_id and saved["job_id"] == job["job_id"]
    assert saved["trained_tokens"] == fake.jobs[job["job_id"]]["trained_tokens"] > 0
    assert saved["model_spec"] == {"kind": "openai", "model": model_id, "base_url": fake.base_url,
                                   "label": "candidate"}
    # OpenAI's events reached the log in order, and the run directory. (The trigger logs through Airflow's
    # structlog, which prints to stdout here and goes to the task log in the triggerer.)
    log = caplog.text + capsys.readouterr().out
    assert log.index("Validating training file") < log.index("Fine-tuning job started") < \
        log.index("The job has successfully completed")
    assert "Step 3/3" in (run_dir / "candidate" / "openai_events.jsonl").read_text()
    # The key never lands in logs or files; it did reach the server.
    files = "".join(p.read_text() for p in (run_dir / "candidate").iterdir())
    assert fake.api_key not in log and fake.api_key not in files and fake.api_key not in json.dumps(result)
    assert fake.auth_headers and set(fake.auth_headers) == {f"Bearer {fake.api_key}"}
    # The fine-tuned model answers through chat completions (what evaluation will call).
    import openai

    client = openai.OpenAI(api_key=fake.api_key, base_url=fake.base_url)
    ex = json.loads((run_dir / "train.jsonl").read_text().splitlines()[0])["messages"]
    answer = client.chat.completions.create(model=model_id, messages=ex[:2]).choices[0].message.content
    assert answer == ex[2]["content"]


def test_polling_backs_off_on_429_and_500(fake, tmp_path):
    job = prepare_openai_job(make_run(tmp_path))
    fake.fail_first("GET /v1/fine_tuning/jobs/{id}", 2, 429)
    fake.fail_first("GET /v1/fine_tuning/jobs/{id}/events", 2, 500)
    events = drive(trigger_for(job["job_id"]))
    assert events[0].payload["status"] == "succeeded" and events[0].payload["model_id"]
    statuses = [s for m, r, s in fake.requests if r == "/v1/fine_tuning/jobs/{id}"]
    assert statuses[:2] == [429, 429] and statuses[-1] == 200
    assert [s for m, r, s in fake.requests if r == "/v1/fine_tuning/jobs/{id}/events"][:2] == [500, 500]


def test_time_driven_progression_reaches_succeeded(tmp_path, monkeypatch):
    server = FakeOpenAI(progression="time", seconds_per_state=0.1)
    base_url, stop = server.start()
    monkeypatch.setenv("OPENAI_API_KEY", server.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    try:
        job = prepare_openai_job(make_run(tmp_path))
        event = drive(trigger_for(job["job_id"]))[0].payload
        assert event["status"] == "succeeded"
        seen = [e["message"] for e in event["events"]]
        assert seen.index("Files validated, moving job to queued state") < seen.index("Fine-tuning job started")
    finally:
        stop()


def test_create_that_failed_with_500_after_creating_is_not_duplicated(fake, tmp_path):
    fake.fail_first("POST /v1/files", 1, 429)  # the client's own retry handles uploads
    fake.fail_first("POST /v1/fine_tuning/jobs", 1, 500, after_processing=True)
    job = prepare_openai_job(make_run(tmp_path), retry_seconds=0.01)
    assert len(fake.jobs) == 1 and job["job_id"] in fake.jobs
    assert fake.count("POST", "/v1/fine_tuning/jobs") == 1  # found by its run key instead of re-created


def test_failed_job_surfaces_openai_error_message(fake, tmp_path):
    fake.fail_jobs_with = {"code": "invalid_training_file",
                           "message": "The job failed due to an invalid training file: 4 examples exceed the limit."}
    run_dir = make_run(tmp_path)
    job = prepare_openai_job(run_dir)
    event = drive(trigger_for(job["job_id"]))[0].payload
    assert event["status"] == "failed" and event["error"]["code"] == "invalid_training_file"
    with pytest.raises(FineTuneJobFailed) as exc:
        finish_job(run_dir, event)
    assert f"OpenAI fine-tuning job {job['job_id']} failed: invalid_training_file: The job failed due to an " \
           "invalid training file: 4 examples exceed the limit." in str(exc.value)
    assert not (run_dir / "candidate" / "train_result.json").exists()
    # A clear of the task after a failed job starts a new attempt (it does not re-attach to the failure).
    fake.fail_jobs_with = None
    again = prepare_openai_job(run_dir)
    assert again["job_id"] != job["job_id"] and again["attempt"] == 2 and len(fake.jobs) == 2


def test_cancelled_job_fails_with_openai_message(fake, tmp_path):
    import openai

    run_dir = make_run(tmp_path)
    job = prepare_openai_job(run_dir)
    openai.OpenAI(api_key=fake.api_key, base_url=fake.base_url).fine_tuning.jobs.cancel(job["job_id"])
    event = drive(trigger_for(job["job_id"]))[0].payload
    assert event["status"] == "cancelled"
    assert any(e["message"] == "Fine-tuning job cancelled" for e in event["events"])
    with pytest.raises(FineTuneJobFailed, match=f"job {job['job_id']} cancelled"):
        finish_job(run_dir, event)


def test_retry_reattaches_instead_of_creating_a_second_job(fake, tmp_path):
    run_dir = make_run(tmp_path)
    first = prepare_openai_job(run_dir)
    second = prepare_openai_job(run_dir)
    assert second["job_id"] == first["job_id"] and second["reattached"]
    # Even when the worker died before recording the job: the server's job list (by run key) finds it.
    (run_dir / "candidate" / "openai_job.json").unlink()
    third = prepare_openai_job(run_dir)
    assert third["job_id"] == first["job_id"] and third["reattached"]
    assert len(fake.jobs) == 1 and fake.count("POST", "/v1/fine_tuning/jobs") == 1
    assert fake.count("POST", "/v1/files") == 2  # train + val, once
    # A succeeded job is re-attached too: the trigger fires at once with the same model.
    model_id = drive(trigger_for(first["job_id"]))[0].payload["model_id"]
    assert prepare_openai_job(run_dir)["status"] == "succeeded"
    assert drive(trigger_for(first["job_id"]))[0].payload["model_id"] == model_id
    # Another run of the same use case gets its own job.
    other = make_run(tmp_path / "other", run_id="manual__2026-06-01")
    assert prepare_openai_job(other)["job_id"] != first["job_id"] and len(fake.jobs) == 2


def test_rebuilt_dataset_cancels_the_stale_job(fake, tmp_path):
    run_dir = make_run(tmp_path)
    first = prepare_openai_job(run_dir)
    with open(run_dir / "train.jsonl", "a") as fh:
        fh.write(json.dumps(_messages("otro regalo para mi abuela", {"intent_type": "GIFT"})) + "\n")
    second = prepare_openai_job(run_dir)
    assert second["job_id"] != first["job_id"] and fake.jobs[first["job_id"]]["status"] == "cancelled"


def test_operator_maps_outcomes_to_task_failures(fake, tmp_path):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from retrain.train.openai.operator import OpenAIFineTuneOperator

    run_dir = make_run(tmp_path)
    op = OpenAIFineTuneOperator(task_id="train_openai", run_dir=str(run_dir), max_cost_usd="0.0001")
    # Over budget: fail without retries (the budget has to change first), nothing uploaded.
    with pytest.raises(AirflowFailException, match=r"over the limit max_cost_usd=\$0.0001"):
        op.execute({})
    assert not fake.files
    # OpenAI's verdict fails for good; a refused poll (e.g. rotated key) stays retryable.
    with pytest.raises(AirflowFailException, match="cancelled"):
        op.execute_complete({}, {"status": "cancelled", "job_id": "ftjob-x", "error": None})
    with pytest.raises(AirflowException, match="HTTP 401") as exc:
        op.execute_complete({}, {"status": "error", "job_id": "ftjob-x", "message": "polling failed: HTTP 401"})
    assert not isinstance(exc.value, AirflowFailException)


def test_operator_on_kill_cancels_the_job(fake, tmp_path):
    from retrain.train.openai.operator import OpenAIFineTuneOperator

    run_dir = make_run(tmp_path)
    job = prepare_openai_job(run_dir)
    op = OpenAIFineTuneOperator(task_id="train_openai", run_dir=str(run_dir), conn_id="openai_default")
    op.on_kill()
    assert fake.jobs[job["job_id"]]["status"] == "cancelled"
    assert fake.count("POST", "/v1/fine_tuning/jobs/{id}/cancel") == 1


def test_trigger_on_kill_cancels_the_job_while_deferred(fake, tmp_path):
    fake.polls_per_state = 10_000  # the job stays in validating_files while the trigger polls
    job = prepare_openai_job(make_run(tmp_path))
    trigger = trigger_for(job["job_id"])

    async def scenario():
        # What the triggerer does on "mark failed": cancel the run() task, then await on_kill().
        task = asyncio.ensure_future(anext(trigger.run()))
        while fake.count("GET", "/v1/fine_tuning/jobs/{id}") < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await trigger.on_kill()

    asyncio.run(scenario())
    assert fake.jobs[job["job_id"]]["status"] == "cancelled"


def test_trigger_deadline_cancels_the_job_and_says_so(fake, tmp_path):
    fake.polls_per_state = 10_000
    job = prepare_openai_job(make_run(tmp_path))
    event = drive(trigger_for(job["job_id"], deadline=0.0))[0].payload
    assert event["status"] == "timeout" and "did not finish before the task's deadline" in event["message"]
    assert fake.jobs[job["job_id"]]["status"] == "cancelled"


def test_trigger_serializes_without_secrets():
    from retrain.train.openai.trigger import OpenAIFineTuneTrigger

    trig = OpenAIFineTuneTrigger(job_id="ftjob-1", poll_interval=5, deadline=123.0)
    path, kwargs = trig.serialize()
    assert path == "retrain.train.openai.trigger.OpenAIFineTuneTrigger"
    rebuilt = OpenAIFineTuneTrigger(**kwargs)
    assert rebuilt.serialize() == (path, kwargs) and kwargs["conn_id"] == "openai_default"
    assert not any("key" in k for k in kwargs)


def test_empty_validation_split_is_not_uploaded(fake, tmp_path):
    run_dir = make_run(tmp_path)
    (run_dir / "val.jsonl").write_text("")
    job = prepare_openai_job(run_dir)
    assert fake.jobs[job["job_id"]]["validation_file"] is None and fake.count("POST", "/v1/files") == 1


def test_rejected_polling_reports_an_error_event(fake, tmp_path, monkeypatch):
    job = prepare_openai_job(make_run(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-revoked")
    event = drive(trigger_for(job["job_id"]))[0].payload
    assert event["status"] == "error" and "HTTP 401 invalid_api_key: Incorrect API key provided." in event["message"]
    assert "sk-revoked" not in event["message"]
    monkeypatch.delenv("OPENAI_API_KEY")
    event = drive(trigger_for(job["job_id"]))[0].payload
    assert event["status"] == "error" and "no OpenAI API key" in event["message"]


# --- personal data ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_uploaded_bytes_hold_none_of_the_planted_personal_data(fake, db_conn):
    from retrain import stages
    from retrain.data.synthetic import seed_examples

    seed_examples(db_conn, UC, 400, seed=31, dirty=0.02)
    run = stages.prepare_run("product_intent", "pii-upload-1", {})
    stages.collect(run["run_dir"])
    stages.build(run["run_dir"])
    prepare_openai_job(run["run_dir"])
    sent = fake.uploaded_bytes().decode("utf-8")
    planted = {p for r in generate_rows(UC, 400, seed=31, dirty=0.02) for p in r["pii"]}
    assert len(planted) > 50 and len(sent) > 10_000
    assert [p for p in planted if p in sent] == []
    assert "[EMAIL]" in sent and "[PHONE]" in sent  # the rows that carried PII were uploaded, scrubbed


# --- the operator in a DAG ---------------------------------------------------------------------------------


def _register(dag) -> None:
    """dag.test() in Airflow 3.3 runs only DAGs it finds serialized for a bundle; a DAG defined in a test file is
    in none, so write it to the metadata DB under the dags-folder bundle first (what the DAG processor does)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.collection import update_dag_parsing_results_in_db
    from airflow.serialization.serialized_objects import LazyDeserializedDAG
    from airflow.utils.session import create_session

    with create_session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
    with create_session() as session:
        update_dag_parsing_results_in_db("dags-folder", None, [LazyDeserializedDAG.from_dag(dag)], {}, None, set(),
                                         session=session)


@pytest.mark.integration
def test_dag_with_openai_operator_runs_through_the_deferral(airflow_db, fake, tmp_path, monkeypatch, capsys):
    from airflow.sdk import DAG

    from retrain.train.openai.operator import OpenAIFineTuneOperator

    # Credentials from the Airflow connection this time (password = key, extra base_url), not the environment.
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "generic", "password": fake.api_key, "extra": {"base_url": fake.base_url}}))
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    ok_dir = make_run(tmp_path / "ok")
    bad_dir = make_run(tmp_path / "bad", run_id="manual__bad")
    with DAG("test_openai_finetune", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        OpenAIFineTuneOperator(task_id="train_ok", run_dir=str(ok_dir), poll_interval=0.01, max_backoff=0.05,
                               retries=0)

    _register(dag)
    run = dag.test()
    states = {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in run.get_task_instances()}
    assert states == {"train_ok": "success"}
    result = json.loads((ok_dir / "candidate" / "train_result.json").read_text())
    (job,) = fake.jobs.values()
    assert result["model_id"] == job["fine_tuned_model"] and result["job_id"] == job["id"]
    assert fake.count("GET", "/v1/fine_tuning/jobs/{id}") >= 3  # it really waited in the trigger

    # A job that fails on OpenAI's side fails the task.
    fake.fail_jobs_with = {"code": "invalid_training_file", "message": "Invalid file format. Line 3 is bad."}
    with DAG("test_openai_finetune_fail", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag2:
        OpenAIFineTuneOperator(task_id="train_bad", run_dir=str(bad_dir), poll_interval=0.01, max_backoff=0.05,
                               retries=0)
    _register(dag2)
    capsys.readouterr()
    run2 = dag2.test()
    (ti,) = run2.get_task_instances()
    assert str(ti.state).rsplit(".", 1)[-1].lower() == "failed"
    assert "failed: invalid_training_file: Invalid file format. Line 3 is bad" in capsys.readouterr().out
    assert not (bad_dir / "candidate" / "train_result.json").exists()
    assert json.loads((bad_dir / "candidate" / "openai_job.json").read_text())["status"] == "failed"


def test_format_check_finds_personal_data_after_a_json_escape(tmp_path):
    """An assistant label is JSON: a card number right after an escaped newline must still be found."""
    from retrain.train.openai.checks import check_chat_jsonl

    label = json.dumps({"intent_type": "GIFT", "recipient": "dad\n4111 1111 1111 1111"})
    line = {"messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "a gift"},
                         {"role": "assistant", "content": label}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(line) + "\n")
    report = check_chat_jsonl(path, model="gpt-4o-mini-2024-07-18", min_examples=None)
    assert report["problem_counts"].get("personal_data") == 1, report
    assert "4111" not in json.dumps(report)
