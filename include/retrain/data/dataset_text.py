"""build_dataset for generation use cases (``kind: generation``): this month's scrubbed batch -> one dataset per
tenant, each in its own sub-run directory that trains like a run of its own.

A row is (tenant, input, body): for email_voice the user's id, the e-mail's subject and the body the user sent.
Rows without a tenant, with an empty or invisible-only body, a body outside ``output.min_chars..max_chars``, a
label that is not text, or an input outside ``data``'s bounds go to ``rejected.jsonl`` with a reason.

The structured builder's rules hold, by import (retrain.data.dataset): an example is identified by its tenant and
normalised input, so the same subject of two users is two examples and a user's two bodies for one subject are
one (the label precedence of ``_better`` picks the body: a human's beats a model draft, the newer correction
wins); the split is fixed at first sight by the content hash of the input (collection's ``split``, so a subject
is in the same split for every tenant and no tenant's test subject is trained on by anyone) and test rows are
frozen, so each tenant's test set only grows across months. The rows accumulate in ``dataset_examples`` under
the use case's name with the label ``{"tenant": ..., "body": ...}``.

Layout (RunDir): ``rejected.jsonl``, ``manifest.json`` (totals) and ``tenants.json`` in the run directory; for
every tenant with at least ``tenants.min_examples`` examples (all months) a sub-run directory
``tenants/<name>/`` with run_config.json (run_id ``<parent>#tenant-<name>``), train/val/test.jsonl (chat
``messages``) and manifest.json. Tenants below the minimum are listed in tenants.json with the reason, no
directory. Idempotent: a retry re-runs the same upserts and rewrites every file atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.data.collect import input_hash, split_for
from retrain.data.dataset import (
    SPLITS,
    UPSERT_BATCH,
    Candidate,
    DatasetError,
    TooDeep,
    _better,
    _parse_time,
    _stored,
    _upsert,
    is_blank,
    parse_batch_line,
)
from retrain.rundir import RunDir, atomic_write, read_json, sha256_file, write_json
from retrain.schemas.use_case import UseCase

log = logging.getLogger(__name__)

MAX_TENANT_CHARS = 200  # a user id, not a document
_REJECTED_LABEL_CHARS = 300  # rejected.jsonl keeps an excerpt of a refused body, not a 1 MB blob


def tenant_run_id(parent_run_id: str, tenant: str) -> str:
    """A tenant's own run id (its registry row, its log lines)."""
    return f"{parent_run_id}#tenant-{tenant}"


def example_hash(tenant: str, text: str) -> str:
    """Identity of a generation example: the tenant as it is (user ids are case-sensitive) + the normalised input."""
    return hashlib.sha256(tenant.encode("utf-8") + b"\x00" + input_hash(text).encode("ascii")).hexdigest()


# --- the contract of one row -----------------------------------------------------------------------------------


def check_text_example(uc: UseCase, row: dict) -> tuple[tuple[str, str, str] | None, str | None]:
    """((tenant, input, body), None) if the batch row can train its tenant's adapter, else (None, reason)."""
    rules, out = uc.data, uc.output
    tenant = row.get("tenant")
    if tenant is None or not isinstance(tenant, str) or is_blank(tenant):
        return None, (f"no_tenant: the row has no tenant (production_examples.{uc.tenants.column} is NULL or "
                      "blank): it cannot be attributed to a user's adapter")
    if len(tenant) > MAX_TENANT_CHARS:
        return None, f"tenant_too_long: {len(tenant)} chars > {MAX_TENANT_CHARS}"
    text = row.get("input")
    if not isinstance(text, str) or is_blank(text):
        return None, "empty_input"
    if len(text) > rules.max_input_chars:
        return None, f"input_too_long: {len(text)} chars > data.max_input_chars={rules.max_input_chars}"
    if len(text) < rules.min_input_chars:
        return None, f"input_too_short: {len(text)} chars < data.min_input_chars={rules.min_input_chars}"
    body = row.get("label_raw")
    if isinstance(body, TooDeep) or not isinstance(body, str):
        kind = "a deeply nested value" if isinstance(body, TooDeep) else type(body).__name__
        return None, f"not_text: the label must be the reply as a JSON string, got {kind}"
    body = body.strip()
    if is_blank(body):
        return None, "empty_output: the reply is empty or invisible characters only"
    if len(body) < out.min_chars:
        return None, f"output_too_short: {len(body)} chars < output.min_chars={out.min_chars}"
    if len(body) > out.max_chars:
        return None, f"output_too_long: {len(body)} chars > output.max_chars={out.max_chars}"
    return (tenant, text, body), None


def _rejected_line(row: dict, reason: str) -> str:
    label = row.get("label_raw")
    if isinstance(label, TooDeep):
        label = repr(label)
    elif isinstance(label, str) and len(label) > _REJECTED_LABEL_CHARS:
        label = f"{label[:_REJECTED_LABEL_CHARS]}... ({len(label)} chars)"
    elif not isinstance(label, (str, type(None))):
        label = json.dumps(label, ensure_ascii=False)[:_REJECTED_LABEL_CHARS]
    return json.dumps({"source_id": row.get("source_id"), "reason": reason, "tenant": row.get("tenant"),
                       "input": row.get("input"), "label_raw": label}, ensure_ascii=False, default=str) + "\n"


def messages(uc: UseCase, text: str, body: str) -> dict:
    """One training/evaluation example in chat format: system, user (the rendered input), assistant (the body)."""
    return {"messages": [{"role": "system", "content": uc.system_prompt},
                         {"role": "user", "content": uc.render_input(text)},
                         {"role": "assistant", "content": body}]}


@dataclass(frozen=True)
class _Key:
    """What _stored/_upsert key dataset rows by (a use case's name)."""

    name: str


def _read_batch(uc: UseCase, rd: RunDir) -> tuple[dict[str, Candidate], dict]:
    """Check every batch row and keep each example's best row: (winners by example hash, stats)."""
    winners: dict[str, Candidate] = {}
    rejected: Counter[str] = Counter()
    per_tenant: Counter[str] = Counter()
    collected = accepted = 0
    split = uc.data.split
    with open(rd.batch, encoding="utf-8") as fh, atomic_write(rd.rejected) as rej:
        for line_no, line in enumerate(fh, 1):
            try:
                row = parse_batch_line(line, uc.data.max_label_depth)
            except ValueError:
                raise DatasetError(
                    f"{rd.batch}:{line_no} is not valid JSON (truncated file?): re-run collect_examples") from None
            if not isinstance(row, dict):
                raise DatasetError(f"{rd.batch}:{line_no} is not a JSON object: re-run collect_examples")
            collected += 1
            example, reason = check_text_example(uc, row)
            if reason:
                rejected[reason.split(":")[0]] += 1
                rej.write(_rejected_line(row, reason))
                continue
            accepted += 1
            tenant, text, body = example
            per_tenant[tenant] += 1
            row_split = row.get("split")
            if row_split not in SPLITS:
                row_split = split_for(input_hash(text), split.train, split.val)
            cand = Candidate(int(row.get("source_id") or 0), row.get("feedback") == "corrected",
                             _parse_time(row.get("updated_at")), {"tenant": tenant, "body": body}, text, row_split)
            h = example_hash(tenant, text)
            best = winners.get(h)
            if best is None or _better(cand, best):
                winners[h] = cand
    return winners, {"collected": collected, "accepted": accepted, "rejected": rejected, "per_tenant": per_tenant}


# --- building --------------------------------------------------------------------------------------------------


def build(run_dir: str | Path, conn: Any = None) -> dict:
    """Build every tenant's dataset from ``batch.jsonl`` of a prepared generation run (see the module docstring).

    ``conn``: an open psycopg2 connection (committed here); None opens one (retrain.db). Returns
    {"counts", "rejected_reasons", "new_rows", "tenants": {name: entry of tenants.json}, "eligible": [names],
    "manifest", "tenants_manifest"}.
    """
    if conn is None:
        from retrain import db

        with db.connection() as own:
            return build(run_dir, own)
    rd = RunDir(Path(run_dir).resolve())
    uc, meta = rd.load()
    if uc.kind != "generation" or uc.tenants is None:
        raise DatasetError(f"use case {uc.name} is kind {uc.kind}: build it with retrain.data.dataset.build_dataset")
    if not rd.batch.is_file():
        raise DatasetError(f"{rd.batch} is missing: run collect_examples for this run first")
    run_id = meta["run_id"]
    winners, stats = _read_batch(uc, rd)

    writes: list[tuple] = []
    frozen_test = relabelled = 0
    with conn.cursor() as cur:
        stored = _stored(cur, _Key(uc.name), list(winners))
        for h, cand in winners.items():
            previous = stored.get(h)
            if previous is not None:
                split, old = previous
                if old.label == cand.label:
                    continue
                if split == "test":
                    frozen_test += 1  # the evaluation baseline must not shift
                    continue
                if not _better(cand, old):
                    continue  # a stored human body outranks this month's draft
                relabelled += 1
            writes.append((uc.name, h, cand.split, cand.text, json.dumps(cand.label, ensure_ascii=False),
                           cand.source_id, run_id, run_id, cand.human, cand.updated_at))
        for i in range(0, len(writes), UPSERT_BATCH):
            _upsert(cur, writes[i: i + UPSERT_BATCH])
        cur.execute(
            "SELECT label->>'tenant', split, count(*), count(*) FILTER (WHERE last_run_id = %s) "
            "FROM dataset_examples WHERE use_case = %s GROUP BY 1, 2",
            (run_id, uc.name),
        )
        per_split: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in SPLITS})
        new_by_tenant: Counter[str] = Counter()
        for tenant, split, n, new in cur.fetchall():
            per_split[tenant][split] = n
            if split != "test":
                new_by_tenant[tenant] += new
    del writes

    tenants = _tenant_entries(uc, rd, run_id, per_split, new_by_tenant, stats["per_tenant"])
    eligible = [t for t, e in tenants.items() if e["eligible"]]
    _write_tenant_dirs(conn, uc, rd, meta, eligible, tenants)
    write_json(rd.tenants_manifest, {"tenants": tenants, "min_examples": uc.tenants.min_examples,
                                     "recommended_examples": uc.tenants.recommended_examples})

    totals = {s: sum(tenants[t][s] for t in eligible) for s in SPLITS}
    new_rows = sum(tenants[t]["new_rows"] for t in eligible)
    files = {}
    for path in (rd.rejected, rd.batch):
        with open(path, "rb") as fh:
            n_rows = sum(1 for _ in fh)
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": n_rows}
    manifest = {
        "use_case": uc.name,
        "kind": "generation",
        "run_id": run_id,
        "counts": {
            "collected": stats["collected"],
            **totals,  # rows in the eligible tenants' split files
            "rejected": sum(stats["rejected"].values()),
            "duplicates_removed": stats["accepted"] - len(winners),
            "new_rows": new_rows,
            "label_conflicts": 0,
            "tenants": len(tenants),
            "tenants_eligible": len(eligible),
        },
        "new_rows": new_rows,
        "frozen_test_labels_kept": frozen_test,
        "relabelled": relabelled,
        "tenants": {t: {s: e[s] for s in (*SPLITS, "eligible", "new_rows")} for t, e in tenants.items()},
        # Drift compares label distributions of structured answers; free text has none to compare.
        "drift": {"status": "n/a", "reason": "kind generation: no label distribution to compare", "checks": []},
        "files": files,
        "rejected_reasons": dict(stats["rejected"]),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if rd.collect.is_file():
        manifest["scrubbed"] = read_json(rd.collect).get("scrubbed", {})
    write_json(rd.manifest, manifest)
    conn.commit()  # files are in place first: a crash in between re-runs the same idempotent upserts
    skipped = {t: e["reason"] for t, e in tenants.items() if not e["eligible"]}
    log.info("dataset for %s: %d tenants, %d eligible (%s); train=%d val=%d test=%d; %d collected, %d rejected, "
             "%d duplicates, %d new train/val rows", uc.name, len(tenants), len(eligible), ", ".join(eligible) or "none",
             totals["train"], totals["val"], totals["test"], stats["collected"], manifest["counts"]["rejected"],
             manifest["counts"]["duplicates_removed"], new_rows)
    for tenant, reason in skipped.items():
        log.warning("tenant %s of %s skipped: %s", tenant, uc.name, reason)
    for tenant in eligible:
        if tenants[tenant]["warning"]:
            log.warning("tenant %s of %s: %s", tenant, uc.name, tenants[tenant]["warning"])
    return {"counts": manifest["counts"], "rejected_reasons": dict(stats["rejected"]), "new_rows": new_rows,
            "tenants": tenants, "eligible": eligible, "manifest": str(rd.manifest),
            "tenants_manifest": str(rd.tenants_manifest)}


def _tenant_entries(uc: UseCase, rd: RunDir, run_id: str, per_split: dict[str, dict[str, int]],
                    new_by_tenant: Counter, this_batch: Counter) -> dict[str, dict]:
    rules = uc.tenants
    out: dict[str, dict] = {}
    for tenant in sorted(per_split):
        counts = per_split[tenant]
        total = sum(counts.values())
        reason = warning = None
        if total < rules.min_examples:
            reason = (f"{total} examples (all months) < tenants.min_examples={rules.min_examples}: skipped until "
                      f"the user has sent {rules.min_examples - total} more")
        elif not counts["train"] or not counts["test"]:
            empty = "train" if not counts["train"] else "test"
            reason = f"no {empty} examples yet ({counts}): an adapter needs both to be trained and judged"
        elif total < rules.recommended_examples:
            warning = (f"{total} examples < tenants.recommended_examples={rules.recommended_examples}: trained, but "
                       "the voice may be learnt only partly")
        out[tenant] = {**counts, "total": total, "this_batch": this_batch.get(tenant, 0),
                       "new_rows": new_by_tenant.get(tenant, 0), "eligible": reason is None, "reason": reason,
                       "warning": warning, "run_id": tenant_run_id(run_id, tenant),
                       "run_dir": str(rd.tenant(tenant).path) if reason is None else None}
    return out


def _write_tenant_dirs(conn, uc: UseCase, rd: RunDir, meta: dict, eligible: list[str], tenants: dict) -> None:
    """Each eligible tenant's run_config.json, split files (one ordered pass over the dataset) and manifest.json."""
    wanted = set(eligible)
    if rd.tenants_dir.is_dir():
        # A retry after data changed must not leave a directory for a tenant that is no longer eligible.
        keep = {rd.tenant(t).path.name for t in wanted}
        for stale in rd.tenants_dir.iterdir():
            if stale.is_dir() and stale.name not in keep:
                shutil.rmtree(stale)
    for tenant in eligible:
        sub = rd.tenant(tenant)
        sub.path.mkdir(parents=True, exist_ok=True)
        write_json(sub.run_config, {**meta, "run_id": tenant_run_id(meta["run_id"], tenant),
                                    "tenant": {"name": tenant, "parent_run_dir": str(rd.path),
                                               "parent_run_id": meta["run_id"]}})
        if rd.train_overrides.is_file():
            write_json(sub.train_overrides, read_json(rd.train_overrides))
    current: str | None = None
    stack = ExitStack()
    handles: dict[str, Any] = {}
    try:
        with conn.cursor(name=f"dataset_text_{os.getpid()}") as cur:
            cur.itersize = 5000
            # Sorted by hash within a split: a stable order for identical content, independent of insertion order.
            cur.execute("SELECT label->>'tenant', split, input, label->>'body' FROM dataset_examples "
                        "WHERE use_case = %s ORDER BY 1, split, input_hash", (uc.name,))
            for tenant, split, text, body in cur:
                if tenant not in wanted:
                    continue
                if tenant != current:
                    stack.close()
                    stack = ExitStack()
                    handles = {s: stack.enter_context(atomic_write(rd.tenant(tenant).split(s))) for s in SPLITS}
                    current = tenant
                handles[split].write(json.dumps(messages(uc, text, body), ensure_ascii=False) + "\n")
        stack.close()
    except BaseException:
        stack.__exit__(*sys.exc_info())  # atomic_write drops its temporary files
        raise
    for tenant in eligible:
        sub = rd.tenant(tenant)
        entry = tenants[tenant]
        files = {sub.split(s).name: {"sha256": sha256_file(sub.split(s)), "rows": entry[s]} for s in SPLITS}
        write_json(sub.manifest, {
            "use_case": uc.name, "kind": "generation", "tenant": tenant, "run_id": entry["run_id"],
            "parent_run_id": meta["run_id"],
            "counts": {"collected": entry["this_batch"], **{s: entry[s] for s in SPLITS}, "rejected": 0,
                       "new_rows": entry["new_rows"]},
            "new_rows": entry["new_rows"], "warning": entry["warning"], "files": files,
            "created_at": datetime.now(timezone.utc).isoformat(),
        })
