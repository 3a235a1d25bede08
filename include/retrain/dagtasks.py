"""The Airflow task layer shared by the DAG files: trigger-form Params, fail-fast task bodies, who triggered a run.

* :func:`dag_params` builds each use case's trigger form from ``retrain.schemas.run_params.RunParams`` and the raw
  YAML mapping (``retrain.dagspec``): no Param is declared by hand in a DAG file.
* :func:`step` is ``airflow.sdk.task`` with the body wrapped by :func:`fail_fast`: an error a retry cannot fix (a bad
  use-case file or parameter, a dataset that fails its rules, a failed expectation; ``retrain.errors``) fails the
  task at once with a one-line message (AirflowFailException: no retries, one failure alert); a database or S3
  outage keeps the task's retries.

Imported at parse time: ``airflow.sdk`` and the run-parameter schema only; the task bodies import the rest.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from airflow.sdk import Param, task

from retrain.schemas.run_params import form_fields


def dag_params(spec: dict) -> dict[str, Param]:
    """The trigger form of one use case (every field titled and described; the defaults validate)."""
    params = {}
    for name, field in form_fields(spec).items():
        field = dict(field)
        default = field.pop("default")
        params[name] = Param(default, **field)
    return params


def fail_fast(func: Callable) -> Callable:
    """Run ``func``; an exception a retry cannot fix becomes AirflowFailException with its one-line message."""

    @functools.wraps(func)
    def inner(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            from retrain.errors import is_retry_futile, one_line

            if not is_retry_futile(exc):
                raise
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{type(exc).__name__}: {one_line(exc)}") from exc

    return inner


def step(func: Callable | None = None, **kwargs: Any):
    """``@task`` whose body fails fast on errors a retry cannot fix (see the module docstring)."""
    if func is not None:
        return task(fail_fast(func))
    return lambda f: task(**kwargs)(fail_fast(f))


def branch(**kwargs: Any):
    """``@task.branch`` with the same fail-fast body."""
    return lambda f: task.branch(**kwargs)(fail_fast(f))


# Longer than any scheduler delay of a live deployment, far shorter than a month: a run this late was created
# by an unpause (or a scheduler that was down at its time), not by its tick.
STALE_AFTER = timedelta(hours=1)


def is_stale_scheduled_run(dag_run: Any, now: datetime | None = None) -> bool:
    """A scheduled run due more than STALE_AFTER ago: the DAG was paused at its time and has just been unpaused."""
    run_type = str(getattr(dag_run, "run_type", "") or "").rsplit(".", 1)[-1].lower()
    due = getattr(dag_run, "run_after", None) or getattr(dag_run, "logical_date", None)
    if run_type != "scheduled" or due is None:
        return False
    return (now or datetime.now(timezone.utc)) - due > STALE_AFTER


def skip_if_stale(dag_run: Any) -> None:
    """Skip the whole run (AirflowSkipException in its first task) when it is a stale scheduled run: unpausing a DAG
    must never start training on a month that is long gone. Trigger the DAG to run now."""
    if is_stale_scheduled_run(dag_run):
        from airflow.sdk.exceptions import AirflowSkipException

        due = getattr(dag_run, "run_after", None) or getattr(dag_run, "logical_date", None)
        raise AirflowSkipException(f"scheduled run due at {due} is more than {STALE_AFTER} old (the DAG was paused "
                                   "then); skipped: trigger the DAG to retrain now")


def run_schedule(dag_run: Any) -> dict[str, Any]:
    """The run's type, logical date and data interval (None for a manual run triggered without a logical date), for
    retrain.stages.prepare_run: a data_interval_end bounds what the run collects."""
    return {key: getattr(dag_run, key, None)
            for key in ("run_type", "logical_date", "data_interval_start", "data_interval_end")}


def triggering_user(dag_run: Any) -> str:
    """Who triggered the run (Airflow 3's ``dag_run.triggering_user_name``; None for scheduled runs)."""
    name = getattr(dag_run, "triggering_user_name", None)
    return str(name) if name else "unknown"
