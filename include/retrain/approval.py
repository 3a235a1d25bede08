"""Human approval before deploy (issue 18): a GO candidate of a use case with ``approval: required`` (or a run
triggered with ``approval=required``) waits for a reviewer's Deploy/Reject in Airflow before ``deploy_model``.

* Policy (:func:`resolve`): the run's ``approval`` Param (``use_case`` | ``required`` | ``none``) against the YAML's
  ``approval`` (``required`` | ``none``). A run may always require approval; waiving a YAML ``required`` is a
  loosening like a lowered threshold: it needs ``gate_override_reason`` and is recorded as a gate override
  (run_config.json, decision.json, the report, the registry history) and sent to ops.
* The task (:func:`approval_task`): Airflow's ``HITLBranchOperator`` (apache-airflow-providers-standard) with
  the options Deploy/Reject mapped to ``deploy_model``/``reject_candidate``, a ``comment`` field, and the request
  that ``decide`` prepared (:func:`request_message`) as its subject and body. On Airflow 3.3 it parks in the task
  state ``awaiting_input``: no worker slot, no trigger, no triggerer. A reviewer answers in the UI (Required
  actions, :func:`ui_path`) or through the REST API; no answer within :data:`RESPONSE_TIMEOUT` is a Reject (the
  scheduler applies the default), so production never changes without a human.
* The answer (:func:`review_from_task`) is pushed as the XCom ``review`` of the task, just before it branches: who
  answered, the choice, the comment, when (the branch result names no one, and in Airflow 3 branching ends the task's
  execution: nothing after ``do_branch`` runs, not even a ``post_execute`` hook). ``deploy_model`` /
  ``reject_candidate`` record it in the registry history (:func:`registry_entry`: actor = the reviewer, reason with
  the comment, details).

Imported by the DAG file at parse time: Airflow's HITL operator module and pydantic, no database and no model.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLBranchOperator

from retrain.schemas.base import ConfigError

TASK_ID = "approve_deployment"
REQUEST_KEY = "approval_request"  # XCom key of decide's prepared request (subject, body, link)
REVIEW_KEY = "review"  # XCom key of the approval task's answer
DEPLOY, REJECT = "Deploy", "Reject"
OPTIONS_MAPPING = {DEPLOY: "deploy_model", REJECT: "reject_candidate"}
RESPONSE_TIMEOUT = timedelta(days=7)
MAX_COMMENT_CHARS = 1000
FILES_URL = "/retrain/files"  # where plugins/retrain_ui.py serves run files (paths relative to $RETRAIN_HOME/runs)

log = logging.getLogger(__name__)


# --- policy --------------------------------------------------------------------------------------------------


def resolve(use_case_value: str, requested: str, *, reason: str | None, by: str | None) -> tuple[bool, list[dict]]:
    """(approval required for this run, gate overrides to record). ``use_case_value``: the YAML's ``approval``;
    ``requested``: the run's ``approval`` Param. Waiving a YAML ``required`` without a reason raises."""
    if requested == "use_case":
        return use_case_value == "required", []
    if requested == "required":
        return True, []
    if use_case_value != "required":
        return False, []
    if not reason:
        raise ConfigError(
            "run parameters: approval=none waives the use case's approval: required. Keep approval=use_case, or "
            "give gate_override_reason (recorded and sent to ops) to deploy a GO without a reviewer for this run")
    return False, [{"threshold": "approval", "floor": "required", "value": "none", "by": by or "unknown",
                    "reason": reason}]


# --- the request -----------------------------------------------------------------------------------------------


def ui_path(dag_id: str, run_id: str, task_id: str = TASK_ID) -> str:
    """Airflow 3's page where a reviewer answers this task (the UI route of HITLOperator.generate_link_to_ui)."""
    from urllib.parse import quote

    return f"/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}/tasks/{quote(task_id, safe='')}/required_actions"


def _num(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def request_message(*, use_case: str, version: int, decision: dict, metrics: dict, report_link: str | None,
                    dag_id: str, run_id: str) -> dict:
    """Subject and Markdown body of the approval request: the decision, the key metrics (baseline vs candidate
    primary score, JSON validity), any gate override, and where the report is."""
    from retrain.evaluate.gate import override_note

    rows = []
    for name, label in (("primary_score", f"primary score ({decision.get('primary_label', 'primary label')})"),
                        ("json_validity", "JSON validity"), ("schema_validity", "schema validity")):
        m = metrics.get(name)
        if isinstance(m, dict):
            rows.append(f"| {label} | {_num(m.get('baseline'))} | {_num(m.get('candidate'))} |")
    overrides = [f"- {override_note(o)}" for o in decision.get("overrides") or []]
    body = "\n".join([
        f"**{decision.get('decision', '?')}** for `{use_case}` v{version} (run `{run_id}`)",
        "",
        str(decision.get("summary", "")),
        "",
        f"| metric | baseline ({decision.get('baseline_kind', 'baseline')}) | candidate v{version} |",
        "|---|---|---|",
        *rows,
        "",
        "**Gate overrides:**" if overrides else "Gate overrides: none",
        *overrides,
        "",
        f"Report: [{report_link}]({report_link})" if report_link else "Report: not available",
        "",
        f"**Deploy** makes v{version} the production model; **Reject** records it as rejected, with your comment, "
        f"and production stays as it is. No answer within {RESPONSE_TIMEOUT.days} days counts as Reject.",
    ])
    subject = f"Deploy {use_case} v{version}? The gate says {decision.get('decision', '?')}"
    return {"subject": subject, "body": body, "report": report_link, "ui": ui_path(dag_id, run_id)}


# --- the task ----------------------------------------------------------------------------------------------


def comment_params() -> dict:
    from airflow.sdk import Param

    return {"comment": Param("", type="string", maxLength=MAX_COMMENT_CHARS, title="Comment",
                             description="why you deploy or reject (recorded in the model registry history)")}


def use_prepared_request(context) -> None:
    """Subject and body are the request decide pushed (XCom ``approval_request``)."""
    request = context["ti"].xcom_pull(task_ids="decide", key=REQUEST_KEY)
    if isinstance(request, dict):
        task = context["task"]
        task.subject, task.body = request["subject"], request["body"]


def review_from_task(context) -> dict:
    """Push who answered what as the XCom ``review`` of the approval task."""
    review = review_record(context["task"].hitl_summary_extra)
    context["ti"].xcom_push(key=REVIEW_KEY, value=review)
    who = review["reviewer"]["name"] if review["reviewer"] else f"nobody within {RESPONSE_TIMEOUT.days} days (default)"
    log.info("review: %s by %s (comment: %s)", review["choice"], who, review["comment"] or "none")
    return review


def review_record(summary: dict) -> dict:
    """The reviewer's answer, JSON-able, from a HITL operator's response (``hitl_summary_extra`` after resume:
    chosen_options, params_input, responded_by_user, responded_at). No responder = the timeout default."""
    chosen = list(summary.get("chosen_options") or [])
    user = summary.get("responded_by_user") or None
    comment = str((summary.get("params_input") or {}).get("comment") or "").strip()[:MAX_COMMENT_CHARS]
    choice = chosen[0] if chosen else None
    return {
        "choice": choice,
        "branch": OPTIONS_MAPPING.get(choice) if choice else None,
        "reviewer": {"id": str(user.get("id")), "name": str(user.get("name"))} if isinstance(user, dict) else None,
        "comment": comment or None,
        "responded_at": summary.get("responded_at"),
        "timed_out": user is None,
    }


class ReviewBranchOperator(HITLBranchOperator):
    """Airflow's HITLBranchOperator, with decide's request as subject and body, and the reviewer's answer pushed as
    the XCom ``review`` before it branches."""

    def execute(self, context):
        use_prepared_request(context)
        return super().execute(context)

    def do_branch(self, context, branches_to_execute):
        review_from_task(context)
        return super().do_branch(context, branches_to_execute)


def approval_task(**kwargs: Any) -> ReviewBranchOperator:
    """The approval task of the monthly DAG (see the module docstring). ``kwargs``: BaseOperator arguments."""
    return ReviewBranchOperator(
        task_id=TASK_ID,
        subject="Deploy the candidate?",  # replaced by decide's request when the task starts
        options=[DEPLOY, REJECT],
        options_mapping=OPTIONS_MAPPING,
        defaults=[REJECT],
        multiple=False,
        params=comment_params(),
        response_timeout=RESPONSE_TIMEOUT,
        **kwargs,
    )


# --- what the registry records ---------------------------------------------------------------------------------


def registry_entry(review: dict | None, *, actor: str, summary: str) -> dict:
    """actor / reason / details for the registry move after a review (``review`` None: no review, as before)."""
    if not review:
        return {"actor": actor, "reason": summary, "details": None}
    verb = "approved" if review.get("choice") == DEPLOY else "rejected"
    if review.get("timed_out") or not review.get("reviewer"):
        return {"actor": actor, "details": {"approval": review},
                "reason": f"{verb}: no reviewer answered within {RESPONSE_TIMEOUT.days} days; gate: {summary}"}
    name = review["reviewer"]["name"]
    comment = review.get("comment") or "no comment"
    return {"actor": f"reviewer:{name}", "details": {"approval": review},
            "reason": f"{verb} by {name}: {comment}; gate: {summary}"}
