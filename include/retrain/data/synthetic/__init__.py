"""Synthetic production traffic for the three demo use cases (product_intent, email_intel, hr_leave).

The generator stands in for months of real user feedback so the pipeline can be exercised end to end.
Three properties matter more than realism:

* The TRUE label is a deterministic function of the input text (templates with disjoint cue vocabularies),
  so a small model can actually learn it and the go/no-go gate has something real to measure.
* Personal data is planted on purpose (and recorded per row) so scrubbing can be verified, and broken rows
  (prose instead of JSON, unknown labels, null/empty/huge inputs) are planted at a known rate so the
  validation stage has to catch them.
* It is cheap: one pass of ``random.Random`` calls and string formatting per row, no per-row JSON
  round-trips, so a million rows take seconds and ``insert_rows`` streams them with COPY.

Rows carry one extra key besides the documented ones: ``dirty`` is None for a well-formed row or the name
of the defect planted in it (``prose_json``, ``unknown_label``, ``missing_field``, ``null_input``,
``empty_input``, ``huge_input``), which tests use as the ground truth for what validation must reject.
Rows whose input carries a SQL-injection string are well-formed (``dirty`` None): the text must simply
round-trip.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from retrain.data.synthetic.email_intel import email_intel_row, email_intel_wrong
from retrain.data.synthetic.email_voice import rows_for_total as email_voice_rows
from retrain.data.synthetic.hr_leave import HR_POLICY, hr_decision, hr_leave_row, hr_leave_wrong
from retrain.data.synthetic.pii import pick
from retrain.data.synthetic.product_intent import product_intent_row, product_intent_wrong
from retrain.schemas.use_case import UseCase

# Share of rows carrying personal data, and the feedback mix of well-formed rows (seed 004's production
# feedback loop: most predictions are accepted, a human fixes some, rejects a few).
PII_RATE = 0.35
CORRECTED_RATE = 0.10
REJECTED_RATE = 0.05
# SQL-injection rows are valid traffic; they ride along with dirty batches at this share of `dirty`.
SQL_INJECTION_SHARE = 1 / 7
SQL_INJECTION = "'); DROP TABLE production_examples; --"
HUGE_INPUT_CHARS = 1 << 20  # 1 MiB of text: far over every use case's max_input_chars
# Broken-row kinds and their weights; huge inputs are capped per call (see _huge_cap) because a million-row
# dirty batch would otherwise ship gigabytes of filler into the database.
DIRTY_KINDS = ("prose_json", "unknown_label", "missing_field", "null_input", "empty_input", "huge_input")
DIRTY_WEIGHTS = (0.22, 0.22, 0.20, 0.12, 0.12, 0.12)
_INPUT_DEFECTS = ("null_input", "empty_input", "huge_input")

__all__ = ["DIRTY_KINDS", "HR_POLICY", "SQL_INJECTION", "generate_rows", "hr_decision", "insert_rows",
           "seed_examples", "supported_use_cases"]


# --- dispatch ----------------------------------------------------------------------------------------
# name -> (row builder, wrong-label maker, unknown label values for the primary field)
_BUILDERS: dict[str, tuple[Callable, Callable, str, tuple[Any, ...]]] = {
    "product_intent": (product_intent_row, product_intent_wrong, "intent_type",
                       ("GIFTS", "REFUND", "gift", "PERSONAL")),
    "email_intel": (email_intel_row, email_intel_wrong, "intent", ("REFUND", "order", "PURCHASE_ORDER", "spam")),
    "hr_leave": (hr_leave_row, hr_leave_wrong, "eligible", ("yes", "maybe", "pending", "true")),
}


# Generation use cases (free-text output, one tenant per row): name -> rows_for_total(n, seed, dirty=, start=).
_TEXT_BUILDERS: dict[str, Callable[..., list[dict]]] = {"email_voice": email_voice_rows}


def supported_use_cases() -> list[str]:
    return sorted([*_BUILDERS, *_TEXT_BUILDERS])


def _builder(name: str):
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"no synthetic traffic generator for use case '{name}' (supported: {', '.join(supported_use_cases())}); "
            "load real production_examples instead, or add a row builder to retrain.data.synthetic"
        ) from None


def _prose(rng: random.Random, label: dict) -> str:
    # What a chatty model returns when it ignores "Return only valid JSON".
    js = json.dumps(label, ensure_ascii=False)
    # None of these may be pure JSON: the dataset stage accepts a JSON string that parses cleanly.
    return pick(rng, (f"Sure! Here is the JSON: {js}", f"```json\n{js}\n```",
                       f"Here you go:\n{js}\nLet me know if you need anything else.",
                       "I'm sorry, I can't help with that request.", js[:-1]))


def _huge_cap(n: int) -> int:
    return max(2, n // 100_000)


def _sql_injection_row(uc_name: str, rng: random.Random, build) -> tuple[str, dict, list[str]]:
    # Valid text that also exercises COPY escaping: a quote-laden SQL payload, a tab, a backslash and the
    # literal two characters of COPY's NULL marker.
    payload = f"{SQL_INJECTION} \\N C:\\temp\t"
    if uc_name == "hr_leave":
        return hr_leave_row(rng, False, name=f"Robert{payload}")
    text, label, pii = build(rng, False)
    if uc_name == "email_intel":
        subject_end = text.index("\n")
        return text[:subject_end] + " " + payload + text[subject_end:], label, pii
    return f"{text} {payload}", label, pii


def generate_rows(uc: UseCase, n: int, *, seed: int = 0, dirty: float = 0.01,
                  start: datetime | None = None) -> Iterator[dict]:
    """Yield n rows: {"input": str|None, "model_output": <JSON-able or None>, "corrected_output": <JSON-able or None>,
    "feedback": "accepted"|"corrected"|"rejected", "created_at": datetime (tz-aware, increasing),
    "pii": [list of planted personal-data strings in input], "dirty": None or the planted defect's name}.

    Deterministic for (uc.name, n, seed, dirty, start). ``start`` defaults to now minus 30 days (pass it for
    byte-identical runs); a naive ``start`` is taken as UTC. Rows span ~30 days with strictly increasing times.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= dirty <= 1.0:
        raise ValueError(f"dirty must be a fraction between 0 and 1 (e.g. 0.01 for normal traffic, 0.3 for a "
                         f"dirty batch), got {dirty}")
    if uc.name in _TEXT_BUILDERS:  # rows carry a "tenant"; see retrain.data.synthetic.email_voice
        yield from _TEXT_BUILDERS[uc.name](n, seed, dirty=dirty, start=start)
        return
    build, wrong_of, primary, unknown_values = _builder(uc.name)
    required = list(uc.output_schema.get("required", []))
    rng = random.Random(f"{uc.name}:{seed}")
    if start is None:
        start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=30)
    elif start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    # Spread over 30 days; jitter < one step keeps times strictly increasing without sorting.
    step_us = max(1, (30 * 86_400 * 1_000_000) // max(n, 1))
    sql_rate = dirty * SQL_INJECTION_SHARE
    huge_left = _huge_cap(n)
    huge_text: str | None = None
    rnd = rng.random
    uc_name = uc.name

    for i in range(n):
        created_at = start + timedelta(microseconds=i * step_us + int(rnd() * step_us * 0.9))
        r = rnd()
        kind = None
        if r < dirty:
            kind = rng.choices(DIRTY_KINDS, DIRTY_WEIGHTS)[0]
            if kind == "huge_input":
                if huge_left > 0:
                    huge_left -= 1
                else:
                    kind = "empty_input"
        if dirty <= r < dirty + sql_rate:
            text, label, pii = _sql_injection_row(uc_name, rng, build)
        else:
            # Rows whose input gets replaced carry no personal data, so their "pii" list stays truthful.
            plant = rnd() < PII_RATE and kind not in _INPUT_DEFECTS
            text, label, pii = build(rng, plant)

        if kind is None:
            f = rnd()
            if f < REJECTED_RATE:
                yield {"input": text, "model_output": wrong_of(rng, label), "corrected_output": None,
                       "feedback": "rejected", "created_at": created_at, "pii": pii, "dirty": None}
            elif f < REJECTED_RATE + CORRECTED_RATE:
                yield {"input": text, "model_output": wrong_of(rng, label), "corrected_output": label,
                       "feedback": "corrected", "created_at": created_at, "pii": pii, "dirty": None}
            else:
                yield {"input": text, "model_output": label, "corrected_output": None,
                       "feedback": "accepted", "created_at": created_at, "pii": pii, "dirty": None}
            continue

        # Broken rows keep feedback accepted/corrected: the defect sits in whatever the pipeline would use as
        # the label (corrected_output when present, else model_output), so only validation can stop it.
        row = {"input": text, "model_output": label, "corrected_output": None, "feedback": "accepted",
               "created_at": created_at, "pii": pii, "dirty": kind}
        if kind == "prose_json":
            row["model_output"] = _prose(rng, label)
        elif kind in ("unknown_label", "missing_field"):
            bad = dict(label)
            if kind == "unknown_label":
                bad[primary] = pick(rng, unknown_values)
            else:
                bad.pop(pick(rng, required))
            if rnd() < 0.3:
                row.update(model_output=wrong_of(rng, label), corrected_output=bad, feedback="corrected")
            else:
                row["model_output"] = bad
        else:
            if kind == "null_input":
                row["input"] = None
            elif kind == "empty_input":
                row["input"] = pick(rng, ("", "   ", "\n"))
            else:
                if huge_text is None:
                    unit = text + "\n"
                    huge_text = (unit * (HUGE_INPUT_CHARS // len(unit) + 1))[:HUGE_INPUT_CHARS]
                row["input"] = huge_text
            if rnd() < 0.2:
                row.update(model_output=wrong_of(rng, label), corrected_output=label, feedback="corrected")
        yield row


# --- database ------------------------------------------------------------------------------------------
_COPY_SQL = ("COPY production_examples (use_case, input, model_output, corrected_output, feedback, created_at) "
             "FROM STDIN")
_COPY_SQL_TENANT = _COPY_SQL.replace("created_at)", "created_at, tenant)")


def _copy_field(s: str | None) -> str:
    # COPY text format: backslash escapes for the delimiter, row separators and the escape itself; \N is NULL.
    if s is None:
        return "\\N"
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_json(v: Any) -> str:
    return "\\N" if v is None else _copy_field(json.dumps(v, ensure_ascii=False))


def insert_rows(conn, use_case: str, rows: Iterable[dict], batch_size: int = 10_000, *,
                with_tenant: bool = False) -> int:
    """Insert into production_examples with COPY FROM STDIN (psycopg2 conn.cursor().copy_expert), streaming in
    batches (bounded memory, must handle 1,000,000 rows); 'pii' key is not stored. Returns rows inserted.

    All batches run in one transaction, committed at the end: a failure leaves no half-seeded month behind.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    import psycopg2

    uc = _copy_field(use_case)
    total = 0
    buf = io.StringIO()
    pending = 0

    def flush(cur) -> None:
        buf.seek(0)
        cur.copy_expert(_COPY_SQL_TENANT if with_tenant else _COPY_SQL, buf)
        buf.seek(0)
        buf.truncate()

    try:
        with conn.cursor() as cur:
            for row in rows:
                created = row["created_at"]
                if created.tzinfo is None:
                    created = created.replace(tzinfo=timezone.utc)
                buf.write(f"{uc}\t{_copy_field(row['input'])}\t{_copy_json(row['model_output'])}\t"
                          f"{_copy_json(row.get('corrected_output'))}\t{row['feedback']}\t{created.isoformat()}"
                          + (f"\t{_copy_field(row.get('tenant'))}\n" if with_tenant else "\n"))
                pending += 1
                if pending >= batch_size:
                    flush(cur)
                    total += pending
                    pending = 0
            if pending:
                flush(cur)
                total += pending
        conn.commit()
    except psycopg2.errors.UndefinedTable:
        conn.rollback()
        raise RuntimeError(
            "table production_examples does not exist in this database; apply include/sql/schema.sql "
            "(retrain.db.ensure_schema) first, then seed again"
        ) from None
    except Exception:
        conn.rollback()
        raise
    return total


def seed_examples(conn, uc: UseCase, rows: int, *, seed: int = 0, dirty: float = 0.01, start=None) -> dict:
    """generate_rows + insert_rows; returns {"use_case", "inserted", "dirty_fraction"} (the measured share of
    broken rows actually planted, which differs slightly from ``dirty``)."""
    broken = 0

    def counted() -> Iterator[dict]:
        nonlocal broken
        for row in generate_rows(uc, rows, seed=seed, dirty=dirty, start=start):
            if row["dirty"] is not None:
                broken += 1
            yield row

    inserted = insert_rows(conn, uc.name, counted(), with_tenant=uc.name in _TEXT_BUILDERS)
    return {"use_case": uc.name, "inserted": inserted,
            "dirty_fraction": round(broken / inserted, 4) if inserted else 0.0}
