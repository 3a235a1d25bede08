"""Deploy and rollback: model files published under $RETRAIN_HOME/models/<use_case>/ with an atomic alias switch,
kept in step with the registry (real PostgreSQL), and the manual rollback_model DAG run with dag.test()."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from retrain import db
from retrain.registry import deploy

from retrain.registry import store as registry
from retrain.schemas.use_case import load_use_case
from retrain.registry.deploy import DeployError

UC = "product_intent"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture

def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("RETRAIN_HOME", str(path))
    return path


@pytest.fixture
def conn(db_conn, home):
    db.ensure_schema(db_conn)
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE model_events RESTART IDENTITY")
    db_conn.commit()
    return db_conn


def fake_merged(root: Path, name: str) -> Path:
    """A saved-model directory whose weights file says which model it is (deploy copies files, never loads them)."""
    d = root / "runs" / name / "candidate" / "merged"
    d.mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(name.encode() * 1000)
    return d


def _publish(use_case, version, merged_dir, *, run_id=None):
    """The file side of a deploy (what deploy.deploy does inside the registry transaction)."""
    return deploy.stage_version(use_case, version, merged_dir, run_id=run_id) | deploy.switch_production(use_case, version)


def served(use_case: str = UC) -> str:
    return (deploy.production_link(use_case) / "model.safetensors").read_bytes()[:20].decode()


def _train(conn, tmp_path, name, backend="qlora"):
    artifact = f"ft:gpt-4o-mini-2024-07-18:acme::{name}" if backend == "openai" else str(fake_merged(tmp_path, name))
    return registry.register_candidate(conn, use_case=UC, run_id=name, backend=backend,
                                       base_model="smollm2-135m-instruct", artifact=artifact)["version"]


def test_publishing_switches_the_alias_atomically_and_keeps_old_versions(home, tmp_path):
    m1, m2 = fake_merged(tmp_path, "month1"), fake_merged(tmp_path, "month2")
    first = _publish(UC, 1, m1)
    assert first["copied"] and first["switched"] and first["previous_target"] is None
    link = deploy.production_link(UC)
    assert link == home / "models" / UC / "production" and os.readlink(link) == "versions/v1"
    assert served().startswith("month1")

    # A reader polling the alias while it flips back and forth never finds it missing or half-written.
    deploy.stage_version(UC, 2, m2)
    misses, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                if (link / "config.json").read_text() != '{"model_type": "llama"}':
                    misses.append("wrong content")
            except OSError as exc:
                misses.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(200):
            deploy.switch_production(UC, 2 if i % 2 == 0 else 1)
    finally:
        stop.set()
        t.join()
    assert misses == []

    second = _publish(UC, 2, m2)
    assert os.readlink(link) == "versions/v2" and served().startswith("month2")
    assert second["copied"] is False  # staged above
    assert (home / "models" / UC / "versions" / "v1" / "model.safetensors").read_bytes().startswith(b"month1")
    retry = _publish(UC, 2, m2)
    assert (retry["copied"], retry["switched"], retry["previous_target"]) == (False, False, "versions/v2")
    assert not [p.name for p in link.parent.iterdir() if ".tmp" in p.name]  # no temp names left behind


def test_a_stale_version_dir_from_another_registry_is_replaced(home, tmp_path):
    _publish(UC, 1, fake_merged(tmp_path, "old-db"))
    # The database was recreated and v1 now means another model: serve what the registry says.
    out = _publish(UC, 1, fake_merged(tmp_path, "new-db"))
    assert out["copied"] is True and served().startswith("new-db")
    assert sorted(p.name for p in (home / "models" / UC / "versions").iterdir()) == ["v1"]


def test_deploy_refuses_a_missing_model_with_a_clear_message(home, tmp_path):
    with pytest.raises(DeployError, match="is not a saved model \\(no config.json\\).*re-run train_candidate"):
        _publish(UC, 1, tmp_path / "nope")
    assert not deploy.production_link(UC).exists()


def test_deploy_promotes_and_publishes_and_a_retry_is_a_no_op(conn, tmp_path):
    v1 = _train(conn, tmp_path, "month1")
    d1 = deploy.deploy(conn, use_case=UC, version=v1, actor="gate", reason="GO month1", run_id="r1")
    assert (d1["version"], d1["changed"], d1["kind"], d1["applied"]["switched"]) == (1, True, "hf", True)
    v2 = _train(conn, tmp_path, "month2")
    d2 = deploy.deploy(conn, use_case=UC, version=v2, actor="gate", reason="GO month2", run_id="r2")
    assert (d2["previous_version"], d2["applied"]["previous_target"]) == (1, "versions/v1")
    assert served().startswith("month2")
    assert {v["version"]: v["status"] for v in registry.versions(conn, UC)} == {1: "retired", 2: "production"}
    retry = deploy.deploy(conn, use_case=UC, version=v2, actor="gate", reason="GO month2", run_id="r2")
    assert retry["changed"] is False and retry["applied"]["switched"] is False and retry["applied"]["copied"] is False
    # The baseline of the next run is the published copy, not the training run directory.
    spec = deploy.baseline_spec(conn, load_use_case(UC))
    assert spec["path"] == str(deploy.version_dir(UC, 2)) and spec["baseline_kind"] == "production"


def test_a_failed_publish_leaves_registry_and_alias_unchanged(conn, tmp_path, pg_url):
    deploy.deploy(conn, use_case=UC, version=_train(conn, tmp_path, "month1"), actor="gate", reason="GO")
    v2 = _train(conn, tmp_path, "month2")
    for p in Path(registry.get_version(conn, UC, v2)["artifact"]).iterdir():
        p.unlink()  # the merged model vanished between training and deploy
    with pytest.raises(DeployError, match="no config.json"):
        deploy.deploy(conn, use_case=UC, version=v2, actor="gate", reason="GO")
    assert registry.production(conn, UC)["version"] == 1 and served().startswith("month1")

    # A commit that fails after the alias was switched puts the alias back.
    import psycopg2
    import psycopg2.extensions

    class LosesTheCommit(psycopg2.extensions.connection):
        def commit(self):
            if os.readlink(deploy.production_link(UC)) == "versions/v3":
                raise psycopg2.OperationalError("server closed the connection unexpectedly")
            super().commit()

    v3 = _train(conn, tmp_path, "month3")
    flaky = psycopg2.connect(pg_url, connection_factory=LosesTheCommit)
    try:
        with pytest.raises(psycopg2.OperationalError, match="server closed"):
            deploy.deploy(flaky, use_case=UC, version=v3, actor="gate", reason="GO")
    finally:
        flaky.close()
    assert os.readlink(deploy.production_link(UC)) == "versions/v1" and served().startswith("month1")
    assert registry.production(conn, UC)["version"] == 1


def test_rollback_deploy_moves_registry_and_alias_together(conn, tmp_path, home):
    for name in ("month1", "month2", "month3"):
        deploy.deploy(conn, use_case=UC, version=_train(conn, tmp_path, name), actor="gate", reason="GO")
    back = deploy.rollback_deploy(conn, use_case=UC, actor="alice", reason="month3 misroutes gifts")
    assert (back["version"], back["previous_version"]) == (2, 3) and served().startswith("month2")
    # A version dir deleted by hand is copied back from its training artifact.
    import shutil

    shutil.rmtree(deploy.version_dir(UC, 1))
    named = deploy.rollback_deploy(conn, use_case=UC, to_version=1, actor="bob", reason="back to the first model")
    assert named["applied"]["copied"] is True and served().startswith("month1")
    assert deploy.version_dir(UC, 3).is_dir()  # rolled-away versions stay on disk for a later restore
    with pytest.raises(registry.RegistryError, match="no previous production model"):
        deploy.rollback_deploy(conn, use_case=UC, actor="bob", reason="again")  # v2 and v3 were rolled away from
    assert served().startswith("month1")


def test_openai_deploy_records_the_model_id_and_drops_a_stale_local_alias(conn, tmp_path, home):
    import json

    deploy.deploy(conn, use_case=UC, version=_train(conn, tmp_path, "month1"), actor="gate", reason="GO")
    v2 = _train(conn, tmp_path, "month2", backend="openai")
    out = deploy.deploy(conn, use_case=UC, version=v2, actor="gate", reason="GO")
    assert out["kind"] == "openai" and out["applied"]["model"] == "ft:gpt-4o-mini-2024-07-18:acme::month2"
    assert not deploy.production_link(UC).is_symlink()
    pointer = json.loads((home / "models" / UC / "production.json").read_text())
    assert (pointer["kind"], pointer["version"], pointer["model"]) == ("openai", 2, out["artifact"])
    assert registry.production(conn, UC)["artifact"] == "ft:gpt-4o-mini-2024-07-18:acme::month2"
    deploy.rollback_deploy(conn, use_case=UC, actor="alice", reason="fine-tune regressed on Spanish")
    assert served().startswith("month1")
    assert json.loads((home / "models" / UC / "production.json").read_text())["kind"] == "hf"


# --- the manual DAG ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(REPO / "dags"))


def test_rollback_dag_shape_and_params(dagbag):
    from airflow.sdk.definitions.param import ParamValidationError

    assert dagbag.import_errors == {}
    dag = dagbag.dags["rollback_model"]
    assert dag.schedule is None and "rollback" in dag.tags and "Roll back a use case" in dag.doc_md
    assert [t.task_id for t in dag.tasks] == ["rollback"] and dag.tasks[0].retries >= 1
    params = dag.params
    assert params.get_param("use_case").schema["enum"] == ["email_intel", "email_voice", "hr_leave", "product_intent"]
    assert params["tenant"] is None  # generation use cases roll back one tenant's adapter
    for key, bad in (("use_case", "nope"), ("reason", "oops"), ("to_version", 0), ("to_version", "two")):
        with pytest.raises(ParamValidationError):
            params.get_param(key).resolve(bad)
    with pytest.raises(ParamValidationError):
        params.get_param("reason").resolve()  # required: no default


@pytest.mark.integration
def test_rollback_dag_moves_production_back(conn, tmp_path, dagbag):
    for name in ("month1", "month2"):
        deploy.deploy(conn, use_case=UC, version=_train(conn, tmp_path, name), actor="gate", reason="GO")
    dag = dagbag.dags["rollback_model"]
    run = dag.test(run_conf={"use_case": UC, "reason": "month2 returns invalid JSON for Spanish queries"})
    assert str(run.state).endswith("success")
    conn.rollback()  # see the DAG's committed writes
    assert registry.production(conn, UC)["version"] == 1 and served().startswith("month1")
    last = registry.history(conn, UC)[-1]
    assert (last["action"], last["version"], last["to_status"], last["actor"], last["run_id"]) == (
        "rollback", 1, "production", "dag_test", run.run_id)
    assert last["reason"] == "month2 returns invalid JSON for Spanish queries"
    named = dag.test(run_conf={"use_case": UC, "to_version": 2, "reason": "the JSON bug was in the client"})
    assert str(named.state).endswith("success")
    conn.rollback()
    assert registry.production(conn, UC)["version"] == 2 and served().startswith("month2")
    # v1 was rolled away from, so there is no automatic "previous": the task fails (no retries) and says so.
    # (to_version given explicitly: dag.test() in one process keeps the previous run's resolved Param values.)
    failed = dag.test(run_conf={"use_case": UC, "to_version": None, "reason": "try once more please"})
    assert str(failed.state).endswith("failed")
    conn.rollback()
    assert registry.production(conn, UC)["version"] == 2 and served().startswith("month2")


def test_run_rollback_checks_its_inputs_before_touching_anything(conn, tmp_path):
    from retrain.schemas.use_case import ConfigError

    for name in ("month1", "month2"):
        deploy.deploy(conn, use_case=UC, version=_train(conn, tmp_path, name), actor="gate", reason="GO")
    with pytest.raises(ConfigError, match="unknown use case 'nope'"):
        deploy.run_rollback("nope", reason="a long enough reason", actor="cli")
    with pytest.raises(registry.RegistryError, match="at least 10 characters"):
        deploy.run_rollback(UC, reason="bad", actor="cli")
    conn.rollback()
    assert registry.production(conn, UC)["version"] == 2
    out = deploy.run_rollback(UC, reason="month2 regressed on budget_tier", actor="cli:alice")
    assert out["version"] == 1 and served().startswith("month1")
