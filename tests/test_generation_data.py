"""Generation use cases (issue 20), data side: YAML kind/tenants/gate/judge, the tenant column, collection with
tenants, per-tenant datasets (rejections, eligibility, frozen test sets), synthetic voices, text validation."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from retrain.data.collect import collect_examples
from retrain.data.dataset_text import build, check_text_example, example_hash
from retrain.data.synthetic import email_voice, insert_rows, seed_examples, supported_use_cases
from retrain.data.validate import DataValidationError
from retrain.data.validate_text import validate
from retrain.rundir import RunDir, read_json, write_json
from retrain.schemas.use_case import ConfigError, list_use_cases, load_use_case, parse_use_case
from retrain.settings import use_cases_dir

UC = load_use_case("email_voice")
START = datetime(2026, 10, 1, tzinfo=timezone.utc)


def raw(name: str) -> dict:
    return yaml.safe_load((use_cases_dir() / f"{name}.yaml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_use_case(data, "test.yaml")
    return str(info.value)


# --- YAML ------------------------------------------------------------------------------------------------------


def test_structured_yaml_without_output_schema_names_the_field():
    data = raw("product_intent")
    del data["output_schema"]
    assert "output_schema" in error_of(data) and "kind" in error_of(data)


def test_generation_yaml_with_json_output_names_output_type():
    data = raw("email_voice")
    data["output"] = {"type": "json"}
    message = error_of(data)
    assert "output.type" in message and "text" in message


@pytest.mark.parametrize(("patch", "field"), [
    ({"tenants": {"column": "tenant; DROP TABLE production_examples"}}, "tenants.column"),
    ({"tenants": {"column": "Tenant"}}, "tenants.column"),
    ({"tenants": {"min_examples": 300, "recommended_examples": 200}}, "recommended_examples"),
    ({"tenants": None}, "tenants"),
    ({"generation_gate": {"min_length_ratio": 3.0, "max_length_ratio": 2.0}}, "min_length_ratio"),
    ({"generation_gate": {"min_attribution": 1.5}}, "generation_gate.min_attribution"),
    ({"evaluation": {"judge": {"model": "gpt-4o-mini", "rubric": "Which reply sounds like the user?",
                               "calibration": "../../secrets.jsonl"}}}, "evaluation.judge.calibration"),
    ({"evaluation": {"judge": {"model": "gpt-4o-mini", "rubric": "Which reply sounds like the user?",
                               "calibration": "/etc/passwd"}}}, "evaluation.judge.calibration"),
    ({"evaluation": {"judge": {"model": "gpt-4o-mini", "rubric": "Which reply sounds like the user?",
                               "min_kappa": 1.2}}}, "evaluation.judge.min_kappa"),
    ({"evaluation": {"judge": {"model": "m", "rubric": "Which reply sounds like the user?",
                               "connection": "a b"}}}, "evaluation.judge.connection"),
    ({"output_schema": {"type": "object"}}, "output_schema"),
    ({"output": {"type": "text", "min_chars": 500, "max_chars": 100}}, "min_chars"),
    ({"kind": "structure"}, "kind"),
])
def test_generation_yaml_errors_name_the_field(patch, field):
    data = raw("email_voice")
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    assert field in error_of(data)


def test_judge_block_is_refused_for_structured_and_parsed_for_generation():
    data = raw("email_voice")
    data["evaluation"] = {"judge": {"model": "gpt-4o-mini", "rubric": "Which reply sounds more like the user?"}}
    judge = parse_use_case(data).evaluation.judge
    assert (judge.min_kappa, judge.calibration, judge.connection, judge.base_url) == (
        0.6, "judge_calibration.jsonl", "openai_default", None)
    structured = raw("product_intent") | {"evaluation": data["evaluation"]}
    assert "evaluation.judge" in error_of(structured)


def test_judge_calibration_symlink_out_of_the_use_case_directory_is_refused(tmp_path):
    from retrain.schemas.generation import JudgeConfig

    (tmp_path / "use_cases").mkdir()
    (tmp_path / "secret.jsonl").write_text("{}")
    (tmp_path / "use_cases" / "judge_calibration.jsonl").symlink_to(tmp_path / "secret.jsonl")
    (tmp_path / "use_cases" / "ok.jsonl").write_text("{}")
    judge = JudgeConfig(model="m", rubric="Which reply sounds like the user?")
    with pytest.raises(ValueError, match="evaluation.judge.calibration.*outside"):
        judge.calibration_path(tmp_path / "use_cases")
    ok = JudgeConfig(model="m", rubric="Which reply sounds like the user?", calibration="ok.jsonl")
    assert ok.calibration_path(tmp_path / "use_cases") == (tmp_path / "use_cases" / "ok.jsonl").resolve()


def test_every_shipped_yaml_loads_and_keeps_its_kind():
    kinds = {name: load_use_case(name).kind for name in list_use_cases()}
    assert kinds["email_voice"] == "generation"
    assert {k for n, k in kinds.items() if n != "email_voice"} == {"structured"}
    assert UC.output_schema is None and UC.fields is None and UC.primary_label is None and UC.allowed_labels == {}
    assert UC.render_input("Budget") == "Write a professional email about: Budget"


def test_run_params_apply_to_a_generation_use_case():
    from retrain.schemas.run_params import RunParams, apply_params, form_fields

    uc = apply_params(UC, RunParams(max_train_steps=7))
    assert uc.kind == "generation" and uc.training.max_steps == 7 and uc.tenants == UC.tenants
    assert "max_train_steps" in form_fields(raw("email_voice"))


# --- run directory ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "../../etc", "a/b", "x" * 300, "josé", ".hidden", ""])
def test_tenant_directories_stay_inside_tenants(tmp_path, name):
    rd = RunDir(tmp_path)
    sub = rd.tenant(name)
    assert sub.path.parent == rd.tenants_dir and sub.path.name not in (".", "..", "")
    assert len(sub.path.name) <= 80


def test_tenant_directories_never_collide(tmp_path):
    rd = RunDir(tmp_path)
    names = ["a/b", "a_b", "a b", "alice", "ALICE", "..", "_"]
    assert len({rd.tenant(n).path for n in names}) == len(names)


# --- database ---------------------------------------------------------------------------------------------------


def test_tenant_column_migration_is_idempotent(pg_url):
    from retrain import db

    with db.connection(pg_url) as conn:
        with conn.cursor() as cur:
            # A database from before issue 20: the column is missing.
            cur.execute("DROP INDEX IF EXISTS production_examples_tenant_idx")
            cur.execute("ALTER TABLE production_examples DROP COLUMN IF EXISTS tenant")
        conn.commit()
        db.ensure_schema(conn)
        db.ensure_schema(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT data_type, is_nullable FROM information_schema.columns "
                        "WHERE table_name = 'production_examples' AND column_name = 'tenant'")
            assert cur.fetchall() == [("text", "YES")]
            cur.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'production_examples_tenant_idx'")
            (indexdef,) = cur.fetchone()
            assert "(use_case, tenant)" in indexdef


def _prepare(tmp_path: Path, run_id: str, uc=UC) -> RunDir:
    rd = RunDir(tmp_path / run_id.replace(":", "_"))
    rd.path.mkdir(parents=True)
    write_json(rd.run_config, {"use_case": uc.model_dump(mode="json"), "run_id": run_id, "params": {}})
    return rd


def _collect(conn, rd: RunDir) -> dict:
    uc, meta = rd.load()
    return collect_examples(conn, uc.name, meta["run_id"], rd.batch, split_ratios=(uc.data.split.train,
                            uc.data.split.val), pii=uc.pii, tenant_column=uc.tenants.column)


def _month(conn, tmp_path, run_id) -> tuple[RunDir, dict]:
    rd = _prepare(tmp_path, run_id)
    _collect(conn, rd)
    return rd, build(rd.path, conn)


def _insert(conn, rows) -> None:
    insert_rows(conn, "email_voice", rows, with_tenant=True)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_collection_keeps_the_tenant_and_structured_batches_carry_none(db_conn, tmp_path):
    _insert(db_conn, email_voice.rows({"alice": 3}, seed=1, start=START)
            + [{"input": "Lunch", "model_output": None, "corrected_output": "Hi all, lunch at noon.",
                "feedback": "corrected", "created_at": START, "tenant": None}])
    rd = _prepare(tmp_path, "r1")
    assert _collect(db_conn, rd)["rows"] == 4
    assert sorted(str(r["tenant"]) for r in _read(rd.batch)) == ["None", "alice", "alice", "alice"]
    collect_examples(db_conn, "email_voice", "r2-no-column", tmp_path / "plain.jsonl")
    with db_conn.cursor() as cur:
        cur.execute("INSERT INTO production_examples (use_case, input, model_output, feedback, tenant) VALUES "
                    "('email_voice', 'later', '\"x\"', 'accepted', 'bob')")
    db_conn.commit()
    collect_examples(db_conn, "email_voice", "r3", tmp_path / "plain.jsonl")
    assert [r["tenant"] for r in _read(tmp_path / "plain.jsonl")] == [None]  # no tenant_column: null


def test_collection_refuses_a_tenant_column_that_is_not_a_plain_name(db_conn, tmp_path):
    with pytest.raises(ValueError, match="tenant column"):
        collect_examples(db_conn, "email_voice", "r", tmp_path / "b.jsonl", tenant_column="tenant; DROP TABLE x")


@pytest.mark.parametrize(("row", "reason"), [
    ({"tenant": None, "input": "Budget", "label_raw": "Dear Tom, the budget is fine."}, "no_tenant"),
    ({"tenant": "  \u200b", "input": "Budget", "label_raw": "Dear Tom, the budget is fine."}, "no_tenant"),
    ({"tenant": "t" * 500, "input": "Budget", "label_raw": "Dear Tom, the budget is fine."}, "tenant_too_long"),
    ({"tenant": "alice", "input": "Budget", "label_raw": ""}, "empty_output"),
    ({"tenant": "alice", "input": "Budget", "label_raw": "\u200b\u200c \n"}, "empty_output"),
    ({"tenant": "alice", "input": "Budget", "label_raw": "Hi"}, "output_too_short"),
    ({"tenant": "alice", "input": "Budget", "label_raw": "word " * 1000}, "output_too_long"),
    ({"tenant": "alice", "input": "Budget", "label_raw": {"body": "Dear Tom, the budget is fine."}}, "not_text"),
    ({"tenant": "alice", "input": None, "label_raw": "Dear Tom, the budget is fine."}, "empty_input"),
    ({"tenant": "alice", "input": "x" * 201, "label_raw": "Dear Tom, the budget is fine."}, "input_too_long"),
])
def test_row_contract_violations_are_named(row, reason):
    got, why = check_text_example(UC, row)
    assert got is None and why.startswith(reason), why


def test_build_rejects_with_reasons_lists_small_tenants_and_writes_tenant_runs(db_conn, tmp_path):
    rows = email_voice.rows(email_voice.DEFAULT_MIX, seed=0, start=START)
    planted = [p for r in rows for p in r["pii"]]
    assert planted  # the scrubber has something to do
    rows += [{"input": "Quarterly numbers", "model_output": None, "corrected_output": "Dear all, numbers attached.",
              "feedback": "corrected", "created_at": START, "tenant": None},
             {"input": "Empty one", "model_output": None, "corrected_output": "  ", "feedback": "corrected",
              "created_at": START, "tenant": "alice"}]
    _insert(db_conn, rows)
    rd, result = _month(db_conn, tmp_path, "scheduled__2026-11-01T03:00:00+00:00")

    rejected = {r["reason"].split(":")[0]: r for r in _read(rd.rejected)}
    assert set(rejected) == {"no_tenant", "empty_output"}
    assert "tenants.column" in rejected["no_tenant"]["reason"] or "production_examples.tenant" in \
        rejected["no_tenant"]["reason"]
    tenants = read_json(rd.tenants_manifest)
    assert (tenants["min_examples"], tenants["recommended_examples"]) == (50, 200)
    dan = tenants["tenants"]["dan"]
    assert not dan["eligible"] and "20 examples" in dan["reason"] and "min_examples=50" in dan["reason"]
    assert not rd.tenant("dan").path.exists()
    assert result["eligible"] == ["alice", "bob", "carmen"]
    for name in result["eligible"]:
        entry = tenants["tenants"][name]
        assert entry["eligible"] and entry["reason"] is None and "recommended_examples=200" in entry["warning"]
        assert entry["train"] + entry["val"] + entry["test"] == 120 and entry["test"] > 0
        sub = rd.tenant(name)
        config = read_json(sub.run_config)
        assert config["run_id"] == f"scheduled__2026-11-01T03:00:00+00:00#tenant-{name}"
        assert config["tenant"] == {"name": name, "parent_run_dir": str(rd.path),
                                    "parent_run_id": "scheduled__2026-11-01T03:00:00+00:00"}
        uc, _ = sub.load()
        assert uc.name == "email_voice"
        lines = _read(sub.split("train"))
        assert len(lines) == entry["train"]
        roles = [m["role"] for m in lines[0]["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert lines[0]["messages"][1]["content"].startswith("Write a professional email about: ")
        assert read_json(sub.manifest)["counts"]["train"] == entry["train"]
    # The subject alone never decides the split for one tenant but not another (same content hash).
    # Personal data planted in bodies is scrubbed before the split files exist.
    text = "".join(rd.tenant(t).split(s).read_text() for t in result["eligible"] for s in ("train", "val", "test"))
    assert not [p for p in planted if p in text]
    assert "[EMAIL]" in text or "[PHONE]" in text
    manifest = read_json(rd.manifest)
    assert manifest["counts"]["rejected"] == 2 and manifest["counts"]["tenants_eligible"] == 3
    assert manifest["counts"]["train"] == sum(tenants["tenants"][t]["train"] for t in result["eligible"])

    # A retry of the same run rewrites the same files and counts the same new rows.
    before = {p: p.read_bytes() for t in result["eligible"] for p in rd.tenant(t).path.glob("*.jsonl")}
    again = build(rd.path, db_conn)
    assert again["new_rows"] == result["new_rows"] > 0 and again["eligible"] == result["eligible"]
    assert {p: p.read_bytes() for p in before} == before


def _split_inputs(rd: RunDir, tenant: str, split: str) -> dict[str, str]:
    return {r["messages"][1]["content"]: r["messages"][2]["content"] for r in _read(rd.tenant(tenant).split(split))}


def test_test_set_only_grows_and_keeps_its_bodies(db_conn, tmp_path):
    _insert(db_conn, email_voice.rows({"alice": 80, "bob": 60}, seed=5, start=START))
    rd1, _ = _month(db_conn, tmp_path, "m1")
    test1 = _split_inputs(rd1, "alice", "test")
    assert test1
    # Month 2: more e-mails, and alice rewrote the body of every e-mail already in her test set.
    rewritten = [{"input": rd1.load()[0].extract_input(subject), "model_output": None,
                  "corrected_output": "Dear Laura, this is a rewritten body that must not enter the frozen test set.",
                  "feedback": "corrected", "created_at": START, "tenant": "alice"} for subject in test1]
    _insert(db_conn, email_voice.rows({"alice": 160, "bob": 60}, seed=6, start=START) + rewritten)
    rd2, result2 = _month(db_conn, tmp_path, "m2")
    test2 = _split_inputs(rd2, "alice", "test")
    assert set(test1) <= set(test2) and len(test2) > len(test1)
    assert {k: test2[k] for k in test1} == test1
    # No subject of anyone's test set is in anyone's training data.
    trained = {s for t in result2["eligible"] for s in _split_inputs(rd2, t, "train")}
    tested = {s for t in result2["eligible"] for s in _split_inputs(rd2, t, "test")}
    assert not trained & tested


def test_two_tenants_with_the_same_subject_are_two_examples():
    assert example_hash("alice", "Budget") != example_hash("bob", "Budget")
    assert example_hash("alice", "Budget  review") == example_hash("alice", "budget review")
    assert example_hash("Alice", "Budget") != example_hash("alice", "Budget")


def test_build_refuses_a_structured_run(db_conn, tmp_path):
    from retrain.data.dataset import DatasetError

    rd = _prepare(tmp_path, "s", load_use_case("product_intent"))
    rd.batch.write_text("")
    with pytest.raises(DatasetError, match="kind structured"):
        build(rd.path, db_conn)


# --- synthetic voices ------------------------------------------------------------------------------------------


def _greeting(body: str) -> str:
    first = body.splitlines()[0]
    return re.split(r"\s+[A-Z][a-zí]+[,!]$", first)[0]


def test_generator_is_deterministic_and_voices_are_distinct():
    a = email_voice.rows(email_voice.DEFAULT_MIX, seed=3, start=START)
    assert a == email_voice.rows(email_voice.DEFAULT_MIX, seed=3, start=START)
    assert a != email_voice.rows(email_voice.DEFAULT_MIX, seed=4, start=START)
    by = {t: [r for r in a if r["tenant"] == t] for t in email_voice.DEFAULT_MIX}
    assert {t: len(v) for t, v in by.items()} == email_voice.DEFAULT_MIX
    greetings = {t: {_greeting(r["corrected_output"]) for r in v} for t, v in by.items()}
    signoffs = {t: {r["corrected_output"].split("\n\n")[-1] for r in v} for t, v in by.items()}
    for t, u in ((t, u) for t in by for u in by if t < u):
        assert not greetings[t] & greetings[u], (t, u)
        assert not signoffs[t] & signoffs[u], (t, u)
    assert greetings["alice"] == set(email_voice.voices()["alice"].greeting_words)
    words = {t: [len(r["corrected_output"].split()) for r in v] for t, v in by.items()}
    assert all(40 <= n <= 120 for v in words.values() for n in v)
    mean = {t: sum(v) / len(v) for t, v in words.items()}
    assert mean["alice"] > mean["carmen"] > mean["bob"]
    # Formality markers: bob contracts, alice never does; carmen writes Spanish.
    assert all("'" not in r["corrected_output"] for r in by["alice"])
    assert sum("'" in r["corrected_output"] for r in by["bob"]) > 60
    assert sum(bool(re.search(r"\b(pero|gracias|te|el)\b", r["corrected_output"])) for r in by["carmen"]) == 120
    # Recurring phrases: each writer repeats one of its own in every e-mail.
    for t, v in by.items():
        phrases = email_voice.voices()[t].phrases
        assert all(any(p in r["corrected_output"] for p in phrases) for r in v)
    # Subjects come from one pool: every writer covers every topic, so the subject does not name the writer.
    for t in ("alice", "bob", "carmen"):
        assert all(r["input"] in email_voice.SUBJECTS for r in by[t])
        assert len({email_voice.topic_of(r["input"]) for r in by[t]}) == 12
    assert len({r["input"] for r in by["alice"]}) == 120  # no repeated subject for one writer


def test_dirty_rows_are_planted_and_named():
    rows = email_voice.rows({"alice": 100}, seed=0, start=START, dirty=0.06)
    kinds = sorted(r["dirty"] for r in rows if r["dirty"])
    assert kinds == ["empty_body", "empty_body", "huge_body", "huge_body", "no_tenant", "no_tenant"]
    for r in rows:
        if r["dirty"]:
            _, why = check_text_example(UC, {"tenant": r["tenant"], "input": r["input"],
                                             "label_raw": r["corrected_output"]})
            assert why and why.split("_")[0] in ("no", "empty", "output"), why


def test_seed_fills_production_examples_with_tenants(db_conn):
    assert "email_voice" in supported_use_cases()
    result = seed_examples(db_conn, UC, 400, seed=0, dirty=0.0)
    assert result["inserted"] == 400
    with db_conn.cursor() as cur:
        cur.execute("SELECT tenant, count(*) FROM production_examples WHERE use_case = 'email_voice' GROUP BY 1")
        counts = dict(cur.fetchall())
    assert counts["dan"] == 20 and sum(counts.values()) == 400 and min(counts.values()) == 20
    assert sorted(counts) == ["alice", "bob", "carmen", "dan"]


# --- validation -------------------------------------------------------------------------------------------------


def test_validation_passes_on_the_demo_voices(db_conn, tmp_path):
    _insert(db_conn, email_voice.rows(email_voice.DEFAULT_MIX, seed=0, start=START))
    rd, _ = _month(db_conn, tmp_path, "v1")
    result = validate(rd.path)
    assert result["success"] and result["tenants"]["eligible"] == 3
    summary = read_json(rd.validation)
    names = {e["name"] for e in summary["expectations"]}
    assert "dataset: expect_column_values_to_be_in_set(output_language)" in names
    assert "dataset: expect_column_values_to_be_null(output_near_duplicate)" in names
    assert "tenants: expect_column_max_to_be_between(examples)" in names
    assert (rd.data_docs / "index.html").is_file()


def test_validation_fails_naming_the_expectation_on_all_empty_bodies(db_conn, tmp_path):
    rows = email_voice.rows({"alice": 60, "bob": 60}, seed=2, start=START)
    for r in rows:
        r["corrected_output"] = ""
    _insert(db_conn, rows)
    rd, result = _month(db_conn, tmp_path, "empty")
    assert result["eligible"] == [] and result["rejected_reasons"] == {"empty_output": 120}
    with pytest.raises(DataValidationError) as info:
        validate(rd.path)
    message = str(info.value)
    assert "batch: expect_column_values_to_be_null(row_defect)" in message
    assert "empty_output" in message
    assert "tenants: expect_column_max_to_be_between(examples)" in message
    failed = read_json(rd.validation)["failed"]
    assert "dataset: expect_table_row_count_to_be_between" in failed


def test_validation_catches_what_build_would_never_write(db_conn, tmp_path):
    """Split files edited by hand (or by a broken builder): PII, near-duplicates, another language."""
    _insert(db_conn, email_voice.rows({"alice": 80}, seed=9, start=START))
    rd, _ = _month(db_conn, tmp_path, "tampered")
    path = rd.tenant("alice").split("train")
    lines = _read(path)
    lines[0]["messages"][2]["content"] += " Call me on +34 612 345 678 or mail alice.m@example.com."
    for line in lines[1:]:
        line["messages"][2]["content"] = "Bonjour Madame, veuillez trouver ci-joint les documents demandés. Cordialement"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(DataValidationError) as info:
        validate(rd.path)
    message = str(info.value)
    for name in ("expect_column_values_to_be_null(output_pii)", "expect_column_values_to_be_null(output_near_duplicate)",
                 "expect_column_values_to_be_in_set(output_language)"):
        assert name in message, name
    assert "612 345 678" not in message and "alice.m@example.com" not in message
