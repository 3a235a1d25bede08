"""The ``review_queue`` table (include/sql/schema.sql) and the write-back of reviewed answers.

A run's selection replaces that run's queue: rows selected again are updated in place (a retried task never
duplicates one), rows no longer selected are dropped unless a reviewer already answered them. Reviewed answers go
to ``production_examples.corrected_output`` with feedback ``corrected``; the ``production_examples_touch`` trigger
moves the row's ``updated_at``, so the next collection picks it up (once) and the next month trains on it.
"""

from __future__ import annotations

import json
from typing import Any

_COLUMNS = ("use_case", "run_id", "source_id", "rank", "score", "reasons", "margin", "input", "candidate_output",
            "production_output", "details", "status", "reviewed_output", "reviewed_at", "created_at", "updated_at")


def replace_run(conn, use_case: str, run_id: str, selected: list[dict]) -> dict:
    """Make the run's queue exactly ``selected`` (rows already reviewed are kept). Commits. Returns counts."""
    ids = [int(r["source_id"]) for r in selected]
    with conn.cursor() as cur:
        cur.execute("DELETE FROM review_queue WHERE use_case = %s AND run_id = %s AND status = 'queued' "
                    "AND NOT (source_id = ANY(%s))", (use_case, run_id, ids))
        dropped = cur.rowcount
        for r in selected:
            cur.execute(
                "INSERT INTO review_queue (use_case, run_id, source_id, rank, score, reasons, margin, input, "
                "candidate_output, production_output, details) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                "%s::jsonb) ON CONFLICT (use_case, run_id, source_id) DO UPDATE SET rank = EXCLUDED.rank, "
                "score = EXCLUDED.score, reasons = EXCLUDED.reasons, margin = EXCLUDED.margin, input = EXCLUDED.input, "
                "candidate_output = EXCLUDED.candidate_output, production_output = EXCLUDED.production_output, "
                "details = EXCLUDED.details, updated_at = now()",
                (use_case, run_id, int(r["source_id"]), int(r["rank"]), float(r["score"]), list(r["reasons"]),
                 r["candidate"].get("margin"), r["input"], r["candidate"].get("text"), r["production"].get("text"),
                 json.dumps(_details(r), ensure_ascii=False, default=str)))
    conn.commit()
    return {"queued": len(selected), "dropped": dropped}


def _details(r: dict) -> dict:
    def side(a: dict) -> dict:
        return {k: a.get(k) for k in ("label", "margin", "top_tokens", "schema_valid", "schema_error", "error")}

    return {"candidate": side(r["candidate"]), "production": side(r["production"]),
            "recorded_output": r.get("recorded_output"), "origin": r.get("origin"), "models": r.get("models")}


def _rows(cur) -> list[dict]:
    return [dict(zip(_COLUMNS, row)) for row in cur.fetchall()]


def run_rows(conn, use_case: str, run_id: str) -> list[dict]:
    """The run's queue, hardest first."""
    with conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(_COLUMNS)} FROM review_queue WHERE use_case = %s AND run_id = %s "
                    "ORDER BY rank, source_id", (use_case, run_id))
        return _rows(cur)


def latest_run_id(conn, use_case: str) -> str | None:
    """The run whose queue was written last (what `retrain review export` exports without --run-id)."""
    with conn.cursor() as cur:
        cur.execute("SELECT run_id FROM review_queue WHERE use_case = %s GROUP BY run_id "
                    "ORDER BY max(created_at) DESC, run_id DESC LIMIT 1", (use_case,))
        row = cur.fetchone()
    return row[0] if row else None


def get(conn, use_case: str, run_id: str, source_id: int) -> dict | None:
    with conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(_COLUMNS)} FROM review_queue WHERE use_case = %s AND run_id = %s "
                    "AND source_id = %s", (use_case, run_id, int(source_id)))
        rows = _rows(cur)
    return rows[0] if rows else None


def counts(conn, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """{(use_case, run_id): {"queued": n, "reviewed": n}} for the given runs (read-only: the UI page)."""
    if not pairs:
        return {}
    with conn.cursor() as cur:
        cur.execute("SELECT use_case, run_id, count(*), count(*) FILTER (WHERE status = 'reviewed') FROM review_queue "
                    "WHERE (use_case, run_id) IN (SELECT * FROM unnest(%s::text[], %s::text[])) "
                    "GROUP BY use_case, run_id", ([p[0] for p in pairs], [p[1] for p in pairs]))
        return {(u, r): {"queued": int(n), "reviewed": int(done)} for u, r, n, done in cur.fetchall()}


def apply_review(conn, row: dict, answer: dict[str, Any]) -> bool:
    """Write one reviewed answer: production_examples.corrected_output + feedback 'corrected', queue row reviewed.
    Returns whether anything changed (the same answer imported again changes nothing, updated_at included).
    Does not commit: the caller commits each task on its own."""
    payload = json.dumps(answer, ensure_ascii=False, sort_keys=True)
    with conn.cursor() as cur:
        cur.execute("UPDATE production_examples SET corrected_output = %s::jsonb, feedback = 'corrected' "
                    "WHERE id = %s AND use_case = %s AND (corrected_output IS DISTINCT FROM %s::jsonb "
                    "OR feedback <> 'corrected')", (payload, row["source_id"], row["use_case"], payload))
        changed = cur.rowcount > 0
        cur.execute("UPDATE review_queue SET status = 'reviewed', reviewed_output = %s::jsonb, reviewed_at = now(), "
                    "updated_at = now() WHERE use_case = %s AND run_id = %s AND source_id = %s "
                    "AND (status <> 'reviewed' OR reviewed_output IS DISTINCT FROM %s::jsonb)",
                    (payload, row["use_case"], row["run_id"], row["source_id"], payload))
        changed = cur.rowcount > 0 or changed
    return changed


def example_exists(conn, use_case: str, source_id: int) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM production_examples WHERE id = %s AND use_case = %s", (int(source_id), use_case))
        return cur.fetchone() is not None


def table_sample(conn, use_case: str, run_id: str, limit: int, exclude: set[int]) -> list[tuple[int, str, Any]]:
    """Up to ``limit`` older rows without a human correction, the same ones on every retry of a run (ordered by a
    hash of id and run id): (id, input, model_output)."""
    if limit <= 0:
        return []
    with conn.cursor() as cur:
        cur.execute("SELECT id, input, model_output FROM production_examples WHERE use_case = %s "
                    "AND corrected_output IS NULL AND feedback <> 'corrected' AND input IS NOT NULL "
                    "AND NOT (id = ANY(%s)) ORDER BY md5(id::text || %s) LIMIT %s",
                    (use_case, sorted(exclude), run_id, int(limit)))
        return list(cur.fetchall())
