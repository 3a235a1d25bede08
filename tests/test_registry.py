"""Model registry against a real PostgreSQL server: idempotent registration, the one-production rule enforced by
the database, promotion/reject/rollback state machine with history, and the baseline choice."""

from __future__ import annotations

import psycopg2
import pytest

from retrain import db
from retrain.registry import deploy
from retrain.registry import store as registry
from retrain.schemas.run_params import apply_params, parse_run_params
from retrain.schemas.use_case import load_use_case
from retrain.registry.store import RegistryError

UC = "product_intent"


@pytest.fixture
def conn(db_conn):
    db.ensure_schema(db_conn)
    with db_conn.cursor() as cur:
        cur.execute("TRUNCATE model_events RESTART IDENTITY")
    db_conn.commit()
    return db_conn


def _register(conn, run_id, backend="qlora", artifact=None, use_case=UC):
    return registry.register_candidate(conn, use_case=use_case, run_id=run_id, backend=backend,
                                       base_model="smollm2-135m-instruct",
                                       artifact=f"/runs/{run_id}/candidate/merged" if artifact is None else artifact,
                                       metrics={"train_loss": 0.5})


def _deployed(conn, n, use_case=UC):
    """n versions, each promoted in turn (v<n> ends in production)."""
    for i in range(1, n + 1):
        v = _register(conn, f"run-{i}", use_case=use_case)["version"]
        registry.promote(conn, use_case=use_case, version=v, actor="gate", reason=f"GO run-{i}")


def _statuses(conn, use_case=UC):
    return {v["version"]: v["status"] for v in registry.versions(conn, use_case)}


def test_register_is_idempotent_per_run(conn):
    first = _register(conn, "scheduled__2026-01-01")
    again = registry.register_candidate(conn, use_case=UC, run_id="scheduled__2026-01-01", backend="qlora",
                                        base_model="smollm2-135m-instruct", artifact="/elsewhere/merged")
    other = _register(conn, "scheduled__2026-02-01")
    other_uc = _register(conn, "scheduled__2026-01-01", use_case="hr_leave")
    assert (first["version"], first["created"], first["status"]) == (1, True, "candidate")
    assert (again["version"], again["created"]) == (1, False)
    assert again["artifact"] == "/elsewhere/merged" and again["metrics"] == {"train_loss": 0.5}
    assert other["version"] == 2 and other_uc["version"] == 1  # numbering is per use case
    assert [e["action"] for e in registry.history(conn, UC)] == ["register", "register"]
    # The database itself refuses a second version for the same run.
    with pytest.raises(psycopg2.IntegrityError), conn.cursor() as cur:
        cur.execute("INSERT INTO model_versions (use_case, version, backend, base_model, artifact, run_id, status)"
                    " VALUES (%s, 9, 'qlora', 'b', 'a', 'scheduled__2026-01-01', 'candidate')", (UC,))
    conn.rollback()


def test_register_without_artifact_is_refused(conn):
    with pytest.raises(RegistryError, match="no artifact"):
        _register(conn, "r1", artifact="")


def test_database_enforces_a_single_production(conn):
    _deployed(conn, 1)
    _register(conn, "run-2")
    with pytest.raises(psycopg2.IntegrityError) as exc, conn.cursor() as cur:
        cur.execute("UPDATE model_versions SET status = 'production' WHERE use_case = %s AND version = 2", (UC,))
    assert "model_versions_one_production" in str(exc.value)
    conn.rollback()
    assert _statuses(conn) == {1: "production", 2: "candidate"}
    # Other use cases have their own production model.
    _deployed(conn, 1, use_case="hr_leave")
    assert registry.production(conn, "hr_leave")["version"] == 1 and registry.production(conn, UC)["version"] == 1


def test_promotion_retires_the_previous_production_and_is_idempotent(conn):
    assert registry.production(conn, UC) is None
    _deployed(conn, 1)
    _register(conn, "run-2")
    result = registry.promote(conn, use_case=UC, version=2, actor="gate", reason="GO: 0.91 vs 0.62")
    assert (result["version"], result["previous_version"], result["changed"], result["status"]) == (
        2, 1, True, "production")
    assert _statuses(conn) == {1: "retired", 2: "production"}
    again = registry.promote(conn, use_case=UC, version=2, actor="gate", reason="retry")
    assert again["changed"] is False and again["previous_version"] is None
    moves = [(e["version"], e["action"], e["from_status"], e["to_status"], e["actor"], e["reason"])
             for e in registry.history(conn, UC) if e["action"] == "promote"]
    assert moves == [(1, "promote", "candidate", "production", "gate", "GO run-1"),
                     (1, "promote", "production", "retired", "gate", "GO: 0.91 vs 0.62"),
                     (2, "promote", "candidate", "production", "gate", "GO: 0.91 vs 0.62")]


def test_promotion_is_one_transaction(conn):
    _deployed(conn, 1)
    _register(conn, "run-2")

    def fail(result):
        assert result["version"] == 2  # the rows are already moved inside the transaction
        raise OSError("disk full while switching the alias")

    with pytest.raises(OSError, match="disk full"):
        registry.promote(conn, use_case=UC, version=2, actor="gate", reason="GO", apply=fail)
    assert _statuses(conn) == {1: "production", 2: "candidate"}
    assert not [e for e in registry.history(conn, UC) if e["version"] == 2 and e["action"] == "promote"]


def test_reject(conn):
    _deployed(conn, 1)
    _register(conn, "run-2")
    out = registry.reject(conn, use_case=UC, version=2, actor="gate", reason="NO-GO: +2% < 10%")
    assert out["changed"] is True and _statuses(conn) == {1: "production", 2: "rejected"}
    assert registry.reject(conn, use_case=UC, version=2, actor="gate", reason="retry")["changed"] is False
    assert [e["reason"] for e in registry.history(conn, UC) if e["action"] == "reject"] == ["NO-GO: +2% < 10%"]
    with pytest.raises(RegistryError, match="in production and cannot be rejected; roll back first"):
        registry.reject(conn, use_case=UC, version=1, actor="x", reason="y")
    with pytest.raises(RegistryError, match="was rejected and cannot be promoted"):
        registry.promote(conn, use_case=UC, version=2, actor="x", reason="y")
    with pytest.raises(RegistryError, match=r"no model version 7; registered versions: v1 \(production\), v2"):
        registry.reject(conn, use_case=UC, version=7, actor="x", reason="y")


def test_record_decision_is_stored_once(conn):
    v = _register(conn, "run-1")["version"]
    metrics = {"candidate": {"intent_type_accuracy": 0.91}, "baseline": {"intent_type_accuracy": 0.6}}
    decision = {"decision": "GO", "reason": "all 5 checks passed", "checks": [{"name": "min_score", "passed": True}]}
    registry.record_decision(conn, use_case=UC, version=v, metrics=metrics, decision=decision)
    # A retried gate task decides the same thing a few seconds later.
    registry.record_decision(conn, use_case=UC, version=v, metrics=metrics,
                             decision=decision | {"decided_at": "2026-01-01T03:10:00+00:00"})
    row = registry.get_version(conn, UC, v)
    assert row["metrics"] == metrics and row["decision"] == decision and row["status"] == "candidate"
    decided = [e for e in registry.history(conn, UC) if e["action"] == "decide"]
    assert len(decided) == 1 and decided[0]["reason"] == "all 5 checks passed"


def test_rollback_to_previous_then_to_a_named_version(conn):
    _deployed(conn, 3)
    back = registry.rollback(conn, use_case=UC, actor="alice", reason="v3 misroutes GIFT queries")
    assert (back["version"], back["previous_version"], back["changed"]) == (2, 3, True)
    assert _statuses(conn) == {1: "retired", 2: "production", 3: "retired"}
    # "Previous" skips v3, which was just rolled back away from: it goes on to v1, not back to v3.
    back = registry.rollback(conn, use_case=UC, actor="alice", reason="v2 too slow")
    assert (back["version"], back["previous_version"]) == (1, 2)
    # Named: restore any retired version, including the rolled-away one.
    named = registry.rollback(conn, use_case=UC, to_version=3, actor="bob", reason="the v3 bug was in the client")
    assert (named["version"], named["previous_version"]) == (3, 1)
    assert _statuses(conn) == {1: "retired", 2: "retired", 3: "production"}
    rollbacks = [(e["version"], e["from_status"], e["to_status"], e["actor"], e["reason"])
                 for e in registry.history(conn, UC) if e["action"] == "rollback"]
    assert rollbacks == [
        (3, "production", "retired", "alice", "v3 misroutes GIFT queries"),
        (2, "retired", "production", "alice", "v3 misroutes GIFT queries"),
        (2, "production", "retired", "alice", "v2 too slow"),
        (1, "retired", "production", "alice", "v2 too slow"),
        (1, "production", "retired", "bob", "the v3 bug was in the client"),
        (3, "retired", "production", "bob", "the v3 bug was in the client"),
    ]
    # Rolling back to what is already production changes nothing.
    assert registry.rollback(conn, use_case=UC, to_version=3, actor="bob", reason="again")["changed"] is False


def test_previous_after_a_new_promotion_is_the_version_it_replaced(conn):
    _deployed(conn, 2)
    registry.rollback(conn, use_case=UC, actor="alice", reason="v2 is broken")  # v1 serves again
    _register(conn, "run-3")
    registry.promote(conn, use_case=UC, version=3, actor="gate", reason="GO")
    back = registry.rollback(conn, use_case=UC, actor="alice", reason="v3 is broken too")
    assert back["version"] == 1
    with pytest.raises(RegistryError, match="no previous production"):  # nothing older than v1 to step back to
        registry.rollback(conn, use_case=UC, actor="alice", reason="and v1 too")


def test_rollback_without_a_previous_version_is_a_clear_error(conn):
    with pytest.raises(RegistryError, match="no previous production model of 'product_intent' to roll back to "
                                            r"\(nothing is in production\); there is no retired version"):
        registry.rollback(conn, use_case=UC, actor="alice", reason="first deploy is bad")
    _deployed(conn, 1)
    _register(conn, "run-2")
    with pytest.raises(RegistryError, match=r"\(v1 is production\); there is no retired version to restore"):
        registry.rollback(conn, use_case=UC, actor="alice", reason="bad")
    with pytest.raises(RegistryError, match="v2 is 'candidate' and was never a production model"):
        registry.rollback(conn, use_case=UC, to_version=2, actor="alice", reason="bad")
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.rollback(conn, use_case=UC, to_version=1, actor="alice", reason="  ")
    assert _statuses(conn) == {1: "production", 2: "candidate"}


def test_a_retried_rollback_task_does_not_step_back_twice(conn):
    _deployed(conn, 3)
    first = registry.rollback(conn, use_case=UC, actor="alice", reason="v3 bad", run_id="manual__1")
    retry = registry.rollback(conn, use_case=UC, actor="alice", reason="v3 bad", run_id="manual__1")
    assert first["version"] == retry["version"] == 2 and retry["changed"] is False
    assert registry.production(conn, UC)["version"] == 2
    assert len([e for e in registry.history(conn, UC) if e["action"] == "rollback"]) == 2


def test_baseline_is_the_base_model_on_a_first_run_then_the_production_model(conn, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAIN_HOME", str(tmp_path / "home"))
    uc = load_use_case(UC)
    first = deploy.baseline_spec(conn, uc)
    assert first == {"kind": "hf", "path": uc.training.base_model, "label": "baseline", "baseline_kind": "base_model",
                     "version": None, "base_model": uc.training.base_model}
    uc_openai = apply_params(uc, parse_run_params({"backend": "openai"}))
    assert deploy.baseline_spec(conn, uc_openai) | {"base_url": None} == {
        "kind": "openai", "model": uc.training.openai_base_model, "base_url": None, "label": "baseline",
        "baseline_kind": "base_model", "version": None, "base_model": uc.training.openai_base_model}

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    v = _register(conn, "run-1", artifact=str(merged))["version"]
    registry.promote(conn, use_case=UC, version=v, actor="gate", reason="GO")  # registry only: not published yet
    spec = deploy.baseline_spec(conn, uc)
    assert (spec["kind"], spec["path"], spec["baseline_kind"], spec["version"]) == ("hf", str(merged), "production", 1)

    # An OpenAI fine-tune in production is the baseline even for a qlora run: compare against what serves.
    v2 = _register(conn, "run-2", backend="openai", artifact="ft:gpt-4o-mini-2024-07-18:acme::abc123")["version"]
    registry.promote(conn, use_case=UC, version=v2, actor="gate", reason="GO")
    spec = deploy.baseline_spec(conn, uc)
    assert (spec["kind"], spec["model"], spec["version"]) == ("openai", "ft:gpt-4o-mini-2024-07-18:acme::abc123", 2)


def test_summary_lists_versions_and_history(conn):
    _deployed(conn, 2)
    s = registry.summary(conn, UC)
    assert s["production"]["version"] == 2
    assert [(v["version"], v["status"]) for v in s["versions"]] == [(1, "retired"), (2, "production")]
    assert len(s["history"]) == 5 and all(isinstance(e["at"], str) for e in s["history"])


def test_registry_upgrades_a_database_created_before_the_history_table(conn, monkeypatch):
    with conn.cursor() as cur:
        cur.execute("DROP TABLE model_events; DROP INDEX model_versions_one_per_run")
    conn.commit()
    monkeypatch.setattr(db, "_schema_ready", set())  # a fresh process
    assert registry.history(conn, UC) == [] and registry.production(conn, UC) is None  # reads leave a txn open
    assert _register(conn, "run-1")["version"] == 1  # creates the table inside its own transaction
    assert [e["action"] for e in registry.history(conn, UC)] == ["register"]
    assert db.schema_is_ready(conn)
