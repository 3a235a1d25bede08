"""Dataset validation with real Great Expectations on small hand-written run directories.

Each corruption case starts from the same clean product_intent dataset and breaks one thing, then checks
that validation fails naming the expectation that guards against it (and not with a GX traceback).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

from retrain.schemas.use_case import load_use_case
from retrain.data.validate import DataValidationError, validate_dataset


@pytest.fixture(scope="module")
def uc():
    return load_use_case("product_intent")


@pytest.fixture(scope="module", autouse=True)
def _import_gx_once():
    # Importing GX takes seconds; pay it once here so per-test timings measure validation only.
    import great_expectations  # noqa: F401


PRODUCTS = ["running shoes", "zapatillas", "laptop bag", "coffee grinder", "desk lamp", "auriculares"]
RECIPIENTS = ["my mother", "mi hermano", "the office", "myself", "a friend"]
ADJECTIVES = ["cheap", "premium", "urgent", "comparar"]


def clean_rows(n: int = 120) -> list[tuple[str, Any]]:
    """n distinct (input, label) pairs that satisfy the product_intent contract."""
    rows = []
    for product, recipient, adjective in itertools.islice(
        itertools.product(PRODUCTS, RECIPIENTS, ADJECTIVES), n
    ):
        rows.append(
            (
                f"{adjective} {product} for {recipient}",
                {
                    "intent_type": "GIFT" if recipient != "myself" else "PERSONAL_USE",
                    "budget_tier": "premium" if adjective == "premium" else "economic",
                    "category": product,
                    "recipient": recipient,
                    "context_tags": [adjective],
                    "priority_features": ["price"],
                },
            )
        )
    assert len(rows) == n, "word lists too short for n"
    return rows


def split_of(i: int) -> str:
    return {8: "val", 9: "test"}.get(i % 10, "train")


def message_line(uc, text: Any, label: Any) -> dict:
    """One contract line; a str label is written verbatim as the assistant content (to corrupt it)."""
    content = label if isinstance(label, str) or label is None else json.dumps(label, ensure_ascii=False)
    return {
        "messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(text) if isinstance(text, str) else text},
            {"role": "assistant", "content": content},
        ]
    }


def write_run_dir(
    path: Path,
    uc,
    rows: list[tuple[Any, Any]],
    splits: list[str] | None = None,
    batch: list[tuple[Any, Any]] | None = None,
) -> Path:
    """Write train/val/test.jsonl, batch.jsonl, rejected.jsonl and manifest.json as build_dataset would.

    ``splits`` overrides the split per row; ``batch`` (default: the same rows) is this month's batch.jsonl.
    """
    path.mkdir(parents=True, exist_ok=True)
    splits = splits or [split_of(i) for i in range(len(rows))]
    lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for (text, label), split in zip(rows, splits):
        lines[split].append(json.dumps(message_line(uc, text, label), ensure_ascii=False))
    for split, content in lines.items():
        (path / f"{split}.jsonl").write_text("".join(f"{line}\n" for line in content), encoding="utf-8")
    batch = rows if batch is None else batch
    with (path / "batch.jsonl").open("w", encoding="utf-8") as fh:
        for i, (text, label) in enumerate(batch):
            record = {"source_id": i + 1, "input": text, "label_raw": label, "split": split_of(i)}
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    (path / "rejected.jsonl").write_text("", encoding="utf-8")
    counts = {s: len(v) for s, v in lines.items()}
    (path / "manifest.json").write_text(json.dumps({"use_case": uc.name, "counts": counts}), encoding="utf-8")
    return path


# --- the happy path ----------------------------------------------------------------------------------


def test_valid_dataset_passes_and_writes_docs_and_summary(tmp_path, uc):
    run_dir = write_run_dir(tmp_path / "run", uc, clean_rows())

    started = time.perf_counter()
    result = validate_dataset(run_dir, uc)
    elapsed = time.perf_counter() - started
    print(f"\nvalidate_dataset on 120 rows + 120 batch rows: {elapsed:.2f}s")

    assert result["success"] is True and result["failed"] == []
    # 14 dataset + 8 batch (row_defect + 7 per-rule) for product_intent's two label fields; no drift suite
    # (this hand-written manifest has no drift report: drift is n/a).
    assert result["expectations"] == 22
    assert result["drift"]["status"] == "n/a" and result["warnings"] == []
    index = Path(result["data_docs"])
    assert index == run_dir / "data_docs" / "index.html" and index.is_file()
    assert "product_intent.dataset" in index.read_text(encoding="utf-8")
    # The per-run validation pages are rendered too, not just the index.
    assert len(list((run_dir / "data_docs" / "validations").rglob("*.html"))) == 2

    summary = json.loads(Path(result["report"]).read_text(encoding="utf-8"))
    assert summary["success"] is True
    assert summary["suites"]["dataset"] == {
        "rows": 120,
        "rows_per_split": {"train": 96, "val": 12, "test": 12},
        "mostly": 1.0,
        "skipped": False,
        "success": True,
    }
    assert summary["suites"]["batch"]["mostly"] == 0.95
    assert len(summary["expectations"]) == 22
    by_name = {e["name"]: e for e in summary["expectations"]}
    row_count = by_name["dataset: expect_table_row_count_to_be_between"]
    assert row_count["observed_value"] == 120
    assert elapsed < 30, "validation should take seconds, not minutes"


def test_validation_writes_nothing_outside_run_dir(tmp_path, uc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run_dir = write_run_dir(tmp_path / "run", uc, clean_rows())
    validate_dataset(run_dir, uc)
    # Retrying must replace the docs, not pile up one validation page per attempt.
    validate_dataset(run_dir, uc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert len(list((run_dir / "data_docs" / "validations").rglob("*.html"))) == 2


def test_empty_batch_skips_batch_suite_but_records_it(tmp_path, uc):
    run_dir = write_run_dir(tmp_path / "run", uc, clean_rows(), batch=[])
    result = validate_dataset(run_dir, uc)
    assert result["success"] is True and result["expectations"] == 14
    summary = json.loads((run_dir / "validation.json").read_text(encoding="utf-8"))
    assert summary["suites"]["batch"]["skipped"] is True
    assert "no rows" in summary["suites"]["batch"]["reason"]


def test_batch_within_tolerance_passes(tmp_path, uc):
    rows = clean_rows()
    batch = rows + [("regalo misterioso para alguien", "not json at all")]  # 1 of 121 broken: < 5%
    run_dir = write_run_dir(tmp_path / "run", uc, rows, batch=batch)
    result = validate_dataset(run_dir, uc)
    assert result["success"] is True
    summary = json.loads((run_dir / "validation.json").read_text(encoding="utf-8"))
    parseable = next(e for e in summary["expectations"]
                     if e["name"] == "batch: expect_column_values_to_be_json_parseable(output)")
    # Passing within tolerance still records what was tolerated.
    assert parseable["success"] is True and parseable["unexpected_count"] == 1


# --- one corruption per case -------------------------------------------------------------------------


# Each corruption edits the clean rows in place; it may return write_run_dir options (e.g. splits).


def corrupt_unknown_label(rows):
    rows[0] = (rows[0][0], {**rows[0][1], "intent_type": "GIFTS"})


def corrupt_non_json_output(rows):
    rows[0] = (rows[0][0], "GIFT, economic, shoes")


def corrupt_schema(rows):
    rows[0] = (rows[0][0], {k: v for k, v in rows[0][1].items() if k != "recipient"})


def corrupt_huge_input(rows):
    rows[0] = ("regalo " + "muy " * 250_000, rows[0][1])  # ~1 MB


def corrupt_duplicate(rows):
    # Same query with different case and spacing, both in train.
    rows[1] = ("  " + rows[0][0].upper().replace(" ", "   ") + " ", rows[1][1])


def corrupt_overlap(rows):
    rows[9] = (rows[0][0], rows[9][1])  # row 9 is the first test row, row 0 a train row


def corrupt_email(rows):
    rows[0] = (rows[0][0] + " send to jane.doe@example.com", rows[0][1])


def corrupt_card_after_escape(rows):
    # A JSON escape right before the number: a regex over the serialized text saw "n4111..." and missed it.
    text, label = rows[0]
    rows[0] = (text, {**label, "recipient": "dad\n4111 1111 1111 1111"})


def corrupt_too_few_rows(rows):
    del rows[30:]


def corrupt_null_input(rows):
    rows[0] = (None, rows[0][1])


def corrupt_empty_train(rows):
    return {"splits": ["val" if split_of(i) == "train" else split_of(i) for i in range(len(rows))]}


DS = "dataset: expect_column_values_to_"
CASES = [
    ("unknown_label", corrupt_unknown_label, DS + "be_in_set(intent_type)", "'GIFTS' (train.jsonl:1)"),
    ("non_json", corrupt_non_json_output, DS + "be_json_parseable(output)", "'GIFT, economic, shoes'"),
    ("schema", corrupt_schema, DS + "be_null(output_schema_error)", "'recipient' is a required property"),
    ("huge_input", corrupt_huge_input, DS + "be_between(input_chars)", "1000007 (train.jsonl:1)"),
    ("duplicate", corrupt_duplicate, DS + "be_unique(input_norm)", "train.jsonl:2"),
    ("overlap", corrupt_overlap, DS + "be_null(test_input_in_train_or_val)", "test.jsonl:1"),
    ("email", corrupt_email, DS + "be_null(input_pii)", "'EMAIL' (train.jsonl:1)"),
    ("card_after_escape", lambda rows: corrupt_card_after_escape(rows), DS + "be_null(output_pii)",
     "'CARD' (train.jsonl:1)"),
    ("too_few_rows", corrupt_too_few_rows, "dataset: expect_table_row_count_to_be_between", "30 rows"),
    ("null_input", corrupt_null_input, DS + "not_be_null(input)", "None (train.jsonl:1)"),
    ("empty_train", corrupt_empty_train, "dataset: expect_column_distinct_values_to_contain_set(split)",
     "no rows for split(s) train"),
]


@pytest.mark.parametrize("case, corrupt, expectation, evidence", CASES, ids=[c[0] for c in CASES])
def test_corrupted_dataset_fails_naming_the_expectation(tmp_path, uc, case, corrupt, expectation, evidence):
    rows = clean_rows()
    options = corrupt(rows) or {}
    # The batch is kept clean so only the dataset suite can be blamed.
    run_dir = write_run_dir(tmp_path / "run", uc, rows, batch=clean_rows(), **options)

    with pytest.raises(DataValidationError) as info:
        validate_dataset(run_dir, uc)

    message = str(info.value)
    assert message.startswith(f"Dataset validation failed for product_intent (run_dir={run_dir.resolve()})")
    assert expectation in info.value.summary["failed"]
    line = next(line for line in message.splitlines() if expectation in line)
    assert evidence in line, line
    assert "Traceback" not in message and "Data Docs: " in message and "clear collect_examples" in message
    assert not any(name.startswith("batch:") for name in info.value.summary["failed"])
    # Docs and summary are written before raising, so the failure can be inspected.
    assert (run_dir / "data_docs" / "index.html").is_file()
    assert json.loads((run_dir / "validation.json").read_text(encoding="utf-8"))["success"] is False
    if case in ("email", "card_after_escape"):
        secret = "jane.doe@example.com" if case == "email" else "4111 1111 1111 1111"
        assert secret not in message  # the log must not leak what it complains about
        assert secret not in (run_dir / "validation.json").read_text(encoding="utf-8")
    if case == "huge_input":
        assert len(message) < 5000


def test_dirty_batch_over_tolerance_fails_with_offending_values(tmp_path, uc):
    rows = clean_rows()
    batch = list(rows)
    for i in range(0, 120, 4):  # 25% unknown intents
        batch[i] = (batch[i][0], {**batch[i][1], "intent_type": "GIFTS" if i % 8 else "REFUND"})
    for i in range(2, 120, 20):  # 5% more that are not JSON at all
        batch[i] = (batch[i][0], "{broken")
    run_dir = write_run_dir(tmp_path / "run", uc, rows, batch=batch)

    with pytest.raises(DataValidationError) as info:
        validate_dataset(run_dir, uc)

    failed = info.value.summary["failed"]
    assert "batch: expect_column_values_to_be_in_set(intent_type)" in failed
    assert not any(name.startswith("dataset:") for name in failed)
    line = next(line for line in str(info.value).splitlines() if "be_in_set(intent_type)" in line)
    # The 6 non-JSON rows have no label at all, so GX's percentage is of the 114 labelled rows.
    assert "30 of 114 non-null rows (26.3%) unexpected, allowed <= 5.0%" in line
    assert "'REFUND' (batch.jsonl:1)" in line and "'GIFTS' (batch.jsonl:5)" in line
    # 6 non-JSON rows are 5.0% of 120: exactly at the tolerance, so that expectation passes.
    assert "batch: expect_column_values_to_be_json_parseable(output)" not in failed


def test_malformed_lines_fail_cleanly(tmp_path, uc):
    run_dir = write_run_dir(tmp_path / "run", uc, clean_rows())
    with (run_dir / "train.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("this is not json\n")
        fh.write(json.dumps({"messages": [{"role": "user", "content": "hola que tal"}]}) + "\n")
    with (run_dir / "batch.jsonl").open("a", encoding="utf-8") as fh:
        fh.write("[1, 2, 3]\n")

    with pytest.raises(DataValidationError) as info:
        validate_dataset(run_dir, uc)

    failed = info.value.summary["failed"]
    assert "dataset: expect_column_values_to_be_in_set(roles)" in failed
    assert "dataset: expect_column_values_to_not_be_null(output)" in failed
    assert not any(name.startswith("batch:") for name in failed)  # 1 bad line of 121 is tolerated


def test_missing_file_names_it_and_says_run_build_dataset(tmp_path, uc):
    run_dir = write_run_dir(tmp_path / "run", uc, clean_rows())
    (run_dir / "val.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"val\.jsonl missing .*run build_dataset first"):
        validate_dataset(run_dir, uc)
    with pytest.raises(FileNotFoundError, match="does not exist; run build_dataset first"):
        validate_dataset(tmp_path / "nowhere", uc)


def test_module_import_stays_light():
    # DAG files import retrain.data.validate at parse time; GX alone takes seconds to import.
    import subprocess
    import sys

    code = "import sys, retrain.data.validate; print(sorted({'great_expectations', 'pandas'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the batch tolerance counts broken rows, once each (issue 16) --------------------------------------------------


def test_four_defects_under_tolerance_each_are_17_5_percent_broken_rows(tmp_path, uc):
    rows = clean_rows()
    batch = [(f"{text} numero {k}", label) for k in range(2) for text, label in rows][:200]
    for i in range(0, 9):  # 4.5% null input
        batch[i] = (None, batch[i][1])
    for i in range(20, 29):  # 4.5% not JSON
        batch[i] = (batch[i][0], "GIFT, economic, shoes")
    for i in range(40, 49):  # 4.5% schema errors
        batch[i] = (batch[i][0], {k: v for k, v in batch[i][1].items() if k != "recipient"})
    for i in range(60, 68):  # 4% too short
        batch[i] = ("hey", batch[i][1])
    run_dir = write_run_dir(tmp_path / "run", uc, rows, batch=batch)

    with pytest.raises(DataValidationError) as info:
        validate_dataset(run_dir, uc)

    summary = info.value.summary
    # Every per-rule expectation alone stays within the 5% tolerance ...
    assert summary["failed"] == ["batch: expect_column_values_to_be_null(row_defect)"]
    # ... but 35 of 200 rows are broken.
    line = next(line for line in str(info.value).splitlines() if "(row_defect)" in line)
    assert "35 of 200 rows (17.5%) broken, allowed <= 5.0%" in line, line
    assert "top reasons: empty_input 9 (e.g. batch.jsonl:1: empty_input), invalid_json 9 (e.g. batch.jsonl:21: " \
        "invalid_json), schema 9 (e.g. batch.jsonl:41: schema: (root): 'recipient' is a required property), " \
        "input_too_short 8 (e.g. batch.jsonl:61: input_too_short: 3 chars < 5)" in line, line
    assert summary["suites"]["batch"]["defects"]["broken_rows"] == 35
    entry = next(e for e in summary["expectations"] if e.get("column") == "row_defect")
    assert entry["top_reasons"]["schema"] == 9 and len(entry["samples"]) == 4


def test_hostile_batch_rows_are_defects_not_crashes(tmp_path, uc):
    rows = clean_rows()
    run_dir = write_run_dir(tmp_path / "run", uc, rows)
    deep = '{"a": ' * 3000 + "1" + "}" * 3000
    with (run_dir / "batch.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(f'{{"source_id": 500, "input": "regalo profundo", "label_raw": {deep}, "split": "train"}}\n')
        fh.write(json.dumps({"source_id": 501, "input": "\u200b\u200c\u200d\u2060\ufeff", "label_raw": rows[0][1],
                             "split": "train"}) + "\n")
        fh.write(json.dumps({"source_id": 502, "input": "regalo raro", "label_raw": "[" * 3000 + "]" * 3000,
                             "split": "train"}) + "\n")
    result = validate_dataset(run_dir, uc)  # 3 of 123 broken: tolerated, and no RecursionError
    summary = json.loads((run_dir / "validation.json").read_text(encoding="utf-8"))
    defects = summary["suites"]["batch"]["defects"]
    assert result["success"] is True and defects["broken_rows"] == 3
    assert defects["top_reasons"] == {"label_too_deep": 2, "empty_input": 1}


# --- drift -----------------------------------------------------------------------------------------------------------

INTENTS = ["GIFT", "PERSONAL_USE", "BUSINESS", "COMPARISON", "URGENT"]


def _month_rows(n, prefix, skew=None):
    rows = []
    for i in range(n):
        intent = INTENTS[i % 5] if skew is None else ("GIFT" if i < skew * n else INTENTS[1 + i % 4])
        rows.append({"input": f"{prefix} product number {i} for the house", "label_raw": {
            "intent_type": intent, "budget_tier": "economic", "category": "lamp", "recipient": "myself",
            "context_tags": ["home"], "priority_features": ["price"]}})
    return rows


def _build_month(db_conn, uc, path, rows, run_id):
    from retrain.data.collect import input_hash, split_for
    from retrain.data.dataset import build_dataset

    path.mkdir(parents=True)
    with (path / "batch.jsonl").open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows, 1):
            fh.write(json.dumps({"source_id": i, "feedback": "accepted",
                                 "split": split_for(input_hash(row["input"]), 0.8, 0.1), **row}) + "\n")
    build_dataset(db_conn, uc, run_id, path)
    return path


def test_first_month_drift_is_na_not_an_error(db_conn, tmp_path, uc):
    run_dir = _build_month(db_conn, uc, tmp_path / "m1", _month_rows(300, "a"), "m1")
    result = validate_dataset(run_dir, uc)
    assert result["success"] is True and result["drift"]["status"] == "n/a"
    assert "first month" in result["drift"]["reason"]
    assert json.loads((run_dir / "validation.json").read_text())["drift"]["status"] == "n/a"


def test_ninety_percent_one_label_month_warns_visibly(db_conn, tmp_path, uc, caplog):
    _build_month(db_conn, uc, tmp_path / "m1", _month_rows(300, "a"), "m1")
    run_dir = _build_month(db_conn, uc, tmp_path / "m2", _month_rows(200, "b", skew=0.9), "m2")
    with caplog.at_level("WARNING", logger="retrain.data.validate"):
        result = validate_dataset(run_dir, uc)
    assert result["success"] is True  # data.drift.action defaults to warn
    assert result["drift"]["status"] == "warn" and result["drift"]["level"] == "fail"
    assert result["drift"]["action"] == "warn"
    assert "drift: expect_column_max_to_be_between(label_psi[intent_type])" in result["warnings"]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    line = next(m for m in warned if "intent_type: label_psi" in m)
    assert "'GIFT' is 90.0% of this month's rows vs 20.0% of the accumulated dataset" in line
    assert "(data.drift.label_psi: warn 0.25, fail 1)" in line
    summary = json.loads((run_dir / "validation.json").read_text())
    assert summary["success"] is True and summary["drift"]["labels"]["intent_type"]["top"]["share"] == 0.9
    # Data Docs show it: the drift suite is rendered next to the dataset and batch suites.
    assert "product_intent.drift" in (run_dir / "data_docs" / "index.html").read_text(encoding="utf-8")


def test_ninety_percent_one_label_month_fails_with_action_fail(db_conn, tmp_path, uc):
    from retrain.schemas.use_case import parse_use_case

    data = uc.model_dump()
    data["data"]["drift"] = {"action": "fail"}
    strict = parse_use_case(data)
    _build_month(db_conn, strict, tmp_path / "m1", _month_rows(300, "a"), "m1")
    run_dir = _build_month(db_conn, strict, tmp_path / "m2", _month_rows(200, "b", skew=0.9), "m2")
    with pytest.raises(DataValidationError) as info:
        validate_dataset(run_dir, strict)
    assert "drift: expect_column_max_to_be_between(label_psi[intent_type])" in info.value.summary["failed"]
    message = str(info.value)
    assert "intent_type: label_psi" in message and "'GIFT' is 90.0%" in message
    assert "data.drift.action: warn" in message  # says how to accept the change


def test_drift_levels_are_validated_naming_the_field(uc):
    from retrain.schemas.use_case import ConfigError, parse_use_case

    data = uc.model_dump()
    data["data"]["drift"] = {"label_psi": {"warn": 2, "fail": 1}}
    with pytest.raises(ConfigError, match=r"data\.drift\.label_psi: .*warn \(2\.0\) must not be above fail"):
        parse_use_case(data)
    data["data"]["drift"] = {"action": "explode"}
    with pytest.raises(ConfigError, match=r"data\.drift\.action"):
        parse_use_case(data)
