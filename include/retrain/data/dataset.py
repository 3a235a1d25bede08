"""build_dataset: turn this month's scrubbed batch into train/val/test files in chat ``messages`` format.

Rows that break the use case's output contract are kept out of the splits and written to ``rejected.jsonl`` with
a reason (nothing is lost; validation then judges whether the batch as a whole is too dirty). Hostile rows are
rejections, never crashes: an input of only invisible characters is empty, a label nested deeper than
``data.max_label_depth`` or longer than ``data.max_label_chars`` is rejected with that reason.

Accepted rows are merged into the accumulated ``dataset_examples`` table, one row per normalised input. Which
label wins (see :func:`_better`): a human correction (feedback ``corrected``) beats any accepted model output, this
month and across months (``dataset_examples.label_human``); of two corrections the newer one (the row's
``updated_at`` when the batch has it, else the higher source id) wins; of two model outputs the newer one. Inputs
whose rows disagree are counted in ``manifest.json["conflicts"]`` with a few examples (hash + competing labels,
scrubbed content only). An example's split is fixed at first sight by its content hash and test rows are frozen,
so the test set only grows and never leaks into training.

The manifest also carries ``new_rows`` (train/val rows this run inserted or relabelled: what a retrain would learn
from; :func:`training_decision` turns it into train / skip) and ``drift`` (this month against the dataset,
:mod:`retrain.data.drift`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.data import drift as drift_mod
from retrain.data.collect import input_hash
from retrain.rundir import RunDir, atomic_write, read_json, sha256_file, write_json
from retrain.schemas.use_case import UseCase

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
UPSERT_BATCH = 1000
LOOKUP_BATCH = 5000
MAX_CONFLICT_EXAMPLES = 5


class DatasetError(RuntimeError):
    """The dataset cannot be built; the message says what is missing and what to run."""


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def label_key(value: Any) -> str:
    """A label value as the drift and conflict reports key it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# --- hostile input -------------------------------------------------------------------------------------------

# Characters that render as nothing: format (zero-width space/joiners, word joiner, BOM, bidi marks), control,
# separators, lone combining marks, surrogates/private/unassigned, plus the "blank" letters used to fake content.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Cc", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """True when the text shows nothing: whitespace, zero-width and other invisible characters only."""
    return all(c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in text)


class TooDeep:
    """A JSON value nested too deeply to parse safely (kept as a clipped excerpt of its text)."""

    def __init__(self, text: str, depth: int):
        self.depth = depth
        self.chars = len(text)
        self.excerpt = text[:200]

    def __repr__(self) -> str:
        return f"<JSON value nested {self.depth} levels deep, {self.chars} chars: {self.excerpt[:60]}...>"


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value ({"a": 1} is 1), iteratively; stops counting once above ``limit``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{},:]')
_SPACE = re.compile(r"\s*")


def _split_object(text: str, limit: int) -> dict | None:
    """Parse a JSON object's top level without recursing: members nested deeper than ``limit`` become TooDeep.

    The fallback for a line ``json.loads`` cannot parse (RecursionError): a row carrying a 3,000-level label is
    still a row with a source id and an input, to reject with a reason.
    """
    decoder = json.JSONDecoder()
    pos = _SPACE.match(text, 0).end()
    if not text.startswith("{", pos):
        return None
    out: dict[str, Any] = {}
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("}", pos):
        return out
    while True:
        key, pos = decoder.raw_decode(text, pos)
        pos = _SPACE.match(text, pos).end()
        if not isinstance(key, str) or not text.startswith(":", pos):
            return None
        start = _SPACE.match(text, pos + 1).end()
        depth = deepest = 0
        end = None
        for tok in _TOKEN.finditer(text, start):
            t = tok.group()
            if t in "[{":
                depth += 1
                deepest = max(deepest, depth)
            elif t in "]}":
                if depth == 0:
                    end = tok.start()
                    break
                depth -= 1
            elif t == "," and depth == 0:
                end = tok.start()
                break
        if end is None:
            return None
        raw = text[start:end].strip()
        out[key] = TooDeep(raw, deepest) if deepest > limit else json.loads(raw)
        if text[end] == "}":
            return out
        pos = _SPACE.match(text, end + 1).end()


def parse_batch_line(line: str, max_depth: int = 32) -> Any:
    """A batch.jsonl line as a dict; deeply nested members become TooDeep instead of raising RecursionError.

    Raises ValueError when the line is not JSON at all.
    """
    try:
        return json.loads(line)
    except RecursionError:
        try:
            row = _split_object(line, max_depth)
        except (ValueError, RecursionError, IndexError):
            row = None
        if row is None:
            raise ValueError("not a JSON object (nested too deeply to parse)") from None
        return row


def check_example(uc: UseCase, text: Any, label_raw: Any, validator) -> tuple[dict | None, str | None]:
    """(parsed label, None) if the example meets the contract, else (None, reason)."""
    rules = uc.data
    if not isinstance(text, str) or is_blank(text):
        return None, "empty_input"
    if len(text) > rules.max_input_chars:
        return None, f"input_too_long: {len(text)} chars > {rules.max_input_chars}"
    if len(text) < rules.min_input_chars:
        return None, f"input_too_short: {len(text)} chars < {rules.min_input_chars}"
    label = label_raw
    if isinstance(label, TooDeep):
        return None, f"label_too_deep: nested {label.depth} levels > data.max_label_depth={rules.max_label_depth}"
    if isinstance(label, str):
        if len(label) > rules.max_label_chars:
            return None, f"label_too_large: {len(label)} chars > data.max_label_chars={rules.max_label_chars}"
        # Some serving stacks store the model's raw text as a JSON string: accept it only if it is pure JSON.
        try:
            label = json.loads(label)
        except RecursionError:
            return None, f"label_too_deep: nested deeper than data.max_label_depth={rules.max_label_depth}"
        except ValueError:
            return None, "invalid_json"
    if not isinstance(label, dict):
        return None, f"invalid_json: expected an object, got {type(label).__name__}"
    depth = json_depth(label, rules.max_label_depth)
    if depth > rules.max_label_depth:
        return None, f"label_too_deep: nested {depth} levels > data.max_label_depth={rules.max_label_depth}"
    size = len(json.dumps(label, ensure_ascii=False))
    if size > rules.max_label_chars:
        return None, f"label_too_large: {size} chars > data.max_label_chars={rules.max_label_chars}"
    for path, allowed in uc.allowed_labels.items():
        value = _get(label, path)
        if value is not None and value not in allowed:
            return None, f"unknown_label: {path}={value!r}"
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


# --- label precedence ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Candidate:
    """One accepted row of the batch (or the stored dataset row) competing for an input's label."""

    source_id: int
    human: bool
    updated_at: datetime | None
    label: dict
    text: str = ""
    split: str = "train"

    def source(self) -> str:
        return "human" if self.human else "model"


def _better(new: Candidate, old: Candidate) -> bool:
    """Whether ``new`` replaces ``old`` as the input's label (the SQL guard in _upsert says the same): a human
    correction beats a model output; between two of a kind the newer updated_at (when both have one), else the
    higher source id."""
    if new.human != old.human:
        return new.human
    if new.updated_at is not None and old.updated_at is not None and new.updated_at != old.updated_at:
        return new.updated_at > old.updated_at
    return new.source_id >= old.source_id


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


@dataclass
class _Dispute:
    """The distinct labels seen for one input (at most a few kept, all counted)."""

    labels: dict[str, Candidate] = field(default_factory=dict)
    distinct: int = 0
    rows: int = 0

    def add(self, cand: Candidate, key: str) -> None:
        if key in self.labels:
            if _better(cand, self.labels[key]):
                self.labels[key] = cand
            return
        self.distinct += 1
        if len(self.labels) < 4:
            self.labels[key] = cand


def _canonical(label: Any) -> str:
    return json.dumps(label, ensure_ascii=False, sort_keys=True)


def _shown(uc: UseCase, cand: Candidate) -> dict:
    text = json.dumps(cand.label, ensure_ascii=False)
    label = cand.label if len(text) <= 400 else {f: _get(cand.label, f) for f in uc.fields.labels}
    return {"source": cand.source(), "source_id": cand.source_id,
            "updated_at": cand.updated_at.isoformat() if cand.updated_at else None, "label": label}


def _conflict_kind(cands: list[Candidate]) -> str:
    humans = {_canonical(c.label) for c in cands if c.human}
    if len(humans) > 1:
        return "human_vs_human"
    if humans and any(not c.human for c in cands):
        return "human_vs_model"
    return "model_vs_model"


# --- database ------------------------------------------------------------------------------------------------


def _stored(cur, uc: UseCase, hashes: list[str]) -> dict[str, tuple[str, Candidate]]:
    """input_hash -> (split, stored label as a Candidate) for the hashes already in the dataset."""
    out: dict[str, tuple[str, Candidate]] = {}
    for i in range(0, len(hashes), LOOKUP_BATCH):
        cur.execute(
            "SELECT input_hash, split, label, label_human, label_updated_at, source_id FROM dataset_examples "
            "WHERE use_case = %s AND input_hash = ANY(%s)",
            (uc.name, hashes[i : i + LOOKUP_BATCH]),
        )
        for h, split, label, human, updated_at, source_id in cur.fetchall():
            out[h] = (split, Candidate(source_id, bool(human), updated_at, label))
    return out


def _upsert(cur, rows: list[tuple]) -> None:
    from psycopg2.extras import execute_values

    # Test rows are frozen at first sight (the evaluation baseline must not shift); train/val rows take the
    # winning label by _better's rule, repeated here so that no writer can put a model output over a correction.
    execute_values(
        cur,
        """
        INSERT INTO dataset_examples (use_case, input_hash, split, input, label, source_id, first_run_id, last_run_id,
                                      label_human, label_updated_at)
        VALUES %s
        ON CONFLICT (use_case, input_hash) DO UPDATE
           SET label = EXCLUDED.label, source_id = EXCLUDED.source_id, label_human = EXCLUDED.label_human,
               label_updated_at = EXCLUDED.label_updated_at, last_run_id = EXCLUDED.last_run_id, updated_at = now()
         WHERE dataset_examples.split <> 'test' AND dataset_examples.label IS DISTINCT FROM EXCLUDED.label
           AND (EXCLUDED.label_human OR NOT dataset_examples.label_human)
           AND (EXCLUDED.label_human <> dataset_examples.label_human
                OR CASE WHEN EXCLUDED.label_updated_at IS NOT NULL AND dataset_examples.label_updated_at IS NOT NULL
                             AND EXCLUDED.label_updated_at <> dataset_examples.label_updated_at
                        THEN EXCLUDED.label_updated_at > dataset_examples.label_updated_at
                        ELSE EXCLUDED.source_id >= dataset_examples.source_id END)
        """,
        rows,
    )


def _reference(cur, uc: UseCase, run_id: str) -> tuple[dict[str, Counter], Counter]:
    """Label counts per field and the input-length histogram of the dataset rows first seen before this run."""
    labels: dict[str, Counter] = {}
    for path in uc.fields.labels:
        cur.execute(
            "SELECT label #> %s, count(*) FROM dataset_examples WHERE use_case = %s AND first_run_id <> %s "
            "GROUP BY 1",
            (path.split("."), uc.name, run_id),
        )
        labels[path] = Counter({label_key(v): n for v, n in cur.fetchall()})
    cur.execute(
        "SELECT length(input), count(*) FROM dataset_examples WHERE use_case = %s AND first_run_id <> %s GROUP BY 1",
        (uc.name, run_id),
    )
    return labels, Counter(dict(cur.fetchall()))


# --- building ------------------------------------------------------------------------------------------------


def _rejected_line(row: dict, reason: str) -> str:
    label = row.get("label_raw")
    if isinstance(label, TooDeep) or reason.startswith(("label_too_deep", "label_too_large")):
        label = repr(label) if isinstance(label, TooDeep) else f"<{reason.split(':')[0]}: not kept>"
    return json.dumps({"source_id": row.get("source_id"), "reason": reason, "input": row.get("input"),
                       "label_raw": label}, ensure_ascii=False) + "\n"


def _read_batch(uc: UseCase, rd: RunDir, validator) -> tuple[dict[str, Candidate], dict[str, _Dispute], dict]:
    """Check every batch row; pick each input's best row. Returns (winners, disputes, stats)."""
    winners: dict[str, Candidate] = {}
    disputes: dict[str, _Dispute] = {}
    later_rows: Counter[str] = Counter()  # rows after an input's first one (duplicates only: stays small)
    rejected: Counter[str] = Counter()
    collected = accepted = 0
    with open(rd.batch, encoding="utf-8") as fh, atomic_write(rd.rejected) as rej:
        for line_no, line in enumerate(fh, 1):
            try:
                row = parse_batch_line(line, uc.data.max_label_depth)
            except ValueError:
                raise DatasetError(
                    f"{rd.batch}:{line_no} is not valid JSON (truncated file?): re-run collect_examples"
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(f"{rd.batch}:{line_no} is not a JSON object: re-run collect_examples")
            collected += 1
            label, reason = check_example(uc, row.get("input"), row.get("label_raw"), validator)
            if reason:
                rejected[reason.split(":")[0]] += 1
                rej.write(_rejected_line(row, reason))
                continue
            accepted += 1
            h = input_hash(row["input"])
            cand = Candidate(int(row.get("source_id") or 0), row.get("feedback") == "corrected",
                             _parse_time(row.get("updated_at")), label, row["input"], row.get("split") or "train")
            best = winners.get(h)
            if best is None:
                winners[h] = cand
                continue
            later_rows[h] += 1
            dispute = disputes.get(h)
            if dispute is None and label != best.label:
                # Only inputs whose rows disagree pay for the bookkeeping (a million agreeing rows stay cheap).
                # Every earlier row agreed with the first one, so the best so far stands for all of them.
                dispute = disputes[h] = _Dispute()
                dispute.add(best, _canonical(best.label))
            if dispute is not None:
                dispute.add(cand, _canonical(label))
            if _better(cand, best):
                winners[h] = cand
    for h, dispute in disputes.items():
        dispute.rows = later_rows[h] + 1
    stats = {"collected": collected, "accepted": accepted, "rejected": rejected}
    return winners, disputes, stats


def build_dataset(conn, uc: UseCase, run_id: str, run_dir: Path) -> dict:
    import jsonschema

    rd = RunDir(run_dir)
    if not rd.batch.is_file():
        raise DatasetError(f"{rd.batch} is missing: run collect_examples for this run first")
    validator = jsonschema.Draft202012Validator(uc.output_schema)
    winners, disputes, stats = _read_batch(uc, rd, validator)
    collected, rejected_reasons = stats["collected"], stats["rejected"]

    batch_labels: dict[str, Counter] = {path: Counter() for path in uc.fields.labels}
    batch_lengths: Counter = Counter()
    for cand in winners.values():
        batch_lengths[len(cand.text)] += 1
        for path in uc.fields.labels:
            batch_labels[path][label_key(_get(cand.label, path))] += 1

    conflicts: list[dict] = []  # the first few, in full
    by_kind: Counter[str] = Counter()
    frozen_test = 0
    writes: list[tuple] = []
    with conn.cursor() as cur:
        reference_labels, reference_lengths = _reference(cur, uc, run_id)
        stored = _stored(cur, uc, list(winners))
        for h, cand in winners.items():
            competing = list(disputes[h].labels.values()) if h in disputes else [cand]
            previous = stored.get(h)
            write = True
            if previous is not None:
                split, old = previous
                same = old.label == cand.label
                if not same and old.human:
                    # A stored human correction against this month's label is a conflict; a stored model output
                    # replaced by a newer label is the normal update path and is not.
                    competing = [*competing, old]
                if same or split == "test":
                    write = False
                    frozen_test += int(not same and split == "test")
                elif not _better(cand, old):
                    write = False  # a stored human correction outranks this month's label
            if len({_canonical(c.label) for c in competing}) > 1:
                by_kind[_conflict_kind(competing)] += 1
                if len(conflicts) < MAX_CONFLICT_EXAMPLES:
                    conflicts.append(_conflict(uc, h, cand, competing, previous, write, disputes.get(h)))
            if write:
                writes.append((uc.name, h, cand.split, cand.text, json.dumps(cand.label, ensure_ascii=False),
                               cand.source_id, run_id, run_id, cand.human, cand.updated_at))
        for i in range(0, len(writes), UPSERT_BATCH):
            _upsert(cur, writes[i : i + UPSERT_BATCH])
        cur.execute(
            "SELECT split, count(*) FROM dataset_examples WHERE use_case = %s AND last_run_id = %s GROUP BY split",
            (uc.name, run_id),
        )
        new_by_split = {s: 0 for s in SPLITS} | dict(cur.fetchall())
    del writes

    counts, distribution = _write_splits(conn, uc, rd)
    drift = drift_mod.drift_report(uc.data.drift, reference_labels, batch_labels, reference_lengths, batch_lengths)
    files = {}
    for path in (*(rd.split(s) for s in SPLITS), rd.rejected, rd.batch):
        with open(path, "rb") as fh:
            n_rows = sum(1 for _ in fh)
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": n_rows}

    n_conflicts = sum(by_kind.values())
    new_rows = new_by_split["train"] + new_by_split["val"]
    manifest = {
        "use_case": uc.name,
        "run_id": run_id,
        "counts": {
            "collected": collected,
            **{s: counts.get(s, 0) for s in SPLITS},
            "rejected": sum(rejected_reasons.values()),
            "duplicates_removed": stats["accepted"] - len(winners),
            "new_rows": new_rows,
            "label_conflicts": n_conflicts,
        },
        "new_rows": new_rows,
        "new_rows_by_split": new_by_split,
        "conflicts": {
            "inputs": n_conflicts,
            "by_kind": dict(by_kind),
            "frozen_test_labels_kept": frozen_test,
            "rule": "a human correction beats any accepted model output; the newer of two corrections (updated_at, "
                    "else source id) wins; test labels are frozen at first sight",
            "examples": conflicts,
        },
        "drift": drift,
        "label_distribution": {s: {f: dict(c) for f, c in d.items()} for s, d in distribution.items()},
        "files": files,
        "rejected_reasons": dict(rejected_reasons),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    if rd.collect.is_file():
        manifest["scrubbed"] = read_json(rd.collect).get("scrubbed", {})
    write_json(rd.manifest, manifest)
    # Files are in place before the rows commit; a crash in between re-runs the same idempotent upserts.
    conn.commit()
    log.info(
        "dataset for %s: train=%d val=%d test=%d (this batch: %d collected, %d rejected, %d duplicates, "
        "%d new/relabelled train+val rows, %d inputs with conflicting labels; drift: %s)",
        uc.name, counts.get("train", 0), counts.get("val", 0), counts.get("test", 0), collected,
        manifest["counts"]["rejected"], manifest["counts"]["duplicates_removed"], new_rows, n_conflicts,
        drift["status"],
    )
    if n_conflicts:
        # Two humans disagreeing is worth a look; a model answer overruled by a correction is the feedback loop.
        log.log(logging.WARNING if by_kind["human_vs_human"] else logging.INFO,
                "%d inputs of %s had conflicting labels this month (%s); resolved by precedence, examples in %s",
                n_conflicts, uc.name, ", ".join(f"{k}: {n}" for k, n in sorted(by_kind.items())), rd.manifest)
    return {
        "counts": manifest["counts"],
        "rejected_reasons": dict(rejected_reasons),
        "new_rows": new_rows,
        "conflicts": n_conflicts,
        "drift": drift["status"],
        "manifest": str(rd.manifest),
    }


def _conflict(uc: UseCase, h: str, cand: Candidate, competing: list[Candidate],
              previous: tuple[str, Candidate] | None, write: bool, dispute: _Dispute | None) -> dict:
    kept = previous is not None and not write and _canonical(previous[1].label) != _canonical(cand.label)
    winner = previous[1] if kept else cand
    losers = [c for c in competing if _canonical(c.label) != _canonical(winner.label)]
    stored_differs = any(previous is not None and c is previous[1] for c in competing)
    if kept:
        resolution = "kept the stored " + ("test label (frozen)" if previous[0] == "test" else
                                           f"{winner.source()} label")
    else:
        resolution = f"this month's newest {winner.source()} label wins"
    return {
        "input_hash": h,
        "kind": _conflict_kind(competing),
        "rows_this_month": dispute.rows if dispute else 1,
        "distinct_labels": (dispute.distinct if dispute else 1) + int(stored_differs),
        "resolution": resolution,
        "winner": _shown(uc, winner),
        "losers": [_shown(uc, c) for c in losers[:3]],
    }


def _write_splits(conn, uc: UseCase, rd: RunDir) -> tuple[dict[str, int], dict]:
    counts: dict[str, int] = {}
    distribution: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    with atomic_write(rd.split("train")) as train, atomic_write(rd.split("val")) as val, \
            atomic_write(rd.split("test")) as test, conn.cursor(name=f"dataset_{os.getpid()}") as cur:
        handles = {"train": train, "val": val, "test": test}
        cur.itersize = 5000
        # Sorted by hash: a stable order for identical content, independent of insertion order.
        cur.execute(
            "SELECT split, input, label FROM dataset_examples WHERE use_case = %s ORDER BY split, input_hash",
            (uc.name,),
        )
        for split, text, label in cur:
            handles[split].write(json.dumps(_messages(uc, text, label), ensure_ascii=False) + "\n")
            counts[split] = counts.get(split, 0) + 1
            for path in uc.fields.labels:
                distribution[split][path][str(_get(label, path))] += 1
    return counts, distribution


# --- train or skip -------------------------------------------------------------------------------------------


def training_decision(manifest: dict, uc: UseCase, force: bool) -> tuple[bool, str]:
    """(should_train, reason) for this month's dataset: skip when fewer than data.min_new_rows train/val rows are
    new or relabelled (an all-rejected or empty month would train again on the identical dataset)."""
    minimum = uc.data.min_new_rows
    new = manifest.get("new_rows")
    if new is None:
        return True, "manifest.json has no new_rows count (built by an older version): training"
    counts = manifest.get("counts") or {}
    context = f"{counts.get('collected', 0)} rows collected, {counts.get('rejected', 0)} rejected"
    if new < minimum:
        if force:
            return True, (f"force_retrain=true: training although {new} usable new rows this month "
                          f"(< data.min_new_rows={minimum})")
        return False, (f"{new} usable new rows this month (< data.min_new_rows={minimum}): nothing to retrain; "
                       f"trigger with force_retrain=true to train anyway ({context})")
    return True, f"{new} usable new rows this month (>= data.min_new_rows={minimum}; {context})"
