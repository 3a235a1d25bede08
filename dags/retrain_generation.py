"""
# Monthly retraining of a free-text use case, one LoRA adapter per tenant (`retrain_<use_case>`, kind generation)

One DAG per use-case file with `kind: generation` (e.g. `email_voice`: drafts e-mails in each user's voice).

1. **prepare_run**, **collect_examples** as for every use case (validated Params, watermarked collection, PII
   scrubbed; each row keeps its tenant);
2. **build_dataset** writes one sub-run directory per tenant (`tenants/<tenant>/`: chat-format train/val/test,
   the test set frozen and only growing) and `tenants.json` (rows per tenant, eligible or not and why);
3. **validate_dataset**: Great Expectations for text (non-empty, length bounds, language, near-duplicates, PII
   scrubbed, examples per tenant);
4. **plan_tenants** lists the tenants to train (enough examples; nothing on a dry run or without new data unless
   `force_retrain`), skips the others with the reason, and fits the voice-attribution classifier once;
5. **train_tenant** is mapped over the tenants (`gpu` queue and pool, resumable from its checkpoints);
6. **evaluate_tenant** registers the adapter as `<use_case>@<tenant>` and compares it with the tenant's production
   adapter (or the base model on a first run) on the tenant's test set: chrF, ROUGE-L, style, voice attribution,
   perplexity, 95% bootstrap CIs, the LLM judge if configured;
7. **decide_tenant** applies the `generation_gate`: GO deploys the tenant's adapter and Ollama Modelfile behind its
   own production alias, NO-GO rejects it (a decision, not a failure);
8. **summarize_tenants** writes the run's table (every tenant, metrics with CIs, decision); then **backup_to_s3**,
   **verify_backup**, **prune_backups** and **cleanup** as for every use case (not on a dry run).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import chain, dag

from retrain.dagspec import text, use_case_specs
from retrain.dagtasks import branch, dag_params, step, triggering_user
from retrain.notify import default_notifiers
from retrain.registry.runs import failure_recorder
from retrain.settings import retry_delay_seconds

DEFAULT_ARGS = {
    "owner": "ml-platform",
    "retries": 2,
    "retry_delay": timedelta(seconds=retry_delay_seconds()),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=30),
    "execution_timeout": timedelta(hours=1),
}
SHORT = timedelta(minutes=5)
GPU = {"queue": "gpu", "pool": "gpu", "execution_timeout": timedelta(hours=12)}


def stage(module: str, name: str, task_id: str | None = None, **kwargs):
    """A task named as its body ``retrain.<module>.<name>``, called with one argument (run dir or tenant)."""

    @step(task_id=task_id or name, **kwargs)
    def body(arg):
        import importlib

        return getattr(importlib.import_module(f"retrain.{module}"), name)(arg)

    return body


def build_dag(spec: dict):
    use_case = spec["_file_stem"]
    description = text(spec, "description") or f"Retrain the {use_case} adapters"

    @dag(dag_id=spec["_dag_id"], description=description[:200],
         doc_md=__doc__ + f"\n\n## This use case\n{description}\n", schedule="0 3 1 * *",
         start_date=datetime(2026, 1, 1), catchup=False, is_paused_upon_creation=True, max_active_runs=1,
         default_args={**DEFAULT_ARGS, "on_failure_callback": [*default_notifiers(), failure_recorder(use_case)]},
         params=dag_params(spec), tags=["retrain", use_case, "llm", "generation"], render_template_as_native_obj=True)
    def retrain():
        @step(execution_timeout=SHORT)
        def prepare_run(params=None, run_id=None, dag_run=None) -> dict:
            from retrain.dagtasks import skip_if_stale
            from retrain.stages import prepare_run

            skip_if_stale(dag_run)
            return prepare_run(use_case, run_id, dict(params), triggered_by=triggering_user(dag_run))

        @branch(execution_timeout=SHORT)
        def summarize_tenants(run_dir: str) -> list[str]:
            """Always runs (tenants may all be skipped); backs up unless nothing was trained (as a dry run)."""
            from retrain.generation import summarize

            return ["backup_to_s3"] if summarize(run_dir)["decided"] else []

        run = prepare_run()
        run_dir = run["run_dir"]
        planned = stage("generation", "plan_tenants", execution_timeout=SHORT)(run_dir)
        chain(run, stage("stages", "collect", task_id="collect_examples")(run_dir),
              stage("generation", "build", task_id="build_dataset")(run_dir),
              stage("generation", "validate", task_id="validate_dataset")(run_dir), planned)
        trained = stage("generation", "train_tenant", **GPU).expand(arg=planned)
        evaluated = stage("generation", "evaluate_tenant", execution_timeout=timedelta(hours=3)).expand(arg=trained)
        decided = stage("generation", "decide_tenant", execution_timeout=timedelta(minutes=30)).expand(arg=evaluated)
        # Runs when every tenant was skipped (empty plan) as well as after the decisions; not after a stale skip.
        summary = summarize_tenants.override(trigger_rule="none_failed_min_one_success")(run_dir)
        decided >> summary
        chain(summary, stage("stages", "backup", task_id="backup_to_s3", execution_timeout=timedelta(hours=2))(run_dir),
              stage("stages", "verify_backup")(run_dir),
              stage("stages", "prune_backups", execution_timeout=timedelta(minutes=30))(run_dir),
              stage("stages", "cleanup", execution_timeout=timedelta(minutes=10))(run_dir))

    return retrain()


for _spec in use_case_specs():
    if _spec.get("kind") == "generation":
        globals()[_spec["_dag_id"]] = build_dag(_spec)
