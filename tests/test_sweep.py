"""Hyper-parameter sweeps (issue 19): the sweep: section and the sweep Param, the candidates, successive halving,
selection on the validation split, the report, the registry rows of the candidates that lost, and the DAG mapping
the training task over the candidates (dag.test() with a tiny random Llama as the base model)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from retrain.rundir import RunDir
from retrain.schemas.run_params import check_run_policy, parse_run_params
from retrain.schemas.sweep import (
    SweepConfig,
    SweepError,
    candidates,
    check_sweep_cost,
    halving_schedule,
    survivors,
    sweep_size,
)
from retrain.schemas.use_case import ConfigError, load_use_case, parse_use_case
from test_train import FAST, _one_thread_for_tiny_models, make_run_dir, tiny_model  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parents[1]
UC = load_use_case("product_intent")
YAML = yaml.safe_load((REPO / "include" / "use_cases" / "product_intent.yaml").read_text())


def with_sweep(sweep: dict) -> dict:
    data = copy.deepcopy(YAML)
    data["sweep"] = sweep
    return data


# --- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sweep", "expected"),
    [
        ({"space": {"lora_rank": [8, 16]}}, "sweep.space: Value error, 'lora_rank' cannot be swept"),
        ({"space": {"stop_at_step": [8, 16]}}, "'stop_at_step' cannot be swept: it is set by the sweep itself"),
        ({"space": {"learning_rate": [0.001, 2]}}, "sweep.space.learning_rate: value 2 is invalid (learning_rate: "
                                                   "Input should be less than 1)"),
        ({"space": {"max_steps": [10, 10**6]}}, "sweep.space.max_steps=1000000 is above limits.max_steps"),
        ({"space": {"lora_r": [8, 16, 32], "learning_rate": [1e-3, 2e-3]}, "max_candidates": 4},
         "max_candidates: the grid has 6 combinations, more than max_candidates=4"),
        ({"space": {"lora_r": [8]}}, "a sweep needs at least two candidates"),
        ({"space": {"lora_r": [8, 8]}}, "'lora_r' lists a value twice"),
        ({"space": {"lora_r": []}}, "'lora_r' needs a non-empty list"),
        ({"space": {"lora_r": [8, 16]}, "halving": {"eta": 1}}, "sweep.halving.eta: Input should be greater than"),
        ({"space": {"lora_r": [8, 16]}, "method": "bayes"}, "sweep.method"),
        ({"space": {"lora_r": [8, 16]}, "maxcandidates": 3}, "sweep.maxcandidates: unknown field"),
        ({"space": {"openai_learning_rate_multiplier": [0.5, -1]}},
         "sweep.space.openai_learning_rate_multiplier: -1 must be a positive number"),
    ],
)
def test_sweep_config_errors_name_the_field(sweep, expected):
    with pytest.raises(ConfigError) as err:
        parse_use_case(with_sweep(sweep), "product_intent.yaml")
    assert expected in str(err.value), str(err.value)


def test_a_valid_sweep_section_parses_and_no_section_means_no_sweep():
    uc = parse_use_case(with_sweep({"method": "random", "space": {"learning_rate": [5e-4, 1e-3, 2e-3],
                                                                  "lora_r": [8, 16]}, "max_candidates": 3,
                                    "halving": {"eta": 3, "first_budget_fraction": 0.25}}))
    assert uc.sweep.grid_size == 6 and uc.sweep.halving.eta == 3
    assert UC.sweep is None  # the demo's use case has no sweep: nothing changes for it


def test_candidates_grid_in_order_random_seeded_and_a_smaller_n_is_a_subset():
    grid = SweepConfig(space={"learning_rate": [1e-3, 2e-3], "lora_r": [8, 16]}, max_candidates=4)
    assert candidates(grid) == [{"learning_rate": 1e-3, "lora_r": 8}, {"learning_rate": 1e-3, "lora_r": 16},
                                {"learning_rate": 2e-3, "lora_r": 8}, {"learning_rate": 2e-3, "lora_r": 16}]
    two = candidates(grid, 2)
    assert len(two) == 2 and all(c in candidates(grid) for c in two) and two == candidates(grid, 2)
    rnd = SweepConfig(method="random", space={"learning_rate": [1e-4, 3e-4, 1e-3, 3e-3], "lora_r": [4, 8, 16]},
                      max_candidates=5, seed=7)
    picked = candidates(rnd)
    assert len(picked) == 5 and len({json.dumps(c, sort_keys=True) for c in picked}) == 5
    assert picked == candidates(rnd) and picked != candidates(rnd.model_copy(update={"seed": 8}))


def test_sweep_param_off_on_or_a_number():
    config = SweepConfig(space={"learning_rate": [1e-3, 2e-3, 3e-3]}, max_candidates=3)
    assert sweep_size(None, config) == sweep_size("off", config) == 0
    assert sweep_size("on", config) == 3 and sweep_size("2", config) == 2
    with pytest.raises(SweepError, match="sweep=4 asks for more candidates than the sweep's space holds"):
        sweep_size("4", config)
    with pytest.raises(SweepError, match="has no sweep: section"):
        sweep_size("on", None)
    assert parse_run_params({}).sweep == "off" and parse_run_params({"sweep": 3}).sweep == "3"
    with pytest.raises(ConfigError, match="sweep: String should match pattern"):
        parse_run_params({"sweep": "1"})
    with pytest.raises(ConfigError, match="sweep is on but the use case has no sweep: section"):
        check_run_policy(UC, parse_run_params({"sweep": "on"}), base_root=REPO / "nowhere")


def test_halving_schedule_is_a_pure_budget_rule():
    # 4 candidates of 160 steps, eta 4, a quarter first: 4 x 40 + 1 x 120 = 280 steps, against 640 for the grid.
    s = halving_schedule([160] * 4, eta=4, first_budget_fraction=0.25)
    assert s["first_budget"] == [40] * 4 and s["keep"] == 1
    assert s["max_optimizer_steps"] == 280 <= 2 * 160 and s["full_grid_steps"] == 640 and s["saving"] == 0.5625
    # eta 3 keeps ceil(4 / 3) = 2; unequal lengths: survivors are costed as the longest runs (an upper bound).
    s = halving_schedule([100, 200, 50, 80], eta=3, first_budget_fraction=0.1)
    assert s["first_budget"] == [10, 20, 5, 8] and s["keep"] == 2 and s["max_optimizer_steps"] == 43 + 180 + 90
    assert halving_schedule([3], eta=2, first_budget_fraction=0.01)["first_budget"] == [1]
    assert survivors({"c1": 0.5, "c2": None, "c3": 0.9, "c4": 0.5}, 3) == ["c3", "c1", "c4"]
    # A tie on the metric goes to the lower validation loss (never to the training loss), then to plan order.
    assert survivors({"c1": 0.5, "c2": 0.5, "c3": 0.5}, 2, {"c1": 1.2, "c2": 0.7, "c3": None}) == ["c2", "c1"]


def test_openai_sweep_cost_sum_must_fit_the_limit():
    assert check_sweep_cost({"c1": 1.0, "c2": 2.5}, 5.0) == 3.5
    with pytest.raises(SweepError) as err:
        check_sweep_cost({"c1": 3.0, "c2": 2.5}, 5.0)
    assert "sum to $5.5000, over the limit max_cost_usd=$5.00" in str(err.value)


# --- candidates in sub-run directories, halving, selection (the trainer for real, a fixed scorer) -------------


def _sweep_run_dir(tmp_path: Path, base_model: str, sweep: dict, param: str = "on") -> Path:
    run_dir = make_run_dir(tmp_path / "run", base_model, n=60)
    meta = json.loads((run_dir / "run_config.json").read_text())
    meta["use_case"]["training"].update({**FAST, "early_stopping_patience": None})
    meta["use_case"]["sweep"] = sweep
    meta["params"] = {"sweep": param}
    (run_dir / "run_config.json").write_text(json.dumps(meta))
    RunDir(run_dir).load()  # still a valid use case
    return run_dir


def fixed_scores(by_lr: dict[float, float]):
    calls = []

    def score(sub_dir: str) -> dict:
        _, meta = RunDir(sub_dir).load()
        calls.append(Path(sub_dir).name)
        return {"primary_score": by_lr[meta["use_case"]["training"]["learning_rate"]], "json_validity": 1.0}

    score.calls = calls
    return score


def test_halving_trains_a_first_rung_continues_the_best_and_promotes_it(tiny_model, tmp_path):
    from retrain import sweep

    run_dir = _sweep_run_dir(tmp_path, str(tiny_model), {
        "space": {"learning_rate": [1e-3, 3e-3, 1e-2]}, "max_candidates": 3,
        "halving": {"eta": 3, "first_budget_fraction": 0.5}})
    planned = sweep.plan(run_dir)
    assert [c["stop_at_step"] for c in planned] == [4, 4, 4] and [c["total_steps"] for c in planned] == [8] * 3
    sub = RunDir(planned[1]["run_dir"])
    assert json.loads(sub.train_overrides.read_text())["learning_rate"] == 3e-3
    assert sub.split("train").is_symlink() and sub.split("train").read_bytes() == (run_dir / "train.jsonl").read_bytes()
    assert sweep.plan(run_dir) == planned  # planning again finds the same candidates
    # A split swapped for other data in a candidate's directory is put back: candidates train on the run's data.
    sub.split("val").unlink()
    sub.split("val").symlink_to(tmp_path / "elsewhere.jsonl")
    sub.split("train").unlink()
    sub.split("train").write_text("{}\n")
    sweep.plan(run_dir)
    assert sub.split("val").resolve() == (run_dir / "val.jsonl").resolve() and sub.split("train").is_symlink()

    rung1 = [sweep.train(c) for c in planned]
    assert [r["steps"] for r in rung1] == [4, 4, 4]
    score = fixed_scores({1e-3: 0.2, 3e-3: 0.9, 1e-2: 0.5})
    kept = sweep.halve(rung1, score)
    assert [k["name"] for k in kept] == ["c2"] and kept[0]["stop_at_step"] is None

    final = [sweep.train(c) for c in kept]
    result = sub.read_train_result()
    assert result["steps"] == 8 and result["resumed_from_step"] == 4  # continued from the rung's checkpoint
    assert final[0]["steps_trained"] == 4 and sub.sweep_rung1_result.is_file()
    assert sweep.train(kept[0])["steps"] == 8 and sub.read_train_result() == result  # a retry reuses the result

    report = sweep.select(final, score)
    rd = RunDir(run_dir)
    assert report["winner"] == "c2" and report["optimizer_steps"] == 16 and report["full_grid_steps"] == 24
    promoted = rd.read_train_result()
    assert promoted["sweep_candidate"] == "c2" and promoted["merged_path"] == str(rd.merged)
    assert (rd.merged / "model.safetensors").is_file() and not sub.candidate.exists()
    assert not RunDir(planned[0]["run_dir"]).merged.exists()  # losers keep their adapter only
    assert RunDir(planned[0]["run_dir"]).adapter.is_dir()
    md = rd.sweep_report_md.read_text()
    assert "| c2 | 0.003 | 0.900 |" in md and "**selected**" in md and "first rung" in md
    # The scores that decided who continued are in the report, for the stopped candidates and the survivor.
    assert "val score after rung 1" in md and "| first rung | 0.200 | not_selected |" in md
    assert {r["name"]: r["rung1_score"] for r in report["candidates"]} == {"c1": 0.2, "c2": 0.9, "c3": 0.5}
    assert rd.sweep_plot.read_bytes()[:4] == b"\x89PNG"
    calls = len(score.calls)
    assert sweep.select(final, score)["winner"] == "c2" and len(score.calls) == calls  # a retry changes nothing


def test_a_sweep_without_halving_trains_every_candidate_to_the_end(tiny_model, tmp_path):
    from retrain import sweep

    run_dir = _sweep_run_dir(tmp_path, str(tiny_model), {"space": {"learning_rate": [1e-3, 1e-2]}},
                             param="2")
    planned = sweep.plan(run_dir)
    assert [c["stop_at_step"] for c in planned] == [None, None]
    results = [sweep.train({**c, "total_steps": c["total_steps"]}) for c in planned]
    report = sweep.select(results, fixed_scores({1e-3: 0.7, 1e-2: 0.3}))
    assert report["winner"] == "c1" and [r["trained"] for r in report["candidates"]] == ["full", "full"]
    assert report["optimizer_steps"] == report["full_grid_steps"] == 16


# --- the DAG ----------------------------------------------------------------------------------------------------


def sweep_bag(directory: Path, monkeypatch, tiny_model: Path, sweep: dict):
    """The DAG file read from a use-case directory whose product_intent.yaml has a sweep: section and trains the
    tiny model for a few steps."""
    from airflow.dag_processing.dagbag import DagBag

    data = copy.deepcopy(YAML)
    data["training"].update({**FAST, "max_steps": 4, "eval_steps": 2, "save_steps": 2, "max_length": 256,
                             "early_stopping_patience": None, "base_model": str(tiny_model), "epochs": 1})
    data["sweep"] = sweep
    directory.mkdir()
    (directory / "product_intent.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("RETRAIN_USE_CASES_DIR", str(directory))
    return DagBag(str(REPO / "dags" / "retrain_use_cases.py")).dags["retrain_product_intent"]


LRS = {"learning_rate": [1e-3, 3e-3, 1e-2]}


def test_the_graph_gains_sweep_tasks_only_with_a_sweep_section(tmp_path, monkeypatch, tiny_model, airflow_db):
    plain = sweep_bag(tmp_path / "plain", monkeypatch, tiny_model, {"space": LRS})
    assert {"plan_sweep", "train_sweep", "select_candidate"} <= set(plain.task_ids)
    assert not {"halve_sweep", "continue_sweep"} & set(plain.task_ids)
    assert plain.get_task("select_candidate").downstream_task_ids == {"register_candidate"}
    assert plain.get_task("train_sweep").pool == "gpu" and plain.get_task("train_sweep").queue == "gpu"
    # The openai backend's branch: the cost gate, the deferred fine-tuning operator mapped over the candidates.
    assert {"plan_openai_sweep", "train_openai_sweep", "select_openai_candidate"} <= set(plain.task_ids)
    assert type(plain.get_task("train_openai_sweep")).__name__ == "MappedOperator"
    assert plain.get_task("plan_openai_sweep").downstream_task_ids == {"train_openai_sweep"}
    assert plain.get_task("select_openai_candidate").downstream_task_ids == {"register_candidate"}
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.delenv("RETRAIN_USE_CASES_DIR")
    demo = DagBag(str(REPO / "dags" / "retrain_use_cases.py")).dags["retrain_product_intent"]
    assert not [t for t in demo.task_ids if "sweep" in t or t == "select_candidate"]  # the demo's graph is as before


@pytest.mark.integration
def test_dag_maps_training_over_three_candidates_halves_and_registers_the_losers(db_conn, tmp_path, monkeypatch,
                                                                               tiny_model, airflow_db, backup_env,
                                                                               task_log):
    from conftest import registry_rows, states
    from retrain.data.synthetic import seed_examples

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    sweep_dag = sweep_bag(tmp_path / "use_cases", monkeypatch, tiny_model, {
        "space": LRS, "max_candidates": 3, "halving": {"eta": 3, "first_budget_fraction": 0.5}})
    seed_examples(db_conn, UC, 200, seed=3, dirty=0.0)
    # No logical date (the UI's plain "Trigger"): no data interval bounds collection, the rows seeded now count.
    run = sweep_dag.test(logical_date=None, run_conf={
        "sweep": "on", "min_score": 0.0, "min_json_validity": 0.0, "min_relative_improvement": -1.0,
        "gate_override_reason": "sweep smoke test"})
    out = task_log()
    st = states(run)
    assert st["train_qlora"] == "skipped" and st["train_openai"] == "skipped", out[-4000:]
    assert st["plan_openai_sweep"] == st["select_openai_candidate"] == "skipped"
    for task in ("plan_sweep", "train_sweep", "halve_sweep", "continue_sweep", "select_candidate",
                 "register_candidate", "evaluate_candidate", "decide"):
        assert st[task] == "success", (task, out[-6000:])
    mapped = {}
    for ti in run.get_task_instances():
        mapped.setdefault(ti.task_id, []).append(ti.map_index)
    assert sorted(mapped["train_sweep"]) == [0, 1, 2] and mapped["continue_sweep"] == [0]

    rd = RunDir.for_run("product_intent", run.run_id)
    report = json.loads(rd.sweep_report_json.read_text())
    scores = {r["name"]: r["primary_score"] for r in report["candidates"]}
    losses = {r["name"]: r["eval_loss"] for r in report["candidates"] if r["trained"] == "full"}
    assert report["winner"] == survivors({k: scores[k] for k in losses}, 1, losses)[0]  # best on validation
    assert rd.read_train_result()["sweep_candidate"] == report["winner"]
    assert rd.sweep_plot.is_file() and "| candidate | learning_rate |" in rd.sweep_report_md.read_text()

    rows = registry_rows(db_conn)
    by_status = {}
    for r in rows:
        by_status.setdefault(r["status"], []).append(r)
    assert len(by_status["not_selected"]) == 2 and len(rows) == 3
    losers = {r["run_id"] for r in by_status["not_selected"]}
    assert losers == {f"{run.run_id}#sweep-{r['name']}" for r in report["candidates"] if r["name"] != report["winner"]}
    assert all("primary_score" in r["metrics"]["validation"] for r in by_status["not_selected"])
    (main,) = [r for r in rows if r["run_id"] == run.run_id]
    assert main["status"] in ("production", "rejected") and main["artifact"] == str(rd.merged)
    assert report["optimizer_steps"] == 3 * 2 + 2 and report["full_grid_steps"] == 12
    assert sorted(r["trained"] for r in report["candidates"]) == ["first rung", "first rung", "full"]


# --- registry -------------------------------------------------------------------------------------------------


def test_not_selected_candidates_are_registered_once_and_never_promoted(db_conn):
    from retrain import db
    from retrain.registry import store as registry

    db.ensure_schema(db_conn)  # schema.sql again: the status CHECK is rebuilt only once
    db_conn.commit()
    kwargs = dict(use_case="product_intent", run_id="m1#sweep-c2", backend="qlora", base_model="smollm2-135m-instruct",
                  artifact="/runs/m1/sweep/c2/candidate/adapter", reason="sweep of run m1: c1 scored higher",
                  metrics={"validation": {"primary_score": 0.42}})
    row = registry.record_not_selected(db_conn, **kwargs)
    assert (row["status"], row["version"], row["created"]) == ("not_selected", 1, True)
    again = registry.record_not_selected(db_conn, **kwargs)
    assert (again["version"], again["created"]) == (1, False)
    assert row["metrics"]["validation"]["primary_score"] == 0.42
    with pytest.raises(registry.RegistryError, match="lost its sweep on validation"):
        registry.promote(db_conn, use_case="product_intent", version=1, actor="t", reason="try")
    (event,) = registry.history(db_conn, "product_intent")
    assert (event["action"], event["to_status"]) == ("register", "not_selected")
    with db_conn.cursor() as cur, pytest.raises(Exception, match="model_versions_status_check"):
        cur.execute("UPDATE model_versions SET status = 'bogus' WHERE version = 1")
    db_conn.rollback()


def test_openai_sweep_sums_the_candidates_estimates_against_max_cost(tmp_path):
    from retrain import sweep
    from retrain.train.openai.checks import price_per_1m

    run_dir = _sweep_run_dir(tmp_path, "smollm2-135m-instruct",
                             {"space": {"epochs": [1, 3], "openai_learning_rate_multiplier": [0.5, 2.0]}})
    estimate = {"billed_tokens_per_epoch": 1_000_000, "model": "gpt-4o-mini-2024-07-18"}
    price = price_per_1m("gpt-4o-mini-2024-07-18")
    out = sweep.openai_cost_check(run_dir, estimate, max_cost_usd=8 * price + 0.01)
    assert out["total_usd"] == pytest.approx(8 * price)  # 1 + 1 + 3 + 3 epochs of 1M tokens
    with pytest.raises(SweepError) as err:
        sweep.openai_cost_check(run_dir, estimate, max_cost_usd=8 * price - 0.01)
    assert f"sum to ${8 * price:.4f}, over the limit max_cost_usd" in str(err.value)
