"""End to end: retrain_product_intent with dag.test() against a real PostgreSQL server.

Month 1 on clean synthetic traffic validates; a dirty batch the month after fails validate_dataset naming the
failed expectations, and nothing downstream runs; a retry of collect replays its window; the CLI shows errors
as messages, not tracebacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import states
from retrain.schemas.use_case import load_use_case
from retrain.rundir import RunDir
from retrain.data.synthetic import seed_examples

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]



def test_monthly_dag_validates_then_rejects_a_dirty_batch(db_conn, dagbag):
    uc = load_use_case("product_intent")
    seed_examples(db_conn, uc, 600, seed=11, dirty=0.01)
    dag = dagbag.dags["retrain_product_intent"]

    run1 = dag.test(run_conf={"sample_limit": 5000, "dry_run": True})
    st1 = states(run1)
    assert {t: st1[t] for t in ("prepare_run", "collect_examples", "build_dataset", "validate_dataset",
                                "report_dataset", "choose_backend")} == dict.fromkeys(
        ["prepare_run", "collect_examples", "build_dataset", "validate_dataset", "report_dataset", "choose_backend"],
        "success",
    )
    # dry_run stops before training: everything after the branch is skipped, and the run still succeeds.
    assert {st1[t] for t in ("train_qlora", "train_openai", "register_candidate", "decide")} == {"skipped"}
    assert str(run1.state).endswith("success")
    run_dir = RunDir.for_run("product_intent", run1.run_id).path
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert counts["collected"] > 500 and 0 < counts["rejected"] < 0.05 * counts["collected"]
    assert (run_dir / "data_docs" / "index.html").stat().st_size > 1000
    assert json.loads((run_dir / "validation.json").read_text())["success"] is True
    assert json.loads((run_dir / "run_config.json").read_text())["params"]["sample_limit"] == 5000
    # No planted personal data reached any file of the run directory.
    planted = {p for r in _planted(uc, 600, seed=11) for p in r}
    blob = "\n".join(p.read_text(errors="replace") for p in run_dir.rglob("*.jsonl"))
    assert planted and not [p for p in planted if p in blob]

    # Next month: a batch where 30% of the rows are broken.
    seed_examples(db_conn, uc, 300, seed=12, dirty=0.3, start=datetime.now(timezone.utc))
    run2 = dag.test(run_conf={"dry_run": True})
    st = states(run2)
    assert st["validate_dataset"] == "failed" and st["report_dataset"] == "upstream_failed"
    summary = json.loads((RunDir.for_run("product_intent", run2.run_id).path / "validation.json").read_text())
    failed = " ".join(summary_item for summary_item in _failed_names(summary))
    assert "batch: expect_column_values_to_be_in_set(intent_type)" in failed
    # The frozen test set of month 1 is still entirely inside month 2's test set.
    test1 = (run_dir / "test.jsonl").read_text().splitlines()
    test2 = set((RunDir.for_run("product_intent", run2.run_id).path / "test.jsonl").read_text().splitlines())
    assert all(line in test2 for line in test1)


def _planted(uc, n, seed):
    from retrain.data.synthetic import generate_rows

    return [r["pii"] for r in generate_rows(uc, n, seed=seed, dirty=0.01)]


def _failed_names(summary: dict) -> list[str]:
    names = summary.get("failed") or []
    return [n if isinstance(n, str) else json.dumps(n) for n in names]


def test_prepare_run_rejects_bad_params_naming_the_field(db_conn, dagbag):
    dag = dagbag.dags["retrain_product_intent"]
    with pytest.raises(Exception) as exc:  # Airflow validates typed Params before any task runs
        dag.test(run_conf={"backend": "gpt-5"})
    assert "backend" in str(exc.value)


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(Path(sys.executable).with_name("retrain")), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_errors_are_messages_not_tracebacks(db_conn, tmp_path):
    proc = _cli("prepare", "--use-case", "nope", "--run-id", "x")
    assert proc.returncode == 2 and "unknown use case 'nope'" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("prepare", "--use-case", "product_intent", "--run-id", "x", "--param", "sample_limit=0")
    assert proc.returncode == 2 and "sample_limit" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("build", "--run-dir", str(tmp_path))
    assert proc.returncode == 1 and "run prepare_run first" in proc.stderr and "Traceback" not in proc.stderr
    proc = _cli("check-config")
    assert proc.returncode == 0 and proc.stdout.count("ok ") == len(list((Path(__file__).resolve().parents[1] / "include" / "use_cases").glob("*.yaml")))
    proc = _cli("prepare", "--use-case", "product_intent", "--run-id", "x",
                env_extra={"RETRAIN_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert proc.returncode == 1 and "cannot connect to PostgreSQL from RETRAIN_DATABASE_URL" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_empty_table_fails_validation_with_a_clear_message(db_conn, tmp_path):
    from retrain import stages
    from retrain.data.validate import DataValidationError

    run = stages.prepare_run("hr_leave", "empty-1", {})
    assert stages.collect(run["run_dir"])["rows"] == 0
    stages.build(run["run_dir"])
    with pytest.raises(DataValidationError) as exc:
        stages.validate(run["run_dir"])
    assert "expect_table_row_count_to_be_between" in str(exc.value)


def test_sql_injection_and_huge_inputs_pass_through_safely(db_conn):
    from psycopg2.extras import Json

    from retrain import stages

    uc = load_use_case("product_intent")
    seed_examples(db_conn, uc, 300, seed=5, dirty=0.0)
    label = {"intent_type": "GIFT", "budget_tier": "economic", "category": "toys", "recipient": "son",
             "context_tags": ["gift"], "priority_features": ["cheap"]}
    with db_conn.cursor() as cur:
        for text in ("'); DROP TABLE production_examples; -- regalo barato para mi hijo", "x" * 1_000_000, None):
            cur.execute("INSERT INTO production_examples (use_case, input, model_output, feedback) "
                        "VALUES ('product_intent', %s, %s, 'accepted')", (text, Json(label)))
    db_conn.commit()
    run = stages.prepare_run("product_intent", "inject-1", {})
    stages.collect(run["run_dir"])
    built = stages.build(run["run_dir"])
    assert built["rejected_reasons"].get("input_too_long") == 1 and built["rejected_reasons"].get("empty_input") == 1
    assert stages.validate(run["run_dir"])["success"]
    lines = Path(run["run_dir"], "train.jsonl").read_text() + Path(run["run_dir"], "test.jsonl").read_text() + \
        Path(run["run_dir"], "val.jsonl").read_text()
    assert "DROP TABLE production_examples" in lines
    with db_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM production_examples")
        assert cur.fetchone()[0] == 303


def _one_label_month(uc, n: int, seed: int, label: str = "GIFT", share: float = 0.9) -> list[dict]:
    """Next month's traffic where ``share`` of the rows carry one intent (an upstream bug or a campaign)."""
    from retrain.data.synthetic import generate_rows

    rows = list(generate_rows(uc, n, seed=seed, dirty=0.0, start=datetime.now(timezone.utc)))
    for i, row in enumerate(rows):
        if i < share * n:
            for key in ("model_output", "corrected_output"):
                if isinstance(row.get(key), dict):
                    row[key] = {**row[key], "intent_type": label}
    return rows


def test_a_month_where_one_label_dominates_warns_in_the_run_summary(db_conn, dagbag, capsys):
    from retrain.cli.demo import print_run_summary
    from retrain.data.synthetic import insert_rows

    uc = load_use_case("product_intent")
    seed_examples(db_conn, uc, 600, seed=21, dirty=0.0)
    dag = dagbag.dags["retrain_product_intent"]
    assert str(dag.test(run_conf={"dry_run": True}).state).endswith("success")
    insert_rows(db_conn, uc.name, _one_label_month(uc, 400, seed=22))
    run = dag.test(run_conf={"dry_run": True})
    assert str(run.state).endswith("success")  # drift warns by default (data.drift.action: warn)
    run_dir = RunDir.for_run("product_intent", run.run_id).path
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["drift"]["status"] in ("warn", "fail") and summary["drift"]["warnings"], summary["drift"]
    assert any("intent_type" in w for w in summary["drift"]["warnings"])
    print_run_summary(run_dir, {"dag_id": dag.dag_id, "run_id": run.run_id, "state": "success", "seconds": 1}, 1.0)
    assert "DRIFT        : intent_type" in capsys.readouterr().out


def test_a_month_with_nothing_new_does_not_train(db_conn, dagbag):
    from retrain.registry import runs

    uc = load_use_case("product_intent")
    seed_examples(db_conn, uc, 400, seed=31, dirty=0.0)
    dag = dagbag.dags["retrain_product_intent"]
    assert str(dag.test(run_conf={"dry_run": True}).state).endswith("success")
    run = dag.test(run_conf={"dry_run": False})  # no new rows since: the branch stops before training
    st = states(run)
    assert st["choose_backend"] == "success" and str(run.state).endswith("success")
    assert {st[t] for t in ("train_qlora", "train_openai", "register_candidate", "decide", "backup_to_s3")} == {"skipped"}
    rows = runs.latest_runs(db_conn, 10, "product_intent")
    row = next(r for r in rows if r["run_id"] == run.run_id)
    assert row["status"] == "no_new_data", [(r["run_id"], r["status"], r["stages"]) for r in rows]
    assert row["status"] == "no_new_data" and "force_retrain" in (row["error"] or "") + json.dumps(row)
