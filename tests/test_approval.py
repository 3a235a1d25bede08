"""Human approval before deploy (issue 18): the policy (YAML ``approval`` and the run's ``approval`` Param), the
DAG's approval task (Airflow's HITLBranchOperator, parked in awaiting_input: no worker slot), decide's three
branches, and what the registry records after a reviewer's Deploy or Reject.

End to end: the real monthly DAG with dag.test() (its heavy stages replaced by fakes) waits for the reviewer, who
answers through Airflow's real REST endpoint (PATCH .../hitlDetails, in process); and, marked ``stack``, the real
stack with a trained candidate.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from retrain import approval
from retrain.rundir import RunDir, write_json
from retrain.schemas.base import ConfigError
from stack_helpers import api, stack  # noqa: F401 - fixtures of the stack test

UC = "product_intent"
DAG_ID = f"retrain_{UC}"
REPO = Path(__file__).resolve().parents[1]
GO_SUMMARY = "GO: intent accuracy 0.931 vs 0.000 (base model); all 6 required checks passed"


# --- policy ------------------------------------------------------------------------------------------------------


def test_use_case_option_defaults_to_none_and_a_typo_names_the_field():
    from retrain.schemas.use_case import load_use_case, parse_use_case

    uc = load_use_case(UC)
    assert uc.approval == "none"
    data = uc.model_dump()
    assert parse_use_case({**data, "approval": "required"}).approval == "required"
    with pytest.raises(ConfigError, match="approval"):
        parse_use_case({**data, "approval": "yes"})


def test_run_param_is_a_form_field():
    from retrain.schemas.run_params import form_fields, parse_run_params

    field = form_fields({})["approval"]
    assert field["default"] == "use_case" and field["enum"] == ["use_case", "required", "none"]
    assert parse_run_params({}).approval == "use_case"
    with pytest.raises(ConfigError, match="approval"):
        parse_run_params({"approval": "maybe"})


@pytest.mark.parametrize("yaml_value, requested, reason, required", [
    ("none", "use_case", None, False),
    ("required", "use_case", None, True),
    ("none", "required", None, True),  # a run may require approval the YAML does not
    ("required", "required", None, True),
    ("none", "none", None, False),
])
def test_policy_without_a_waiver(yaml_value, requested, reason, required):
    assert approval.resolve(yaml_value, requested, reason=reason, by="alice") == (required, [])


def test_waiving_a_required_approval_needs_a_reason_and_is_recorded_as_an_override():
    with pytest.raises(ConfigError, match="gate_override_reason"):
        approval.resolve("required", "none", reason=None, by="alice")
    required, overrides = approval.resolve("required", "none", reason="hotfix, reviewed in INC-42", by="alice")
    assert required is False
    assert overrides == [{"threshold": "approval", "floor": "required", "value": "none", "by": "alice",
                          "reason": "hotfix, reviewed in INC-42"}]


def test_prepare_run_refuses_a_silent_waiver_and_records_a_reasoned_one(pg_url, home, tmp_path, monkeypatch):
    import yaml

    from retrain import stages

    cases = tmp_path / "use_cases"
    cases.mkdir()
    data = yaml.safe_load((REPO / "include" / "use_cases" / f"{UC}.yaml").read_text())
    (cases / f"{UC}.yaml").write_text(yaml.safe_dump({**data, "approval": "required"}))
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(cases))
    with pytest.raises(ConfigError, match="approval=none waives the use case's approval: required"):
        stages.prepare_run(UC, "manual__waive0", {"approval": "none"}, triggered_by="alice")
    run = stages.prepare_run(UC, "manual__waive1", {"approval": "none", "gate_override_reason": "INC-42 hotfix"},
                             triggered_by="alice")
    config = json.loads(RunDir(run["run_dir"]).run_config.read_text())
    assert config["approval_required"] is False
    assert config["gate_overrides"] == [{"threshold": "approval", "floor": "required", "value": "none",
                                         "by": "alice", "reason": "INC-42 hotfix"}]
    run = stages.prepare_run(UC, "manual__yaml", {}, triggered_by="alice")
    config = json.loads(RunDir(run["run_dir"]).run_config.read_text())
    assert config["approval_required"] is True and config["gate_overrides"] == []


# --- a prepared run directory (what decide leaves behind) --------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("RETRAIN_HOME", str(path))
    return path


def _fake_merged(root: Path, name: str) -> Path:
    d = root / "artifacts" / name / "merged"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(name.encode() * 100)
    return d


def _write_gate_outputs(rd: RunDir, decision: str = "GO", overrides: list | None = None) -> None:
    """decision.json, metrics.json and the report, as evaluate_candidate and decide write them."""
    rd.evaluation.mkdir(parents=True, exist_ok=True)
    write_json(rd.metrics, {"comparison": {"metrics": {
        "primary_score": {"baseline": 0.0, "candidate": 0.931},
        "json_validity": {"baseline": 0.425, "candidate": 1.0}}}})
    summary = GO_SUMMARY if decision == "GO" else "NO-GO: intent accuracy 0.931 vs 0.931; failed min_relative_improvement"
    write_json(rd.decision, {"decision": decision, "summary": summary, "primary_label": "intent",
                             "baseline_kind": "base_model", "overrides": overrides or [],
                             "checks": [{"name": "min_score", "required": True, "passed": decision == "GO",
                                         "reason": "intent accuracy 0.931 >= 0.85"}]})
    rd.report_html.write_text("<html>report</html>")


def _prepared_run(conn, home: Path, run_id: str, *, approval_required: bool, decision: str = "GO") -> RunDir:
    from retrain.registry import store as registry
    from retrain.schemas.use_case import load_use_case

    rd = RunDir.for_run(UC, run_id)
    rd.path.mkdir(parents=True)
    write_json(rd.run_config, {"run_id": run_id, "params": {}, "use_case": load_use_case(UC).model_dump(mode="json"),
                               "triggered_by": "alice", "gate_overrides": [], "approval_required": approval_required})
    row = registry.register_candidate(conn, use_case=UC, run_id=run_id, backend="qlora",
                                      base_model="smollm2-135m-instruct", artifact=str(_fake_merged(home, run_id)))
    rd.candidate.mkdir(parents=True, exist_ok=True)
    write_json(rd.registered, {"version": row["version"]})
    _write_gate_outputs(rd, decision)
    return rd


@pytest.fixture
def conn(db_conn, home):
    return db_conn


def _events(conn, version: int) -> list[dict]:
    from retrain.registry import store as registry

    conn.rollback()
    return [e for e in registry.history(conn, UC) if e["version"] == version]


def _pipeline_row(conn, run_id: str) -> dict:
    from retrain.registry import runs

    conn.rollback()
    return next(r for r in runs.latest_runs(conn, 50, UC) if r["run_id"] == run_id)


def _review(choice: str, name: str | None = "alice", comment: str = "") -> dict:
    return approval.review_record({
        "chosen_options": [choice], "params_input": {"comment": comment},
        "responded_by_user": {"id": "7", "name": name} if name else None,
        "responded_at": "2026-12-03T12:00:00+00:00"})


# --- the request and decide's branches -----------------------------------------------------------------------------


def test_request_names_the_decision_key_metrics_overrides_and_links(conn, home):
    rd = _prepared_run(conn, home, "manual__req", approval_required=True)
    override = {"threshold": "min_score", "floor": 0.85, "value": 0.5, "by": "alice", "reason": "new label set"}
    _write_gate_outputs(rd, "GO", [override])
    from retrain import stages

    request = stages.approval_request(rd.path, dag_id=DAG_ID, run_id="manual__req")
    assert request["subject"] == f"Deploy {UC} v{rd.registered_version()}? The gate says GO"
    body = request["body"]
    assert GO_SUMMARY in body
    assert "| primary score (intent) | 0.000 | 0.931 |" in body and "| JSON validity | 0.425 | 1.000 |" in body
    assert "threshold min_score loosened from 0.85 to 0.5 by alice: new label set" in body
    link = f"/retrain/files/{UC}/{rd.path.name}/evaluation/report.html"
    assert request["report"] == link and f"]({link})" in body
    assert request["ui"] == f"/dags/{DAG_ID}/runs/manual__req/tasks/approve_deployment/required_actions"
    assert "No answer within 7 days counts as Reject" in body
    assert _pipeline_row(conn, "manual__req")["status"] == "awaiting_approval"
    # The plugin serves the report at that link (same rule as its _file_link).
    assert _plugin()._file_link(rd.report_html) == link


def _plugin():
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrain_ui_for_approval", REPO / "plugins" / "retrain_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_request_when_approval_is_not_required(conn, home):
    from retrain import stages

    rd = _prepared_run(conn, home, "manual__none", approval_required=False)
    assert stages.approval_request(rd.path, dag_id=DAG_ID, run_id="manual__none") is None


class _TI:
    def __init__(self, xcoms: dict | None = None):
        self.pushed: dict = {}
        self.xcoms = xcoms or {}

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key="return_value"):
        return self.xcoms.get((task_ids, key))


@pytest.mark.parametrize("decision, required, branch", [
    ("GO", True, "approve_deployment"),
    ("GO", False, "deploy_model"),
    ("NO-GO", True, "reject_candidate"),  # a NO-GO needs nobody's approval
    ("NO-GO", False, "reject_candidate"),
])
def test_decide_branches(bag, conn, home, monkeypatch, decision, required, branch):
    from retrain import stages

    run_id = f"manual__{decision}_{required}"
    rd = _prepared_run(conn, home, run_id, approval_required=required, decision=decision)
    monkeypatch.setattr(stages, "decide", lambda run_dir: {"decision": rd.read_decision()["decision"]})
    ti = _TI()
    task = bag.dags[DAG_ID].get_task("decide")
    out = task.python_callable(run={"run_dir": str(rd.path)}, dag_run=SimpleNamespace(dag_id=DAG_ID, run_id=run_id),
                               ti=ti)
    assert out == branch
    if branch == "approve_deployment":
        assert ti.pushed[approval.REQUEST_KEY]["subject"].startswith(f"Deploy {UC} v")
    else:
        assert ti.pushed == {}


# --- the DAG and the operator ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def test_dag_shape(bag):
    from airflow.providers.standard.operators.hitl import HITLBranchOperator

    dag = bag.dags[DAG_ID]
    task = dag.get_task("approve_deployment")
    assert isinstance(task, HITLBranchOperator)  # retrain.approval.ReviewBranchOperator
    assert task.options == ["Deploy", "Reject"] and task.multiple is False
    assert task.options_mapping == {"Deploy": "deploy_model", "Reject": "reject_candidate"}
    assert task.defaults == ["Reject"]  # no answer in time: production stays
    assert task.response_timeout == approval.RESPONSE_TIMEOUT
    assert task.execution_timeout is not None and task.retries >= 1
    assert set(task.params) == {"comment"}  # the run's Params are not part of the reviewer's form
    down = {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks}
    assert down["decide"] == ["approve_deployment", "deploy_model", "reject_candidate"]
    assert down["approve_deployment"] == ["deploy_model", "reject_candidate"]
    for t in ("deploy_model", "reject_candidate"):
        assert down[t] == ["backup_to_s3"]
        # one of their upstreams (decide's direct branch or the review) is always skipped; prepare_run is not one
        assert dag.get_task(t).trigger_rule == "none_failed_min_one_success"
        assert sorted(dag.get_task(t).upstream_task_ids) == ["approve_deployment", "decide"]


def _context(task, ti) -> dict:
    ti.task = task
    return {"task": task, "ti": ti, "task_instance": ti}


def test_the_approval_task_parks_in_awaiting_input_holding_no_worker_slot(bag, monkeypatch):
    """On Airflow 3.3 the operator writes the request and raises TaskAwaitingInput: the worker lets go of the task
    (state awaiting_input), no trigger is created, nothing polls."""
    import airflow.providers.standard.operators.hitl as hitl
    from airflow.sdk.exceptions import TaskAwaitingInput

    written = {}
    monkeypatch.setattr(hitl, "upsert_hitl_detail", lambda **kw: written.update(kw))
    monkeypatch.setattr(hitl.HITLOperator, "defer", lambda *a, **k: pytest.fail("deferred to a trigger"))
    task = bag.dags[DAG_ID].get_task("approve_deployment")
    request = {"subject": "Deploy product_intent v3? The gate says GO", "body": "**GO** ...", "ui": "/x"}
    ti = _TI({("decide", approval.REQUEST_KEY): request})
    ti.id = "0195c0de-0000-7000-8000-000000000001"
    ctx = _context(task, ti)
    started = time.monotonic()
    with pytest.raises(TaskAwaitingInput) as info:
        task.execute(ctx)
    assert time.monotonic() - started < 5  # returns at once: no waiting inside the worker
    assert info.value.method_name == "execute_complete" and info.value.timeout == approval.RESPONSE_TIMEOUT
    assert written["subject"] == request["subject"] and written["body"] == request["body"]
    assert written["options"] == ["Deploy", "Reject"] and written["defaults"] == ["Reject"]
    assert set(written["params"]) == {"comment"}


@pytest.mark.parametrize("choice, user, branch", [("Reject", {"id": "7", "name": "alice"}, "reject_candidate"),
                                                  ("Deploy", {"id": "8", "name": "bob"}, "deploy_model"),
                                                  ("Reject", None, "reject_candidate")])  # the timeout default
def test_the_answer_branches_and_is_pushed_as_the_review(bag, monkeypatch, choice, user, branch):
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    task = bag.dags[DAG_ID].get_task("approve_deployment")
    followed = []

    def skip_all_except(self, ti, ids):
        # As in Airflow 3: skipping the other branch ends the task's execution with this exception.
        followed.append(list(ids))
        raise DownstreamTasksSkipped(tasks=[t for t in approval.OPTIONS_MAPPING.values() if t not in ids])

    monkeypatch.setattr(type(task), "skip_all_except", skip_all_except)
    ti = _TI()
    ctx = _context(task, ti)
    event = {"chosen_options": [choice], "params_input": {"comment": "  accuracy looks right  "},
             "responded_at": datetime(2026, 12, 3, 12, tzinfo=timezone.utc), "responded_by_user": user,
             "timedout": user is None}
    with pytest.raises(DownstreamTasksSkipped):
        task.execute_complete(ctx, event)
    assert followed == [[branch]]
    review = ti.pushed[approval.REVIEW_KEY]
    assert review == {"choice": choice, "branch": branch, "reviewer": user, "comment": "accuracy looks right",
                      "responded_at": "2026-12-03T12:00:00+00:00", "timed_out": user is None}
    json.dumps(review)  # XCom-safe


# --- what the registry records --------------------------------------------------------------------------------------


def test_a_reviewers_reject_records_reviewer_and_comment(conn, home):
    from retrain import stages

    rd = _prepared_run(conn, home, "manual__rej", approval_required=True)
    review = _review("Reject", "alice", "entity F1 dropped on German queries")
    out = stages.reject_candidate(rd.path, actor=f"airflow:{DAG_ID}", review=review)
    assert out["status"] == "rejected" and out["review"] == review
    event = _events(conn, rd.registered_version())[-1]
    assert (event["action"], event["to_status"], event["actor"]) == ("reject", "rejected", "reviewer:alice")
    assert event["reason"] == f"rejected by alice: entity F1 dropped on German queries; gate: {GO_SUMMARY}"
    assert event["details"]["approval"] == review
    row = _pipeline_row(conn, "manual__rej")
    assert row["status"] == "rejected"
    assert row["decision_reasons"][-1] == f"review: {event['reason']}"


def test_an_approved_deploy_records_the_approver(conn, home):
    from retrain import stages

    rd = _prepared_run(conn, home, "manual__dep", approval_required=True)
    review = _review("Deploy", "bob", "")
    out = stages.deploy_candidate(rd.path, actor=f"airflow:{DAG_ID}", review=review)
    assert out["review"] == review and out["changed"] is True
    event = _events(conn, rd.registered_version())[-1]
    assert (event["action"], event["to_status"], event["actor"]) == ("promote", "production", "reviewer:bob")
    assert event["reason"] == f"approved by bob: no comment; gate: {GO_SUMMARY}"
    assert event["details"]["approval"]["reviewer"] == {"id": "7", "name": "bob"}
    assert "replaces" in event["details"]
    assert _pipeline_row(conn, "manual__dep")["status"] == "success"


def test_a_timed_out_review_rejects_in_the_pipelines_name(conn, home):
    from retrain import stages

    rd = _prepared_run(conn, home, "manual__late", approval_required=True)
    stages.reject_candidate(rd.path, actor=f"airflow:{DAG_ID}", review=_review("Reject", None))
    event = _events(conn, rd.registered_version())[-1]
    assert event["actor"] == f"airflow:{DAG_ID}"
    assert event["reason"].startswith("rejected: no reviewer answered within 7 days; gate: GO:")


def test_without_a_review_nothing_changes(conn, home):
    from retrain import stages

    rd = _prepared_run(conn, home, "manual__nogo", approval_required=False, decision="NO-GO")
    stages.reject_candidate(rd.path, actor=f"airflow:{DAG_ID}")
    event = _events(conn, rd.registered_version())[-1]
    assert event["actor"] == f"airflow:{DAG_ID}" and event["reason"].startswith("NO-GO:")
    assert event["details"] == {}
    assert _pipeline_row(conn, "manual__nogo")["status"] == "no_go"


# --- the UI page -------------------------------------------------------------------------------------------------


def test_ui_shows_a_run_waiting_for_approval_then_the_review(conn, home):
    from retrain import stages

    ui = _plugin()
    rd = _prepared_run(conn, home, "manual__ui", approval_required=True)
    stages.approval_request(rd.path, dag_id=DAG_ID, run_id="manual__ui")
    data = ui.overview(UC)
    run = next(r for r in data["runs"] if r["run_id"] == "manual__ui")
    link = f"/dags/{DAG_ID}/runs/manual__ui/tasks/approve_deployment/required_actions"
    assert run["status"] == "awaiting_approval" and run["approval_link"] == link
    html = ui.render_page(data)
    assert f'<a class="approval" href="{link}">Deploy or reject in Airflow</a>' in html
    assert '<span class="badge warn">awaiting_approval</span>' in html

    stages.reject_candidate(rd.path, actor=f"airflow:{DAG_ID}", review=_review("Reject", "alice", "too slow"))
    data = ui.overview(UC)
    run = next(r for r in data["runs"] if r["run_id"] == "manual__ui")
    assert run["status"] == "rejected" and "approval_link" not in run
    html = ui.render_page(data)
    assert "review: rejected by alice: too slow; gate: GO:" in html and 'class="approval"' not in html


# --- end to end with dag.test(): the real DAG waits, a reviewer answers through the REST API ----------------------


def _fake_heavy_stages(monkeypatch, home: Path) -> None:
    """Data, training, evaluation and the gate replaced by fakes that leave what the next stage reads;
    prepare_run, register_candidate, the approval request, the review and deploy/reject are the real ones."""
    from retrain import stages

    for name, value in (("collect", {"rows": 0, "skipped": 0, "replayed": 0}), ("build", {}), ("validate", {}),
                        ("summarize", {}), ("evaluate", {})):
        monkeypatch.setattr(stages, name, lambda run_dir, _v=value: _v)
    monkeypatch.setattr(stages, "should_train", lambda run_dir: True)

    def train(run_dir):
        rd = RunDir(run_dir)
        rd.candidate.mkdir(parents=True, exist_ok=True)
        write_json(rd.train_result, {"backend": "qlora", "merged_path": str(_fake_merged(home, rd.path.name)),
                                     "base_model": "smollm2-135m-instruct", "steps": 1})
        return {"backend": "qlora"}

    def decide(run_dir):
        _write_gate_outputs(RunDir(run_dir), "GO")
        return {"decision": "GO", "summary": GO_SUMMARY}

    monkeypatch.setattr(stages, "train_qlora", train)
    monkeypatch.setattr(stages, "decide", decide)


class _Reviewer(threading.Thread):
    """Answers the first open approval request of DAG_ID through Airflow's REST API (the api-server app, in this
    process, on the same metadata DB), as the user ``name``. If anything goes wrong it fails the DAG run through the
    same API, so dag.test() never waits forever."""

    def __init__(self, choice: str, comment: str, name: str = "alice", timeout: float = 240):
        super().__init__(daemon=True)
        self.choice, self.comment, self.name, self.timeout = choice, comment, name, timeout
        self.seen: dict = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        from fastapi.testclient import TestClient

        from airflow.api_fastapi.app import create_app
        from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
        from airflow.api_fastapi.core_api.security import get_user

        app = create_app("core")
        app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username=self.name, role="admin")
        client = TestClient(app)
        run_id = None
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                resp = client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/~/hitlDetails", params={"response_received": False})
                assert resp.status_code == 200, resp.text
                open_ = [d for d in resp.json()["hitl_details"]
                         if d["task_instance"]["task_id"] == "approve_deployment"]
                if open_:
                    run_id = open_[0]["task_instance"]["dag_run_id"]
                    if open_[0]["task_instance"]["state"] == "awaiting_input":
                        self.seen = open_[0]
                        break
                assert time.monotonic() < deadline, "no approval request appeared"
                time.sleep(0.5)
            resp = client.patch(
                f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approve_deployment/-1/hitlDetails",
                json={"chosen_options": [self.choice], "params_input": {"comment": self.comment}})
            assert resp.status_code == 200, resp.text
            self.seen["response"] = resp.json()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            if run_id:
                client.patch(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})


@pytest.mark.integration
@pytest.mark.parametrize("choice", ["Reject", "Deploy"])
def test_dag_test_waits_for_the_reviewer_and_records_the_answer(dagbag, conn, home, monkeypatch, choice):
    """Airflow 3.3's dag.test() has no argument that answers a HITL task: it parks the task in awaiting_input
    and polls the metadata DB until a response arrives from outside (sdk/definitions/dag.py). So the reviewer
    answers through the real PATCH .../hitlDetails endpoint while dag.test() waits."""
    from conftest import states

    _fake_heavy_stages(monkeypatch, home)
    dag = dagbag.dags[DAG_ID]
    comment = f"{choice.lower()}: checked the German slice"
    reviewer = _Reviewer(choice, comment)
    reviewer.start()
    run = dag.test(run_conf={"approval": "required"},
                   mark_success_pattern=r"backup_to_s3|verify_backup|prune_backups|cleanup")
    reviewer.join(timeout=30)
    assert reviewer.error is None, repr(reviewer.error)
    st = states(run)
    assert str(run.state).endswith("success"), st
    # What the reviewer saw: the parked task and decide's request.
    seen = reviewer.seen
    assert seen["task_instance"]["state"] == "awaiting_input"
    assert seen["subject"] == f"Deploy {UC} v1? The gate says GO" and GO_SUMMARY in seen["body"]
    assert seen["options"] == ["Deploy", "Reject"] and seen["defaults"] == ["Reject"]
    assert seen["response"]["responded_by"]["name"] == "alice"
    followed, skipped = ("deploy_model", "reject_candidate") if choice == "Deploy" else ("reject_candidate",
                                                                                          "deploy_model")
    assert (st["approve_deployment"], st[followed], st[skipped]) == ("success", "success", "skipped"), st
    event = _events(conn, 1)[-1]
    assert event["actor"] == "reviewer:alice", event
    verb = "approved" if choice == "Deploy" else "rejected"
    assert event["reason"] == f"{verb} by alice: {comment}; gate: {GO_SUMMARY}"
    assert event["details"]["approval"]["choice"] == choice
    assert _pipeline_row(conn, run.run_id)["status"] == ("success" if choice == "Deploy" else "rejected")


# --- the production stack (retrain stack): a trained candidate waits for a reviewer ---------------------------------

LOOSE_GATE = {"min_score": 0, "min_relative_improvement": -1, "min_json_validity": 0, "require_significance": False,
              "max_p95_latency_regression": 10, "max_slice_regression": 1,
              "gate_override_reason": "approval stack test: any candidate is a GO, a human decides"}


@pytest.fixture(scope="module")
def stack_examples(pg_url):
    from retrain import db
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    with db.connection(pg_url) as c:
        db.ensure_schema(c)
        if db.count_examples(c, UC) == 0:
            seed_examples(c, load_use_case(UC), 140, seed=11, dirty=0.0)
        c.commit()
    return pg_url


@pytest.mark.stack
@pytest.mark.slow  # trains a candidate through the real stack first (make test-all)
def test_stack_run_waits_for_a_reviewer_holding_no_slot_and_records_the_reject(stack, api, stack_examples):
    import urllib.parse

    from retrain import db
    from retrain.registry import store as registry
    from retrain.registry.runs import latest_runs

    conf = {"approval": "required", "force_retrain": True, "max_train_steps": 2,
            "training_overrides": {"eval_steps": 2, "save_steps": 2, "logging_steps": 1}, **LOOSE_GATE}
    run_id = api.trigger(conf)["dag_run_id"]
    quoted = urllib.parse.quote(run_id, safe="")
    api.wait_task(run_id, "approve_deployment", {"awaiting_input"}, timeout=2400)  # 2 steps took 15 min on a busy host
    # select_for_review (active learning) runs beside decide and may still hold a slot: let it finish first.
    api.wait_task(run_id, "select_for_review", {"success", "failed"}, timeout=1800)
    # Parked: no worker slot taken, nothing downstream started, the request is decide's.
    pool = api.get("/api/v2/pools/default_pool")
    assert pool["running_slots"] == 0 and pool["queued_slots"] == 0, pool
    tis = api.task_instances(run_id)
    assert tis["decide"]["state"] == "success"
    assert tis["deploy_model"]["state"] not in ("success", "running", "queued")
    detail = api.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/approve_deployment/-1/hitlDetails")
    assert detail["subject"].startswith(f"Deploy {UC} v") and detail["options"] == ["Deploy", "Reject"]
    assert "threshold min_score loosened" in detail["body"] and "/retrain/files/" in detail["body"]
    with db.connection(stack_examples) as c:
        row = next(r for r in latest_runs(c, 20, UC) if r["run_id"] == run_id)
    assert row["status"] == "awaiting_approval"

    comment = "stack test: 4 steps are not a production model"
    answer = api.request("PATCH", f"/api/v2/dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/approve_deployment/-1/"
                                  "hitlDetails", {"chosen_options": ["Reject"], "params_input": {"comment": comment}})
    assert answer["responded_by"]["name"] == stack.admin[0]
    done = api.wait(run_id, timeout=600)
    tis = api.task_instances(run_id)
    assert done["state"] == "success", api.diagnose(run_id)
    assert (tis["approve_deployment"]["state"], tis["reject_candidate"]["state"], tis["deploy_model"]["state"]) == (
        "success", "success", "skipped")
    with db.connection(stack_examples) as c:
        events = [e for e in registry.history(c, UC) if e["run_id"] == run_id and e["action"] == "reject"]
    assert events and events[-1]["actor"] == f"reviewer:{stack.admin[0]}"
    assert f"rejected by {stack.admin[0]}: {comment}; gate: GO:" in events[-1]["reason"]
