"""
# Monthly retraining of a fine-tuned model (`retrain_<use_case>`)

One DAG per use-case file in `include/use_cases/*.yaml`. Every month (03:00 on the 1st) or when triggered from the UI:

1. **prepare_run** validates the use case and the trigger parameters (a bad value fails here, naming the field)
   and creates the run directory;
2. **collect_examples** streams the production examples added since the last run out of PostgreSQL
   (watermarked; a retry re-reads the same window) and scrubs personal data before anything is written;
3. **build_dataset** drops rows that break the output contract into `rejected.jsonl`, deduplicates, and writes
   `train/val/test.jsonl` (chat `messages` format; split fixed by content hash; the test set only grows)
   plus `manifest.json`;
4. **validate_dataset** runs Great Expectations on the dataset and on this month's batch; Data Docs land in the
   run directory and a failure lists each failed expectation with offending values;
5. **report_dataset** prints where the dataset, manifest and Data Docs are;
6. **choose_backend** branches to **train_qlora** (TRL + PEFT + bitsandbytes in its own process, on the `gpu` queue
   and pool; resumes from its newest checkpoint when retried) or **train_openai** (a fine-tuning job, deferred to
   the triggerer while OpenAI trains; cost-gated; cancelled if the task is killed); `dry_run` stops before it;
7. **register_candidate** records the candidate in the model registry (PostgreSQL);
8. **evaluate_candidate** runs the candidate and the baseline (the production model, or the base model on a first
   run) on the same frozen test set;
9. **decide** applies the go/no-go thresholds (Params override the YAML), writes `decision.json` and an HTML report,
   and branches: **deploy_model** (atomic switch of the production alias) or **reject_candidate**. A NO-GO is a
   successful run;
10. **backup_to_s3** encrypts the run's outputs on this side (AES-256-GCM, a fresh data key per backup wrapped by the
   master key or KMS) and streams them to S3; **verify_backup** is the restore drill; **prune_backups** keeps the
   newest N; **cleanup** deletes local training data only after a verified backup.

Task bodies are one call into the `retrain` package (`include/retrain`); nothing here touches a database or a heavy
library at parse time.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Param, chain, dag, task

from retrain.dagspec import use_case_specs
from retrain.notify import default_notifiers
from retrain.registry.runs import failure_recorder
from retrain.train.openai.operator import OpenAIFineTuneOperator

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    # Ops can shorten it (tests use 0) without touching the DAG; not a Variable: nothing is looked up at parse time.
    "retry_delay": timedelta(seconds=float(os.environ.get("RETRAIN_RETRY_DELAY_SECONDS", "60"))),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=1),
}


def _params(spec: dict) -> dict[str, Param]:
    thresholds = spec.get("thresholds") or {}
    training = spec.get("training") or {}
    return {
        "backend": Param(
            training.get("backend", "qlora"),
            type="string",
            enum=["qlora", "openai"],
            description="qlora: fine-tune locally on the gpu queue; openai: an OpenAI fine-tuning job",
        ),
        "base_model": Param(
            "",
            type="string",
            description=f"Hugging Face id or local path (qlora), OpenAI model (openai); empty = the use case's default "
            f"({training.get('base_model', 'smollm2-135m-instruct')})",
        ),
        "sample_limit": Param(
            None, type=["null", "integer"], minimum=1, description="collect at most this many new rows this run"
        ),
        "dry_run": Param(False, type="boolean", description="stop after the dataset is validated (no training)"),
        "max_train_steps": Param(
            None, type=["null", "integer"], minimum=1, description="cap optimizer steps (qlora); empty = from epochs"
        ),
        "adapter": Param(
            training.get("adapter", "qlora"),
            type="string",
            enum=["qlora", "lora"],
            description="qlora: LoRA on a 4-bit (nf4) base; lora: LoRA on a full-precision base",
        ),
        "training_overrides": Param(
            {},
            type="object",
            description='Training fields for this run only (any field of the use case\'s training block), e.g. '
            '{"lora_r": 32, "learning_rate": 0.0005, "eval_steps": 10, "save_steps": 10}. Unknown or invalid '
            "fields fail prepare_run naming the field.",
        ),
        "max_cost_usd": Param(
            float(training.get("max_cost_usd", 10.0)), type="number", minimum=0,
            description="openai backend: refuse to start a fine-tuning job whose estimated cost is higher",
        ),
        "min_score": Param(thresholds.get("min_score", 0.85), type="number", minimum=0, maximum=1),
        "min_relative_improvement": Param(
            thresholds.get("min_relative_improvement", 0.10), type="number", minimum=-1, maximum=10
        ),
        "max_p95_latency_regression": Param(thresholds.get("max_p95_latency_regression", 0.25), type="number", minimum=0),
        "min_json_validity": Param(thresholds.get("min_json_validity", 0.95), type="number", minimum=0, maximum=1),
        "require_significance": Param(thresholds.get("require_significance", False), type="boolean"),
    }


def build_dag(spec: dict):
    use_case = spec["_file_stem"]
    description = " ".join(str(spec.get("description", "")).split()) or f"Retrain the {use_case} model"

    @dag(
        dag_id=f"retrain_{use_case}",
        description=description[:200],
        doc_md=__doc__ + f"\n\n## This use case\n{description}\n",
        schedule="0 3 1 * *",
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        # on_failure_callback fires once, after the last retry (never while up_for_retry): one alert per failure.
        default_args={**DEFAULT_ARGS, "on_failure_callback": [*default_notifiers(), failure_recorder(use_case)]},
        params=_params(spec),
        tags=["retrain", use_case, "llm"],
        render_template_as_native_obj=True,
    )
    def retrain():
        @task(execution_timeout=timedelta(minutes=5))
        def prepare_run(params=None, run_id=None) -> dict:
            from retrain.stages import prepare_run

            return prepare_run(use_case, run_id, dict(params))

        @task
        def collect_examples(run: dict) -> dict:
            from retrain.stages import collect

            return collect(run["run_dir"])

        @task
        def build_dataset(run: dict) -> dict:
            from retrain.stages import build

            return build(run["run_dir"])

        @task(retries=0)  # a failed expectation is a data problem: retrying cannot fix it
        def validate_dataset(run: dict) -> dict:
            from retrain.stages import validate

            return validate(run["run_dir"])

        @task(execution_timeout=timedelta(minutes=5))
        def report_dataset(run: dict) -> dict:
            from retrain.stages import summarize

            return summarize(run["run_dir"])

        @task.branch(execution_timeout=timedelta(minutes=5))
        def choose_backend(run: dict) -> list[str]:
            """dry_run stops here (everything downstream is skipped); otherwise the configured backend trains."""
            if run["dry_run"]:
                return []
            return ["train_openai" if run["backend"] == "openai" else "train_qlora"]

        # Training holds the GPU: its own Celery queue and a pool sized to the number of GPUs.
        @task(queue="gpu", pool="gpu", execution_timeout=timedelta(hours=12))
        def train_qlora(run: dict) -> dict:
            from retrain.train.launch import train_qlora

            # Params (adapter, max_train_steps, training_overrides) were validated and frozen into run_config.json
            # by prepare_run: the trainer reads them from there.
            result = train_qlora(run["run_dir"])
            return {k: result.get(k) for k in ("backend", "merged_path", "train_loss", "eval_loss", "steps", "seconds")}

        train_openai = OpenAIFineTuneOperator(
            task_id="train_openai",
            run_dir="{{ ti.xcom_pull(task_ids='prepare_run')['run_dir'] }}",
            max_cost_usd="{{ params.max_cost_usd }}",
        )

        # Joins the two training branches. It pulls the run from XCom instead of taking it as an argument: an
        # argument would make prepare_run an upstream, and its success would satisfy the trigger rule on dry runs.
        @task(trigger_rule="none_failed_min_one_success", execution_timeout=timedelta(minutes=5))
        def register_candidate(ti=None) -> dict:
            from retrain.stages import register_candidate

            return register_candidate(ti.xcom_pull(task_ids="prepare_run")["run_dir"])

        @task(execution_timeout=timedelta(hours=3))
        def evaluate_candidate(run: dict) -> dict:
            from retrain.stages import evaluate

            return evaluate(run["run_dir"])

        @task.branch(execution_timeout=timedelta(minutes=10))
        def decide(run: dict) -> str:
            """GO deploys, NO-GO rejects; both are successful runs (a NO-GO is a decision, not a failure)."""
            from retrain.stages import decide

            return "deploy_model" if decide(run["run_dir"])["decision"] == "GO" else "reject_candidate"

        @task(execution_timeout=timedelta(minutes=30))
        def deploy_model(run: dict, dag_run=None) -> dict:
            from retrain.stages import deploy_candidate

            return deploy_candidate(run["run_dir"], actor=f"airflow:{dag_run.dag_id}")

        @task(execution_timeout=timedelta(minutes=5))
        def reject_candidate(run: dict, dag_run=None) -> dict:
            from retrain.stages import reject_candidate

            return reject_candidate(run["run_dir"], actor=f"airflow:{dag_run.dag_id}")

        # Backs up whatever the run produced (dataset, manifest, model, report, decision) after either branch of
        # the gate. Same XCom pull as register_candidate: skipped on dry runs, where the dataset must stay local.
        @task(trigger_rule="none_failed_min_one_success", execution_timeout=timedelta(hours=2))
        def backup_to_s3(ti=None) -> dict:
            from retrain.stages import backup

            return backup(ti.xcom_pull(task_ids="prepare_run")["run_dir"])

        @task(execution_timeout=timedelta(hours=1))
        def verify_backup(run: dict) -> dict:
            """The restore drill: nothing local is deleted unless the uploaded backup decrypts and hashes right."""
            from retrain.stages import verify_backup

            return verify_backup(run["run_dir"])

        @task(execution_timeout=timedelta(minutes=30))
        def prune_backups(run: dict) -> dict:
            from retrain.stages import prune_backups

            return prune_backups(run["run_dir"])

        @task(execution_timeout=timedelta(minutes=10))
        def cleanup(run: dict) -> dict:
            from retrain.stages import cleanup

            return cleanup(run["run_dir"])

        run = prepare_run()
        validated = validate_dataset(run)
        chain(run, collect_examples(run), build_dataset(run), validated)
        validated >> report_dataset(run)
        branch = choose_backend(run)
        trained = [train_qlora(run), train_openai]
        validated >> branch >> trained
        registered = register_candidate()
        trained >> registered
        decision = decide(run)
        outcome = [deploy_model(run), reject_candidate(run)]
        chain(registered, evaluate_candidate(run), decision, outcome)
        backup = backup_to_s3()
        outcome >> backup
        chain(backup, verify_backup(run), prune_backups(run), cleanup(run))

    return retrain()


for _spec in use_case_specs():
    globals()[f"retrain_{_spec['_file_stem']}"] = build_dag(_spec)
