"""The real `retrain_product_intent` DAG on the qlora backend, end to end, with the real SmolLM2-135M model.

Two months through dag.test() against the embedded PostgreSQL and an S3 API server (moto):

* month 1: collect -> build -> validate (Great Expectations) -> QLoRA fine-tuning of SmolLM2 in its own process
  (nf4 base, float32 compute on the CPU) -> register -> evaluate the candidate against the base model on the
  frozen test set -> GO -> deploy (atomic switch of models/product_intent/production) -> encrypted backup ->
  restore drill -> prune -> cleanup;
* month 2, no new data: the same training again; the baseline is now the production model, the candidate is no
  better, and the gate says NO-GO on the relative-improvement rule. Production is unchanged.

The data set is small and training short (a CPU run in CI), so month 1's absolute-score and JSON-validity
thresholds are lowered through the trigger Params, as a team would do for a smoke run; the relative-improvement
rule keeps its YAML value (10%) and decides month 2. The full-size run (160 steps, YAML thresholds) is the demo.
"""

from __future__ import annotations

import json
import pytest

from conftest import registry_rows, run_no_go_month, states
from retrain.schemas.use_case import load_use_case
from retrain.rundir import RunDir
from retrain.registry.deploy import use_case_models_dir
from retrain.data.synthetic import seed_examples

pytestmark = pytest.mark.integration
UC = load_use_case("product_intent")
ROWS, SEED = 260, 7
PARAMS = {
    "max_train_steps": 32,
    "training_overrides": {"eval_steps": 16, "save_steps": 16, "logging_steps": 16},
    "min_score": 0.05,
    "min_json_validity": 0.25,
    # 32 steps on the CPU cannot reach the YAML's floors (0.85 / 0.95): loosening them needs a reason (issue 17).
    "gate_override_reason": "32-step CPU test run: the floors are for real training",
}
MONTH_1_TASKS = ("prepare_run", "collect_examples", "build_dataset", "validate_dataset", "report_dataset",
                 "choose_backend", "train_qlora", "register_candidate", "evaluate_candidate", "decide",
                 "deploy_model", "backup_to_s3", "verify_backup", "prune_backups", "cleanup")


def test_real_smollm2_month_1_goes_and_month_2_on_the_same_data_does_not(db_conn, dagbag, backup_env, task_log):
    seed_examples(db_conn, UC, ROWS, seed=SEED, dirty=0.0)
    dag = dagbag.dags["retrain_product_intent"]
    task_log.clear()

    run = dag.test(run_conf=PARAMS)
    out = task_log()
    st = states(run)
    assert {t: st[t] for t in MONTH_1_TASKS} == dict.fromkeys(MONTH_1_TASKS, "success"), out[-6000:]
    assert st["train_openai"] == "skipped" and st["reject_candidate"] == "skipped"
    run_dir = RunDir.for_run("product_intent", run.run_id).path

    # Training: the real model, 4-bit base, float32 compute, progress streamed into the task log, loss falling.
    result = json.loads((run_dir / "candidate" / "train_result.json").read_text())
    assert (result["adapter"], result["quantized"], result["compute_dtype"]) == ("qlora", True, "float32")
    assert result["base_model"] == "smollm2-135m-instruct" and result["steps"] == 32
    assert result["spec"]["eval_steps"] == 16  # the Params reached the trainer through run_config.json
    assert result["eval_loss"] < 0.7 * result["eval_loss_initial"], result
    assert "[train] step 32/32 loss" in out and "[eval] step 0/32 eval_loss" in out
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "merged/tokenizer.json",
                 "model_card.md", "Modelfile", "loss.png"):
        assert (run_dir / "candidate" / name).is_file(), name

    # Evaluation on the frozen test set: the fine-tuned model beats the untuned base model it came from.
    decision = json.loads((run_dir / "decision.json").read_text())
    assert decision["decision"] == "GO", decision["summary"]
    assert decision["baseline_kind"] == "base_model"
    assert decision["candidate_score"] > decision["baseline_score"]
    metrics = json.loads((run_dir / "evaluation" / "metrics.json").read_text())["comparison"]["metrics"]
    assert metrics["json_validity"]["candidate"] > metrics["json_validity"]["baseline"]
    assert (run_dir / "evaluation" / "report.html").is_file()

    # Deploy: registry and the served alias agree.
    (row,) = registry_rows(db_conn)
    assert (row["backend"], row["status"], row["run_id"]) == ("qlora", "production", run.run_id)
    production = use_case_models_dir("product_intent") / "production"
    assert (production / "model.safetensors").is_file()
    served = production.resolve()

    # Backup, drill, cleanup: the training data is gone locally, the backup record stays.
    assert (run_dir / "backup.json").is_file() and not (run_dir / "train.jsonl").exists()

    # Month 2: nothing new in the table, so the same data set and the same training; the production model is the
    # baseline now, and a candidate that is no better must not replace it.
    models2, _ = run_no_go_month(db_conn, dag, PARAMS, task_log)
    assert models2["baseline"]["version"] == row["version"]  # the deployed copy of month 1's candidate
    assert production.resolve() == served
