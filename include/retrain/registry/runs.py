"""Run metrics: one ``pipeline_runs`` row per (use case, DAG run), filled in stage by stage.

Every stage calls ``record_stage`` once when it finishes. The call is an upsert keyed by (use_case, run_id):
a stage's duration is merged into the ``stages`` JSON object under the stage name (a retried or cleared task
overwrites its own entry instead of adding a second one) and the other fields are written only when given, so
a later stage never erases what an earlier one recorded. Calling it twice with the same arguments leaves the
same row: retries are safe.

The UI page (plugins/retrain_ui.py) and ``latest_runs`` read the table; nothing in the pipeline depends on it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from retrain import db
from retrain.rundir import RunDir

log = logging.getLogger(__name__)

# Fields a stage may report, with how they are stored. JSON columns take any JSON-able value.
_TEXT = ("status", "run_dir", "decision", "backup_id", "error")
_INT = ("rows_collected", "rows_rejected", "model_version")
_JSON = ("validation", "metrics", "decision_reasons")
FIELDS = _TEXT + _INT + _JSON
STATUSES = ("running", "success", "failed", "no_go", "dry_run", "no_new_data", "awaiting_approval", "rejected")
_COLUMNS = ("use_case", "run_id", "status", "run_dir", "stages", "stage_order", *_INT, "validation", "metrics",
            "decision", "decision_reasons", "backup_id", "error", "started_at", "updated_at")


def _ensure_ready(conn) -> None:
    """schema.sql once per process per database, not once per stage (each stage records on a fresh connection)."""
    # Were a transaction already open, the DDL would join it and record_stage's commit would commit both.
    if db.ensure_schema_once(conn):
        conn.commit()
        db.mark_schema_ready(conn)


def _check(fields: dict[str, Any]) -> None:
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise TypeError(f"record_stage got unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
    status = fields.get("status")
    if status is not None and status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {STATUSES}")
    for name in _INT:
        v = fields.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    decision = fields.get("decision")
    if decision is not None and not isinstance(decision, str):
        raise ValueError(f"decision must be a string such as 'GO' or 'NO-GO', got {type(decision).__name__}; "
                         f"pass the per-check explanations as decision_reasons")


def record_stage(conn, *, use_case: str, run_id: str, stage: str, seconds: float | None, **fields: Any) -> dict:
    """Upsert this run's row: set ``stages[stage] = seconds`` and every field given (None = leave unchanged).

    Fields: status, run_dir, rows_collected, rows_rejected, validation, metrics, decision, decision_reasons,
    model_version, backup_id, error. Commits. Returns the row as a dict.
    """
    if not stage:
        raise ValueError("record_stage needs the stage name (e.g. 'collect_examples')")
    if seconds is not None and (not isinstance(seconds, (int, float)) or seconds < 0):
        raise ValueError(f"seconds must be a non-negative number, got {seconds!r}")
    _check(fields)
    given = {k: v for k, v in fields.items() if v is not None}
    stage_json = json.dumps({stage: round(float(seconds), 3)} if seconds is not None else {})

    cols = ["use_case", "run_id", "stages", "stage_order", *given]
    values = [use_case, run_id, stage_json, [stage] if seconds is not None else [],
              *(json.dumps(v, default=str) if k in _JSON else v for k, v in given.items())]
    placeholders = ["%s", "%s", "%s::jsonb", "%s::text[]", *("%s::jsonb" if k in _JSON else "%s" for k in given)]
    # jsonb does not keep key order, so the order stages ran in is kept beside it.
    updates = ["stages = pipeline_runs.stages || EXCLUDED.stages",
               "stage_order = CASE WHEN EXCLUDED.stage_order[1] IS NULL "
               "OR EXCLUDED.stage_order[1] = ANY(pipeline_runs.stage_order) THEN pipeline_runs.stage_order "
               "ELSE pipeline_runs.stage_order || EXCLUDED.stage_order END",
               "updated_at = now()",
               *(f"{k} = EXCLUDED.{k}" for k in given)]
    sql = (
        f"INSERT INTO pipeline_runs ({', '.join(cols)}) VALUES ({', '.join(placeholders)}) "
        f"ON CONFLICT (use_case, run_id) DO UPDATE SET {', '.join(updates)} "
        f"RETURNING {', '.join(_COLUMNS)}"
    )
    with conn.cursor() as cur:
        cur.execute(sql, values)
        row = _row(cur.fetchone())
    conn.commit()
    return row



def _row(values) -> dict:
    row = dict(zip(_COLUMNS, values))
    stages = row["stages"] or {}
    order = [s for s in row.pop("stage_order") or [] if s in stages]
    row["stages"] = {s: stages[s] for s in [*order, *sorted(set(stages) - set(order))]}
    for k in ("started_at", "updated_at"):
        if row.get(k) is not None:
            row[k] = row[k].isoformat()
    row["total_seconds"] = round(sum(v for v in (row["stages"] or {}).values() if isinstance(v, (int, float))), 3)
    return row


def latest_runs(conn, limit: int = 50, use_case: str | None = None) -> list[dict]:
    """The most recent runs first (all use cases, or one)."""
    where, args = ("WHERE use_case = %s", [use_case]) if use_case else ("", [])
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM pipeline_runs {where} ORDER BY started_at DESC, run_id DESC LIMIT %s",
            [*args, int(limit)],
        )
        return [_row(r) for r in cur.fetchall()]


def decision_fields(decision: dict | None) -> dict:
    """``decision`` / ``decision_reasons`` for record_stage from the gate's decision.json (retrain.evaluate.gate.decide).

    The reasons are the one-line reasons of the required checks that failed (why NO-GO), or of every required
    check (why GO); informational checks (``required: false``) never count. Older or hand-written shapes work
    too: {"go": bool}, "reason"/"reasons", "summary", or "checks" as a mapping.
    """
    if not isinstance(decision, dict):
        return {}
    label = decision.get("decision") or decision.get("outcome") or decision.get("result")
    if label is None and isinstance(decision.get("go"), bool):
        label = "GO" if decision["go"] else "NO-GO"
    label = str(label).upper().replace("_", "-") if label is not None else None
    if label == "NOGO":
        label = "NO-GO"
    checks = decision.get("checks")
    if isinstance(checks, dict):  # {"name": {...}} as well as [{"name": ...}]
        checks = [{"name": k, **v} if isinstance(v, dict) else {"name": k, "reason": str(v)} for k, v in checks.items()]
    required = [c for c in checks if isinstance(c, dict) and c.get("required", True) is not False] \
        if isinstance(checks, list) else []
    failed = [c for c in required if c.get("passed", c.get("pass", c.get("ok"))) is False]
    reasons = [str(c.get("reason") or c.get("message") or c.get("name")) for c in (failed or required)]
    if not reasons:
        extra = decision.get("reasons") or decision.get("reason") or decision.get("summary")
        reasons = [str(r) for r in extra] if isinstance(extra, list) else [str(extra)] if extra else []
    return {"decision": label, "decision_reasons": reasons or None}


def record_run_stage(run_dir: str | Path, stage: str, seconds: float | None, **fields: Any) -> dict | None:
    """record_stage for a prepared run directory (use case and run id from its run_config.json), best effort.

    Run metrics are bookkeeping: if the database write fails the stage still succeeds, with a warning in the
    task log. Returns the row, or None when nothing could be recorded.
    """
    try:
        meta = json.loads(RunDir(run_dir).run_config.read_text())
        use_case = meta["use_case"]["name"] if isinstance(meta["use_case"], dict) else str(meta["use_case"])
        with db.connection() as conn:
            _ensure_ready(conn)
            return record_stage(conn, use_case=use_case, run_id=meta["run_id"], stage=stage, seconds=seconds,
                                run_dir=str(run_dir), **fields)
    except (TypeError, ValueError):
        raise  # a wrong field or value is a bug in the caller: fail loudly
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.warning("could not record stage %s of %s in pipeline_runs: %s", stage, run_dir, exc)
        return None


@contextmanager
def timed_stage(run_dir: str | Path, stage: str, **fields: Any) -> Iterator[dict]:
    """Time a stage and record it; put what the stage found in the yielded dict (rows_collected=..., ...).

    The duration is recorded even when the stage raises (with the fields set so far), then the error goes on.
    """
    found: dict[str, Any] = dict(fields)
    start = time.monotonic()
    try:
        yield found
    finally:
        record_run_stage(run_dir, stage, time.monotonic() - start, **found)


def failure_recorder(use_case: str):
    """An ``on_failure_callback`` that marks this run failed in pipeline_runs, naming the task and the error.

    Cheap to build at parse time (no database access until a task actually fails). It never raises: losing
    this bookkeeping must not hide the task's own failure or stop the alert notifiers.
    """

    def record_failure(context) -> None:
        import logging

        from retrain.notify import alert_payload

        p = alert_payload(context)
        try:
            with db.connection() as conn:
                _ensure_ready(conn)
                record_stage(conn, use_case=use_case, run_id=p["run_id"], stage=p["task_id"], seconds=None,
                             status="failed", error=f"{p['task_id']}: {p['error']}")
        except Exception as exc:  # noqa: BLE001 - see docstring
            logging.getLogger(__name__).warning("could not record the failure of %s in pipeline_runs: %s",
                                                p["task_id"], exc)

    record_failure.__name__ = f"record_failure_{use_case}"
    return record_failure
