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
5. **report_dataset** prints where everything is.

Stages not built yet: training, evaluation, go/no-go gate, deploy, encrypted backup (see README).
Task bodies are one call into the `retrain` package (`include/retrain`); nothing here touches a database or a heavy
library at parse time.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, chain, dag, task

from retrain.dagspec import use_case_specs

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
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
            description=f"Hugging Face id, local path or OpenAI model; empty = the use case's default "
            f"({training.get('base_model', 'smollm2-135m-instruct')})",
        ),
        "sample_limit": Param(
            None, type=["null", "integer"], minimum=1, description="collect at most this many new rows this run"
        ),
        "dry_run": Param(False, type="boolean", description="stop after the dataset is validated (no training)"),
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
        default_args=DEFAULT_ARGS,
        params=_params(spec),
        tags=["retrain", use_case, "llm"],
        render_template_as_native_obj=True,
    )
    def retrain():
        @task(execution_timeout=timedelta(minutes=5))
        def prepare_run(params=None, run_id=None) -> dict:
            from retrain.pipeline import prepare_run

            return prepare_run(use_case, run_id, dict(params))

        @task
        def collect_examples(run: dict) -> dict:
            from retrain.pipeline import collect

            return collect(run["run_dir"])

        @task
        def build_dataset(run: dict) -> dict:
            from retrain.pipeline import build

            return build(run["run_dir"])

        @task(retries=0)  # a failed expectation is a data problem: retrying cannot fix it
        def validate_dataset(run: dict) -> dict:
            from retrain.pipeline import validate

            return validate(run["run_dir"])

        @task(execution_timeout=timedelta(minutes=5))
        def report_dataset(run: dict) -> dict:
            from retrain.pipeline import summarize

            return summarize(run["run_dir"])

        run = prepare_run()
        chain(run, collect_examples(run), build_dataset(run), validate_dataset(run), report_dataset(run))

    return retrain()


for _spec in use_case_specs():
    globals()[f"retrain_{_spec['_file_stem']}"] = build_dag(_spec)
