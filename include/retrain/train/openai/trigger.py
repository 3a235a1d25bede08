"""Airflow trigger that waits for an OpenAI fine-tuning job without holding a worker slot.

Runs in the triggerer's event loop (``dag.test()`` runs it in-process). It polls the job and its events with the
async client, writes each new OpenAI event to the task log, backs off on 429/5xx/connection errors (honouring
Retry-After), and fires ONE event when the job ends: ``succeeded`` (with the fine-tuned model id), ``failed`` /
``cancelled`` (with OpenAI's error object), ``timeout`` (our own deadline passed: the job was cancelled so it
stops billing) or ``error`` (the API refused the polling itself, e.g. a revoked key).

Airflow calls ``on_kill()`` only when a user acts on the deferred task (mark failed/success, clear); it cancels
the job. ``cleanup()`` runs on every exit including triggerer restarts, so it must NOT cancel anything.

Imported only at task run time and by the triggerer: this module imports Airflow core and is never imported by
a DAG file. The API key is resolved here at run time (connection or environment) and never serialized into the
trigger's kwargs, which Airflow stores in its database.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

# Imported at module level on purpose: the triggerer loads this module outside its event loop, while a first
# `import openai` inside run() would block every other trigger for about a second.
import openai
from airflow.triggers.base import BaseTrigger, TriggerEvent

from retrain import settings
from retrain.train.openai.errors import OpenAIFineTuneError, require_api_key
from retrain.train.openai.job import ACTIVE_STATES, TERMINAL_STATES, api_error_message, is_transient_error

CLASSPATH = "retrain.train.openai.trigger.OpenAIFineTuneTrigger"


class OpenAIFineTuneTrigger(BaseTrigger):
    """Poll ``job_id`` until it ends; see the module docstring for the events it fires.

    :param job_id: the fine-tuning job (``ftjob-...``)
    :param conn_id: Airflow connection with the API key (password) and optional ``base_url`` extra; falls back
        to OPENAI_API_KEY / OPENAI_BASE_URL
    :param poll_interval: seconds between polls while the job runs
    :param max_backoff: longest wait after repeated 429/5xx/connection errors
    :param deadline: epoch seconds after which the job is cancelled and a ``timeout`` event fires (None: never)
    :param events_tail: how many of the latest OpenAI events the final event carries (for the run directory)
    """

    def __init__(self, job_id: str, conn_id: str | None = "openai_default", poll_interval: float = 30.0,
                 max_backoff: float = 600.0, deadline: float | None = None, events_tail: int = 50):
        super().__init__()
        self.job_id = job_id
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        self.max_backoff = float(max_backoff)
        self.deadline = deadline
        self.events_tail = int(events_tail)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return CLASSPATH, {
            "job_id": self.job_id,
            "conn_id": self.conn_id,
            "poll_interval": self.poll_interval,
            "max_backoff": self.max_backoff,
            "deadline": self.deadline,
            "events_tail": self.events_tail,
        }

    async def _client(self, max_retries: int = 0):
        key, url = await settings.aopenai_credentials(self.conn_id)
        # Retries are ours (below) so every backoff shows up in the task log.
        return openai.AsyncOpenAI(api_key=require_api_key(key), base_url=url, max_retries=max_retries,
                                  timeout=60.0)

    def _backoff(self, failures: int, exc: BaseException) -> float:
        wait = min(self.max_backoff, max(self.poll_interval, 0.05) * 2 ** failures)
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        try:
            if "retry-after-ms" in headers:
                wait = max(wait, float(headers["retry-after-ms"]) / 1000)
            elif "retry-after" in headers:
                wait = max(wait, float(headers["retry-after"]))
        except ValueError:
            pass  # an HTTP-date Retry-After: the exponential wait is close enough
        return min(self.max_backoff, wait) * random.uniform(0.9, 1.1)

    async def _log_new_events(self, client, seen: set[str], tail: deque) -> None:
        fresh: list[Any] = []
        after = None
        for _ in range(20):  # newest first; page back until an event we already logged (bounded)
            paging = {"after": after} if after else {}
            page = await client.fine_tuning.jobs.list_events(self.job_id, limit=100, **paging)
            batch = list(page.data)
            new = [e for e in batch if e.id not in seen]
            fresh.extend(new)
            if len(new) < len(batch) or not getattr(page, "has_more", False) or not batch:
                break
            after = batch[-1].id
        # The API lists newest first; reversed + a stable sort keeps same-second events in their real order.
        for e in sorted(reversed(fresh), key=lambda e: e.created_at):
            seen.add(e.id)
            data = getattr(e, "data", None) or None
            self.log.info("[openai %s] %s %s", e.level, e.message, data if data else "")
            tail.append({"id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message,
                         "data": data})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            client = await self._client()
        except OpenAIFineTuneError as exc:  # no credentials on the triggerer: say so instead of a traceback
            yield TriggerEvent({"status": "error", "job_id": self.job_id, "events": [], "message": str(exc)})
            return
        try:
            async for event in self._poll(client):
                yield event
        finally:
            await client.close()

    async def _poll(self, client) -> AsyncIterator[TriggerEvent]:
        seen: set[str] = set()
        tail: deque = deque(maxlen=self.events_tail)
        failures, last_status = 0, None
        self.log.info("waiting for OpenAI fine-tuning job %s (poll every %gs)", self.job_id, self.poll_interval)
        while True:
            if self.deadline is not None and time.time() > self.deadline:
                outcome = await self._acancel(client)
                yield TriggerEvent({
                    "status": "timeout", "job_id": self.job_id, "events": list(tail),
                    "message": f"fine-tuning job {self.job_id} did not finish before the task's deadline; "
                               f"cancel request: {outcome.get('status')}. Raise job_timeout on the operator if "
                               f"OpenAI's queue is this slow, then clear the task.",
                })
                return
            try:
                job = await client.fine_tuning.jobs.retrieve(self.job_id)
                await self._log_new_events(client, seen, tail)
            except Exception as exc:  # noqa: BLE001 - classified just below
                if not is_transient_error(exc):
                    yield TriggerEvent({
                        "status": "error", "job_id": self.job_id, "events": list(tail),
                        "message": f"polling OpenAI fine-tuning job {self.job_id} failed: {api_error_message(exc)}. "
                                   f"Check the API key/connection; the job itself may still be running.",
                    })
                    return
                failures += 1
                wait = self._backoff(failures, exc)
                self.log.warning("polling job %s: %s; retrying in %.1fs (%d in a row)", self.job_id,
                                 api_error_message(exc), wait, failures)
                await asyncio.sleep(wait)
                continue
            failures = 0
            if job.status != last_status:
                self.log.info("job %s is %s", self.job_id, job.status)
                last_status = job.status
            if job.status in TERMINAL_STATES:
                error = job.error.model_dump() if job.error is not None else None
                yield TriggerEvent({
                    "status": job.status, "job_id": job.id, "model": job.model,
                    "model_id": job.fine_tuned_model, "trained_tokens": job.trained_tokens,
                    "created_at": job.created_at, "finished_at": job.finished_at, "error": error,
                    "hyperparameters": job.hyperparameters.model_dump() if job.hyperparameters else None,
                    "events": list(tail),
                })
                return
            await asyncio.sleep(self.poll_interval)

    async def _acancel(self, client) -> dict:
        try:
            job = await client.fine_tuning.jobs.retrieve(self.job_id)
            if job.status not in ACTIVE_STATES:
                return {"job_id": self.job_id, "status": job.status, "cancelled": False}
            job = await client.fine_tuning.jobs.cancel(self.job_id)
            self.log.warning("cancelled OpenAI fine-tuning job %s", self.job_id)
            return {"job_id": self.job_id, "status": job.status, "cancelled": True}
        except Exception as exc:  # noqa: BLE001 - reported, never raised (see on_kill)
            self.log.warning("could not cancel job %s: %s", self.job_id, api_error_message(exc))
            return {"job_id": self.job_id, "status": "unknown", "cancelled": False, "error": api_error_message(exc)}

    async def on_kill(self) -> None:
        """The user marked the deferred task failed/success or cleared it: stop the job so it stops billing."""
        client = await self._client(max_retries=2)
        try:
            await asyncio.wait_for(self._acancel(client), timeout=25)  # Airflow bounds on_kill at 30 s
        finally:
            await client.close()
