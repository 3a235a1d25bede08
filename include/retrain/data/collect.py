"""collect_examples: stream this month's new production examples out of PostgreSQL.

Incremental by a per-use-case watermark on the row id (insertion order), not on created_at: a row that arrives
late with an old timestamp is still collected next month instead of being skipped for ever. The window a run collects is recorded in
``collection_runs`` in the same transaction that moves the watermark, so a retried or cleared task replays
exactly the same window and the watermark never moves twice. Rows are streamed through a server-side cursor and
scrubbed of personal data before they touch the disk: memory stays flat however large the month is.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring
import logging
import math
import os
import time
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Any

from retrain.data.scrub import scrub_text

log = logging.getLogger(__name__)

FETCH_ROWS = 5000  # rows per round trip of the server-side cursor; bounds memory, amortises latency
# Initial watermark: before any plausible production row.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# jsonb comes back as its text form: we pass labels through as JSON text (scrubbed) instead of paying for a
# parse + re-serialise of every row in Python. build_dataset parses them once, when it checks the contract.
_SELECT_WINDOW = """
    SELECT id, input, model_output::text, corrected_output::text, feedback
    FROM production_examples
    WHERE use_case = %(use_case)s
      AND id > %(from_id)s AND id <= %(to_id)s
    ORDER BY id
"""


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


def _window(cur, use_case: str, run_id: str, sample_limit: int | None) -> tuple[dict, bool]:
    cur.execute(
        "SELECT from_created_at, from_id, to_created_at, to_id FROM collection_runs "
        "WHERE use_case = %s AND run_id = %s",
        (use_case, run_id),
    )
    done = cur.fetchone()
    if done is not None:
        f_ts, f_id, t_ts, t_id = done
        return {"from_ts": f_ts, "from_id": f_id, "to_ts": t_ts, "to_id": t_id}, True

    # Lock the use case's watermark so two runs cannot collect the same rows concurrently.
    cur.execute(
        "INSERT INTO collection_watermarks (use_case, created_at, id, run_id) "
        "VALUES (%s, %s, 0, '') ON CONFLICT (use_case) DO NOTHING",
        (use_case, _EPOCH),
    )
    cur.execute(
        "SELECT created_at, id FROM collection_watermarks WHERE use_case = %s FOR UPDATE", (use_case,)
    )
    from_ts, from_id = cur.fetchone()
    params = {"use_case": use_case, "from_ts": from_ts, "from_id": from_id}
    if sample_limit:
        cur.execute(
            "SELECT created_at, id FROM production_examples WHERE use_case = %(use_case)s "
            "AND id > %(from_id)s ORDER BY id OFFSET %(offset)s LIMIT 1",
            {**params, "offset": sample_limit - 1},
        )
        upper = cur.fetchone()
    else:
        upper = None
    if upper is None:
        cur.execute(
            "SELECT created_at, id FROM production_examples WHERE use_case = %(use_case)s "
            "AND id > %(from_id)s ORDER BY id DESC LIMIT 1",
            params,
        )
        upper = cur.fetchone()
    if upper is None:  # nothing new: an empty window
        upper = (from_ts, from_id)
    return {"from_ts": from_ts, "from_id": from_id, "to_ts": upper[0], "to_id": upper[1]}, False


def format_chunk(rows: list[tuple], train_cut: int, val_cut: int) -> tuple[str, int, Counter, Counter]:
    """Scrub, split and serialise a chunk of rows into batch.jsonl lines: (text, rows written, skipped, PII counts).

    The hot path of collection (a million rows a month is normal): local names, no per-row dicts, the C JSON
    string encoder, and the label passed through as jsonb text instead of parsed and re-serialised.
    """
    skipped: Counter[str] = Counter()
    scrubbed: Counter[str] = Counter()
    quote = encode_basestring
    sha256 = hashlib.sha256
    out: list[str] = []
    append = out.append
    for source_id, text, model_output, corrected_output, feedback in rows:
        label, reason = pick_label(feedback, model_output, corrected_output)
        if reason:
            skipped[reason] += 1
            continue
        if text is not None:
            text = scrub_text(text, scrubbed)
            # Same bucket as split_for(input_hash(text)): first 4 bytes of the SHA-256 of the normalised input.
            bucket = int.from_bytes(sha256(" ".join(text.lower().split()).encode()).digest()[:4], "big")
            split = '"train"' if bucket < train_cut else '"val"' if bucket < val_cut else '"test"'
            text_json = quote(text)
        else:
            split = text_json = "null"
        # jsonb text is valid JSON, and placeholders like [EMAIL] keep it valid after scrubbing.
        append(
            f'{{"source_id": {source_id}, "input": {text_json}, "label_raw": {scrub_text(label, scrubbed)}, '
            f'"feedback": "{feedback}", "split": {split}}}\n'
        )
    return "".join(out), len(out), skipped, scrubbed


PARALLEL_MIN_ROWS = 50_000  # below this, worker start-up costs more than it saves


def _workers_for(window: dict) -> int:
    # Ids are shared by all use cases, so the id span over-estimates the rows: good enough to decide.
    span = (window["to_id"] or 0) - (window["from_id"] or 0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 4) if span >= PARALLEL_MIN_ROWS and cpus > 1 else 0


def _format_chunks(chunks, train_cut: int, val_cut: int, workers: int):
    """Yield formatted chunks in order. With workers, scrubbing runs in parallel processes while this process
    keeps fetching; at most 2 chunks per worker are in flight, so memory stays bounded however big the month."""
    if not workers:
        for rows in chunks:
            yield format_chunk(rows, train_cut, val_cut)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the Airflow task process has threads (log shipping, heartbeats) that fork would copy mid-lock.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque = deque()
        for rows in chunks:
            pending.append(pool.submit(format_chunk, rows, train_cut, val_cut))
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
) -> dict:
    """Write this run's new examples, scrubbed, to ``out_file`` (batch.jsonl) and return counts.

    Each line: {"source_id", "input", "label_raw", "feedback", "split"}. Rows whose label cannot be trusted
    (rejected, corrected without a fix) are counted, not written.
    """
    started = time.monotonic()
    out_file = Path(out_file)
    tmp = out_file.with_suffix(out_file.suffix + ".tmp")
    skipped: Counter[str] = Counter()
    scrubbed: Counter[str] = Counter()
    written = 0
    train, val = split_ratios

    with conn.cursor() as cur:
        window, replay = _window(cur, use_case, run_id, sample_limit)

    train_cut, val_cut = split_cuts(train, val)
    workers = _workers_for(window)
    # A named cursor is a server-side cursor: rows arrive FETCH_ROWS at a time instead of all at once.
    with conn.cursor(name=f"collect_{os.getpid()}") as stream, open(tmp, "w", encoding="utf-8") as fh:
        stream.itersize = FETCH_ROWS
        stream.execute(_SELECT_WINDOW, {"use_case": use_case, **window})
        chunks = iter(lambda: stream.fetchmany(FETCH_ROWS), [])
        for text, n, skip, pii in _format_chunks(chunks, train_cut, val_cut, workers):
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
                "rows_collected, rows_skipped) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (use_case, run_id) DO NOTHING",
                (
                    use_case,
                    run_id,
                    window["from_ts"],
                    window["from_id"],
                    window["to_ts"],
                    window["to_id"],
                    written,
                    json.dumps(dict(skipped)),
                ),
            )
            cur.execute(
                "UPDATE collection_watermarks SET created_at = %s, id = %s, run_id = %s, updated_at = now() "
                "WHERE use_case = %s AND id < %s",
                (window["to_ts"], window["to_id"], run_id, use_case, window["to_id"]),
            )
    # The file is complete before the watermark commits: a crash in between replays the same window.
    os.replace(tmp, out_file)
    conn.commit()

    seconds = time.monotonic() - started
    result = {
        "rows": written,
        "skipped": dict(skipped),
        "scrubbed": dict(scrubbed),
        "replayed": replay,
        "window": {k: str(v) for k, v in window.items()},
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
