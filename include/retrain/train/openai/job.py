"""OpenAI fine-tuning backend: create (or re-attach to) this run's job, cancel it, turn its end into a result.

Plain functions, no Airflow: the deferrable operator (``operator.py``) calls ``prepare_openai_job`` and, after its
trigger (``trigger.py``) reports the job's end, ``finish_job``. Before anything is uploaded, ``checks.py`` checks
the dataset's format and gates on cost (token counts from ``tokens.py``).

What leaves the machine is exactly ``train.jsonl`` and ``val.jsonl`` of the run directory: the dataset stage
already scrubbed them and validation already failed the run on any leftover personal data; the format check
scans once more with the same patterns, because an upload cannot be taken back.

Idempotency: every job carries ``metadata.retrain_run_key`` (a hash of use case + run id) and the job id is also
written to ``run_dir/candidate/openai_job.json`` the moment it exists. A retried or cleared task therefore finds
its job (file first, then the server's job list) and re-attaches while it is running or has succeeded; only a
job that ended failed/cancelled is replaced by a new attempt (the same rule as Airflow's ResumableJobMixin).

Credentials: ``retrain.settings.openai_credentials`` (explicit arguments, then the Airflow connection, then
OPENAI_API_KEY / OPENAI_BASE_URL); a missing key fails with how to configure one.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain import settings
from retrain.rundir import RunDir, sha256_file, write_json
from retrain.train.openai.checks import check_and_estimate
from retrain.train.openai.errors import (  # noqa: F401 - re-exported: callers catch them from here
    CostLimitExceeded,
    FineTuneJobFailed,
    FormatCheckError,
    OpenAIFineTuneError,
    require_api_key,
)

log = logging.getLogger(__name__)

ACTIVE_STATES = ("validating_files", "queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


# --- client ----------------------------------------------------------------------------------------------


def make_client(api_key: str | None = None, base_url: str | None = None, *, max_retries: int = 4,
                timeout: float = 120.0):
    """A synchronous client; ``api_key``/``base_url`` as resolved by settings.openai_credentials (no key: a
    message saying how to configure one)."""
    import openai

    # The client's own retries back off exponentially and honour Retry-After on 429/5xx.
    return openai.OpenAI(api_key=require_api_key(api_key), base_url=base_url, max_retries=max_retries,
                         timeout=timeout)


def is_transient_error(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.RateLimitError)):  # timeouts are connection errors
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def api_error_message(exc: BaseException) -> str:
    """OpenAI's own words from an API exception, without request details (no headers, no key)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return f"HTTP {exc.status_code}{f' {code}' if code else ''}: {msg or exc.message}"
    return f"{type(exc).__name__}: {exc}"


# --- jobs ------------------------------------------------------------------------------------------------


def _job_dict(job: Any) -> dict:
    data = job.model_dump() if hasattr(job, "model_dump") else dict(job)
    return {k: data.get(k) for k in ("id", "status", "model", "fine_tuned_model", "trained_tokens", "created_at",
                                     "finished_at", "training_file", "validation_file", "metadata", "error",
                                     "hyperparameters", "seed", "user_provided_suffix")}


def _jobs_for_run(client, key: str, known_id: str | None) -> list[dict]:
    """This run's jobs, newest first: the one recorded in the run directory plus every job on the server whose
    metadata carries the run key (covers a worker that died between creating the job and recording it)."""
    import openai

    found: dict[str, dict] = {}
    if known_id:
        try:
            found[known_id] = _job_dict(client.fine_tuning.jobs.retrieve(known_id))
        except openai.NotFoundError:
            log.warning("job %s recorded in the run directory no longer exists on the server", known_id)
    seen = 0
    # The metadata filter is a server-side convenience; some compatible servers ignore it, so filter again here.
    for job in client.fine_tuning.jobs.list(metadata={"retrain_run_key": key}, limit=100):
        seen += 1
        if (job.metadata or {}).get("retrain_run_key") == key:
            found.setdefault(job.id, _job_dict(job))
        if seen >= 1000:
            break
    return sorted(found.values(), key=lambda j: j.get("created_at") or 0, reverse=True)


def _upload(client, path: Path, sha: str, previous: dict | None) -> str:
    import openai

    if previous and previous.get("sha256") == sha:
        try:
            client.files.retrieve(previous["id"])
            log.info("reusing uploaded %s as %s (same content)", path.name, previous["id"])
            return previous["id"]
        except openai.NotFoundError:
            pass
    with open(path, "rb") as fh:
        uploaded = client.files.create(file=(path.name, fh), purpose="fine-tune")
    log.info("uploaded %s (%d bytes) as %s", path.name, path.stat().st_size, uploaded.id)
    return uploaded.id


def prepare_openai_job(run_dir: str | Path, *, conn_id: str | None = settings.OPENAI_CONN_ID,
                       api_key: str | None = None, base_url: str | None = None, max_cost_usd: float | str | None = None, model: str | None = None,
                       create_attempts: int = 5, retry_seconds: float = 2.0) -> dict:
    """Format check + cost gate, then re-attach to this run's job or upload the files and create it.

    Returns ``{"job_id", "status", "reattached", "attempt", "model", "suffix", "training_file",
    "validation_file", "estimated_usd", "tokens_exact"}``; ``run_dir/candidate/openai_job.json`` records the
    job (never the key).
    """
    run = RunDir(run_dir)
    report = check_and_estimate(run.path, model=model, max_cost_usd=max_cost_usd)
    key, url = settings.openai_credentials(conn_id, api_key=api_key, base_url=base_url)
    with make_client(key, url) as client:
        return _create_or_reattach(client, run, report, url, create_attempts, retry_seconds)


def _create_or_reattach(client, run: RunDir, report: dict, url: str | None, create_attempts: int,
                        retry_seconds: float) -> dict:
    s, estimate = report["settings"], report["estimate"]
    state_path = run.openai_job
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    train, val = run.split("train"), run.split("val")
    train_sha = sha256_file(train)
    has_val = report["format"]["val"]["examples"] > 0

    def same_data(job: dict) -> bool:
        sha = (job.get("metadata") or {}).get("retrain_train_sha256")
        if sha is not None:
            return sha == train_sha
        # A compatible server that drops metadata: trust the run directory's record of what this job got.
        recorded = ((state.get("files") or {}).get("train") or {}).get("sha256")
        return job["id"] == state.get("job_id") and recorded == train_sha

    jobs = _jobs_for_run(client, s["run_key"], state.get("job_id"))
    for job in jobs:
        if same_data(job) and job["status"] in (*ACTIVE_STATES, "succeeded"):
            log.info("re-attaching to fine-tuning job %s (%s) created for this run earlier", job["id"], job["status"])
            files = state.get("files") or {}
            if not files.get("train"):  # the record was lost: rebuild it from the job
                files["train"] = {"id": job["training_file"], "sha256": train_sha}
                if job.get("validation_file"):
                    files["val"] = {"id": job["validation_file"], "sha256": sha256_file(val)}
            state.update(job_id=job["id"], status=job["status"], model=job["model"], base_url=url, files=files,
                         suffix=job.get("user_provided_suffix") or s["suffix"], run_key=s["run_key"],
                         hyperparameters=state.get("hyperparameters") or job.get("hyperparameters"),
                         seed=job.get("seed"), estimate=estimate, created_at=job.get("created_at"),
                         reattached_at=datetime.now(timezone.utc).isoformat())
            write_json(state_path, state)
            return _prepared(state, job, reattached=True, estimate=estimate)
        if not same_data(job) and job["status"] in ACTIVE_STATES:
            # The run's dataset was rebuilt since: that job trains on stale data and would be billed for nothing.
            log.warning("cancelling job %s: it trains on an earlier version of this run's dataset", job["id"])
            cancel_job(job["id"], client=client)
    if jobs:
        last = jobs[0]
        err = (last.get("error") or {}).get("message") or ""
        log.warning("this run's previous job %s cannot be re-used (%s%s); starting attempt %d", last["id"],
                    last["status"], f": {err}" if err else "", len(jobs) + 1)
    attempt = len(jobs) + 1

    files = state.get("files") or {}
    files["train"] = {"id": _upload(client, train, train_sha, files.get("train")), "sha256": train_sha}
    if has_val:
        val_sha = sha256_file(val)
        files["val"] = {"id": _upload(client, val, val_sha, files.get("val")), "sha256": val_sha}
    else:
        files.pop("val", None)
    state.update(files=files, model=s["model"], suffix=s["suffix"], base_url=url, run_key=s["run_key"])
    write_json(state_path, state)  # uploads are reused by a retry that dies before the job exists

    metadata = {
        "retrain_run_key": s["run_key"],
        "retrain_use_case": s["use_case"],
        "retrain_run_id": s["run_id"][:512],
        "retrain_train_sha256": train_sha,
        "retrain_attempt": str(attempt),
    }
    hp = s["hyperparameters"]
    request = dict(
        model=s["model"],
        training_file=files["train"]["id"],
        suffix=s["suffix"],
        seed=s["seed"],
        metadata=metadata,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
    )
    if has_val:
        request["validation_file"] = files["val"]["id"]
    # Creating is the one call that must not be blindly retried: a 5xx or a dropped connection may hide a job that
    # was created. Retry by hand, looking for the job by its run key before each new attempt.
    once = client.with_options(max_retries=0)
    job = None
    for n in range(1, create_attempts + 1):
        try:
            job = _job_dict(once.fine_tuning.jobs.create(**request))
            break
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient_error(exc):
                raise OpenAIFineTuneError(
                    f"OpenAI refused to create the fine-tuning job: {api_error_message(exc)}. Check the model name, "
                    f"the account's fine-tuning access and the uploaded files ({state_path.name})."
                ) from None
            log.warning("creating the job failed (%s), attempt %d/%d", api_error_message(exc), n, create_attempts)
            time.sleep(retry_seconds * 2 ** (n - 1))
            existing = [j for j in _jobs_for_run(client, s["run_key"], None)
                        if (j.get("metadata") or {}).get("retrain_attempt") == str(attempt)]
            if existing:
                job = existing[0]
                log.info("the job was created despite the error: %s", job["id"])
                break
    if job is None:
        raise OpenAIFineTuneError(
            f"could not create the fine-tuning job after {create_attempts} attempts (OpenAI kept answering with "
            f"rate-limit/server errors); the task retry will try again and re-use the uploaded files."
        )
    state.update(job_id=job["id"], status=job["status"], attempt=attempt, created_at=job["created_at"],
                 hyperparameters=hp, seed=s["seed"], metadata=metadata, estimate=estimate)
    write_json(state_path, state)
    log.info("created fine-tuning job %s on %s (attempt %d, %d epochs, suffix %s)", job["id"], s["model"], attempt,
             hp["n_epochs"], s["suffix"])
    return _prepared(state, job, reattached=False, estimate=estimate)


def _prepared(state: dict, job: dict, *, reattached: bool, estimate: dict) -> dict:
    return {
        "job_id": job["id"],
        "status": job["status"],
        "reattached": reattached,
        "attempt": int((job.get("metadata") or {}).get("retrain_attempt") or state.get("attempt") or 1),
        "model": job["model"],
        "suffix": job.get("user_provided_suffix") or state.get("suffix"),
        "training_file": job.get("training_file"),
        "validation_file": job.get("validation_file"),
        "estimated_usd": estimate["estimated_usd"],
        "tokens_exact": estimate["tokens_exact"],
    }


def recorded_job_id(run_dir: str | Path) -> str | None:
    path = RunDir(run_dir).openai_job
    return json.loads(path.read_text()).get("job_id") if path.is_file() else None


def cancel_job(job_id: str, *, client=None, conn_id: str | None = settings.OPENAI_CONN_ID) -> dict:
    """Cancel a job unless it already ended; returns {"job_id", "status", "cancelled"}. Without ``client``, one
    is made from ``conn_id`` (settings.openai_credentials)."""
    import openai

    if client is None:
        key, url = settings.openai_credentials(conn_id)
        with make_client(key, url, max_retries=2, timeout=30) as own:
            return cancel_job(job_id, client=own)
    try:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL_STATES:
            return {"job_id": job_id, "status": job.status, "cancelled": False}
        job = client.fine_tuning.jobs.cancel(job_id)
        log.warning("cancelled OpenAI fine-tuning job %s", job_id)
        return {"job_id": job_id, "status": job.status, "cancelled": True}
    except openai.APIStatusError as exc:
        # Lost a race with the job finishing (400) or it is gone (404): nothing left to cancel.
        log.warning("could not cancel job %s: %s", job_id, api_error_message(exc))
        return {"job_id": job_id, "status": "unknown", "cancelled": False, "error": api_error_message(exc)}


# --- result ----------------------------------------------------------------------------------------------


def finish_job(run_dir: str | Path, event: dict) -> dict:
    """Turn the trigger's final event into train_result.json, or raise with OpenAI's own error message."""
    run = RunDir(run_dir)
    run.candidate.mkdir(parents=True, exist_ok=True)
    events = event.get("events") or []
    if events:
        with open(run.openai_events, "a", encoding="utf-8") as fh:
            for e in events:
                fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    state_path = run.openai_job
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    status, job_id = event.get("status"), event.get("job_id") or state.get("job_id")
    state.update(status=status, finished_at=event.get("finished_at"))
    write_json(state_path, state)
    if status in ("failed", "cancelled"):
        err = event.get("error") or {}
        detail = (f"{err.get('code') or 'error'}: {str(err['message']).rstrip('.')}" if err.get("message")
                  else "OpenAI gave no error message")
        hint = ("Fix the training data and rebuild the dataset" if status == "failed"
                else "The job was cancelled (from the OpenAI dashboard, the API or by killing this task)")
        raise FineTuneJobFailed(
            f"OpenAI fine-tuning job {job_id} {status}: {detail}. {hint}; clearing this task starts a new job.",
            job_id=job_id, status=status, error=err or None,
        )
    if status != "succeeded":
        raise OpenAIFineTuneError(event.get("message") or f"fine-tuning job {job_id} ended with status {status!r}")
    model_id = event["model_id"]
    created, finished = event.get("created_at") or state.get("created_at"), event.get("finished_at")
    result = {
        "backend": "openai",
        "base_model": state.get("model") or event.get("model"),
        "base_model_path": state.get("model") or event.get("model"),
        "model_id": model_id,
        "job_id": job_id,
        "trained_tokens": event.get("trained_tokens"),
        "estimated_cost_usd": (state.get("estimate") or {}).get("estimated_usd"),
        "hyperparameters": event.get("hyperparameters") or state.get("hyperparameters"),
        "seed": state.get("seed"),
        "training_file": (state.get("files") or {}).get("train", {}).get("id"),
        "validation_file": (state.get("files") or {}).get("val", {}).get("id"),
        "base_url": state.get("base_url"),
        "seconds": (finished - created) if finished and created else None,
        "finished_at": finished,
        "model_spec": {"kind": "openai", "model": model_id, "base_url": state.get("base_url"), "label": "candidate"},
    }
    write_json(run.train_result, result)
    log.info("fine-tuned model %s ready (job %s, %s trained tokens)", model_id, job_id, event.get("trained_tokens"))
    return {"backend": "openai", "model_id": model_id, "job_id": job_id, "trained_tokens": event.get("trained_tokens"),
            "train_result": str(run.train_result), "model_spec": result["model_spec"]}
