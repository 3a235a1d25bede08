"""Hostile trigger parameters: the YAML's gate thresholds are floors, base models come from an allow-list, every
numeric Param is bounded, and a run with nothing new does not train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from retrain import stages
from retrain.rundir import RunDir, write_json
from retrain.schemas.use_case import ConfigError, load_use_case

UC = load_use_case("product_intent")
FLOORS = UC.thresholds


def _prepare(params: dict, run_id: str = "manual__attack", **kw):
    return stages.prepare_run("product_intent", run_id, params, **kw)


# --- floors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "threshold", "floor"),
    [
        ({"min_score": 0}, "min_score", FLOORS.min_score),
        ({"min_relative_improvement": -1}, "min_relative_improvement", FLOORS.min_relative_improvement),
        ({"min_json_validity": 0}, "min_json_validity", FLOORS.min_json_validity),
        ({"max_p95_latency_regression": 10}, "max_p95_latency_regression", FLOORS.max_p95_latency_regression),
        ({"min_score": 0.5, "gate_override_reason": "   "}, "min_score", FLOORS.min_score),  # blank is no reason
    ],
)
def test_loosening_a_threshold_without_a_reason_fails_naming_it_and_its_floor(params, threshold, floor):
    with pytest.raises(ConfigError) as exc:
        _prepare(params)
    msg = str(exc.value)
    assert threshold in msg and f"floor {floor}" in msg and "gate_override_reason" in msg, msg


def test_a_required_significance_cannot_be_switched_off_silently(tmp_path, monkeypatch):
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "include/use_cases/product_intent.yaml").read_text())
    data["thresholds"]["require_significance"] = True
    (tmp_path / "product_intent.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="require_significance=False is looser than the use case's floor True"):
        _prepare({"require_significance": False})


def test_tightening_needs_no_reason():
    from retrain.schemas.run_params import apply_params, gate_overrides, parse_run_params

    tight = apply_params(UC, parse_run_params({"min_score": 0.95, "min_relative_improvement": 0.5,
                                               "min_json_validity": 1.0, "max_p95_latency_regression": 0.0,
                                               "require_significance": True}))
    assert gate_overrides(FLOORS, tight.thresholds, reason=None, by="x") == []


# --- base models --------------------------------------------------------------------------------------------------


def test_an_arbitrary_base_model_is_refused_naming_the_allow_list(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as exc:
        _prepare({"base_model": "evil/backdoored-7b"})
    msg = str(exc.value)
    assert "training.allowed_base_models ['smollm2-135m-instruct']" in msg and "evil/backdoored-7b" in msg
    with pytest.raises(ConfigError, match=r"allowed_openai_base_models \['gpt-4o-mini-2024-07-18'\]"):
        _prepare({"backend": "openai", "base_model": "gpt-4-some-other"})
    # A directory outside <RETRAIN_HOME>/models/base is refused, also through a symlink placed inside it.
    from retrain.settings import models_root

    outside = tmp_path / "outside-model"
    outside.mkdir()
    base = models_root() / "base"
    base.mkdir(parents=True, exist_ok=True)
    link = base / "sneaky"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(outside, target_is_directory=True)
    for path in (outside, link, base / ".." / ".." / "models" / "base" / "sneaky"):
        with pytest.raises(ConfigError, match="allowed_base_models"):
            _prepare({"base_model": str(path)})
    link.unlink()


def test_allowed_base_models_and_local_base_directories_pass_the_policy(tmp_path):
    from retrain.schemas.run_params import check_run_policy, parse_run_params
    from retrain.schemas.use_case import parse_use_case

    data = UC.model_dump(mode="json")
    data["training"]["allowed_base_models"] = ["smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct"]
    uc = parse_use_case(data)
    root = tmp_path / "base"
    (root / "my-model").mkdir(parents=True)
    check_run_policy(uc, parse_run_params({"base_model": "HuggingFaceTB/SmolLM2-360M-Instruct"}), base_root=root)
    check_run_policy(uc, parse_run_params({"base_model": str(root / "my-model")}), base_root=root)
    with pytest.raises(ConfigError):
        check_run_policy(uc, parse_run_params({"base_model": str(root)}), base_root=root)  # the root itself


# --- bounds -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "field", "bound"),
    [
        ({"max_train_steps": 1e12}, "max_train_steps", "limits.max_steps=100000"),
        ({"training_overrides": {"batch_size": 1_000_000}}, "training.batch_size", "limits.batch_size=512"),
        ({"training_overrides": {"max_length": 10_000_000}}, "training.max_length", "limits.max_length=32768"),
        ({"training_overrides": {"epochs": 1e9}}, "training.epochs", "limits.epochs=100"),
        ({"training_overrides": {"lora_r": 4096}}, "lora_r", "1024"),
        ({"sample_limit": 2**63}, "sample_limit", "limits.sample_limit=10000000"),
        ({"max_cost_usd": 5000}, "max_cost_usd", "limits.max_cost_usd=1000"),
        ({"max_cost_usd": math.inf}, "max_cost_usd", "finite"),
        ({"max_cost_usd": math.nan}, "max_cost_usd", "finite"),
        ({"min_score": math.nan}, "min_score", "finite"),
        ({"training_overrides": {"learning_rate": math.nan}}, "learning_rate", "finite"),
        ({"training_overrides": {"max_grad_norm": math.inf}}, "max_grad_norm", "finite"),
    ],
)
def test_numeric_params_are_bounded_naming_field_and_bound(params, field, bound):
    with pytest.raises(ConfigError) as exc:
        _prepare(params)
    msg = str(exc.value)
    assert field in msg and bound in msg, msg


def test_a_use_case_can_raise_its_limits(tmp_path, monkeypatch):
    from retrain.schemas.run_params import apply_params, check_run_policy, parse_run_params
    from retrain.schemas.use_case import parse_use_case

    data = UC.model_dump(mode="json")
    data["limits"] = {"max_steps": 500_000, "sample_limit": 50_000_000}
    uc = parse_use_case(data)
    params = parse_run_params({"max_train_steps": 200_000, "sample_limit": 20_000_000})
    check_run_policy(uc, params, base_root=tmp_path)
    assert apply_params(uc, params).training.max_steps == 200_000
    with pytest.raises(ConfigError, match="limits.max_stepz: unknown field"):
        parse_use_case({**data, "limits": {"max_stepz": 1}})
    with pytest.raises(ConfigError, match="training.max_steps=600000 is above limits.max_steps=500000"):
        parse_use_case({**data, "training": {**data["training"], "max_steps": 600_000}})


# --- an override with a reason: recorded everywhere, announced once ----------------------------------------------


def _write_evaluation(run_dir: Path, conn) -> int:
    from retrain.evaluate.metrics import compare, score_predictions
    from retrain.evaluate.metrics import write_metrics
    from retrain.registry import store as registry

    uc, meta = RunDir(run_dir).load()
    gold = {"intent_type": "GIFT", "budget_tier": "premium", "category": "home", "recipient": "boss",
            "context_tags": ["gift"], "priority_features": ["thoughtful"]}
    golds = [gold] * 40

    def preds(n_right):
        return [{"text": json.dumps(gold if i < n_right else {**gold, "intent_type": "PERSONAL_USE"}),
                 "latency_s": 0.1, "tokens": 20, "error": None} for i in range(40)]

    base, cand = score_predictions(uc, golds, preds(20)), score_predictions(uc, golds, preds(26))  # 0.50 -> 0.65
    write_metrics(run_dir, base, cand, compare(uc, base, cand))
    row = registry.register_candidate(conn, use_case=uc.name, run_id=meta["run_id"], backend="qlora",
                                      base_model="smollm2-135m-instruct", artifact=str(run_dir / "merged"))
    write_json(RunDir(run_dir).registered, {"version": row["version"]})
    write_json(RunDir(run_dir).models, {"baseline": {"kind": "hf", "path": "/models/prod", "baseline_kind": "production"},
                                        "candidate": {"kind": "hf", "path": str(run_dir / "merged")}})
    return row["version"]


def test_an_override_with_a_reason_is_recorded_reported_and_announced_once(db_conn, monkeypatch):
    from retrain import notify
    from retrain.registry import store as registry

    sent = []
    monkeypatch.setattr(notify, "_get_connection",
                        lambda conn_id, missing_ok=False: type("C", (), {"conn_id": conn_id, "host": "http://h/x",
                                                                         "extra_dejson": {}, "login": None,
                                                                         "password": None})()
                        if conn_id == notify.WEBHOOK_CONN_ID else None)
    monkeypatch.setattr(notify, "post_json", lambda url, body, headers, timeout=10: sent.append(body) or 200)

    reason = "hotfix: the tuned model fixes the Black Friday outage"
    run = _prepare({"min_score": 0.6, "min_relative_improvement": 0.0, "gate_override_reason": reason},
                   "manual__override", triggered_by="alice")
    rd = RunDir(run["run_dir"])
    config = json.loads(rd.run_config.read_text())
    assert config["triggered_by"] == "alice"
    assert [o["threshold"] for o in config["gate_overrides"]] == ["min_score", "min_relative_improvement"]
    version = _write_evaluation(rd.path, db_conn)

    out = stages.decide(rd.path)
    assert out["decision"] == "GO"  # 0.65 passes only the loosened gate
    decision = rd.read_decision()
    assert decision["overrides"] == [
        {"threshold": "min_score", "floor": 0.85, "value": 0.6, "by": "alice", "reason": reason},
        {"threshold": "min_relative_improvement", "floor": 0.1, "value": 0.0, "by": "alice", "reason": reason},
    ]
    line = f"threshold min_score loosened from 0.85 to 0.6 by alice: {reason}"
    assert line in decision["summary"]
    html_report = (rd.evaluation / "report.html").read_text()
    md_report = (rd.evaluation / "report.md").read_text()
    assert "Gate overrides" in html_report and line.replace(":", ":") in html_report.replace("&#x27;", "'")
    assert "## Gate overrides" in md_report and line in md_report
    history = [e for e in registry.history(db_conn, "product_intent") if e["version"] == version]
    decided = [e for e in history if e["action"] == "decide"]
    assert len(decided) == 1 and line in decided[0]["reason"], history
    assert decided[0]["details"]["overrides"][0]["reason"] == reason
    assert registry.get_version(db_conn, "product_intent", version)["decision"]["overrides"][0]["by"] == "alice"
    assert len(sent) == 1 and sent[0]["event"] == "gate_override" and line in sent[0]["text"]


def test_no_override_no_announcement(db_conn, monkeypatch):
    from retrain import notify

    calls = []
    monkeypatch.setattr(notify, "send_message", lambda *a, **k: calls.append(a))
    run = _prepare({"min_score": 0.5 + 0.45}, "manual__tight")  # tighter: no reason needed
    rd = RunDir(run["run_dir"])
    assert json.loads(rd.run_config.read_text())["gate_overrides"] == []
    _write_evaluation(rd.path, db_conn)
    stages.decide(rd.path)
    assert rd.read_decision()["overrides"] == [] and calls == []


# --- no new data, no training -------------------------------------------------------------------------------------


def test_should_train_follows_the_data_sets_decision(db_conn, monkeypatch):
    from retrain.data import dataset

    run = _prepare({}, "manual__nothing_new")
    rd = RunDir(run["run_dir"])
    write_json(rd.manifest, {"counts": {"train": 10, "val": 2, "test": 2}, "new_rows": 0})
    seen = []

    def decision(manifest, uc, force):
        seen.append((manifest["new_rows"], uc.name, force))
        return (force or manifest["new_rows"] > 0), "no new rows since the last trained run"

    monkeypatch.setattr(dataset, "training_decision", decision, raising=False)
    assert stages.should_train(rd.path) is False
    from retrain.registry.runs import latest_runs

    row = next(r for r in latest_runs(db_conn, use_case="product_intent") if r["run_id"] == "manual__nothing_new")
    assert row["status"] == "no_new_data" and "no new rows" in json.dumps(row["decision_reasons"])
    forced = _prepare({"force_retrain": True}, "manual__forced")
    write_json(RunDir(forced["run_dir"]).manifest, {"counts": {}, "new_rows": 0})
    assert stages.should_train(forced["run_dir"]) is True
    assert seen == [(0, "product_intent", False), (0, "product_intent", True)]
