"""
# Roll back a use case's production model (`rollback_model`)

Manual only. Moves production of one use case back to a named model version, or (version left empty) to the
version that served before the current one. Versions someone already rolled back away from are skipped by the
automatic choice; name them explicitly to restore one.

In one registry transaction the current production version becomes `retired`, the chosen one `production`, and
both moves are written to the history with **who** (the user who triggered this run) and **why** (the reason).
For a local model the alias `models/<use_case>/production` is switched atomically to `versions/v<N>`; for an
OpenAI model the registry records the model id. A retry of this run never steps back twice.

Same thing from a shell: `retrain rollback --use-case <name> [--to-version N] --reason "..."`;
see the registry with `retrain registry --use-case <name>`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag

from retrain.dagspec import use_case_specs
from retrain.dagtasks import step
from retrain.settings import retry_delay_seconds

_USE_CASES = [s["_file_stem"] for s in use_case_specs()]
_use_case_schema = {"enum": _USE_CASES} if _USE_CASES else {}


@dag(
    dag_id="rollback_model",
    description="Move a use case's production model back to a named or the previous version, with a reason",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # two rollbacks at once would race on "the previous version"
    default_args={
        "owner": "ml-platform",
        "retries": 2,
        "retry_delay": timedelta(seconds=min(30.0, retry_delay_seconds())),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(minutes=30),  # may copy a model back from its training run
    },
    params={
        "use_case": Param(type="string", description="which use case's production model to roll back",
                          **_use_case_schema),
        "tenant": Param(None, type=["null", "string"], maxLength=200,
                        description="generation use cases (e.g. email_voice): the tenant whose adapter rolls back"),
        "to_version": Param(None, type=["null", "integer"], minimum=1,
                            description="registry version to restore; empty = the previous production version"),
        # minLength = retrain.registry.deploy.MIN_REASON_CHARS (a literal here: the DAG file imports nothing at parse time)
        "reason": Param(type="string", minLength=10, maxLength=500,
                        description="why (recorded in the registry history; at least 10 characters)"),
    },
    tags=["retrain", "ops", "rollback"],
)
def rollback_model():
    # step = @task whose body fails at once (no retries) on what a retry cannot change (nothing to roll back to,
    # a wrong version number); database outages still get the retries.
    @step
    def rollback(params=None, dag_run=None, run_id=None) -> dict:
        from retrain.registry.deploy import run_rollback

        actor = getattr(dag_run, "triggering_user_name", None) or "airflow"
        if params.get("tenant"):  # one tenant's adapter of a generation use case (retrain.registry.tenants)
            from retrain.registry.tenants import run_rollback as run_tenant_rollback

            return run_tenant_rollback(params["use_case"], params["tenant"], to_version=params.get("to_version"),
                                       reason=params["reason"], actor=actor, run_id=run_id)
        return run_rollback(params["use_case"], to_version=params.get("to_version"), reason=params["reason"],
                            actor=actor, run_id=run_id)

    rollback()


rollback_model()
