"""collect_examples: stream this month's new and corrected production examples out of PostgreSQL.

Source-table contract (``production_examples``; the production app needs no change): the app INSERTs one row per
answered request (``use_case``, ``input``, ``model_output`` jsonb, ``feedback`` accepted/corrected/rejected,
optionally ``created_at``) and UPDATEs the same row when a human corrects it (``corrected_output``, ``feedback``).
It never writes ``updated_at``: the column defaults to now() on insert and the ``production_examples_touch``
trigger (include/sql/schema.sql) sets it to now() whenever input, output, correction or feedback change.

Incremental by a per-use-case watermark on (updated_at, id), not on created_at: a row that arrives late with an
old timestamp is still collected next run, and a row corrected after it was collected is collected again, once,
with its correction (each batch line carries ``updated_at`` so build_dataset lets the newest correction win). The
window a run collects is recorded in ``collection_runs`` in the same transaction that moves the watermark, so a
retried or cleared task replays exactly the same window and the watermark never moves twice; a row corrected
between a try and its retry leaves that window and is collected by the next run instead (never twice, never lost).
A run with a data interval (scheduled, or triggered for a logical date) collects only rows changed before its
data_interval_end: a run for a past month never takes the months after it, and the watermark never passes them.
Known limit, shared by any watermark: a transaction that stays open across a collection and then commits writes
an updated_at (its start time) behind the watermark, so keep correcting transactions short.

Rows are streamed through a server-side cursor and scrubbed of personal data before they touch the disk (inputs as
text, labels as decoded JSON: every string value, never the serialized text): memory stays flat however large the
month is.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
import logging
import math
import os
import re
import time
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Any

from retrain.rundir import atomic_write
from retrain.data.scrub import might_contain_pii, scrub_text, scrub_value

log = logging.getLogger(__name__)

FETCH_ROWS = 5000  # rows per round trip of the server-side cursor; bounds memory, amortises latency
# Initial watermark: before any plausible production row.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# jsonb comes back as its text form: a label without escapes and without anything a detector could match is passed
# through as that text; only the others are parsed, scrubbed value by value and serialised again.
_SELECT_WINDOW = """
    SELECT id, input, model_output::text, corrected_output::text, feedback,
           to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), {tenant}
    FROM production_examples
    WHERE use_case = %(use_case)s
      AND updated_at >= %(from_ts)s AND updated_at <= %(to_ts)s
      AND (updated_at, id) > (%(from_ts)s, %(from_id)s) AND (updated_at, id) <= (%(to_ts)s, %(to_id)s)
    ORDER BY updated_at, id
"""
# The plain range on updated_at is redundant with the row comparisons but lets the planner estimate the window:
# without it PostgreSQL guessed ~100 rows and sorted a million on disk instead of walking the index in order.


def _select_window(tenant_column: str | None):
    from psycopg2 import sql

    if tenant_column is not None and not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", tenant_column):
        raise ValueError(f"tenant column {tenant_column!r} is not a plain column name (tenants.column)")
    tenant = sql.Identifier(tenant_column) if tenant_column else sql.SQL("NULL")
    return sql.SQL(_SELECT_WINDOW).format(tenant=tenant)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def input_hash(text: str) -> str:
    """Stable identity of an example: hash of its normalised (scrubbed) input."""
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def split_cuts(train: float, val: float) -> tuple[int, int]:
    """Bucket boundaries on the first 32 bits of the hash (ceil: ``b < ceil(x)`` iff ``b < x`` for integer b)."""
    return math.ceil(train * 2**32), math.ceil((train + val) * 2**32)


def split_for(hash_hex: str, train: float, val: float) -> str:
    """Deterministic split from the content hash: the same input lands in the same split every month."""
    bucket = int(hash_hex[:8], 16)
    train_cut, val_cut = split_cuts(train, val)
    return "train" if bucket < train_cut else "val" if bucket < val_cut else "test"


def pick_label(feedback: str, model_output: Any, corrected_output: Any) -> tuple[Any, str | None]:
    """(trusted label, skip reason). A human's correction wins; an accepted output is trusted; rejected is not."""
    if feedback == "rejected":
        return None, "rejected"
    if corrected_output is not None:
        return corrected_output, None
    if feedback == "corrected":
        return None, "corrected_without_fix"
    if model_output is None:
        return None, "accepted_without_output"
    return model_output, None


def _window(cur, use_case: str, run_id: str, sample_limit: int | None,
            interval: tuple[datetime | None, datetime | None] = (None, None)) -> tuple[dict, bool]:
    """(window, replay): (from_ts, from_id] exclusive .. (to_ts, to_id] inclusive in (updated_at, id) order.

    ``interval``: the run's (data_interval_start, data_interval_end); an end bounds the window to rows changed
    before it (exclusive), so a run for a past month never takes the rows of the months after it."""
    cur.execute(
        "SELECT from_updated_at, from_id, to_updated_at, to_id, from_created_at, to_created_at, "
        "data_interval_start, data_interval_end FROM collection_runs WHERE use_case = %s AND run_id = %s",
        (use_case, run_id),
    )
    done = cur.fetchone()
    if done is not None:
        f_ts, f_id, t_ts, t_id, f_created, t_created, i_start, i_end = done
        # A run recorded by the id-only collector: its rows sort at the epoch (see schema.sql).
        return {"from_ts": f_ts or _EPOCH, "from_id": f_id, "to_ts": t_ts or _EPOCH, "to_id": t_id,
                "from_created_at": f_created, "to_created_at": t_created,
                "interval_start": i_start, "interval_end": i_end}, True

    # Lock the use case's watermark so two runs cannot collect the same rows concurrently.
    cur.execute(
        "INSERT INTO collection_watermarks (use_case, created_at, id, run_id, row_updated_at) "
        "VALUES (%s, %s, 0, '', %s) ON CONFLICT (use_case) DO NOTHING",
        (use_case, _EPOCH, _EPOCH),
    )
    cur.execute(
        "SELECT COALESCE(row_updated_at, %s), id, created_at FROM collection_watermarks WHERE use_case = %s "
        "FOR UPDATE",
        (_EPOCH, use_case),
    )
    from_ts, from_id, from_created = cur.fetchone()
    interval_start, interval_end = interval
    params = {"use_case": use_case, "from_ts": from_ts, "from_id": from_id, "before": interval_end}
    # The lower bound is the watermark, never the interval's start: rows of a month no run collected are not lost.
    newer = ("SELECT updated_at, id, created_at FROM production_examples WHERE use_case = %(use_case)s "
             "AND updated_at >= %(from_ts)s AND (updated_at, id) > (%(from_ts)s, %(from_id)s) "
             + ("AND updated_at < %(before)s " if interval_end is not None else ""))
    upper = None
    if sample_limit:
        cur.execute(newer + "ORDER BY updated_at, id OFFSET %(offset)s LIMIT 1", {**params, "offset": sample_limit - 1})
        upper = cur.fetchone()
    if upper is None:
        cur.execute(newer + "ORDER BY updated_at DESC, id DESC LIMIT 1", params)
        upper = cur.fetchone()
    if upper is None:  # nothing new: an empty window
        upper = (from_ts, from_id, from_created)
    return {"from_ts": from_ts, "from_id": from_id, "to_ts": upper[0], "to_id": upper[1],
            "from_created_at": from_created, "to_created_at": upper[2],
            "interval_start": interval_start, "interval_end": interval_end}, False


def _label_json(label: str, scrubbed: Counter, pii, fast: bool = True) -> str:
    """The label's JSON text with every decoded string value scrubbed (keys kept). ``fast``: the pass-through
    below is sound (no names/addresses detection, which has no cheap pre-check)."""
    if fast and "\\" not in label and not might_contain_pii(label):
        return label  # no escapes: its strings are substrings of the text, and no detector fires on the text
    try:
        value = json.loads(label)
    except ValueError:  # not JSON (cannot come from jsonb): scrubbed as text, build_dataset rejects it
        return encode_basestring(scrub_text(label, scrubbed, pii))
    before = sum(scrubbed.values())
    value = scrub_value(value, scrubbed, pii)
    if sum(scrubbed.values()) == before:
        return label
    return json.dumps(value, ensure_ascii=False)


_LABEL_CACHE: dict[Any, dict[str, tuple[str, Counter]]] = {}
_LABEL_CACHE_SIZE = 20_000  # ~5 MB of label texts per process


def format_chunk(rows: list[tuple], train_cut: int, val_cut: int, pii=None) -> tuple[str, int, Counter, Counter]:
    """Scrub, split and serialise a chunk of rows into batch.jsonl lines: (text, rows written, skipped, PII counts).

    The hot path of collection (a million rows a month is normal): local names, no per-row dicts, the C JSON
    string encoder, and a label without escapes or PII candidates passed through as jsonb text.
    ``pii`` is the use case's ``pii:`` block (names/addresses); None scrubs the always-on categories only.
    """
    skipped: Counter[str] = Counter()
    scrubbed: Counter[str] = Counter()
    quote = encode_basestring
    sha256 = hashlib.sha256
    out: list[str] = []
    append = out.append
    fast = pii is None or not (pii.names or pii.addresses)
    # Labels repeat (enum-heavy outputs): each distinct label text is scrubbed once per worker process.
    labels = _LABEL_CACHE.setdefault((None if pii is None else (pii.names, pii.addresses)), {})
    if len(labels) > _LABEL_CACHE_SIZE:
        labels.clear()
    for source_id, text, model_output, corrected_output, feedback, updated_at, *tenant in rows:
        label, reason = pick_label(feedback, model_output, corrected_output)
        if reason:
            skipped[reason] += 1
            continue
        if text is not None:
            text = scrub_text(text, scrubbed, pii)
            # Same bucket as split_for(input_hash(text)): first 4 bytes of the SHA-256 of the normalised input.
            bucket = int.from_bytes(sha256(" ".join(text.lower().split()).encode()).digest()[:4], "big")
            split = '"train"' if bucket < train_cut else '"val"' if bucket < val_cut else '"test"'
            text_json = quote(text)
        else:
            split = text_json = "null"
        cached = labels.get(label)
        if cached is None:
            found: Counter[str] = Counter()
            cached = labels[label] = (_label_json(label, found, pii, fast), found)
        label_json, found = cached
        if found:
            scrubbed.update(found)
        # The tenant (generation use cases) is an identifier, kept as it is like source_id: scrubbing a user id
        # that happens to be an e-mail address would merge every such user into one "[EMAIL]" tenant.
        tenant_json = quote(str(tenant[0])) if tenant and tenant[0] is not None else "null"
        append(
            f'{{"source_id": {source_id}, "input": {text_json}, "label_raw": {label_json}, '
            f'"feedback": "{feedback}", "split": {split}, "updated_at": "{updated_at}", "tenant": {tenant_json}}}\n'
        )
    return "".join(out), len(out), skipped, scrubbed


PARALLEL_MIN_ROWS = 50_000  # below this, worker start-up costs more than it saves


def _workers_for(window: dict) -> int:
    # Ids are shared by all use cases and corrections revisit old ids, so the id span is a rough size: good enough.
    span = abs((window["to_id"] or 0) - (window["from_id"] or 0))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 4) if span >= PARALLEL_MIN_ROWS and cpus > 1 else 0


def _format_chunks(chunks, train_cut: int, val_cut: int, workers: int, pii=None):
    """Yield formatted chunks in order. With workers, scrubbing runs in parallel processes while this process
    keeps fetching; at most 2 chunks per worker are in flight, so memory stays bounded however big the month."""
    if not workers:
        for rows in chunks:
            yield format_chunk(rows, train_cut, val_cut, pii)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the Airflow task process has threads (log shipping, heartbeats) that fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for rows in chunks:
            pending.append(pool.submit(format_chunk, rows, train_cut, val_cut, pii))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def collect_examples(
    conn,
    use_case: str,
    run_id: str,
    out_file: Path,
    *,
    split_ratios: tuple[float, float] = (0.8, 0.1),
    sample_limit: int | None = None,
    pii=None,
    tenant_column: str | None = None,
    data_interval: tuple[datetime | None, datetime | None] | None = None,
) -> dict:
    """Write this run's new examples, scrubbed, to ``out_file`` (batch.jsonl) and return counts.

    Each line: {"source_id", "input", "label_raw", "feedback", "split", "updated_at"} (updated_at: ISO 8601 UTC,
    the row's last change). Rows whose label cannot be trusted (rejected, corrected without a fix) are counted,
    not written. ``pii``: the use case's ``pii:`` block (retrain.schemas.pii.PiiConfig); None = names and
    addresses off. ``tenant_column``: the production_examples column holding the tenant (a generation use case's
    tenants.column), written as "tenant"; None = "tenant": null on every line. ``data_interval``: the run's
    (data_interval_start, data_interval_end) (a scheduled run, or one triggered for a logical date): only rows
    changed before the end are collected, later ones stay for the next run; None (a manual run): up to now.
    """
    started = time.monotonic()
    out_file = Path(out_file)
    skipped: Counter[str] = Counter()
    scrubbed: Counter[str] = Counter()
    written = 0
    train, val = split_ratios

    with conn.cursor() as cur:
        window, replay = _window(cur, use_case, run_id, sample_limit, tuple(data_interval or (None, None)))

    train_cut, val_cut = split_cuts(train, val)
    workers = _workers_for(window)
    # A named cursor is a server-side cursor: rows arrive FETCH_ROWS at a time instead of all at once.
    with conn.cursor(name=f"collect_{os.getpid()}") as stream, atomic_write(out_file) as fh:
        stream.itersize = FETCH_ROWS
        stream.execute(_select_window(tenant_column), {"use_case": use_case, **window})
        chunks = iter(lambda: stream.fetchmany(FETCH_ROWS), [])
        for text, n, skip, pii in _format_chunks(chunks, train_cut, val_cut, workers, pii):
            fh.write(text)
            written += n
            skipped.update(skip)
            scrubbed.update(pii)
        fh.flush()
        os.fsync(fh.fileno())

    with conn.cursor() as cur:
        if not replay:
            cur.execute(
                "INSERT INTO collection_runs (use_case, run_id, from_created_at, from_id, to_created_at, to_id, "
                "from_updated_at, to_updated_at, rows_collected, rows_skipped, data_interval_start, data_interval_end) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (use_case, run_id) DO NOTHING",
                (
                    use_case,
                    run_id,
                    window["from_created_at"],
                    window["from_id"],
                    window["to_created_at"],
                    window["to_id"],
                    window["from_ts"],
                    window["to_ts"],
                    written,
                    json.dumps(dict(skipped)),
                    window["interval_start"],
                    window["interval_end"],
                ),
            )
            # Forward only: a watermark already at or past this window (another run) stays where it is.
            cur.execute(
                "UPDATE collection_watermarks SET created_at = %s, id = %s, row_updated_at = %s, run_id = %s, "
                "updated_at = now() WHERE use_case = %s AND (COALESCE(row_updated_at, %s), id) < (%s, %s)",
                (window["to_created_at"], window["to_id"], window["to_ts"], run_id, use_case, _EPOCH,
                 window["to_ts"], window["to_id"]),
            )
    # The file was complete (renamed into place) before the watermark commits: a crash in between replays the
    # same window; a crash while writing leaves no partial or .tmp file behind (rundir.atomic_write).
    conn.commit()

    seconds = time.monotonic() - started
    if window["interval_end"] is not None:
        log.info("collection bounded by the run's data interval: rows changed before %s (later ones stay for the "
                 "next run)", _iso(window["interval_end"]))
    result = {
        "rows": written,
        "skipped": dict(skipped),
        "scrubbed": dict(scrubbed),
        "replayed": replay,
        "window": {
            "from_updated_at": _iso(window["from_ts"]), "from_id": window["from_id"],
            "to_updated_at": _iso(window["to_ts"]), "to_id": window["to_id"],
            # Rows changed at or after this were left for the next run (None: a manual run, up to now).
            "before": _iso(window["interval_end"]),
            "data_interval_start": _iso(window["interval_start"]),
            "data_interval_end": _iso(window["interval_end"]),
        },
        "seconds": round(seconds, 2),
        "file": str(out_file),
    }
    log.info(
        "collected %d rows for %s (%s skipped, %s PII replacements)%s in %.1fs",
        written,
        use_case,
        sum(skipped.values()),
        sum(scrubbed.values()),
        " [replayed window of an earlier try]" if replay else "",
        seconds,
    )
    return result
