"""Active learning end to end: select a run's hard examples (the ``select_for_review`` task), export a run's queue
for Label Studio (``retrain review export``), import the reviewers' answers (``retrain review import FILE``)."""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from retrain import db
from retrain.review import labelstudio, queue
from retrain.review.select import order_key, rank, sample_rows, score_rows
from retrain.rundir import RunDir, atomic_write, load_run, write_json
from retrain.schemas.use_case import ConfigError, load_use_case

log = logging.getLogger(__name__)


class ReviewError(ConfigError):
    """A review export or import cannot proceed (unknown use case or run, unreadable file): one line says why."""


# --- selection (the select_for_review task) ----------------------------------------------------------------------


def _batch_sample(path: Path, limit: int) -> tuple[list[dict], int]:
    """(scorable batch rows, at most ``limit``, the same ones on every retry; how many were scorable). Streams the
    file and keeps a bounded heap: a batch of a million rows costs ``limit`` rows of memory."""
    heap: list[tuple[int, int, dict]] = []
    scorable = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("input")
            if not isinstance(text, str) or not text.strip() or row.get("feedback") == "corrected":
                continue  # nothing to show, or a human already answered it
            scorable += 1
            source_id = int(row["source_id"])
            item = (-int(order_key(source_id)[:15], 16), source_id,
                    {"source_id": source_id, "input": text, "recorded_output": row.get("label_raw"),
                     "origin": "batch"})
            if len(heap) < limit:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)
    return sample_rows([item[2] for item in heap], limit), scorable


def _table_rows(conn, uc, run_id: str, limit: int, exclude: set[int]) -> list[dict]:
    from retrain.data.scrub import scrub_text

    # Same scrubbing as collection: nothing unscrubbed reaches the queue, the export or a reviewer.
    return [{"source_id": int(i), "input": scrub_text(text, None, uc.pii), "recorded_output": output,
             "origin": "table_sample"} for i, text, output in queue.table_sample(conn, uc.name, run_id, limit, exclude)]


def _budget(uc, rows: list[dict]) -> int:
    from retrain.evaluate.inference import max_new_tokens_for

    answers = [json.dumps(r["recorded_output"], ensure_ascii=False) for r in rows if r.get("recorded_output")]
    return max_new_tokens_for(uc, answers)


def summary_line(summary: dict | None) -> str | None:
    """REVIEW: n queued, top reasons (the run summary and the UI page)."""
    if not summary:
        return None
    status = summary.get("status")
    if status == "off":
        return f"REVIEW: off ({summary.get('reason')})"
    if status == "failed":
        return f"REVIEW: failed ({summary.get('error')}); the deploy path did not wait for it"
    reasons = ", ".join(f"{k} {v}" for k, v in (summary.get("reasons") or {}).items()) or "no hard example"
    return (f"REVIEW: {summary.get('queued', 0)} queued of {summary.get('scored', 0)} rows scored ({reasons})"
            + (f" -> {summary['export']}" if summary.get("export") else ""))


def select_run(run_dir: str | Path) -> dict:
    """Score the run's newest production rows with both models, queue the hardest, write the Label Studio files."""
    rd = RunDir(run_dir)
    uc, meta = load_run(rd)
    cfg = uc.review
    run_id = meta["run_id"]
    if uc.is_generation or cfg.max_examples == 0:
        reason = "kind generation has no labels to review" if uc.is_generation else "review.max_examples is 0"
        summary = {"status": "off", "reason": reason, "queued": 0}
        write_json(rd.review_summary, summary)
        return summary
    models = json.loads(rd.models.read_text(encoding="utf-8")) if rd.models.is_file() else None
    if models is None:
        raise FileNotFoundError(f"{rd.models} is missing: run evaluate_candidate first")
    production, candidate = models["baseline"], models["candidate"]
    remote = [spec.get("model") for spec in (production, candidate) if spec.get("kind") != "hf"]
    if remote and not cfg.score_remote_models:
        summary = {"status": "off", "queued": 0, "reason": f"{', '.join(map(str, remote))} answer through a paid API: "
                                                           "set review.score_remote_models: true to score with them"}
        write_json(rd.review_summary, summary)
        return summary
    if not rd.batch.is_file():
        raise FileNotFoundError(f"{rd.batch} is missing: select_for_review reads the rows collected this run "
                                "(it must run before cleanup)")
    rows, scorable = _batch_sample(rd.batch, cfg.max_scored)
    with db.connection() as conn:
        db.ensure_schema(conn)
        if cfg.table_sample:
            rows += _table_rows(conn, uc, run_id, cfg.table_sample, {r["source_id"] for r in rows})
    scored = score_rows(uc, rows, production, candidate, max_new_tokens=_budget(uc, rows),
                        margin_below=cfg.margin_below) if rows else []
    model_names = {"production": production.get("path") or production.get("model"),
                   "production_kind": production.get("baseline_kind"),
                   "candidate": candidate.get("path") or candidate.get("model")}
    selected = [{**r, "models": model_names} for r in rank(scored, cfg.max_examples)]
    with db.connection() as conn:
        counts = queue.replace_run(conn, uc.name, run_id, selected)
        queued = queue.run_rows(conn, uc.name, run_id)
    files = write_export(uc, queued, rd.review_export)
    reasons = Counter(reason for r in selected for reason in r["reasons"])
    margins = sorted(r["candidate"]["margin"] for r in scored if r["candidate"].get("margin") is not None)
    summary = {
        "status": "ok",
        "use_case": uc.name,
        "run_id": run_id,
        "scored": len(scored),
        "batch_rows_scorable": scorable,
        "table_sample": sum(r["origin"] == "table_sample" for r in rows),
        "hard": sum(bool(r["reasons"]) for r in scored),
        "queued": len(queued),
        "dropped": counts["dropped"],
        "reasons": dict(reasons.most_common()),
        "median_candidate_margin": margins[len(margins) // 2] if margins else None,
        "margin_below": cfg.margin_below,
        "max_examples": cfg.max_examples,
        "models": model_names,
        **files,
        "top": [{"source_id": r["source_id"], "rank": r["rank"], "score": r["score"], "reasons": r["reasons"],
                 "margin": r["candidate"].get("margin")} for r in selected[:5]],
    }
    write_json(rd.review_summary, summary)
    log.info("%s", summary_line(summary))
    return summary


def select_run_safely(run_dir: str | Path) -> dict:
    """select_run that never raises: the review queue is a by-product of the run, so its failure is logged and
    written to the review summary (the run summary and the UI show it) instead of failing the DAG run."""
    from retrain.errors import one_line

    try:
        return select_run(run_dir)
    except Exception as exc:  # noqa: BLE001 - see docstring
        log.exception("select_for_review failed; the run goes on without a review queue")
        summary = {"status": "failed", "error": f"{type(exc).__name__}: {one_line(exc, 300)}", "queued": 0}
        try:
            write_json(RunDir(run_dir).review_summary, summary)
        except OSError:
            pass
        return summary


# --- export ------------------------------------------------------------------------------------------------------


def write_export(uc, rows: list[dict], path: Path) -> dict:
    """The Label Studio import file (a JSON list of tasks) and, beside it, the labeling config it needs."""
    path = Path(path)
    write_json(path, labelstudio.tasks(uc, rows))
    config = path.with_name(RunDir.REVIEW_LABELING_CONFIG)
    with atomic_write(config) as fh:
        fh.write(labelstudio.labeling_config(uc))
    return {"export": str(path), "labeling_config": str(config), "tasks": len(rows)}


def export(use_case: str, run_id: str | None = None, out: str | Path | None = None) -> dict:
    """Write a run's queue (default: the newest run with one) as a Label Studio import file."""
    uc = load_use_case(use_case)
    with db.connection() as conn:
        db.ensure_schema(conn)
        run_id = run_id or queue.latest_run_id(conn, uc.name)
        if run_id is None:
            raise ReviewError(f"{uc.name} has no review queue yet: a run's select_for_review task fills it")
        rows = queue.run_rows(conn, uc.name, run_id)
    if not rows:
        raise ReviewError(f"run {run_id!r} of {uc.name} has nothing in the review queue (check the run id)")
    files = write_export(uc, rows, Path(out) if out else RunDir.for_run(uc.name, run_id).review_export)
    return {"use_case": uc.name, "run_id": run_id, "queued": sum(r["status"] == "queued" for r in rows),
            "reviewed": sum(r["status"] == "reviewed" for r in rows), **files}


# --- import ------------------------------------------------------------------------------------------------------


def _key(data: dict) -> tuple[str, str, int]:
    try:
        return str(data["use_case"]), str(data["run_id"]), int(data["source_id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("its data has no use_case/run_id/source_id: not a task of a `retrain review export` "
                         "file") from None


def import_file(path: str | Path) -> dict:
    """Write every reviewed task of a Label Studio export back (see retrain.review.labelstudio for the rules).

    A bad task is reported with one line naming it and what is wrong; the others are still imported. Importing the
    same file again changes nothing. Returns {"imported", "unchanged", "not_reviewed", "errors": [lines]}."""
    import jsonschema

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReviewError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    try:
        tasks = labelstudio.read_export(text)
    except labelstudio.ReviewFileError as exc:
        raise ReviewError(f"{path}: {exc}") from None
    use_cases: dict[str, Any] = {}
    result: dict[str, Any] = {"file": str(path), "tasks": len(tasks), "imported": 0, "unchanged": 0,
                              "not_reviewed": 0, "errors": []}
    with db.connection() as conn:
        db.ensure_schema(conn)
        for index, t in enumerate(tasks):
            name = labelstudio.task_name(t, index)
            try:
                if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
                    raise ValueError("not a Label Studio task (no data object)")
                use_case, run_id, source_id = _key(t["data"])
                if use_case not in use_cases:
                    try:
                        uc = load_use_case(use_case)
                    except ConfigError:
                        raise ValueError(f"unknown use case {use_case!r}") from None
                    use_cases[use_case] = (uc, jsonschema.Draft202012Validator(uc.output_schema))
                uc, validator = use_cases[use_case]
                row = queue.get(conn, use_case, run_id, source_id)
                if row is None or not queue.example_exists(conn, use_case, source_id):
                    raise ValueError(f"unknown task: example {source_id} of run {run_id!r} is not in the {use_case} "
                                     "review queue")
                annotation = labelstudio.final_annotation(t)
                if annotation is None:
                    result["not_reviewed"] += 1
                    continue
                answer = labelstudio.reviewed_answer(uc, t["data"], labelstudio.controls(annotation))
                error = next(iter(validator.iter_errors(answer)), None)
                if error is not None:
                    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                    raise ValueError(f"the answer breaks the {use_case} output schema at {where}: "
                                     f"{error.message[:200]}")
                changed = queue.apply_review(conn, row, answer)
                conn.commit()
                result["imported" if changed else "unchanged"] += 1
            except ValueError as exc:
                conn.rollback()
                result["errors"].append(f"{name}: {exc}")
    return result


def ui_line(run_dir: str | Path | None, counts: dict | None) -> str | None:
    """The UI page's line for one run: the run summary's REVIEW line, plus how many a reviewer has answered since."""
    summary = None
    if run_dir:
        path = RunDir(run_dir).review_summary
        try:
            summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, ValueError):
            summary = None
    line = summary_line(summary)
    if counts:
        line = (line.split(" -> ")[0] if line else f"REVIEW: {counts['queued']} in the queue") + \
            f"; {counts['reviewed']} reviewed"
    elif line:
        line = line.split(" -> ")[0]
    return line
