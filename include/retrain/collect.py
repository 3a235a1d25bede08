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
import logging
import os
import time
from datetime import datetime, timezone
from collections import Counter
from pathlib import Path
from typing import Any

from retrain.scrub import scrub_text, scrub_value

log = logging.getLogger(__name__)

FETCH_ROWS = 5000  # rows per round trip of the server-side cursor; bounds memory, amortises latency
# Initial watermark: before any plausible production row.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

_SELECT_WINDOW = """
    SELECT id, input, model_output, corrected_output, feedback, created_at
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


def split_for(hash_hex: str, train: float, val: float) -> str:
    """Deterministic split from the content hash: the same input lands in the same split every month."""
    bucket = int(hash_hex[:8], 16) / 0x1_0000_0000
    if bucket < train:
        return "train"
    if bucket < train + val:
        return "val"
    return "test"


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

    # A named cursor is a server-side cursor: rows arrive FETCH_ROWS at a time instead of all at once.
    with conn.cursor(name=f"collect_{os.getpid()}") as stream, open(tmp, "w", encoding="utf-8") as fh:
        stream.itersize = FETCH_ROWS
        stream.execute(_SELECT_WINDOW, {"use_case": use_case, **window})
        for source_id, text, model_output, corrected_output, feedback, _created in stream:
            label, reason = pick_label(feedback, model_output, corrected_output)
            if reason:
                skipped[reason] += 1
                continue
            clean_input = scrub_text(text, scrubbed) if isinstance(text, str) else None
            record = {
                "source_id": source_id,
                "input": clean_input,
                "label_raw": scrub_value(label, scrubbed),
                "feedback": feedback,
                "split": split_for(input_hash(clean_input), train, val) if clean_input else None,
            }
            fh.write(json.dumps(record, ensure_ascii=False))
            fh.write("\n")
            written += 1
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
