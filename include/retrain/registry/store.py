"""Model registry in PostgreSQL: which model version of each use case is a candidate, in production, rejected or
retired, and the history of every move with who did it and why.

The invariants live in the database, not in this code: ``model_versions_one_production`` (schema.sql) allows at
most one production row per use case, ``model_versions_one_per_run`` one version per training run. Code that
races or forgets a step gets an IntegrityError instead of silently serving two models.

Every write takes a per-use-case advisory lock and commits its own transaction, so call these functions with no
uncommitted work of yours on the connection. Each write is idempotent: a retried Airflow task gets the same answer
and changes nothing twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from retrain import db

log = logging.getLogger(__name__)

STATUSES = ("candidate", "production", "rejected", "retired", "not_selected")  # not_selected: a sweep's loser
_COLUMNS = ("id", "use_case", "version", "backend", "base_model", "artifact", "run_id", "metrics", "decision",
            "status", "created_at", "updated_at")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM model_versions"
_EVENT_COLUMNS = ("id", "use_case", "version", "action", "from_status", "to_status", "actor", "reason", "run_id",
                  "details", "at")


class RegistryError(RuntimeError):
    """A registry operation is not possible in the current state; the message says what to do instead."""


@contextmanager
def _transaction(conn, use_case: str) -> Iterator[Any]:
    # schema.sql once per process, so the registry also works on a database created before the history table.
    pending = db.ensure_schema_once(conn)
    try:
        with conn.cursor() as cur:
            # Serialise writers per use case: version numbering and promotion read-then-write.
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('retrain.registry.store'), hashtext(%s))", (use_case,))
            yield cur
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    if pending:
        db.mark_schema_ready(conn)


def _jsonable(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


def _row(values) -> dict | None:
    if values is None:
        return None
    return {k: _jsonable(v) for k, v in zip(_COLUMNS, values)}


def _get(cur, use_case: str, version: int, *, lock: bool = False) -> dict:
    cur.execute(f"{_SELECT} WHERE use_case = %s AND version = %s{' FOR UPDATE' if lock else ''}", (use_case, version))
    row = _row(cur.fetchone())
    if row is None:
        cur.execute("SELECT version, status FROM model_versions WHERE use_case = %s ORDER BY version", (use_case,))
        known = ", ".join(f"v{v} ({s})" for v, s in cur.fetchall()) or "none"
        raise RegistryError(
            f"use case '{use_case}' has no model version {version}; registered versions: {known}. "
            f"List them with `retrain registry --use-case {use_case}`."
        )
    return row


def _production(cur, use_case: str, *, lock: bool = False) -> dict | None:
    cur.execute(f"{_SELECT} WHERE use_case = %s AND status = 'production'{' FOR UPDATE' if lock else ''}",
                (use_case,))
    return _row(cur.fetchone())


def _set_status(cur, row: dict, to_status: str, *, action: str, actor: str, reason: str, run_id: str | None,
                details: dict | None = None) -> None:
    cur.execute(
        "UPDATE model_versions SET status = %s, updated_at = now() WHERE id = %s",
        (to_status, row["id"]),
    )
    _event(cur, row["use_case"], row["version"], action, row["status"], to_status, actor, reason, run_id, details)


def _event(cur, use_case, version, action, from_status, to_status, actor, reason, run_id, details=None) -> None:
    cur.execute(
        "INSERT INTO model_events (use_case, version, action, from_status, to_status, actor, reason, run_id, details)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (use_case, version, action, from_status, to_status, actor, reason or "", run_id,
         json.dumps(details or {}, default=str)),
    )


# --- reads -------------------------------------------------------------------------------------------------------


def production(conn, use_case: str) -> dict | None:
    """The production model version row of a use case, or None before the first deployment."""
    with conn.cursor() as cur:
        return _production(cur, use_case)


def get_version(conn, use_case: str, version: int) -> dict:
    with conn.cursor() as cur:
        return _get(cur, use_case, version)


def versions(conn, use_case: str) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(f"{_SELECT} WHERE use_case = %s ORDER BY version", (use_case,))
        return [_row(r) for r in cur.fetchall()]


def recent_versions(conn, use_case: str | None = None, *, per_use_case: int = 10) -> list[dict]:
    """The newest ``per_use_case`` versions of one use case (or of each), newest first, timestamps as ISO text."""
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM (SELECT *, row_number() OVER (PARTITION BY use_case ORDER BY version "
            f"DESC) AS n FROM model_versions WHERE %(uc)s::text IS NULL OR use_case = %(uc)s) v "
            f"WHERE n <= %(limit)s ORDER BY use_case, version DESC",
            {"uc": use_case, "limit": int(per_use_case)},
        )
        return [_row(r) for r in cur.fetchall()]


def history(conn, use_case: str) -> list[dict]:
    """Every registry event of a use case, oldest first."""
    with conn.cursor() as cur:
        if not db.schema_is_ready(conn):
            cur.execute("SELECT to_regclass('model_events')")
            if cur.fetchone()[0] is None:
                return []  # nothing was ever registered on this database
        cur.execute(
            f"SELECT {', '.join(_EVENT_COLUMNS)} FROM model_events WHERE use_case = %s ORDER BY id", (use_case,)
        )
        return [{k: _jsonable(v) for k, v in zip(_EVENT_COLUMNS, r)} for r in cur.fetchall()]


def summary(conn, use_case: str) -> dict:
    """What `retrain registry` prints: the production version, every version, the full history."""
    prod = production(conn, use_case)
    return {
        "use_case": use_case,
        "production": None if prod is None else {k: prod[k] for k in ("version", "backend", "artifact", "run_id")},
        "versions": [
            {k: v[k] for k in ("version", "status", "backend", "base_model", "artifact", "run_id", "created_at",
                               "updated_at")} | {"decision": (v["decision"] or {}).get("decision")}
            for v in versions(conn, use_case)
        ],
        "history": history(conn, use_case),
    }


# --- writes ------------------------------------------------------------------------------------------------------


def register_candidate(conn, *, use_case: str, run_id: str, backend: str, base_model: str, artifact: str,
                       metrics: dict | None = None, actor: str = "pipeline") -> dict:
    """Register a trained model as the next candidate version. A second call for the same run returns the same
    version (refreshing artifact and metrics while it is still a candidate: a retried training task rewrote them)."""
    if not artifact:
        raise RegistryError(f"cannot register run {run_id} of '{use_case}': no artifact (merged model dir or "
                            f"OpenAI model id); check the training result")
    with _transaction(conn, use_case) as cur:
        cur.execute(f"{_SELECT} WHERE use_case = %s AND run_id = %s", (use_case, run_id))
        row = _row(cur.fetchone())
        if row is not None:
            if row["status"] == "candidate":
                cur.execute(
                    "UPDATE model_versions SET backend = %s, base_model = %s, artifact = %s,"
                    " metrics = COALESCE(%s::jsonb, metrics), updated_at = now() WHERE id = %s",
                    (backend, base_model, artifact, None if metrics is None else json.dumps(metrics), row["id"]),
                )
                cur.execute(f"{_SELECT} WHERE id = %s", (row["id"],))
                row = _row(cur.fetchone())
            return row | {"created": False}
        cur.execute("SELECT COALESCE(max(version), 0) + 1 FROM model_versions WHERE use_case = %s", (use_case,))
        version = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO model_versions (use_case, version, backend, base_model, artifact, run_id, metrics, status)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, 'candidate') RETURNING {', '.join(_COLUMNS)}",
            (use_case, version, backend, base_model, artifact, run_id, json.dumps(metrics or {})),
        )
        row = _row(cur.fetchone())
        _event(cur, use_case, version, "register", None, "candidate", actor, f"trained by run {run_id}", run_id,
               {"backend": backend, "base_model": base_model, "artifact": artifact})
    log.info("registered %s v%d (%s) from run %s", use_case, version, backend, run_id)
    return row | {"created": True}


def register_from_train_result(conn, *, use_case: str, run_id: str, train_result: dict) -> dict:
    """register_candidate from run_dir/candidate/train_result.json (artifact = merged dir, or the OpenAI model id)."""
    backend = train_result["backend"]
    artifact = train_result.get("model_id") if backend == "openai" else train_result.get("merged_path")
    metrics = {k: train_result[k] for k in ("train_loss", "eval_loss", "steps", "seconds", "job_id")
               if train_result.get(k) is not None}
    return register_candidate(conn, use_case=use_case, run_id=run_id, backend=backend,
                              base_model=str(train_result.get("base_model") or ""), artifact=artifact,
                              metrics={"training": metrics})


def record_decision(conn, *, use_case: str, version: int, metrics: dict, decision: dict,
                    actor: str = "pipeline") -> None:
    """Store the evaluation metrics and the gate's decision on a version (the status is moved by deploy/reject)."""
    with _transaction(conn, use_case) as cur:
        row = _get(cur, use_case, version, lock=True)
        if _stable(row["metrics"]) == _stable(metrics) and _stable(row["decision"]) == _stable(decision):
            return  # a retried gate task: the same decision, only its timestamps differ
        cur.execute(
            "UPDATE model_versions SET metrics = %s, decision = %s, updated_at = now() WHERE id = %s",
            (json.dumps(metrics, default=str), json.dumps(decision, default=str), row["id"]),
        )
        verdict = decision.get("decision") or decision.get("outcome")
        reason = decision.get("reason") or decision.get("summary") or (str(verdict) if verdict else "")
        details = {"decision": verdict}
        if decision.get("overrides"):  # thresholds loosened by a trigger Param: who, from what, to what, why
            details["overrides"] = decision["overrides"]
        _event(cur, use_case, version, "decide", row["status"], row["status"], actor, str(reason), row["run_id"],
               details)


def _stable(d: dict | None) -> dict:
    # Compare what was decided, not when (the gate stamps "decided_at").
    return json.loads(json.dumps({k: v for k, v in (d or {}).items() if not k.endswith("_at")}, default=str))


Apply = Callable[[dict], Any]


def promote(conn, *, use_case: str, version: int, actor: str, reason: str, run_id: str | None = None,
            apply: Apply | None = None, details: dict | None = None) -> dict:
    """Make ``version`` the production model; the previous one becomes retired. One transaction.

    ``apply(result)`` runs inside the transaction before the commit (deploy switches the served files there): if it
    raises, the registry is left unchanged. It also runs when the version is already production, so a retried
    deploy repairs the files.
    """
    with _transaction(conn, use_case) as cur:
        row = _get(cur, use_case, version, lock=True)
        current = _production(cur, use_case, lock=True)
        if row["status"] == "production":
            result = _move_result(use_case, row, previous=None, changed=False, action="promote")
        else:
            if row["status"] == "not_selected":
                raise RegistryError(f"{use_case} v{version} lost its sweep on validation (not_selected) and cannot "
                                    f"be promoted; retrain with its settings to deploy them")
            if row["status"] == "rejected":
                raise RegistryError(
                    f"{use_case} v{version} was rejected and cannot be promoted; retrain, or restore a retired "
                    f"version with `retrain rollback --use-case {use_case} --to-version N --reason ...`"
                )
            if current is not None:
                # Retire first: the partial unique index is checked per statement.
                _set_status(cur, current, "retired", action="promote", actor=actor, reason=reason, run_id=run_id,
                            details={"replaced_by": version})
            _set_status(cur, row, "production", action="promote", actor=actor, reason=reason, run_id=run_id,
                        details={"replaces": current and current["version"], **(details or {})})
            result = _move_result(use_case, row, previous=current, changed=True, action="promote")
        if apply is not None:
            result["applied"] = apply(result)
    log.info("%s v%d is production (%s by %s: %s)", use_case, version,
             "promoted" if result["changed"] else "already", actor, reason)
    return result


def reject(conn, *, use_case: str, version: int, actor: str, reason: str, run_id: str | None = None,
           details: dict | None = None) -> dict:
    """Mark a version as rejected (a NO-GO candidate, or a retired version that must never be restored).
    ``details``: recorded in the history event (e.g. the reviewer's answer, retrain.approval)."""
    with _transaction(conn, use_case) as cur:
        row = _get(cur, use_case, version, lock=True)
        if row["status"] == "production":
            raise RegistryError(
                f"{use_case} v{version} is in production and cannot be rejected; roll back first "
                f"(`retrain rollback --use-case {use_case} --reason ...`), then reject it"
            )
        changed = row["status"] != "rejected"
        if changed:
            _set_status(cur, row, "rejected", action="reject", actor=actor, reason=reason, run_id=run_id,
                        details=details)
    return {"use_case": use_case, "version": version, "status": "rejected", "changed": changed}


def _previous_production(cur, use_case: str, current: dict | None) -> int | None:
    """The version that served before the current one, skipping versions someone rolled back away from (they
    were judged bad; restoring one needs an explicit --to-version) and versions rejected since."""
    cur.execute(
        "SELECT e.version, e.action, e.to_status, v.status FROM model_events e"
        " JOIN model_versions v ON v.use_case = e.use_case AND v.version = e.version"
        " WHERE e.use_case = %s AND (e.to_status = 'production' OR e.from_status = 'production')"
        " ORDER BY e.id DESC",
        (use_case,),
    )
    seen: set[int] = set()
    rolled_away: set[int] = set()
    events = cur.fetchall()
    # Latest exit from production per version: was it a rollback?
    for version, action, to_status, _ in events:
        if to_status != "production" and version not in seen:
            seen.add(version)
            if action == "rollback":
                rolled_away.add(version)
    seen.clear()
    for version, _, to_status, status in events:
        if to_status != "production" or version in seen:
            continue
        seen.add(version)
        if current is not None and version == current["version"]:
            continue
        if status == "retired" and version not in rolled_away:
            return version
    return None


def rollback(conn, *, use_case: str, to_version: int | None = None, actor: str, reason: str,
             run_id: str | None = None, apply: Apply | None = None) -> dict:
    """Move production back to ``to_version`` (a retired version) or, if None, to the previous production one.

    With a ``run_id`` (the Airflow run) a retry returns the first attempt's result instead of stepping back
    once more. ``apply`` as in promote().
    """
    if not reason or not reason.strip():
        raise RegistryError("a rollback needs a reason (it is recorded in the history): pass --reason '...'")
    with _transaction(conn, use_case) as cur:
        current = _production(cur, use_case, lock=True)
        if run_id is not None:
            cur.execute(
                "SELECT version FROM model_events WHERE use_case = %s AND run_id = %s AND action = 'rollback'"
                " AND to_status = 'production' ORDER BY id DESC LIMIT 1",
                (use_case, run_id),
            )
            done = cur.fetchone()
            if done is not None:
                row = _get(cur, use_case, done[0])
                result = _move_result(use_case, row, previous=None, changed=False, action="rollback")
                if row["status"] == "production" and apply is not None:
                    result["applied"] = apply(result)  # the first attempt may have died before its file switch
                elif row["status"] != "production":
                    result["note"] = f"production has moved on since (now {current and current['version']})"
                return result
        if to_version is None:
            to_version = _previous_production(cur, use_case, current)
            if to_version is None:
                cur.execute("SELECT version FROM model_versions WHERE use_case = %s AND status = 'retired'"
                            " ORDER BY version", (use_case,))
                retired = [r[0] for r in cur.fetchall()]
                now = f"v{current['version']} is production" if current else "nothing is in production"
                hint = (f"name one of the retired versions {retired} with --to-version N" if retired
                        else "there is no retired version to restore")
                raise RegistryError(
                    f"no previous production model of '{use_case}' to roll back to ({now}); {hint}. "
                    f"See `retrain registry --use-case {use_case}`."
                )
        row = _get(cur, use_case, to_version, lock=True)
        if row["status"] == "production":
            result = _move_result(use_case, row, previous=None, changed=False, action="rollback")
        else:
            if row["status"] != "retired":
                raise RegistryError(
                    f"{use_case} v{to_version} is '{row['status']}' and was never a production model that was "
                    f"replaced; rollback only restores a retired version (see `retrain registry --use-case "
                    f"{use_case}`)"
                )
            if current is not None:
                _set_status(cur, current, "retired", action="rollback", actor=actor, reason=reason, run_id=run_id,
                            details={"replaced_by": to_version})
            _set_status(cur, row, "production", action="rollback", actor=actor, reason=reason, run_id=run_id,
                        details={"replaces": current and current["version"]})
            result = _move_result(use_case, row, previous=current, changed=True, action="rollback")
        if apply is not None:
            result["applied"] = apply(result)
    log.info("rollback of %s: production is v%d (was %s) by %s: %s", use_case, result["version"],
             result["previous_version"], actor, reason)
    return result


def _move_result(use_case: str, row: dict, *, previous: dict | None, changed: bool, action: str) -> dict:
    return {
        "use_case": use_case,
        "action": action,
        "version": row["version"],
        "status": "production",
        "previous_version": previous["version"] if previous else None,
        "changed": changed,
        "backend": row["backend"],
        "artifact": row["artifact"],
        "run_id": row["run_id"],
    }


def record_not_selected(conn, *, use_case: str, run_id: str, backend: str, base_model: str, artifact: str,
                        metrics: dict, reason: str, actor: str = "pipeline") -> dict:
    """Register a sweep candidate that lost on the validation split as ``not_selected`` with its scores (its own
    run id: ``<run>#sweep-c<i>``). Never deployable; a retry returns the same row."""
    with _transaction(conn, use_case) as cur:
        cur.execute(f"{_SELECT} WHERE use_case = %s AND run_id = %s", (use_case, run_id))
        row = _row(cur.fetchone())
        if row is not None:
            return row | {"created": False}
        cur.execute("SELECT COALESCE(max(version), 0) + 1 FROM model_versions WHERE use_case = %s", (use_case,))
        version = cur.fetchone()[0]
        cur.execute(
            "INSERT INTO model_versions (use_case, version, backend, base_model, artifact, run_id, metrics, status)"
            f" VALUES (%s, %s, %s, %s, %s, %s, %s, 'not_selected') RETURNING {', '.join(_COLUMNS)}",
            (use_case, version, backend, base_model, artifact or "", run_id, json.dumps(metrics, default=str)),
        )
        row = _row(cur.fetchone())
        _event(cur, use_case, version, "register", None, "not_selected", actor, reason, run_id, {"sweep": metrics})
    return row | {"created": True}
