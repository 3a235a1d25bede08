"""Deferrable operator for the OpenAI fine-tuning backend; light enough to import at DAG parse time.

Only ``airflow.sdk`` is imported at module level; the OpenAI client, the trigger (Airflow core) and the
dataset checks are imported inside the methods, which run on a worker.

Flow: ``execute`` (worker, seconds) checks the dataset's format, gates on cost, uploads the files and creates
or re-attaches to the job, then defers -> ``OpenAIFineTuneTrigger`` (triggerer, hours, no worker slot) ->
``execute_complete`` (worker, seconds) writes ``candidate/train_result.json`` and returns a small dict.

Sweeps map it over the candidates (``.partial(...).expand(candidate=<plan_sweep's list>)``): each mapped task trains
one candidate's sub-run directory (``retrain.sweep.plan``), whose run id (``<run>#sweep-c<i>``) keys its job, and
returns the finished job merged into the candidate's dict, the shape ``retrain.sweep.select`` takes.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

DEFAULT_POLL_SECONDS = 30.0


class OpenAIFineTuneOperator(BaseOperator):
    """Fine-tune an OpenAI model on a run directory's train/val.jsonl; returns the fine-tuned model id.

    :param run_dir: the run directory (templated, e.g. ``"{{ ti.xcom_pull('prepare_run')['run_dir'] }}"``)
    :param candidate: instead of ``run_dir``, a sweep candidate as ``retrain.sweep.plan`` returns it (the mapped
        argument of a sweep): trains its sub-run directory ``candidate["run_dir"]``
    :param conn_id: Airflow connection: password = API key, extra ``{"base_url": ...}`` for an OpenAI-compatible
        server. When it does not exist, OPENAI_API_KEY / OPENAI_BASE_URL are used.
    :param max_cost_usd: refuse to start above this estimate (templated). None: the run's ``max_cost_usd``
        param, then ``training.max_cost_usd``, then 10 USD.
    :param model: base model (templated). None: the run's ``base_model`` param, then
        ``training.openai_base_model``.
    :param poll_interval: seconds between the trigger's polls. None: $RETRAIN_OPENAI_POLL_SECONDS on the worker,
        else 30 (jobs take minutes to hours; tests poll a local server every few milliseconds)
    :param max_backoff: longest wait between polls after repeated 429/5xx answers
    :param job_timeout: how long the job may take (queue + training); past it the job is cancelled and the task
        fails
    """

    template_fields = ("run_dir", "max_cost_usd", "model")
    ui_color = "#d6f5e3"

    def __init__(
        self,
        *,
        run_dir: str | None = None,
        candidate: dict | None = None,
        conn_id: str = "openai_default",
        max_cost_usd: float | str | None = None,
        model: str | None = None,
        poll_interval: float | None = None,
        max_backoff: float = 600.0,
        job_timeout: timedelta = timedelta(hours=24),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (run_dir is None) == (candidate is None):
            raise ValueError("OpenAIFineTuneOperator: give run_dir (a run) or candidate (a sweep candidate), not both")
        self.run_dir = run_dir
        self.candidate = candidate
        self.conn_id = conn_id
        self.max_cost_usd = max_cost_usd
        self.model = model
        self.poll_interval = poll_interval
        self.max_backoff = max_backoff
        self.job_timeout = job_timeout

    def _run_dir(self) -> str:
        return str(self.run_dir) if self.candidate is None else str(self.candidate["run_dir"])

    def _poll_interval(self) -> float:
        # Read on the worker at run time, not at parse time: the DAG file stays free of environment lookups.
        if self.poll_interval is not None:
            return float(self.poll_interval)
        from retrain import settings

        return settings.openai_poll_seconds(DEFAULT_POLL_SECONDS)

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException

        from retrain.train.openai.job import CostLimitExceeded, FormatCheckError, prepare_openai_job
        from retrain.train.openai.trigger import OpenAIFineTuneTrigger

        try:
            job = prepare_openai_job(self._run_dir(), conn_id=self.conn_id, max_cost_usd=self.max_cost_usd,
                                     model=self.model or None)
        except (FormatCheckError, CostLimitExceeded) as exc:
            # The data or the budget must change first: retrying the task cannot help.
            raise AirflowFailException(str(exc)) from None
        self.log.info("%s fine-tuning job %s (%s, status %s, estimated $%.2f); deferring until it ends",
                      "re-attached to" if job["reattached"] else "created", job["job_id"], job["model"],
                      job["status"], job["estimated_usd"])
        self.defer(
            trigger=OpenAIFineTuneTrigger(
                job_id=job["job_id"],
                conn_id=self.conn_id,
                poll_interval=self._poll_interval(),
                max_backoff=self.max_backoff,
                deadline=time.time() + self.job_timeout.total_seconds(),
            ),
            method_name="execute_complete",
            # Backstop only: the trigger's own deadline fires first and cancels the job (Airflow's trigger timeout
            # would fail the task without cancelling anything).
            timeout=self.job_timeout + timedelta(minutes=15),
        )

    def execute_complete(self, context: Any, event: dict | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        from retrain.train.openai.job import FineTuneJobFailed, OpenAIFineTuneError, finish_job

        if not event:
            raise AirflowException("the trigger ended without an event; clear the task to re-attach to the job")
        try:
            result = finish_job(self._run_dir(), event)
        except FineTuneJobFailed as exc:
            # OpenAI's own verdict (bad data, cancelled): a retry would pay for the same failure again.
            raise AirflowFailException(str(exc)) from None
        except OpenAIFineTuneError as exc:
            if event.get("status") == "timeout":
                raise AirflowFailException(str(exc)) from None
            raise AirflowException(str(exc)) from None  # polling refused (e.g. key rotated): a retry re-attaches
        if self.candidate is None:
            return result
        # A sweep candidate: what retrain.sweep.select reads (no optimizer steps or eval loss: OpenAI trained it).
        keep = ("name", "run_dir", "parent_run_dir", "values", "total_steps", "rung")
        return {**{k: self.candidate.get(k) for k in keep}, **result, "steps": None, "steps_trained": None,
                "eval_loss": None}

    def on_kill(self) -> None:
        """Killed while execute() ran (e.g. SIGTERM, execution_timeout): cancel the job if one exists already.
        While deferred, the trigger's on_kill does this instead."""
        from retrain.train.openai.job import cancel_job, recorded_job_id

        job_id = recorded_job_id(Path(self._run_dir()))
        if not job_id:
            self.log.info("on_kill: no OpenAI job recorded for %s, nothing to cancel", self._run_dir())
            return
        try:
            outcome = cancel_job(job_id, conn_id=self.conn_id)
            self.log.warning("on_kill: job %s -> %s", job_id, outcome["status"])
        except Exception as exc:  # noqa: BLE001 - on_kill must not raise; say what to do by hand
            self.log.error("on_kill: could not cancel OpenAI job %s (%s); cancel it in the OpenAI dashboard",
                           job_id, exc)
