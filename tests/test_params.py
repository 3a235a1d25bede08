"""The trigger form: generated from RunParams, valid by default, one broken YAML never hides the other use cases,
errors a retry cannot fix fail at once, and a first unpause never starts training."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from retrain.schemas.run_params import RunParams, form_fields
from retrain.schemas.use_case import Limits, list_use_cases

REPO = Path(__file__).resolve().parents[1]
GOOD = yaml.safe_load((REPO / "include" / "use_cases" / "product_intent.yaml").read_text())


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def _bag(directory: Path, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(directory))
    return DagBag(str(REPO / "dags" / "retrain_use_cases.py"))


# --- A: the form comes from RunParams ----------------------------------------------------------------------------


def test_every_run_param_is_a_form_field_with_its_schema(bag):
    dag = bag.dags["retrain_product_intent"]
    assert list(dag.params.keys()) == list(RunParams.model_fields)
    schema = {k: dag.params.get_param(k).schema for k in dag.params.keys()}
    assert schema["sample_limit"]["type"] == ["null", "integer"] and schema["sample_limit"]["minimum"] == 1
    assert schema["sample_limit"]["maximum"] == Limits().sample_limit
    assert schema["max_train_steps"]["maximum"] == Limits().max_steps
    assert schema["max_cost_usd"]["maximum"] == Limits().max_cost_usd
    assert schema["backend"]["enum"] == [None, "qlora", "openai"]
    assert schema["min_score"]["minimum"] == 0 and schema["min_score"]["maximum"] == 1
    assert schema["dry_run"]["type"] == "boolean" and schema["force_retrain"]["type"] == "boolean"
    # Defaults of the mirrored fields are the use case's own values.
    assert dag.params["min_score"] == GOOD["thresholds"]["min_score"]
    assert dag.params["min_relative_improvement"] == GOOD["thresholds"]["min_relative_improvement"]
    assert dag.params["require_significance"] is False  # not in the YAML: the model's default
    assert dag.params["backend"] == GOOD["training"]["backend"] and dag.params["adapter"] == "qlora"
    assert dag.params["max_cost_usd"] is None  # not in the YAML: empty = the use case's (model's) default
    assert dag.params["base_model"] is None and dag.params["gate_override_reason"] is None


def test_limits_in_the_yaml_move_the_form_maxima():
    spec = {**GOOD, "limits": {"max_steps": 250_000, "sample_limit": "lots"}}
    fields = form_fields(spec)
    assert fields["max_train_steps"]["maximum"] == 250_000
    assert fields["sample_limit"]["maximum"] == Limits().sample_limit  # unusable value: the default bound


def test_dag_file_declares_no_param_and_reads_no_environment():
    source = (REPO / "dags" / "retrain_use_cases.py").read_text()
    assert "Param(" not in source and "os.environ" not in source and "def _params" not in source
    body = [ln for ln in source.split('"""', 2)[2].splitlines() if ln.strip() and not ln.strip().startswith("#")]
    # wiring only: ~20 tasks of one or two lines each plus their docstrings; it grew with the OpenAI sweep and review
    assert len(body) <= 190, len(body)


# --- B: the default form is valid ---------------------------------------------------------------------------------


@pytest.mark.parametrize("use_case", list_use_cases())
def test_default_trigger_form_validates_and_every_field_is_described(bag, use_case):
    dag = bag.dags[f"retrain_{use_case}"]
    resolved = dag.params.validate()  # Airflow's own validation of every default (what enables "Trigger")
    assert resolved["base_model"] is None and resolved["sample_limit"] is None
    for key in dag.params.keys():
        param = dag.params.get_param(key)
        assert param.description and param.schema.get("title"), key
        param.resolve(param.value)  # each default alone
    # Optional fields are nullable: clearing one in the form is valid.
    for key in ("base_model", "sample_limit", "max_train_steps", "training_overrides", "gate_override_reason"):
        assert dag.params.get_param(key).resolve(None) is None


# --- C: one broken file, every other DAG loads -------------------------------------------------------------------

BROKEN = {
    "training_not_a_mapping": ({"training": "qlora"}, "training"),
    "cost_not_a_number": ({"training": {**GOOD["training"], "max_cost_usd": "ten"}}, "training.max_cost_usd"),
    "score_out_of_range": ({"thresholds": {**GOOD["thresholds"], "min_score": 2}}, "thresholds.min_score"),
    "limits_not_numbers": ({"limits": {"max_steps": "many"}}, "limits.max_steps"),
    "not_yaml": (None, "not valid YAML"),
}


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_a_broken_use_case_file_fails_its_first_task_only(tmp_path, monkeypatch, variant):
    from airflow.sdk.exceptions import AirflowFailException

    changes, field = BROKEN[variant]
    (tmp_path / "good_case.yaml").write_text(yaml.safe_dump({**GOOD, "name": "good_case"}))
    broken = tmp_path / "bad_case.yaml"
    if changes is None:
        broken.write_text("name: bad_case\ndescription: [oops\n")
    else:
        broken.write_text(yaml.safe_dump({**GOOD, "name": "bad_case", **changes}))
    bag = _bag(tmp_path, monkeypatch)
    assert bag.import_errors == {}
    assert {"retrain_good_case", "retrain_bad_case"} <= set(bag.dags)
    good = bag.dags["retrain_good_case"]
    good.params.validate()
    bad = bag.dags["retrain_bad_case"]
    bad.params.validate()  # the default form of the broken use case still validates: prepare_run reports
    prepare = bad.get_task("prepare_run").python_callable
    with pytest.raises(AirflowFailException) as exc:
        prepare(params=dict(bad.params.validate()), run_id="manual__broken", dag_run=SimpleNamespace(run_type="manual"))
    message = str(exc.value)
    assert str(broken) in message and field in message, message
    assert "\n" not in message


# --- D: errors a retry cannot fix fail at once --------------------------------------------------------------------


def test_fail_fast_only_for_errors_a_retry_cannot_fix():
    from airflow.sdk.exceptions import AirflowFailException

    from retrain.dagtasks import fail_fast
    from retrain.data.dataset import DatasetError
    from retrain.db import DatabaseError
    from retrain.schemas.use_case import ConfigError

    def raising(exc):
        return fail_fast(lambda: (_ for _ in ()).throw(exc))

    for exc in (ConfigError("a.yaml is invalid:\n  - x: bad\nFix the file"), DatasetError("too few rows")):
        with pytest.raises(AirflowFailException) as info:
            raising(exc)()
        assert "\n" not in str(info.value) and type(exc).__name__ in str(info.value)
    with pytest.raises(DatabaseError):  # an outage keeps its retries
        raising(DatabaseError("cannot connect"))()
    with pytest.raises(KeyError):  # a bug keeps its traceback
        raising(KeyError("x"))()


def test_every_task_of_the_retrain_dag_fails_fast(bag):
    from retrain.dagtasks import fail_fast

    dag = bag.dags["retrain_product_intent"]
    for t in dag.tasks:
        if t.task_id in ("train_openai", "approve_deployment"):  # operators: no Python body to wrap
            continue
        assert t.python_callable.__code__ is fail_fast(lambda: None).__code__, t.task_id
    # No task needs retries=0 any more: validate_dataset's failed expectations fail fast, outages are retried.
    assert dag.get_task("validate_dataset").retries == 2


def test_cli_prints_one_line_for_a_param_the_form_rejects(bag):
    from airflow.sdk.definitions.param import ParamValidationError

    from retrain.errors import is_user_error, one_line

    dag = bag.dags["retrain_product_intent"]
    params = copy.deepcopy(dag.params)
    with pytest.raises(ParamValidationError) as info:
        params["sample_limit"] = -5  # what dag.test(run_conf=...) / the trigger form do with a bad value
    assert is_user_error(info.value)
    line = one_line(info.value)
    assert line == "Invalid input for param sample_limit: -5 is less than the minimum of 1", line
    assert "\n" not in line and "Failed validating" not in line


# --- G: a first unpause never starts training --------------------------------------------------------------------


def test_new_dags_start_paused_and_a_stale_scheduled_run_is_skipped(bag):
    from airflow.sdk.exceptions import AirflowSkipException
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    from retrain.dagtasks import STALE_AFTER, is_stale_scheduled_run

    dag = bag.dags["retrain_product_intent"]
    assert dag.is_paused_upon_creation is True and dag.catchup is False and dag.max_active_runs == 1
    # What Airflow schedules when a fresh DAG is unpaused: the latest tick at or before now (catchup=False)...
    info = LazyDeserializedDAG.from_dag(dag).next_dagrun_info(last_automated_run_info=None)
    now = datetime.now(timezone.utc)
    if info.run_after <= now:
        # ... which, created later than STALE_AFTER after its tick, is skipped in its first task.
        late = info.run_after + STALE_AFTER + timedelta(minutes=1)
        scheduled = SimpleNamespace(run_type="scheduled", run_after=info.run_after, logical_date=info.run_after)
        assert is_stale_scheduled_run(scheduled, late)
        assert not is_stale_scheduled_run(scheduled, info.run_after + timedelta(minutes=5))
    stale = SimpleNamespace(run_type="scheduled", run_after=now - timedelta(days=2), logical_date=now - timedelta(days=2))
    with pytest.raises(AirflowSkipException, match="trigger the DAG"):
        dag.get_task("prepare_run").python_callable(params={}, run_id="scheduled__old", dag_run=stale)
    # Manual runs are never stale, whatever their date.
    assert not is_stale_scheduled_run(SimpleNamespace(run_type="manual", run_after=now - timedelta(days=40)))
