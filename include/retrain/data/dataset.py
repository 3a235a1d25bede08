"""build_dataset: turn this month's scrubbed batch into train/val/test files in chat ``messages`` format.

Rows that break the use case's output contract are kept out of the splits and written to ``rejected.jsonl`` with
a reason (nothing is lost; validation then judges whether the batch as a whole is too dirty). Accepted rows are
deduplicated and merged into the accumulated ``dataset_examples`` table: an example's split is fixed at first
sight by its content hash, test rows are frozen, so the test set only grows and never leaks into training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.data.collect import input_hash
from retrain.schemas.use_case import UseCase

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UPSERT_BATCH = 1000


class DatasetError(RuntimeError):
    """The dataset cannot be built; the message says what is missing and what to run."""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def check_example(uc: UseCase, text: Any, label_raw: Any, validator) -> tuple[dict | None, str | None]:
    """(parsed label, None) if the example meets the contract, else (None, reason)."""
    if not isinstance(text, str) or not text.strip():
        return None, "empty_input"
    if len(text) > uc.data.max_input_chars:
        return None, f"input_too_long: {len(text)} chars > {uc.data.max_input_chars}"
    if len(text) < uc.data.min_input_chars:
        return None, f"input_too_short: {len(text)} chars < {uc.data.min_input_chars}"
    label = label_raw
    if isinstance(label, str):
        # Some serving stacks store the model's raw text as a JSON string: accept it only if it is pure JSON.
        try:
            label = json.loads(label)
        except ValueError:
            return None, "invalid_json"
    if not isinstance(label, dict):
        return None, f"invalid_json: expected an object, got {type(label).__name__}"
    for field, allowed in uc.allowed_labels.items():
        value = _get(label, field)
        if value is not None and value not in allowed:
            return None, f"unknown_label: {field}={value!r}"
    error = next(iter(validator.iter_errors(label)), None)
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return None, f"schema: {where}: {error.message[:200]}"
    return label, None


def schema_ordered(value: Any, schema: dict) -> Any:
    """The label with its keys in the output schema's property order (unknown keys last, as they came).

    PostgreSQL's jsonb stores keys shortest-first, so the stored label reads category, recipient, budget_tier,
    intent_type, ... . The model learns to write what it is shown, and a causal model decides each field from what
    it has written so far: the schema's order puts the fields the use case declares first (the labels) right
    after the input, and is the order a human reading the YAML expects.
    """
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: schema_ordered(value[k], props.get(k) or {}) for k in keys}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [schema_ordered(v, schema["items"]) for v in value]
    return value


def _messages(uc: UseCase, text: str, label: dict) -> dict:
    return {
        "messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(text)},
            {"role": "assistant", "content": json.dumps(schema_ordered(label, uc.output_schema), ensure_ascii=False)},
        ]
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _upsert(cur, rows: list[tuple]) -> None:
    from psycopg2.extras import execute_values

    # Test rows are frozen at first sight (the evaluation baseline must not shift); train/val rows take the
    # latest trusted label, so a human correction of an old example reaches the next training run.
    execute_values(
        cur,
        """
        INSERT INTO dataset_examples (use_case, input_hash, split, input, label, source_id, first_run_id, last_run_id)
        VALUES %s
        ON CONFLICT (use_case, input_hash) DO UPDATE
           SET label = EXCLUDED.label, source_id = EXCLUDED.source_id,
               last_run_id = EXCLUDED.last_run_id, updated_at = now()
         WHERE dataset_examples.split <> 'test' AND dataset_examples.label IS DISTINCT FROM EXCLUDED.label
        """,
        rows,
    )


def build_dataset(conn, uc: UseCase, run_id: str, run_dir: Path) -> dict:
    import jsonschema

    run_dir = Path(run_dir)
    batch_file = run_dir / "batch.jsonl"
    if not batch_file.is_file():
        raise DatasetError(f"{batch_file} is missing: run collect_examples for this run first")
    validator = jsonschema.Draft202012Validator(uc.output_schema)

    rejected_reasons: Counter[str] = Counter()
    latest: dict[str, tuple] = {}  # input_hash -> row; later rows (newer) replace earlier duplicates
    collected = duplicates = 0
    rejected_tmp = run_dir / "rejected.jsonl.tmp"
    with open(batch_file, encoding="utf-8") as fh, open(rejected_tmp, "w", encoding="utf-8") as rej:
        for line_no, line in enumerate(fh, 1):
            try:
                row = json.loads(line)
            except ValueError:
                raise DatasetError(
                    f"{batch_file}:{line_no} is not valid JSON (truncated file?): re-run collect_examples"
                ) from None
            collected += 1
            label, reason = check_example(uc, row.get("input"), row.get("label_raw"), validator)
            if reason:
                rejected_reasons[reason.split(":")[0]] += 1
                rej.write(
                    json.dumps(
                        {"source_id": row.get("source_id"), "reason": reason, "input": row.get("input"),
                         "label_raw": row.get("label_raw")},
                        ensure_ascii=False,
                    )
                    + "\n"
                )
                continue
            h = input_hash(row["input"])
            if h in latest:
                duplicates += 1
            latest[h] = (uc.name, h, row["split"], row["input"], json.dumps(label, ensure_ascii=False),
                         row["source_id"], run_id, run_id)
    os.replace(rejected_tmp, run_dir / "rejected.jsonl")

    with conn.cursor() as cur:
        rows = list(latest.values())
        for i in range(0, len(rows), UPSERT_BATCH):
            _upsert(cur, rows[i : i + UPSERT_BATCH])
    del latest, rows

    counts: dict[str, int] = {}
    distribution: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    handles = {s: open(run_dir / f"{s}.jsonl.tmp", "w", encoding="utf-8") for s in SPLITS}
    try:
        with conn.cursor(name=f"dataset_{os.getpid()}") as cur:
            cur.itersize = 5000
            # Sorted by hash: a stable order for identical content, independent of insertion order.
            cur.execute(
                "SELECT split, input, label FROM dataset_examples WHERE use_case = %s ORDER BY split, input_hash",
                (uc.name,),
            )
            for split, text, label in cur:
                handles[split].write(json.dumps(_messages(uc, text, label), ensure_ascii=False) + "\n")
                counts[split] = counts.get(split, 0) + 1
                for field in uc.fields.labels:
                    distribution[split][field][str(_get(label, field))] += 1
    finally:
        for fh in handles.values():
            fh.close()
    for s in SPLITS:
        os.replace(run_dir / f"{s}.jsonl.tmp", run_dir / f"{s}.jsonl")

    files = {}
    for name in (*(f"{s}.jsonl" for s in SPLITS), "rejected.jsonl", "batch.jsonl"):
        path = run_dir / name
        with open(path, "rb") as fh:
            n_rows = sum(1 for _ in fh)
        files[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, "rows": n_rows}

    manifest = {
        "use_case": uc.name,
        "run_id": run_id,
        "counts": {
            "collected": collected,
            **{s: counts.get(s, 0) for s in SPLITS},
            "rejected": sum(rejected_reasons.values()),
            "duplicates_removed": duplicates,
        },
        "label_distribution": {s: {f: dict(c) for f, c in d.items()} for s, d in distribution.items()},
        "files": files,
        "rejected_reasons": dict(rejected_reasons),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    collect_summary = run_dir / "collect.json"
    if collect_summary.is_file():
        manifest["scrubbed"] = json.loads(collect_summary.read_text()).get("scrubbed", {})
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    # Files are in place before the rows commit; a crash in between re-runs the same idempotent upserts.
    conn.commit()
    log.info(
        "dataset for %s: train=%d val=%d test=%d (this batch: %d collected, %d rejected, %d duplicates)",
        uc.name, counts.get("train", 0), counts.get("val", 0), counts.get("test", 0),
        collected, manifest["counts"]["rejected"], duplicates,
    )
    return {
        "counts": manifest["counts"],
        "rejected_reasons": dict(rejected_reasons),
        "manifest": str(run_dir / "manifest.json"),
    }
