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
   the triggerer while OpenAI trains; cost-gated; cancelled if the task is killed); `dry_run`, or a dataset with
   no new rows since the last trained run (unless `force_retrain`), stops before it;
   With the run's `sweep` Param on (or a number of candidates) and a `sweep:` section in the YAML, it branches to
   **plan_sweep** instead: **train_sweep** is mapped over the candidates (each in its own sub-run directory, `gpu`
   queue and pool, resumable; with `halving`, **halve_sweep** keeps the best ceil(n / eta) on validation and
   **continue_sweep** resumes them to the end), and **select_candidate** scores them on the validation split, writes
   the sweep report and passes the best on as the run's candidate (the others are registered as `not_selected`);
   on the openai backend **plan_openai_sweep** gates the sum of the candidates' cost estimates on `max_cost_usd`,
   **train_openai_sweep** maps the deferred fine-tuning job over them and **select_openai_candidate** picks as above;
7. **register_candidate** records the candidate in the model registry (PostgreSQL);
8. **evaluate_candidate** runs the candidate and the baseline (the production model, or the base model on a first
   run) on the same frozen test set;
   beside the gate, **select_for_review** (active learning) answers this run's production rows with both models and
   queues the hardest (low margin at the primary label, disagreement, schema failures) in `review_queue` with a Label
   Studio import file; the deploy path never waits for it and its failure never fails the run;
9. **decide** applies the go/no-go thresholds, writes `decision.json` and an HTML report, and branches:
   **deploy_model** (atomic switch of the production alias) or **reject_candidate**. A NO-GO is a successful run.
   With human approval (the YAML's `approval: required`, or the form's `approval`), a GO goes to
   **approve_deployment** first: it waits (state awaiting_input, no worker slot) for a reviewer's Deploy or Reject
   under "Required actions"; the reviewer and their comment are recorded in the registry history; no answer in
   7 days is a Reject;
   The YAML's thresholds are floors: the form may tighten them; loosening one needs `gate_override_reason`, and is
   recorded (decision, report, registry history) and sent to ops;
10. **backup_to_s3** encrypts the run's outputs on this side (AES-256-GCM, a fresh data key per backup wrapped by the
   master key or KMS) and streams them to S3; **verify_backup** is the restore drill; **prune_backups** keeps the
   newest N; **cleanup** deletes local training data only after a verified backup.

New DAGs start paused, and unpausing one never starts training for a past month: the scheduled run Airflow
creates for the latest past tick is skipped by prepare_run when it was due more than an hour ago. An error a retry cannot fix (bad file or parameter, bad dataset) fails its task at once.

Task bodies are one call into the `retrain` package (`include/retrain`); nothing here touches a database or a heavy
library at parse time. The trigger form is generated from `retrain.schemas.run_params.RunParams`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import chain, dag

from retrain import approval
from retrain.dagspec import text, use_case_specs
from retrain.dagtasks import branch, dag_params, run_schedule, step, triggering_user
from retrain.notify import default_notifiers
from retrain.registry.runs import failure_recorder
from retrain.settings import retry_delay_seconds
from retrain.train.openai.operator import OpenAIFineTuneOperator

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=retry_delay_seconds()),  # RETRAIN_RETRY_DELAY_SECONDS (tests use 0)
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=1),
}
SHORT = timedelta(minutes=5)


def build_dag(spec: dict):
    use_case = spec["_file_stem"]
    sweeps = isinstance(spec.get("sweep"), dict)  # the YAML's sweep: section; the sweep Param turns it on per run

    def sweep_step(stage: str, **kwargs):
        """A task named as its stage in retrain.stages, called with one argument (run dir, candidate or results)."""

        @step(task_id=stage, **kwargs)
        def body(arg):
            from retrain import stages

            return getattr(stages, stage)(arg)

        return body
    description = text(spec, "description") or f"Retrain the {use_case} model"

    @dag(
        dag_id=spec["_dag_id"],
        description=description[:200],
        doc_md=__doc__ + f"\n\n## This use case\n{description}\n",
        # Created paused. Unpausing makes Airflow schedule the latest past tick (catchup=False), e.g. the 1st at
        # 03:00 when unpaused on the 3rd: prepare_run skips such a stale scheduled run (retrain.dagtasks), so no
        # training starts until the next tick or a manual trigger.
        schedule="0 3 1 * *",
        start_date=datetime(2026, 1, 1),
        catchup=False,
        is_paused_upon_creation=True,
        max_active_runs=1,
        # on_failure_callback fires once, after the last retry (never while up_for_retry): one alert per failure.
        default_args={**DEFAULT_ARGS, "on_failure_callback": [*default_notifiers(), failure_recorder(use_case)]},
        params=dag_params(spec),
        tags=["retrain", use_case, "llm"],
        render_template_as_native_obj=True,
    )
    def retrain():
        @step(execution_timeout=SHORT)
        def prepare_run(params=None, run_id=None, dag_run=None) -> dict:
            from retrain.dagtasks import skip_if_stale
            from retrain.stages import prepare_run

            skip_if_stale(dag_run)
            return prepare_run(use_case, run_id, dict(params), triggered_by=triggering_user(dag_run),
                               schedule=run_schedule(dag_run))

        @step
        def collect_examples(run: dict) -> dict:
            from retrain.stages import collect

            return collect(run["run_dir"])

        @step
        def build_dataset(run: dict) -> dict:
            from retrain.stages import build

            return build(run["run_dir"])

        @step
        def validate_dataset(run: dict) -> dict:
            from retrain.stages import validate

            return validate(run["run_dir"])

        @step(execution_timeout=SHORT)
        def report_dataset(run: dict) -> dict:
            from retrain.stages import summarize

            return summarize(run["run_dir"])

        @branch(execution_timeout=SHORT)
        def choose_backend(run: dict) -> list[str]:
            """dry_run, or no new data (unless force_retrain), stops here: everything downstream is skipped."""
            from retrain.stages import should_train, sweep_requested

            if run["dry_run"] or not should_train(run["run_dir"]):
                return []
            if sweeps and sweep_requested(run["run_dir"]):  # the sweep Param (off / on / n)
                return ["plan_openai_sweep" if run["backend"] == "openai" else "plan_sweep"]
            return ["train_openai" if run["backend"] == "openai" else "train_qlora"]

        # Training holds the GPU: its own Celery queue and a pool sized to the number of GPUs.
        @step(queue="gpu", pool="gpu", execution_timeout=timedelta(hours=12))
        def train_qlora(run: dict) -> dict:
            from retrain.stages import train_qlora

            return train_qlora(run["run_dir"])

        train_openai = OpenAIFineTuneOperator(
            task_id="train_openai",
            run_dir="{{ ti.xcom_pull(task_ids='prepare_run')['run_dir'] }}",
            max_cost_usd="{{ ti.xcom_pull(task_ids='prepare_run')['max_cost_usd'] }}",
        )

        # Joins the two training branches. It pulls the run from XCom instead of taking it as an argument: an
        # argument would make prepare_run an upstream, and its success would satisfy the trigger rule on dry runs.
        @step(trigger_rule="none_failed_min_one_success", execution_timeout=SHORT)
        def register_candidate(ti=None) -> dict:
            from retrain.stages import register_candidate

            return register_candidate(ti.xcom_pull(task_ids="prepare_run")["run_dir"])

        @step(execution_timeout=timedelta(hours=3))
        def evaluate_candidate(run: dict) -> dict:
            from retrain.stages import evaluate

            return evaluate(run["run_dir"])

        @branch(execution_timeout=timedelta(minutes=10))
        def decide(run: dict, dag_run=None, ti=None) -> str:
            """GO deploys (after a reviewer's Deploy when approval is required), NO-GO rejects; both are successful
            runs (a NO-GO is a decision, not a failure)."""
            from retrain.stages import approval_request, decide

            if decide(run["run_dir"])["decision"] != "GO":
                return "reject_candidate"
            request = approval_request(run["run_dir"], dag_id=dag_run.dag_id, run_id=dag_run.run_id)
            if request is None:
                return "deploy_model"
            ti.xcom_push(key=approval.REQUEST_KEY, value=request)
            return approval.TASK_ID

        # Waits in state awaiting_input (no worker slot) for a reviewer's Deploy/Reject (retrain.approval).
        approve_deployment = approval.approval_task(execution_timeout=SHORT)

        # deploy_model and reject_candidate follow decide directly or after the review: one of their two upstreams is
        # skipped. They pull the run from XCom (as register_candidate does) so that prepare_run's success never
        # satisfies their trigger rule on a dry run.
        @step(execution_timeout=timedelta(minutes=30), trigger_rule="none_failed_min_one_success")
        def deploy_model(dag_run=None, ti=None) -> dict:
            from retrain.stages import deploy_candidate

            return deploy_candidate(ti.xcom_pull(task_ids="prepare_run")["run_dir"], actor=f"airflow:{dag_run.dag_id}",
                                    review=ti.xcom_pull(task_ids=approval.TASK_ID, key=approval.REVIEW_KEY))

        @step(execution_timeout=SHORT, trigger_rule="none_failed_min_one_success")
        def reject_candidate(dag_run=None, ti=None) -> dict:
            from retrain.stages import reject_candidate

            return reject_candidate(ti.xcom_pull(task_ids="prepare_run")["run_dir"], actor=f"airflow:{dag_run.dag_id}",
                                    review=ti.xcom_pull(task_ids=approval.TASK_ID, key=approval.REVIEW_KEY))

        # Backs up whatever the run produced (dataset, manifest, model, report, decision) after either branch of
        # the gate. Same XCom pull as register_candidate: skipped on dry runs, where the dataset must stay local.
        @step(trigger_rule="none_failed_min_one_success", execution_timeout=timedelta(hours=2))
        def backup_to_s3(ti=None) -> dict:
            from retrain.stages import backup

            return backup(ti.xcom_pull(task_ids="prepare_run")["run_dir"])

        @step
        def verify_backup(run: dict) -> dict:
            """The restore drill: nothing local is deleted unless the uploaded backup decrypts and hashes right."""
            from retrain.stages import verify_backup

            return verify_backup(run["run_dir"])

        @step(execution_timeout=timedelta(minutes=30))
        def prune_backups(run: dict) -> dict:
            from retrain.stages import prune_backups

            return prune_backups(run["run_dir"])

        @step(execution_timeout=timedelta(minutes=10))
        def cleanup(run: dict) -> dict:
            from retrain.stages import cleanup

            return cleanup(run["run_dir"])

        # Active learning beside the gate: never on the deploy path. Its body never raises (a failure is logged and
        # shown as "REVIEW: failed" in the summary and the UI), and a timeout alerts without marking the run failed
        # in pipeline_runs. cleanup waits for it: it reads batch.jsonl, which cleanup deletes.
        @step(execution_timeout=timedelta(hours=3), on_failure_callback=default_notifiers())
        def select_for_review(run: dict) -> dict:
            from retrain.stages import select_for_review

            return select_for_review(run["run_dir"])

        run = prepare_run()
        validated = validate_dataset(run)
        chain(run, collect_examples(run), build_dataset(run), validated)
        validated >> report_dataset(run)
        trained = [train_qlora(run), train_openai]
        branches = list(trained)
        if sweeps:  # hyper-parameter sweep: one mapped training task per candidate (retrain.sweep)
            gpu = {"queue": "gpu", "pool": "gpu", "execution_timeout": timedelta(hours=12)}
            planned = sweep_step("plan_sweep", execution_timeout=SHORT)(run["run_dir"])
            rung = sweep_step("train_sweep", **gpu).expand(arg=planned)
            if spec["sweep"].get("halving"):  # successive halving: the best ceil(n / eta) continue
                rung = sweep_step("continue_sweep", **gpu).expand(arg=sweep_step("halve_sweep")(rung))
            branches.append(planned)
            trained.append(sweep_step("select_candidate", execution_timeout=timedelta(hours=3))(rung))
            # openai backend: the cost gate over the sum of the estimates, then one deferred job per candidate (its
            # key is the candidate's run id: a retry re-attaches); max_cost_usd comes from the candidate's run config.
            planned = sweep_step("plan_openai_sweep", execution_timeout=SHORT)(run["run_dir"])
            jobs = OpenAIFineTuneOperator.partial(task_id="train_openai_sweep").expand(candidate=planned)
            branches.append(planned)
            trained.append(sweep_step("select_openai_candidate", execution_timeout=timedelta(hours=3))(jobs.output))
        validated >> choose_backend(run) >> branches
        registered = register_candidate()
        trained >> registered
        outcome = [deploy_model(), reject_candidate()]
        decided = decide(run)
        evaluated = evaluate_candidate(run)
        chain(registered, evaluated, decided, outcome)
        decided >> approve_deployment >> outcome
        backup = backup_to_s3()
        outcome >> backup
        cleaned = cleanup(run)
        chain(backup, verify_backup(run), prune_backups(run), cleaned)
        evaluated >> select_for_review(run) >> cleaned

    return retrain()


for _spec in use_case_specs():
    if _spec.get("kind") != "generation":  # free-text use cases: dags/retrain_generation.py
        globals()[_spec["_dag_id"]] = build_dag(_spec)
