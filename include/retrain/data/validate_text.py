"""Validate a generation run's datasets (``kind: generation``) with Great Expectations before any training.

What fits free text, instead of JSON schemas and label sets (the runner, Data Docs and summaries are
retrain.data.validate's, by import):

* ``dataset`` - every row of every eligible tenant's train/val/test.jsonl (strict, as in the structured suite):
  chat roles, a non-empty reply within ``output.min_chars..max_chars``, an input within ``data``'s bounds, no
  personal data left in input or reply (retrain.data.scrub detectors), no test input in the same tenant's
  train/val; tolerant where text is fuzzy: the reply's language (stop-word vote of
  retrain.evaluate.analysis.language) is one of ``output.languages`` for at least ``output.min_language_share`` of
  the rows, and at most ``output.max_near_duplicate_fraction`` of a tenant's replies repeat an earlier one up to
  case, digits, punctuation and spacing (templated mail teaches no voice);
* ``tenants`` - one row per tenant: at least one tenant has ``tenants.min_examples`` examples (otherwise there is
  nothing to train);
* ``batch`` - every row collected this run: at most ``data.max_rejected_fraction`` of them break build_dataset's
  contract (``row_defect``: the reason check_text_example gives), so a month of empty bodies or missing tenants
  fails here with the reason instead of quietly training on what is left.

Writes ``data_docs/`` and ``validation.json``; returns / raises like retrain.data.validate.validate_dataset.
"""

from __future__ import annotations

import re
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.data.dataset import is_blank
from retrain.data.dataset_text import check_text_example
from retrain.data.datadocs import make_offline
from retrain.data.validate import (
    DataValidationError,
    _clip,
    _defect_summary,
    _describe,
    _ephemeral_context,
    _pii_found,
    _read_jsonl,
    _run_identifier,
    _summarise,
)
from retrain.evaluate.analysis import language
from retrain.rundir import RunDir, read_json, write_json
from retrain.schemas.use_case import UseCase

SPLITS = ("train", "val", "test")
EXPECTED_ROLES = "system,user,assistant"
_NOT_LETTERS = re.compile(r"[^\w]+|[\d_]+")

DATASET_COLUMNS = ["where", "tenant", "split", "roles", "input", "input_chars", "output", "output_chars",
                   "output_language", "output_near_duplicate", "input_pii", "output_pii", "test_input_in_train_or_val"]
BATCH_COLUMNS = ["where", "row_defect", "tenant", "input", "input_chars", "output", "output_chars"]
TENANT_COLUMNS = ["tenant", "examples", "eligible"]


def fingerprint(text: str) -> str:
    """A reply up to case, digits, punctuation and spacing: equal fingerprints are near-duplicates."""
    return " ".join(_NOT_LETTERS.sub(" ", text.lower()).split())


def validate(run_dir: str | Path) -> dict:
    """Validate a built generation run directory (see the module docstring).

    Returns {"success", "data_docs", "expectations", "failed", "warnings", "drift", "report", "tenants"}; raises
    DataValidationError (after writing data_docs/ and validation.json) when an expectation fails, and
    FileNotFoundError when build_dataset has not run.
    """
    started = time.perf_counter()
    rd = RunDir(Path(run_dir).resolve())
    uc, _ = rd.load()
    for path in (rd.batch, rd.tenants_manifest):
        if not path.is_file():
            raise FileNotFoundError(f"{path.name} missing in {rd.path}; run build_dataset first (it writes "
                                    f"{rd.tenants_manifest.name} and the tenants' split files)")
    tenants = read_json(rd.tenants_manifest)["tenants"]
    dataset_rows = _dataset_rows(rd, uc, [t for t, e in tenants.items() if e.get("eligible")])
    batch_rows = _batch_rows(rd, uc)
    tenant_rows = [{"tenant": t, "examples": int(e.get("total", 0)), "eligible": bool(e.get("eligible"))}
                   for t, e in tenants.items()] or [{"tenant": "(none)", "examples": 0, "eligible": False}]

    import great_expectations as gx  # seconds to import: keep it out of DAG parsing
    import pandas as pd

    shutil.rmtree(rd.data_docs, ignore_errors=True)  # a retry must not show the last attempt's results
    context = _ephemeral_context(gx, rd.data_docs)
    datasource = context.data_sources.add_pandas("run_dir")
    run_id = _run_identifier(uc, rd.path)
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": 10,
                     "unexpected_index_column_names": ["where"]}
    mostly_batch = round(1.0 - uc.data.max_rejected_fraction, 10)
    suites: list[tuple[str, list[dict], list[str], list[Any], Any]] = [
        ("dataset", dataset_rows, DATASET_COLUMNS, _dataset_expectations(gx, uc), 1.0),
        ("tenants", tenant_rows, TENANT_COLUMNS, _tenant_expectations(gx, uc), 1.0),
    ]
    summary_suites: dict[str, dict] = {
        "dataset": {"rows": len(dataset_rows), "mostly": 1.0, "skipped": False,
                    "rows_per_split": {s: sum(r["split"] == s for r in dataset_rows) for s in SPLITS}},
        "tenants": {"rows": len(tenants), "eligible": sum(bool(e.get("eligible")) for e in tenants.values()),
                    "skipped": False},
        "batch": {"rows": len(batch_rows), "mostly": mostly_batch, "skipped": not batch_rows},
    }
    if batch_rows:
        suites.append(("batch", batch_rows, BATCH_COLUMNS, _batch_expectations(gx, uc, mostly_batch), mostly_batch))
    else:
        summary_suites["batch"]["reason"] = f"{rd.batch.name} has no rows (nothing new collected this run)"

    results: list[dict[str, Any]] = []
    for name, rows, columns, expectations, mostly in suites:
        frame = pd.DataFrame(rows, columns=columns)
        for column in ("input_chars", "output_chars", "examples"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")  # nulls must not turn lengths into floats
        suite = context.suites.add(gx.ExpectationSuite(name=f"{uc.name}.{name}", expectations=expectations))
        asset = datasource.add_dataframe_asset(name)
        definition = context.validation_definitions.add(gx.ValidationDefinition(
            name=f"{uc.name}.{name}", data=asset.add_batch_definition_whole_dataframe(name), suite=suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format, run_id=run_id)
        summary_suites[name]["success"] = bool(outcome.success)
        order = {e.id: i for i, e in enumerate(suite.expectations)}
        ordered = sorted(outcome.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
        results.extend(_summarise(name, r, mostly) for r in ordered)

    context.build_data_docs(site_names=["run_dir"])
    make_offline(rd.data_docs)
    index = rd.data_docs / "index.html"
    if batch_rows:
        defects = summary_suites["batch"]["defects"] = _defect_summary(batch_rows)
        for entry in results:  # the failure line names the commonest reasons, as the structured suite's does
            if entry["suite"] == "batch" and entry.get("column") == "row_defect":
                entry.update(top_reasons=defects["top_reasons"], samples=defects["samples"])
    failed = [r for r in results if not r["success"]]
    summary = {
        "use_case": uc.name,
        "kind": "generation",
        "run_dir": str(rd.path),
        "success": not failed,
        "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
        "data_docs": str(index),
        "suites": summary_suites,
        "expectations": results,
        "failed": [r["name"] for r in failed],
        "warnings": [],
        "drift": {"status": "n/a", "reason": "kind generation: no label distribution to compare", "checks": []},
    }
    report = write_json(rd.validation, summary)
    if failed:
        lines = [f"Dataset validation failed for {uc.name} (run_dir={rd.path}): {len(failed)} of {len(results)} "
                 "expectations failed:", *(_describe(entry) for entry in failed)]
        if summary_suites["batch"].get("skipped"):
            lines.append(f"  (batch suite skipped: {summary_suites['batch']['reason']})")
        lines += [f"Data Docs: {index}  Summary: {rd.validation}",
                  f"Fix the rows at the source (see {rd.rejected} for why each row was rejected) or the rule in "
                  f"{uc.name}.yaml (output:, tenants:, data:), then clear collect_examples and its downstream tasks."]
        raise DataValidationError("\n".join(lines), summary)
    return {"success": True, "data_docs": str(index), "expectations": len(results), "failed": [], "warnings": [],
            "drift": {"status": "n/a", "level": None, "action": uc.data.drift.action,
                      "reason": summary["drift"]["reason"], "warnings": []},
            "report": str(report), "tenants": summary_suites["tenants"]}


# --- derived columns ---------------------------------------------------------------------------------------


def _dataset_rows(rd: RunDir, uc: UseCase, eligible: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for tenant in eligible:
        sub = rd.tenant(tenant)
        seen: dict[str, str] = {}
        trained: set[str] = set()
        tenant_rows = []
        for split in SPLITS:
            path = sub.split(split)
            records = _read_jsonl(path, uc.data.max_label_depth) if path.is_file() else []
            for lineno, record in records:
                messages = record.get("messages") if isinstance(record, dict) else None
                messages = messages if isinstance(messages, list) else []
                by_role = {m.get("role"): m.get("content") for m in messages if isinstance(m, dict)}
                user, body = by_role.get("user"), by_role.get("assistant")
                text = uc.extract_input(user) if isinstance(user, str) else None
                body = body.strip() if isinstance(body, str) and not is_blank(body) else None
                where = f"{path.relative_to(rd.path)}:{lineno}"
                duplicate_of = None
                if body is not None:
                    key = fingerprint(body)
                    duplicate_of = seen.get(key)
                    seen.setdefault(key, where)
                norm = " ".join(text.lower().split()) if text is not None else None
                if split != "test" and norm is not None:
                    trained.add(norm)
                tenant_rows.append({
                    "where": where, "tenant": tenant, "split": split,
                    "roles": ",".join(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)
                    or "(not a {\"messages\": [...]} object)",
                    "input": text, "input_chars": len(text) if text is not None else None,
                    "output": body, "output_chars": len(body) if body is not None else None,
                    "output_language": language(body) if body is not None else None,
                    "output_near_duplicate": duplicate_of,
                    "input_pii": _pii_found(text, uc), "output_pii": _pii_found(body, uc),
                    "_norm": norm,
                })
        for row in tenant_rows:
            norm = row.pop("_norm")
            row["test_input_in_train_or_val"] = row["input"] if row["split"] == "test" and norm in trained else None
        rows.extend(tenant_rows)
    return rows


def _batch_rows(rd: RunDir, uc: UseCase) -> list[dict[str, Any]]:
    rows = []
    for lineno, record in _read_jsonl(rd.batch, uc.data.max_label_depth):
        record = record if isinstance(record, dict) else {}
        _, defect = check_text_example(uc, record)
        text, body = record.get("input"), record.get("label_raw")
        text = text if isinstance(text, str) else None
        body = body.strip() if isinstance(body, str) and not is_blank(body) else None
        tenant = record.get("tenant")
        rows.append({"where": f"{rd.batch.name}:{lineno}", "row_defect": _clip(defect, 200) if defect else None,
                     "tenant": tenant if isinstance(tenant, str) else None,
                     "input": _clip(text, 300), "input_chars": len(text) if text is not None else None,
                     "output": _clip(body, 300), "output_chars": len(body) if body is not None else None})
    return rows


# --- expectations ------------------------------------------------------------------------------------------


def _text_expectations(gxe: Any, uc: UseCase, mostly: float) -> list[Any]:
    """Rules every row meets, strictly in the dataset and within data.max_rejected_fraction in the batch."""
    out, rules = uc.output, uc.data
    return [
        gxe.ExpectColumnValuesToNotBeNull(column="output", mostly=mostly,
                                          notes="The reply (the label) is missing, empty or invisible characters "
                                                "only: nothing to learn a voice from."),
        gxe.ExpectColumnValuesToBeBetween(column="output_chars", min_value=out.min_chars, max_value=out.max_chars,
                                          mostly=mostly,
                                          notes=f"Reply length in characters (output.min_chars={out.min_chars}, "
                                                f"output.max_chars={out.max_chars})."),
        gxe.ExpectColumnValuesToNotBeNull(column="input", mostly=mostly, notes="Rows without an input."),
        gxe.ExpectColumnValuesToBeBetween(column="input_chars", min_value=rules.min_input_chars,
                                          max_value=rules.max_input_chars, mostly=mostly,
                                          notes="Input length in characters (data.min_input_chars, "
                                                "data.max_input_chars)."),
        gxe.ExpectColumnValuesToNotBeNull(column="tenant", mostly=mostly,
                                          notes=f"Whose example the row is (production_examples."
                                                f"{uc.tenants.column}): without it no adapter can learn from it."),
    ]


def _dataset_expectations(gx: Any, uc: UseCase) -> list[Any]:
    gxe, out = gx.expectations, uc.output
    expectations = [
        gxe.ExpectTableRowCountToBeBetween(min_value=uc.data.min_rows,
                                           notes="Examples of the eligible tenants, all splits (data.min_rows)."),
        gxe.ExpectColumnValuesToBeInSet(column="roles", value_set=[EXPECTED_ROLES],
                                        notes="Chat format: system, user, assistant."),
        *_text_expectations(gxe, uc, 1.0),
        gxe.ExpectColumnValuesToBeNull(
            column="output_near_duplicate", mostly=round(1.0 - out.max_near_duplicate_fraction, 10),
            notes="Replies repeating an earlier reply of the same tenant up to case, digits, punctuation and "
                  f"spacing (value: where the first one is); at most output.max_near_duplicate_fraction="
                  f"{out.max_near_duplicate_fraction}."),
        gxe.ExpectColumnValuesToBeNull(column="input_pii", notes="Unscrubbed personal data in the input."),
        gxe.ExpectColumnValuesToBeNull(column="output_pii", notes="Unscrubbed personal data in the reply "
                                                                  "(retrain.data.scrub detectors)."),
        gxe.ExpectColumnValuesToBeNull(column="test_input_in_train_or_val",
                                       notes="A tenant's test input also in its train/val: the score would leak."),
    ]
    if out.languages:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(
            column="output_language", value_set=list(out.languages), mostly=out.min_language_share,
            notes=f"Reply language by a stop-word vote (es/en/other); output.languages={list(out.languages)}, "
                  f"output.min_language_share={out.min_language_share}."))
    return expectations


def _tenant_expectations(gx: Any, uc: UseCase) -> list[Any]:
    return [gx.expectations.ExpectColumnMaxToBeBetween(
        column="examples", min_value=uc.tenants.min_examples,
        notes=f"At least one tenant needs tenants.min_examples={uc.tenants.min_examples} examples (all months) "
              "for an adapter to be trained; tenants.json lists every tenant with the reason it was skipped.")]


def _batch_expectations(gx: Any, uc: UseCase, mostly: float) -> list[Any]:
    gxe = gx.expectations
    return [
        gxe.ExpectColumnValuesToBeNull(
            column="row_defect", mostly=mostly,
            notes="Rows build_dataset rejected, each counted once with its first reason (no tenant, empty reply, "
                  "reply or input out of bounds, not text); the batch fails above data.max_rejected_fraction."),
        *_text_expectations(gxe, uc, mostly),
    ]

