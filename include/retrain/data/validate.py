"""Validate a run directory's dataset with Great Expectations before any GPU time is spent on it.

Two GX batches are validated:

* ``dataset`` - the rows of train/val/test.jsonl, i.e. exactly what will be trained and scored on. Every
  rule is strict (mostly=1.0): build_dataset already dropped broken rows, so a single bad row here means
  the builder or the contract is wrong.
* ``batch`` - batch.jsonl, every row collected this run including the ones build_dataset rejected. The
  tolerance counts rows, not rule violations: ``row_defect`` holds the first reason build_dataset's contract
  check (retrain.data.dataset.check_example) gives for a row, and the batch fails when more than
  data.max_rejected_fraction of its rows have one (a row with three defects counts once; four kinds of defect at
  4.5% each are 17.5% broken rows, not four passes). The per-rule expectations run with the same tolerance and
  show which rule the broken rows break.
* ``drift`` - when build_dataset could compare this month with the accumulated dataset (manifest.json's
  ``drift``, retrain.data.drift), one expectation per metric at its warn level. Drift warns (a WARNING log line,
  a "drift" entry in the result); it fails the run only with data.drift.action: fail and a metric above its
  fail level. The first month has nothing to compare with: drift is "n/a", never an error.

GX sees derived columns rather than raw JSONL lines: raw data can be anything (null, 1 MB, non-JSON,
wrong types) and GX's pandas metrics raise on some of those, which would turn one bad row into a
traceback instead of a failed expectation with examples. Everything derived is computed here, in plain
Python, with None for "not applicable", because GX column-map expectations skip nulls.

Outputs in run_dir: ``data_docs/`` (static GX Data Docs site, self-contained: retrain.data.datadocs),
``validation.json`` (summary per expectation). ``great_expectations`` and ``pandas`` are imported inside the function: importing GX takes
seconds and this module is imported by DAG files at parse time.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.data.dataset import TooDeep, check_example, json_depth, parse_batch_line
from retrain.data.datadocs import make_offline
from retrain.data.drift import drift_failures
from retrain.rundir import RunDir, write_json
from retrain.schemas.use_case import UseCase

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
EXPECTED_ROLES = "system,user,assistant"
_TOP_REASONS = 5  # defect kinds named in the batch failure line

_SITE = "run_dir"
_EXAMPLES = 3  # offending values quoted per failed expectation in the error message
_MAX_VALUE_CHARS = 120  # a 1 MB input must not become a 1 MB log line


class DataValidationError(RuntimeError):
    """The dataset broke at least one expectation; the message lists them with offending values.

    ``summary`` holds the same dict that was written to validation.json.
    """

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


def validate_dataset(run_dir: str | Path, uc: UseCase) -> dict:
    """Validate the dataset files in run_dir against the use case's data contract.

    Writes Data Docs HTML into run_dir/data_docs/ and a summary into run_dir/validation.json, then returns
    {"success", "data_docs", "expectations", "failed", "report"}. Raises DataValidationError (after
    writing both) when any expectation fails, and FileNotFoundError when build_dataset has not run.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    rd = RunDir(run_dir)
    _require_files(rd)

    dataset_rows = _dataset_rows(rd, uc)
    batch_rows = _batch_rows(rd, uc)
    drift = _drift(rd)

    import great_expectations as gx  # seconds to import: keep it out of DAG parsing
    import pandas as pd

    docs_dir = rd.data_docs
    # A retried task must not show last attempt's results next to this one's.
    shutil.rmtree(docs_dir, ignore_errors=True)
    context = _ephemeral_context(gx, docs_dir)
    datasource = context.data_sources.add_pandas("run_dir")
    run_id = _run_identifier(uc, run_dir)
    result_format = {
        "result_format": "SUMMARY",
        "partial_unexpected_count": 10,
        # Makes GX report which file and line each offending value came from.
        "unexpected_index_column_names": ["where"],
    }

    batches: list[tuple[str, list[dict[str, Any]], float, Any]] = [
        ("dataset", dataset_rows, 1.0, _dataset_expectations),
    ]
    mostly_batch = round(1.0 - uc.data.max_rejected_fraction, 10)
    suites_summary: dict[str, dict[str, Any]] = {
        "dataset": {
            "rows": len(dataset_rows),
            "rows_per_split": {s: sum(r["split"] == s for r in dataset_rows) for s in SPLITS},
            "mostly": 1.0,
            "skipped": False,
        },
        "batch": {"rows": len(batch_rows), "mostly": mostly_batch, "skipped": False},
    }
    if batch_rows:
        batches.append(("batch", batch_rows, mostly_batch, _batch_expectations))
        suites_summary["batch"]["defects"] = _defect_summary(batch_rows)
    else:
        suites_summary["batch"].update(
            skipped=True, reason=f"{rd.batch.name} has no rows (nothing new collected this run)"
        )
    if drift["status"] != "n/a" and drift.get("checks"):
        batches.append(("drift", [_drift_row(drift)], 1.0, _drift_expectations(drift)))
        suites_summary["drift"] = {"rows": 1, "action": drift.get("action"), "skipped": False}

    results: list[dict[str, Any]] = []
    for name, rows, mostly, build in batches:
        frame = _frame(pd, name, rows, uc)
        expectations = build(gx, uc, mostly)
        suite = context.suites.add(gx.ExpectationSuite(name=f"{uc.name}.{name}", expectations=expectations))
        asset = datasource.add_dataframe_asset(name)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(
                name=f"{uc.name}.{name}",
                data=asset.add_batch_definition_whole_dataframe(name),
                suite=suite,
            )
        )
        # ValidationDefinition.run rather than a Checkpoint: each batch is a different in-memory
        # DataFrame, and a Checkpoint passes one set of batch_parameters to all its definitions.
        # Results land in the context's validation store, which build_data_docs renders below.
        outcome = definition.run(
            batch_parameters={"dataframe": frame}, result_format=result_format, run_id=run_id
        )
        suites_summary[name]["success"] = bool(outcome.success)
        # GX returns results grouped by metric; report them in the order the suite declares them.
        order = {e.id: i for i, e in enumerate(suite.expectations)}
        ordered = sorted(outcome.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
        results.extend(_summarise(name, r, mostly) for r in ordered)

    context.build_data_docs(site_names=[_SITE])
    make_offline(docs_dir)  # vendored assets instead of CDNs; the index readable without JavaScript
    index = docs_dir / "index.html"

    _annotate(results, suites_summary, drift)
    failed = [r for r in results if not r["success"] and r.get("severity") != "warning"]
    warnings = [r for r in results if not r["success"] and r.get("severity") == "warning"]
    drift_summary = _drift_summary(uc, drift)
    summary = {
        "use_case": uc.name,
        "run_dir": str(run_dir),
        "success": not failed,
        "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 2),
        "data_docs": str(index),
        "suites": suites_summary,
        "expectations": results,
        "failed": [r["name"] for r in failed],
        "warnings": [r["name"] for r in warnings],
        "drift": drift,
    }
    report = write_json(rd.validation, summary)

    if failed:
        message = _failure_message(uc, rd, results, failed, index, suites_summary)
        raise DataValidationError(message, summary)
    return {
        "success": True,
        "data_docs": str(index),
        "expectations": len(results),
        "failed": [],
        "warnings": [r["name"] for r in warnings],
        "drift": drift_summary,
        "report": str(report),
    }


# --- reading the contract files ----------------------------------------------------------------------


def _require_files(rd: RunDir) -> None:
    if not rd.path.is_dir():
        raise FileNotFoundError(
            f"run directory {rd.path} does not exist; run build_dataset first (it creates the directory "
            f"and the dataset files)."
        )
    expected = [rd.split(s) for s in SPLITS] + [rd.batch]
    missing = [path.name for path in expected if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{', '.join(missing)} missing in {rd.path}; run build_dataset first (it writes "
            f"{', '.join(p.name for p in expected[:-1])} and {rd.batch.name})."
        )


def _read_jsonl(path: Path, max_depth: int = 32) -> list[tuple[int, Any]]:
    """(line number, parsed value or _BAD_LINE) for every non-blank line; deeply nested members become TooDeep."""
    rows = []
    # errors="replace": a broken byte must fail an expectation, not crash the reader.
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, parse_batch_line(line, max_depth)))
            except ValueError:
                rows.append((lineno, _BAD_LINE))
    return rows


_BAD_LINE = object()


def _normalise(text: str) -> str:
    # Case and whitespace variants of one query are the same example for leakage purposes.
    return " ".join(text.lower().split())


def _output_columns(output: str | None, uc: UseCase, schema_validator: Any, valid: bool = False) -> dict[str, Any]:
    """Derived columns from an assistant output / raw label text (``valid``: the contract check already passed it,
    so the schema need not be checked again)."""
    parsed: Any = None
    schema_error = None
    if output is not None and len(output) <= uc.data.max_label_chars:
        try:
            parsed = json.loads(output)
        except (json.JSONDecodeError, RecursionError):
            pass  # counted by expect_column_values_to_be_json_parseable on "output"
        else:
            if json_depth(parsed, uc.data.max_label_depth) > uc.data.max_label_depth:
                parsed = None
                schema_error = f"(top level): nested deeper than data.max_label_depth={uc.data.max_label_depth}"
            elif not valid:
                schema_error = _schema_error(schema_validator, parsed)
    elif output is not None:
        schema_error = f"(top level): {len(output)} chars > data.max_label_chars={uc.data.max_label_chars}"
        output = _clip(output, 300)
    columns: dict[str, Any] = {"output": output, "output_schema_error": schema_error}
    for path in uc.fields.labels:
        columns[_label_column(path)] = _label_value(parsed, path)
    return columns


def _schema_validator(uc: UseCase) -> Any:
    # Why not GX's expect_column_values_to_match_json_schema: in GX 1.24 its pandas metric (1) calls
    # json.loads without catching errors, so one non-JSON row turns the whole expectation into an
    # exception, and (2) calls jsonschema.validate per row, which re-checks the schema itself every
    # time: ~3 ms/row for product_intent vs ~0.07 ms with one compiled validator (a minute per 10k
    # rows on this 2-core box). So the first violation per row is computed here, as readable text
    # ("intent_type: 'GIFTS' is not one of [...]"), and GX checks that the column is null.
    import jsonschema

    cls = jsonschema.validators.validator_for(uc.output_schema, default=jsonschema.Draft202012Validator)
    return cls(uc.output_schema)


def _schema_error(validator: Any, instance: Any) -> str | None:
    import jsonschema

    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    return _clip(f"{where}: {error.message}", 300)


def _label_column(path: str) -> str:
    # Label names share the namespace with our own columns; prefix the rare clash.
    return f"label.{path}" if path in _RESERVED_COLUMNS else path


_RESERVED_COLUMNS = {
    "where", "split", "roles", "input", "input_chars", "input_norm", "output", "output_schema_error",
    "test_input_in_train_or_val", "row_defect", "input_pii", "output_pii",
}


def _label_value(parsed: Any, path: str) -> Any:
    node = parsed
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    if isinstance(node, (dict, list)):
        # Unhashable values would break isin(); as JSON text they still show up as "unexpected".
        return json.dumps(node, ensure_ascii=False)
    return node


def _dataset_rows(rd: RunDir, uc: UseCase) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    schema_validator = _schema_validator(uc)
    for split in SPLITS:
        filename = rd.split(split).name
        for lineno, record in _read_jsonl(rd.split(split), uc.data.max_label_depth):
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list):
                messages = []
            roles = ",".join(str(m.get("role")) if isinstance(m, dict) else "?" for m in messages)
            by_role = {m.get("role"): m.get("content") for m in messages if isinstance(m, dict)}
            user, assistant = by_role.get("user"), by_role.get("assistant")
            raw_input = uc.extract_input(user) if isinstance(user, str) else None
            output = assistant if isinstance(assistant, str) else None
            rows.append(
                {
                    "where": f"{filename}:{lineno}",
                    "split": split,
                    "roles": roles if messages else "(not a {\"messages\": [...]} object)",
                    "input": raw_input,
                    "input_chars": len(raw_input) if raw_input is not None else None,
                    "input_norm": _normalise(raw_input) if raw_input is not None else None,
                    "input_pii": _pii_found(raw_input, uc),
                    "output_pii": _pii_found(_decoded(output), uc),
                    **_output_columns(output, uc, schema_validator),
                }
            )
    seen = {r["input_norm"] for r in rows if r["split"] != "test" and r["input_norm"] is not None}
    for r in rows:
        r["test_input_in_train_or_val"] = (
            r["input"] if r["split"] == "test" and r["input_norm"] in seen else None
        )
    return rows


def _batch_rows(rd: RunDir, uc: UseCase) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    schema_validator = _schema_validator(uc)
    for lineno, record in _read_jsonl(rd.batch, uc.data.max_label_depth):
        if not isinstance(record, dict):
            record = {}
        raw_input = _as_text(record.get("input"))
        label = record.get("label_raw")
        # label_raw is "any JSON": an object is the label itself, a string is the text the source
        # system stored (JSON or not); both become the text build_dataset would have parsed.
        if isinstance(label, TooDeep):
            output = repr(label)  # not JSON: counted as unparseable; row_defect names the real reason
        elif isinstance(label, str) or label is None:
            output = label
        else:
            try:
                output = json.dumps(label, ensure_ascii=False)
            except RecursionError:
                output = f"<label nested deeper than data.max_label_depth={uc.data.max_label_depth}>"
        # The row-level verdict is build_dataset's own contract check: one reason per row, counted once.
        _, defect = check_example(uc, record.get("input"), label, schema_validator)
        rows.append(
            {
                "where": f"{rd.batch.name}:{lineno}",
                "input": raw_input,
                "input_chars": len(raw_input) if raw_input is not None else None,
                **_output_columns(output, uc, schema_validator, valid=defect is None),
                "row_defect": _clip(defect, 200) if defect else None,
            }
        )
    return rows


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _columns(name: str, uc: UseCase) -> list[str]:
    labels = [_label_column(p) for p in uc.fields.labels]
    if name == "dataset":
        return ["where", "split", "roles", "input", "input_chars", "input_norm", "input_pii", "output", "output_pii",
                "output_schema_error", *labels, "test_input_in_train_or_val"]
    return ["where", "row_defect", "input", "input_chars", "output", "output_schema_error", *labels]


def _frame(pd: Any, name: str, rows: list[dict[str, Any]], uc: UseCase) -> Any:
    if name == "drift":
        return pd.DataFrame(rows)
    # Explicit columns so an empty file still yields a frame GX can run every expectation on.
    frame = pd.DataFrame(rows, columns=_columns(name, uc))
    # Nullable ints: with a null input pandas would make the lengths floats (and show 12.0 in the docs).
    frame["input_chars"] = frame["input_chars"].astype("Int64")
    return frame


# --- expectations ------------------------------------------------------------------------------------


def _row_expectations(gxe: Any, uc: UseCase, mostly: float) -> list[Any]:
    """Rules every row must meet, in both the dataset (strict) and the batch (tolerant)."""
    expectations = [
        gxe.ExpectColumnValuesToNotBeNull(
            column="input", mostly=mostly, notes="Rows without an input cannot be trained on."
        ),
        gxe.ExpectColumnValuesToNotBeNull(
            column="output", mostly=mostly, notes="The assistant output (the label) is missing."
        ),
        gxe.ExpectColumnValuesToBeJsonParseable(
            column="output", mostly=mostly, notes="The model is trained to answer with JSON only."
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="output_schema_error",
            mostly=mostly,
            notes="The first violation of the use case's output_schema by a parseable assistant output "
            "(computed in retrain.data.validate: GX 1.24's match_json_schema raises on non-JSON rows and "
            "re-checks the schema per row). Non-JSON outputs are counted by the json_parseable "
            "expectation, not here.",
        ),
    ]
    for path, allowed in uc.allowed_labels.items():
        expectations.append(
            gxe.ExpectColumnValuesToBeInSet(
                column=_label_column(path),
                value_set=allowed,
                mostly=mostly,
                notes=f"Label field '{path}' must be one of the use case's enum values.",
            )
        )
    expectations.append(
        gxe.ExpectColumnValuesToBeBetween(
            column="input_chars",
            min_value=uc.data.min_input_chars,
            max_value=uc.data.max_input_chars,
            mostly=mostly,
            notes="Length of the raw input (data.min_input_chars..data.max_input_chars).",
        )
    )
    return expectations


def _dataset_expectations(gx: Any, uc: UseCase, mostly: float) -> list[Any]:
    gxe = gx.expectations
    return [
        gxe.ExpectTableRowCountToBeBetween(
            min_value=uc.data.min_rows, notes="data.min_rows: fewest examples (all splits) worth a run."
        ),
        gxe.ExpectColumnDistinctValuesToContainSet(
            column="split", value_set=list(SPLITS), notes="train, val and test must each have rows."
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="roles",
            value_set=[EXPECTED_ROLES],
            notes="Each line is {\"messages\": [system, user, assistant]} (TRL / OpenAI chat format).",
        ),
        *_row_expectations(gxe, uc, mostly),
        gxe.ExpectColumnValuesToBeUnique(
            column="input_norm",
            notes="Inputs lowercased with whitespace collapsed must be unique across train+val+test.",
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="test_input_in_train_or_val",
            notes="Test inputs also present (normalised) in train or val: the score would be inflated.",
        ),
        # The detectors (checksums, context words) are not regexes, and they must see decoded values: a JSON
        # escape such as \n before a card number hid it from a regex over the serialized text. So the kinds of
        # personal data found per row are computed here (kinds only: never the data itself) and must be null.
        gxe.ExpectColumnValuesToBeNull(
            column="input_pii", notes="Unscrubbed personal data in the input (retrain.data.scrub detectors)."
        ),
        gxe.ExpectColumnValuesToBeNull(
            column="output_pii",
            notes="Unscrubbed personal data in any decoded string of the label (retrain.data.scrub detectors).",
        ),
    ]


def _batch_expectations(gx: Any, uc: UseCase, mostly: float) -> list[Any]:
    gxe = gx.expectations
    return [
        gxe.ExpectColumnValuesToBeNull(
            column="row_defect",
            mostly=mostly,
            notes="Rows with any defect, each counted once: the first reason build_dataset's contract check gives "
            "(empty or invisible-only input, length, non-JSON, too deep or too large, unknown label, schema). The "
            "batch fails when more than data.max_rejected_fraction of its rows are broken; the expectations "
            "below show which rules they break.",
        ),
        *_row_expectations(gxe, uc, mostly),
    ]


# --- Great Expectations context ----------------------------------------------------------------------


def _ephemeral_context(gx: Any, docs_dir: Path) -> Any:
    """An in-memory context (no great_expectations.yml, nothing in ~ or the CWD) whose only Data Docs
    site is a static site in run_dir/data_docs, so the docs travel with the run (and its backup)."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site_store = {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)}
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        # tqdm bars make Airflow task logs unreadable.
        progress_bars=ProgressBarsConfig(globally=False),
        data_docs_sites={
            _SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": site_store,
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _run_identifier(uc: UseCase, run_dir: Path) -> Any:
    from great_expectations.core.run_identifier import RunIdentifier

    # The run name becomes a directory in the docs site: no path separators allowed.
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in run_dir.name)
    return RunIdentifier(run_name=name or uc.name, run_time=datetime.now(timezone.utc))


# --- summarising results -----------------------------------------------------------------------------


def _summarise(suite: str, result: Any, mostly: float) -> dict[str, Any]:
    """One JSON-able entry of validation.json for one ExpectationValidationResult."""
    data = result.to_json_dict()  # GX converts numpy scalars and NaN for us
    config = data["expectation_config"]
    kind = config["type"]
    column = config["kwargs"].get("column")
    res = data.get("result") or {}
    entry: dict[str, Any] = {
        "suite": suite,
        "name": f"{suite}: {kind}({column})" if column else f"{suite}: {kind}",
        "expectation": kind,
        "column": column,
        "success": bool(data["success"]),
    }
    exception = _exception_message(data.get("exception_info"))
    if exception:
        entry["error"] = exception
    if res.get("observed_value") is not None:
        entry["observed_value"] = res["observed_value"]
    if kind == "expect_table_row_count_to_be_between":
        entry["min_value"] = config["kwargs"].get("min_value")
    if "element_count" in res:
        entry.update(
            rows=res["element_count"],
            # Column-map expectations skip nulls, and GX's percentages are of the non-null values.
            checked=res["element_count"] - (res.get("missing_count") or 0),
            unexpected_count=res.get("unexpected_count"),
            unexpected_percent=_round(res.get("unexpected_percent")),
            allowed_percent=_round((1.0 - mostly) * 100),
        )
    if res.get("partial_missing_list"):
        entry["missing"] = res["partial_missing_list"]
    examples = []
    for item in (res.get("partial_unexpected_index_list") or [])[:_EXAMPLES]:
        value = item.get(column)
        if kind == "expect_column_values_to_not_match_regex_list":
            value = _pii_kinds(value)  # never copy the personal data itself into logs
        examples.append({"where": item.get("where"), "value": _clip(value)})
    if examples:
        entry["examples"] = examples
    return entry


def _exception_message(info: Any) -> str | None:
    # exception_info is either {raised_exception, exception_message} or keyed by metric id.
    if not isinstance(info, dict):
        return None
    candidates = [info] + [v for v in info.values() if isinstance(v, dict)]
    for item in candidates:
        if item.get("raised_exception"):
            return str(item.get("exception_message") or "unknown error").splitlines()[0]
    return None


def _decoded(output: str | None) -> Any:
    """The label as decoded JSON when it parses (so escapes are undone), else the text itself."""
    if output is None:
        return None
    try:
        return json.loads(output)
    except (ValueError, RecursionError):
        return output


def _pii_found(value: Any, uc: UseCase) -> str | None:
    """Kinds of personal data still present in a decoded value ('CARD,PHONE'), or None."""
    if value is None:
        return None
    from retrain.data.scrub import find_pii_in_value

    kinds = sorted({kind for kind, _ in find_pii_in_value(value, uc.pii)})
    return ",".join(kinds) or None


def _pii_kinds(value: Any) -> str:
    from retrain.data.scrub import find_pii

    kinds = sorted({kind for kind, _ in find_pii(str(value))})
    return f"<{'/'.join(kinds) or 'PII'} redacted>"


def _clip(value: Any, limit: int = _MAX_VALUE_CHARS) -> Any:
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]}... ({len(value)} chars)"
    return value


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 2)


def _describe(entry: dict[str, Any]) -> str:
    """One line per failed expectation, for the Airflow log."""
    head = f"  - {entry['name']}: "
    if entry.get("error"):
        return head + f"could not be evaluated ({entry['error']})"
    kind = entry["expectation"]
    if kind == "expect_table_row_count_to_be_between":
        return head + (
            f"{entry.get('observed_value')} rows in train+val+test, need at least {entry.get('min_value')} "
            f"(data.min_rows): collect more examples (or wait a month) or lower data.min_rows"
        )
    if kind == "expect_column_distinct_values_to_contain_set":
        return head + "no rows for split(s) " + ", ".join(map(str, entry.get("missing", [])))
    if entry["suite"] == "drift":
        return head + (entry.get("drift_message") or f"observed {entry.get('observed_value')}")
    text = head
    if entry.get("column") == "row_defect" and entry.get("unexpected_percent") is not None:
        samples = {s["reason"].split(":")[0]: s for s in entry.get("samples") or []}
        reasons = ", ".join(
            f"{reason} {n}" + (f" (e.g. {samples[reason]['where']}: {_clip(samples[reason]['reason'], 80)})"
                               if reason in samples else "")
            for reason, n in (entry.get("top_reasons") or {}).items()
        )
        return text + (
            f"{entry['unexpected_count']} of {entry['rows']} rows ({entry['unexpected_percent']:.1f}%) broken, "
            f"allowed <= {entry['allowed_percent']:.1f}% (data.max_rejected_fraction, each row counted once); "
            f"top reasons: {reasons}"
        )
    elif entry.get("unexpected_percent") is not None:
        of = f"{entry['checked']} non-null" if entry["checked"] != entry["rows"] else f"{entry['rows']}"
        text += (
            f"{entry['unexpected_count']} of {of} rows ({entry['unexpected_percent']:.1f}%) unexpected, "
            f"allowed <= {entry['allowed_percent']:.1f}%"
        )
    if entry.get("examples"):
        shown = ", ".join(f"{ex['value']!r} ({ex['where']})" for ex in entry["examples"])
        text += f", e.g. {shown}"
    return text


def _failure_message(
    uc: UseCase,
    rd: RunDir,
    results: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    index: Path,
    suites: dict[str, dict[str, Any]],
) -> str:
    lines = [
        f"Dataset validation failed for {uc.name} (run_dir={rd.path}): "
        f"{len(failed)} of {len(results)} expectations failed:",
        *(_describe(entry) for entry in failed),
    ]
    if suites["batch"].get("skipped"):
        lines.append(f"  (batch suite skipped: {suites['batch']['reason']})")
    lines.append(f"Data Docs: {index}  Summary: {rd.validation}")
    suites_failed = {entry["suite"] for entry in failed}
    if "batch" in suites_failed:
        lines.append(
            f"This month's source rows are dirtier than data.max_rejected_fraction allows: fix or reject "
            f"them in production_examples (see {rd.rejected} for why each was rejected), "
            f"or raise data.max_rejected_fraction in {uc.name}.yaml if this is expected."
        )
    if "dataset" in suites_failed:
        lines.append(
            "Rows that reached train/val/test must be clean (build_dataset drops and deduplicates bad "
            "rows): fix the rows named above at the source, or the rule in the use case YAML "
            f"({uc.name}.yaml: data:, output_schema) if it is wrong."
        )
    if "drift" in suites_failed:
        lines.append(
            "This month's data moved away from the accumulated dataset by more than data.drift's fail levels "
            f"(data.drift.action: fail): check the source system, or set data.drift.action: warn in {uc.name}.yaml "
            "(or raise the levels) if the change is real and should be trained on."
        )
    lines.append(
        "Then clear collect_examples and its downstream tasks: the retry re-reads the same id window, "
        "with your fixes."
    )
    return "\n".join(lines)


# --- row defects and drift ---------------------------------------------------------------------------------


def _defect_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Broken rows of the batch, each counted once, with the commonest reasons and a few sample rows."""
    reasons: Counter[str] = Counter()
    first: dict[str, dict[str, Any]] = {}
    for row in rows:
        defect = row.get("row_defect")
        if defect:
            kind = defect.split(":")[0]
            reasons[kind] += 1
            first.setdefault(kind, {"where": row["where"], "reason": defect})
    top = dict(reasons.most_common(_TOP_REASONS))
    # One sample row per top reason, so the message shows every kind of breakage, not three of the first.
    return {"broken_rows": sum(reasons.values()), "rows": len(rows), "top_reasons": top,
            "samples": [first[kind] for kind in top]}


def _drift(rd: RunDir) -> dict[str, Any]:
    """The drift report build_dataset wrote into the manifest, or n/a when the manifest has none."""
    try:
        manifest = json.loads(rd.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    drift = manifest.get("drift") if isinstance(manifest, dict) else None
    if not isinstance(drift, dict) or "status" not in drift:
        return {"status": "n/a", "reason": f"{rd.manifest.name} has no drift report", "checks": []}
    return drift


def _drift_column(check: dict[str, Any]) -> str:
    return f"{check['metric']}[{check['field']}]" if check.get("field") else check["metric"]


def _drift_row(drift: dict[str, Any]) -> dict[str, Any]:
    return {_drift_column(c): c["value"] for c in drift["checks"]}


def _drift_expectations(drift: dict[str, Any]):
    def build(gx: Any, uc: UseCase, mostly: float) -> list[Any]:
        out = []
        for check in drift["checks"]:
            blocking = drift.get("action") == "fail" and check["status"] == "fail"
            what = f"label field '{check['field']}'" if check.get("field") else "input length"
            out.append(gx.expectations.ExpectColumnMaxToBeBetween(
                column=_drift_column(check),
                max_value=check["warn"],
                severity="critical" if blocking else "warning",
                notes=f"Drift of the {what}, this month's batch ({drift.get('batch_rows')} rows) against the "
                      f"accumulated dataset ({drift.get('reference_rows')} rows): {check['metric']} warns above "
                      f"{check['warn']:g} and fails above {check['fail']:g} (data.drift.{check['metric']}); "
                      f"data.drift.action: {drift.get('action')}. Status: {check['status']}.",
            ))
        return out

    return build


def _annotate(results: list[dict[str, Any]], suites: dict[str, dict[str, Any]], drift: dict[str, Any]) -> None:
    """Attach the row-defect breakdown to the batch's row_defect entry and drift status/severity to drift entries."""
    defects = suites.get("batch", {}).get("defects")
    checks = {_drift_column(c): c for c in drift.get("checks", [])}
    blocking = {_drift_column(c) for c in drift_failures(drift)}
    for entry in results:
        if entry["suite"] == "batch" and entry.get("column") == "row_defect" and defects:
            entry["top_reasons"] = defects["top_reasons"]
            entry["samples"] = defects["samples"]
        elif entry["suite"] == "drift" and entry.get("column") in checks:
            check = checks[entry["column"]]
            entry.update(drift_status=check["status"], warn=check["warn"], fail=check["fail"],
                         drift_message=check.get("message"))
            if entry["column"] not in blocking:
                entry["severity"] = "warning"


def _drift_summary(uc: UseCase, drift: dict[str, Any]) -> dict[str, Any]:
    """What the stage returns about drift, after logging every metric above its warn level at WARNING."""
    messages = [c["message"] for c in drift.get("checks", []) if c.get("status") in ("warn", "fail")]
    for message in messages:
        log.warning("data drift in %s this month: %s", uc.name, message)
    if drift["status"] == "n/a":
        log.info("data drift for %s: n/a (%s)", uc.name, drift.get("reason"))
    return {"status": drift["status"], "level": drift.get("level"), "action": drift.get("action", uc.data.drift.action),
            "reason": drift.get("reason"), "warnings": messages}
