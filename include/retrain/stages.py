"""Task bodies: one function per task of the monthly DAG, named as the task id (and each `retrain <stage>` command).

Each stage takes the run directory (``retrain.rundir.RunDir``) and returns a small JSON-able dict for XCom. The
effective configuration (use-case YAML + this run's parameters, validated) is frozen into ``run_config.json`` by
``prepare_run``, so retries and later stages use exactly what the run started with. Every stage is recorded in
``pipeline_runs`` by one decorator (:func:`recorded`).
"""

from __future__ import annotations

import functools
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain import db
from retrain.registry.runs import record_run_stage, timed_stage
from retrain.rundir import RunDir, assistant_turns, load_run, write_json
from retrain.evaluate.gate import override_note
from retrain.schemas.run_params import apply_params, check_run_policy, gate_overrides, parse_run_params
from retrain.schemas.use_case import load_use_case

log = logging.getLogger(__name__)

__all__ = ["load_run"]


def recorded(stage: str, fields=None):
    """Record the stage's duration (and what ``fields(result)`` picks from its result) in pipeline_runs."""

    def wrap(func):
        @functools.wraps(func)
        def inner(run_dir, *args, **kwargs):
            with timed_stage(run_dir, stage) as rec:
                result = func(run_dir, *args, **kwargs)
                if fields is not None:
                    rec.update(fields(result))
            return result

        return inner

    return wrap


def _jsonable(data: Any) -> Any:
    """Registry rows carry datetimes: make them XCom-safe."""
    return json.loads(json.dumps(data, default=str))


SCHEDULE_FIELDS = ("run_type", "logical_date", "data_interval_start", "data_interval_end")


def _schedule_record(schedule: dict | None) -> dict:
    """The run's schedule facts (Airflow's dag_run) for run_config.json: run type and ISO 8601 UTC dates; None for
    what the run does not have (a manual run triggered without a logical date has no data interval)."""
    out = {}
    for key in SCHEDULE_FIELDS:
        value = (schedule or {}).get(key)
        if value is not None and key == "run_type":
            value = str(value).rsplit(".", 1)[-1].lower()  # DagRunType.SCHEDULED -> "scheduled"
        elif value is not None:
            value = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).replace("Z", "+00:00"))
            value = value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
        out[key] = value
    return out


def _data_interval(meta: dict) -> tuple[datetime | None, datetime | None] | None:
    """The (start, end) collection is bounded by, from run_config.json; None: collect up to now.

    A scheduled (or backfill) run ends at its data interval's end: the run due on the 1st takes what changed before
    that tick, never the month after it. A manual run ends at its logical date: one triggered "for" 2026-11-01 takes
    what changed before it, and one triggered now (the UI's default, ``dag.test()``) takes everything up to now. Not
    the manual run's data interval: Airflow infers it from the timetable and may end it at the last tick, which would
    silently leave out everything that arrived since."""
    def parse(key: str) -> datetime | None:
        return meta.get(key) and datetime.fromisoformat(meta[key].replace("Z", "+00:00"))

    if meta.get("run_type") in ("scheduled", "backfill"):
        end = parse("data_interval_end")
    else:
        end = parse("logical_date")
    if end is None:
        return None
    start = parse("data_interval_start")
    return (start if start is not None and start <= end else None), end


def prepare_run(use_case: str, run_id: str, params: dict | None = None, *, triggered_by: str | None = None,
                schedule: dict | None = None) -> dict:
    """Validate the use case and the run's parameters, create the run directory, make sure the schema exists.

    Everything a retry cannot fix fails here, before any data moves: the file (naming file and field), the Params
    (types, the use case's limits, the base-model allow-list), and a loosened gate threshold without
    ``gate_override_reason`` (naming the threshold and the YAML's floor). ``triggered_by`` (the triggering user)
    is recorded with any gate override. ``schedule``: the run's run_type, logical_date and data interval (from
    Airflow's dag_run), recorded in run_config.json; a data_interval_end bounds what collect_examples takes."""
    from retrain.settings import models_root

    floors = load_use_case(use_case)
    run_params = parse_run_params(params or {})
    check_run_policy(floors, run_params, base_root=models_root() / "base")
    uc = apply_params(floors, run_params)
    overrides = gate_overrides(floors.thresholds, uc.thresholds, reason=run_params.gate_override_reason,
                               by=triggered_by)
    approval_required, waived = _approval_policy(floors, run_params, triggered_by)
    overrides += waived
    rd = RunDir.for_run(uc.name, run_id)
    run_dir = rd.path
    run_dir.mkdir(parents=True, exist_ok=True)
    with db.connection() as conn:
        db.ensure_schema(conn)
        available = db.count_examples(conn, uc.name)
    write_json(
        rd.run_config,
        {
            "run_id": run_id,
            "params": run_params.model_dump(),
            "use_case": uc.model_dump(mode="json"),
            "triggered_by": triggered_by or "unknown",
            "gate_overrides": overrides,
            "approval_required": approval_required,
            "prepared_at": datetime.now(timezone.utc).isoformat(),
            **_schedule_record(schedule),
        },
    )
    for o in overrides:
        log.warning("gate override: %s", override_note(o))
    record_run_stage(rd, "prepare_run", None, status="running")
    log.info("run %s of %s prepared in %s (%d production examples in the table)", run_id, uc.name, run_dir, available)
    return {
        "run_dir": str(run_dir),
        "use_case": uc.name,
        "backend": uc.training.backend,
        "dry_run": run_params.dry_run,
        "max_cost_usd": uc.training.max_cost_usd,
        "production_examples": available,
    }


def should_train(run_dir: str | Path) -> bool:
    """Whether this run trains: no when the dataset brought nothing new since the last trained run (the data set's
    ``training_decision``), unless the run was triggered with force_retrain. A no is logged at WARNING and recorded
    as status ``no_new_data`` with the reason; everything after the branch is skipped, as on a dry run."""
    from retrain.data import dataset

    rd = RunDir(run_dir)
    uc, meta = load_run(rd)
    manifest = json.loads(rd.manifest.read_text())
    train, reason = dataset.training_decision(manifest, uc, bool(meta["params"].get("force_retrain")))
    if not train:
        log.warning("not training %s this run: %s", uc.name, reason)
        record_run_stage(rd, "choose_backend", None, status="no_new_data", decision_reasons=[reason])
    else:
        log.info("training %s: %s", uc.name, reason)
    return bool(train)


@recorded("collect_examples", lambda r: {"rows_collected": r["rows"]})
def collect(run_dir: str | Path) -> dict:
    from retrain.data.collect import collect_examples

    uc, meta = load_run(run_dir)
    split = uc.data.split
    with db.connection() as conn:
        result = collect_examples(
            conn,
            uc.name,
            meta["run_id"],
            RunDir(run_dir).batch,
            split_ratios=(split.train, split.val),
            sample_limit=meta["params"].get("sample_limit"),
            pii=uc.pii,
            tenant_column=uc.tenants.column if uc.tenants else None,
            data_interval=_data_interval(meta),
        )
    write_json(RunDir(run_dir).collect, result)
    return {k: result[k] for k in ("rows", "skipped", "replayed")}


@recorded("build_dataset", lambda r: {"rows_rejected": r["counts"]["rejected"]})
def build(run_dir: str | Path) -> dict:
    from retrain.data.dataset import build_dataset

    uc, meta = load_run(run_dir)
    with db.connection() as conn:
        return build_dataset(conn, uc, meta["run_id"], Path(run_dir))


@recorded("validate_dataset", lambda r: {"validation": {k: r[k] for k in ("success", "failed", "expectations")}})
def validate(run_dir: str | Path) -> dict:
    from retrain.data.validate import validate_dataset

    uc, _ = load_run(run_dir)
    return validate_dataset(run_dir, uc)


def _drift_line(drift: dict) -> dict:
    """Drift status and the message of every metric over its warn level (what the summary and the UI show)."""
    warnings = [c.get("message") for c in drift.get("checks", []) if c.get("status") in ("warn", "fail")]
    return {"status": drift.get("status", "n/a"), "warnings": [w for w in warnings if w],
            "reason": drift.get("reason")}


def summarize(run_dir: str | Path) -> dict:
    """One screen for the task log and the demo: where the dataset, its manifest and the Data Docs are."""
    rd = RunDir(run_dir)
    manifest = json.loads(rd.manifest.read_text())
    validation = json.loads(rd.validation.read_text()) if rd.validation.is_file() else {}
    summary = {
        "run_dir": str(rd),
        "counts": manifest["counts"],
        "dataset": {s: str(rd.split(s)) for s in ("train", "val", "test")},
        "manifest": str(rd.manifest),
        "data_docs": validation.get("data_docs"),
        "validation_success": validation.get("success"),
        "drift": _drift_line(validation.get("drift") or manifest.get("drift") or {}),
        "label_conflicts": (manifest.get("conflicts") or {}).get("total", 0),
        "new_rows": manifest.get("new_rows"),
        # What collect_examples took: (from, to] in (updated_at, id) order, bounded by the data interval if any.
        "collection_window": json.loads(rd.collect.read_text()).get("window") if rd.collect.is_file() else None,
    }
    write_json(rd.summary, summary)
    _, meta = load_run(rd)
    if meta["params"].get("dry_run"):
        record_run_stage(rd, "report_dataset", None, status="dry_run")
    return summary


# --- training, evaluation, gate, deploy ----------------------------------------------------------------------


@recorded("train_qlora")
def train_qlora(run_dir: str | Path) -> dict:
    """Fine-tune the candidate in the trainer process (resumes from its newest checkpoint when retried).

    Params (adapter, max_train_steps, training_overrides) were validated and frozen into run_config.json by
    prepare_run: the trainer reads them from there."""
    from retrain.train.launch import train_qlora as launch

    result = launch(run_dir)
    return {k: result.get(k) for k in ("backend", "merged_path", "train_loss", "eval_loss", "steps", "seconds")}


def _train_result(run_dir: str | Path) -> dict:
    return RunDir(run_dir).read_train_result()


# --- hyper-parameter sweeps (retrain.sweep; the DAG maps train_sweep over plan_sweep's candidates) -------------


def sweep_requested(run_dir: str | Path) -> bool:
    """Whether this run sweeps (its sweep Param is on or a number; prepare_run checked the use case has a sweep)."""
    from retrain.sweep import requested

    return requested(run_dir) > 0


def plan_sweep(run_dir: str | Path) -> list[dict]:
    """One sub-run directory per candidate (the mapped training task's inputs). On the openai backend (task
    plan_openai_sweep) the candidates' jobs share one cost gate, checked before any job exists: the sum of their
    estimates must fit max_cost_usd."""
    from retrain import sweep

    with timed_stage(run_dir, "plan_sweep"):
        uc, _ = load_run(run_dir)
        if uc.training.backend == "openai":
            sweep.check_openai_budget(run_dir)
        return sweep.plan(run_dir)


plan_openai_sweep = plan_sweep  # the openai backend's branch: its candidates train as mapped OpenAI jobs


def train_sweep(candidate: dict) -> dict:
    """Train one sweep candidate in its sub-run directory (resumable; the first halving rung if so planned)."""
    from retrain.sweep import train

    with timed_stage(candidate["parent_run_dir"], f"train_sweep:{candidate['name']}:rung{candidate.get('rung', 1)}"):
        return train(candidate)


continue_sweep = train_sweep  # successive halving's second rung: the survivors, resumed to their full steps


def _val_score(run_dir: str) -> dict:
    return score_split(run_dir, "val", ("candidate",))["models"]["candidate"]


def halve_sweep(results) -> list[dict]:
    """Successive halving: score the first rung on validation and keep the best ceil(n / eta)."""
    from retrain.sweep import halve

    results = list(results)
    with timed_stage(results[0]["parent_run_dir"], "halve_sweep"):
        return halve(results, _val_score)


def select_candidate(results) -> dict:
    """Pick the sweep's best candidate on validation (it becomes the run's candidate/: register, evaluate and the
    gate see one candidate as without a sweep), write the sweep report, register the others as not_selected."""
    from retrain.registry import store as registry
    from retrain.sweep import select

    results = list(results)
    run_dir = results[0]["parent_run_dir"]
    with timed_stage(run_dir, "select_candidate"):
        report = select(results, _val_score)
        uc, _ = load_run(run_dir)
        with db.connection() as conn:
            for row in report["candidates"]:
                if row["status"] != "not_selected":
                    continue
                registry.record_not_selected(
                    conn, use_case=uc.name, run_id=row["run_id"], backend=row["backend"] or "qlora",
                    base_model=str(row["base_model"] or ""), artifact=row["artifact"],
                    metrics={"validation": {k: row[k] for k in ("primary_score", "json_validity")},
                             "training": {"eval_loss": row["eval_loss"], "steps": row["steps"]},
                             "sweep": {"values": row["values"], "winner": report["winner"], "trained": row["trained"]}},
                    reason=f"sweep of run {report['run_id']}: {report['winner']} scored higher on validation")
    return {k: report[k] for k in ("winner", "optimizer_steps", "full_grid_steps", "report_md", "plot")}


select_openai_candidate = select_candidate  # the same selection after the mapped OpenAI jobs


@recorded("register_candidate", lambda r: {"model_version": r["version"]})
def register_candidate(run_dir: str | Path) -> dict:
    """Record the trained candidate in the model registry (idempotent per run)."""
    from retrain.registry import store as registry

    uc, meta = load_run(run_dir)
    with db.connection() as conn:
        db.ensure_schema(conn)
        row = registry.register_from_train_result(
            conn, use_case=uc.name, run_id=meta["run_id"], train_result=_train_result(run_dir)
        )
    write_json(RunDir(run_dir).registered, {"version": row["version"]})
    return {"version": row["version"], "artifact": row["artifact"]}


def candidate_spec(train_result: dict) -> dict:
    if train_result["backend"] == "openai":
        return {"kind": "openai", "model": train_result["model_id"], "base_url": train_result.get("base_url"),
                "label": "candidate"}
    return {"kind": "hf", "path": train_result["merged_path"], "label": "candidate"}


def _training_answers(run_dir: Path) -> list[str]:
    """The labelled answers of the run's train and validation splits (the assistant turns)."""
    return [text for name in ("train", "val") for text in assistant_turns(RunDir(run_dir).split(name))]


def _conversations(uc, inputs: list[str]) -> list[list[dict]]:
    """The prompts a model answers at evaluation: the use case's system prompt and each rendered input."""
    return [[{"role": "system", "content": uc.system_prompt}, {"role": "user", "content": uc.render_input(text)}]
            for text in inputs]


@recorded("evaluate_candidate")
def evaluate(run_dir: str | Path) -> dict:
    """The candidate, the prompted base model (the untuned base model told the labels: retrain.evaluate.baseline)
    and, when one exists, the production model answer the same frozen test set. The gate's reference (metrics.json's
    ``baseline``) is the production model, else the prompted base model; both baselines are reported."""
    from retrain.evaluate import analysis, inference, metrics
    from retrain.evaluate import baseline as baselines
    from retrain.registry.deploy import baseline_spec

    run_dir = Path(run_dir)
    uc, _ = load_run(run_dir)
    with db.connection() as conn:
        db.ensure_schema(conn)
        reference = baseline_spec(conn, uc)
    candidate = candidate_spec(_train_result(run_dir))
    models = baselines.plan(reference, candidate, baselines.prompted_base_spec(uc))
    ref = baselines.reference_name(models)
    rd = RunDir(run_dir)
    inputs, references = metrics.load_test_set(uc, rd.split("test"))
    rd.evaluation.mkdir(exist_ok=True)
    # Every model gets the same budget, bounded by the schema and by the longest answer the candidate was trained on.
    budget = inference.max_new_tokens_for(uc, _training_answers(run_dir))
    scores = {}
    for name, spec in models.items():
        log.info("evaluating %s model %s on %d test examples (at most %d new tokens each)", name,
                 spec.get("path") or spec.get("model"), len(inputs), budget)
        conversations = baselines.conversations(uc, inputs, baselines.system_prompt_for(uc, spec))
        results, stats = inference.predict(spec, conversations, uc, max_new_tokens=budget)
        # predictions_baseline.jsonl is the gate's reference, as before; the prompted base model's also under its name.
        for file in {("baseline" if name == ref else name), *([name] if name == baselines.PROMPTED else [])}:
            with open(rd.predictions(file), "w", encoding="utf-8") as fh:
                for text, result in zip(inputs, results):
                    fh.write(json.dumps({"input": text, **result}, ensure_ascii=False) + "\n")
        scores[name] = metrics.score_predictions(uc, references, results, inputs=inputs, wall_seconds=stats["seconds"])
        log.info("%s: primary score %.3f, json validity %.3f, schema validity %.3f, p95 latency %.3fs", name,
                 scores[name]["aggregate"]["primary_score"], scores[name]["aggregate"]["json_validity"],
                 scores[name]["aggregate"]["schema_validity"], stats.get("p95") or 0.0)
    labels = _labels({"baseline": models[ref], "candidate": candidate, baselines.PROMPTED: models[baselines.PROMPTED]})
    comparison = metrics.compare(uc, scores[ref], scores["candidate"])
    metrics.add_baselines(comparison, scores["candidate"], scores[baselines.PROMPTED], scores.get("production"),
                          labels={"base_model_prompted": labels.get(baselines.PROMPTED),
                                  "production": labels["baseline"] if ref == "production" else None})
    comparison["analysis"] = analysis.report(uc, scores[ref]["per_example"], scores["candidate"]["per_example"],
                                             budget=budget)
    metrics.write_metrics(run_dir, scores[ref], scores["candidate"], comparison,
                          base_model_prompted=scores[baselines.PROMPTED])
    write_json(rd.models, {"baseline": models[ref], "candidate": candidate,
                           baselines.PROMPTED: models[baselines.PROMPTED]})
    return {
        "baseline_kind": models[ref]["baseline_kind"],
        "baseline_score": scores[ref]["aggregate"]["primary_score"],
        "base_model_prompted_score": scores[baselines.PROMPTED]["aggregate"]["primary_score"],
        "production_score": scores["production"]["aggregate"]["primary_score"] if "production" in scores else None,
        "candidate_score": scores["candidate"]["aggregate"]["primary_score"],
        "test_examples": len(inputs),
    }


def score_split(run_dir: str | Path, split: str = "val", models: tuple[str, ...] = ("base", "candidate")) -> dict:
    """Score models on one split of a run (no registry, no gate): e.g. the candidate vs the base on validation.

    ``models`` holds "base" (the use case's base model), "candidate" (this run's trained model) or model paths.
    Returns each model's aggregate metrics; nothing is written.
    """
    from retrain.evaluate import inference, metrics

    run_dir = Path(run_dir)
    uc, _ = load_run(run_dir)
    rd = RunDir(run_dir)
    path = rd.split(split)
    if not path.is_file() and rd.backup_receipt.is_file():
        backup_id = rd.read_backup_receipt().get("backup_id")
        raise FileNotFoundError(
            f"{path} was removed by cleanup after the run's encrypted backup: restore it with `retrain backup restore "
            f"{backup_id} --target-dir <dir>` and score <dir>")
    inputs, references = metrics.load_test_set(uc, path)
    conversations = _conversations(uc, inputs)
    budget = inference.max_new_tokens_for(uc, _training_answers(run_dir))
    out = {"split": split, "examples": len(inputs), "models": {}}
    for name in models:
        if name == "base":
            spec = {"kind": "hf", "path": uc.training.base_model}
        elif name == "candidate":
            spec = candidate_spec(_train_result(run_dir))
        else:
            spec = {"kind": "hf", "path": name}
        results, stats = inference.predict(spec, conversations, uc, max_new_tokens=budget)
        agg = metrics.score_predictions(uc, references, results, inputs=inputs, wall_seconds=stats["seconds"])["aggregate"]
        out["models"][name] = {k: agg[k] for k in ("primary_score", "exact_match", "json_validity", "schema_validity")
                               if k in agg}
    return out


def _labels(models: dict) -> dict:
    """Display names of the scored models (models.json): the gate's reference, the candidate and, when it was
    scored, the prompted base model (runs before it have no such entry)."""
    def name(spec: dict) -> str:
        return Path(str(spec.get("model") or spec.get("path"))).name

    base = models["baseline"]
    kind = base.get("baseline_kind", "base_model").replace("_", " ")
    if base.get("prompt") == "baseline":
        kind = "prompted base model"
    elif kind == "production" and base.get("version") is not None:
        kind = f"production v{base['version']}"
    labels = {"baseline": f"baseline ({kind}: {name(base)})", "candidate": f"candidate ({name(models['candidate'])})"}
    if models.get("base_model_prompted"):
        labels["base_model_prompted"] = f"prompted base model ({name(models['base_model_prompted'])})"
    return labels


def _announce_overrides(use_case: str, run_id: str, version: int, decision: dict, overrides: list[dict],
                        report: str) -> None:
    """One ops message per decision taken under a loosened gate (a log line when no alert channel is set up)."""
    from retrain.notify import send_message

    notes = [override_note(o) for o in overrides]
    title = f"Gate override: {use_case} v{version} decided {decision['decision']} under a loosened gate"
    body = "\n".join([title, f"Run: {run_id}", *notes, f"Decision: {decision['summary']}", f"Report: {report}"])
    event = {"event": "gate_override", "use_case": use_case, "run_id": run_id, "version": version,
             "decision": decision["decision"], "overrides": overrides}
    send_message(event, title, body)


def decide(run_dir: str | Path) -> dict:
    """Apply the go/no-go thresholds, write decision.json and the report, record the decision in the registry."""
    from retrain.evaluate.report import decide_run
    from retrain.registry import store as registry
    from retrain.registry.runs import decision_fields

    rd = RunDir(run_dir)
    uc, meta = load_run(rd)
    models = json.loads(rd.models.read_text())
    overrides = meta.get("gate_overrides") or []
    out = decide_run(rd.path, uc, baseline_kind=models["baseline"]["baseline_kind"], labels=_labels(models),
                     overrides=overrides)
    decision = out["decision_record"]
    data = rd.read_metrics()
    version = rd.registered_version()
    comparison_metrics = data["comparison"]["metrics"]
    with db.connection() as conn:
        registry.record_decision(conn, use_case=uc.name, version=version, metrics=comparison_metrics,
                                 decision=decision)
    record_run_stage(rd, "decide", None, model_version=version, metrics=comparison_metrics,
                     **decision_fields(decision))
    log.info("go/no-go for %s v%s:\n%s\nreport: %s", uc.name, version, out["text"], out["report_html"])
    if overrides:
        _announce_overrides(uc.name, meta["run_id"], version, decision, overrides, out["report_html"])
    return {k: out[k] for k in ("decision", "summary", "candidate_score", "baseline_score", "report_html")} | {
        "version": version, "base_model_prompted_score": out.get("base_model_prompted_score")
    }


@recorded("deploy_model", lambda r: {"status": "success"})
def deploy_candidate(run_dir: str | Path, actor: str, review: dict | None = None) -> dict:
    """Deploy the candidate; after a review (``review``: the approval task's XCom) the approver is the actor."""
    from retrain.registry import deploy

    return _move_candidate(run_dir, actor, review, deploy.deploy)


@recorded("reject_candidate", lambda r: {"status": "rejected" if r.get("review") else "no_go"})
def reject_candidate(run_dir: str | Path, actor: str, review: dict | None = None) -> dict:
    """Reject the candidate (a NO-GO, or a reviewer's Reject: ``review`` is the approval task's XCom)."""
    from retrain.registry import store as registry

    return _move_candidate(run_dir, actor, review, registry.reject)


def _move_candidate(run_dir: str | Path, actor: str, review: dict | None, move) -> dict:
    """Deploy or reject the run's registered candidate (``move``: deploy.deploy or registry.reject), with the
    reviewer as actor and their comment as reason when a review exists."""
    from retrain.approval import registry_entry

    uc, meta = load_run(run_dir)
    rd = RunDir(run_dir)
    entry = registry_entry(review, actor=actor, summary=rd.read_decision()["summary"])
    with db.connection() as conn:
        out = _jsonable(move(conn, use_case=uc.name, version=rd.registered_version(), run_id=meta["run_id"], **entry))
    _record_review(run_dir, review, entry)
    return out | ({"review": review} if review else {})


# --- human approval (retrain.approval) ------------------------------------------------------------------------


def _approval_policy(floors, run_params, triggered_by: str | None) -> tuple[bool, list[dict]]:
    """Whether this run's GO waits for a reviewer; waiving the YAML's approval: required is a recorded override."""
    from retrain.approval import resolve

    return resolve(floors.approval, run_params.approval, reason=run_params.gate_override_reason, by=triggered_by)


def approval_request(run_dir: str | Path, *, dag_id: str, run_id: str) -> dict | None:
    """After a GO: the request a reviewer answers (subject, Markdown body, report and UI links), or None when this
    run deploys without one. Marks the run ``awaiting_approval`` in pipeline_runs."""
    from retrain.approval import FILES_URL, request_message
    from retrain.settings import runs_dir

    rd = RunDir(run_dir)
    uc, meta = load_run(rd)
    if not meta.get("approval_required"):
        return None
    report = rd.report_html.resolve()
    root = runs_dir().resolve()
    link = f"{FILES_URL}/{report.relative_to(root).as_posix()}" if report.is_relative_to(root) else None
    request = request_message(use_case=uc.name, version=rd.registered_version(), decision=rd.read_decision(),
                              metrics=rd.read_metrics()["comparison"]["metrics"], report_link=link, dag_id=dag_id,
                              run_id=run_id)
    record_run_stage(rd, "decide", None, status="awaiting_approval")
    log.info("%s v%s waits for a reviewer's Deploy/Reject: %s", uc.name, rd.registered_version(), request["ui"])
    return request


def _record_review(run_dir: str | Path, review: dict | None, entry: dict) -> None:
    """The reviewer's answer next to the gate's reasons in pipeline_runs (the UI's decision column)."""
    if not review:
        return
    from retrain.registry.runs import decision_fields

    reasons = decision_fields(RunDir(run_dir).read_decision()).get("decision_reasons") or []
    record_run_stage(run_dir, "approve_deployment", None, decision_reasons=[*reasons, f"review: {entry['reason']}"])


# --- backups --------------------------------------------------------------------------------------------------


@recorded("backup_to_s3", lambda r: {"backup_id": r.get("backup_id")})
def backup(run_dir: str | Path) -> dict:
    from retrain.backup.operations import backup_to_s3

    result = backup_to_s3(run_dir)
    return {k: result.get(k) for k in ("backup_id", "skipped", "bytes", "ciphertext_bytes", "reused")}


@recorded("verify_backup")
def verify_backup(run_dir: str | Path) -> dict:
    from retrain.backup.operations import drill_backup

    result = drill_backup(run_dir)
    return {k: result.get(k) for k in ("backup_id", "sha256", "chunks", "verified", "skipped")}


@recorded("prune_backups")
def prune_backups(run_dir: str | Path) -> dict:
    from retrain.backup.operations import prune_stage

    return _jsonable(prune_stage(run_dir))


@recorded("cleanup", lambda r: {"status": "success"})
def cleanup(run_dir: str | Path) -> dict:
    from retrain.backup.operations import cleanup_stage

    result = cleanup_stage(run_dir)
    return {k: result.get(k) for k in ("removed", "bytes_freed", "skipped")}


# --- active learning (retrain.review) ---------------------------------------------------------------------------


@recorded("select_for_review")
def select_for_review(run_dir: str | Path) -> dict:
    """Queue the hardest of this run's production rows for human review (low candidate margin, disagreement with
    the production model, schema failures) and write the Label Studio import file. Never raises: a failure is
    logged and shown in the run summary (REVIEW: failed ...), and the deploy path never waits for it."""
    from retrain.review.workflow import select_run_safely

    summary = select_run_safely(run_dir)
    return {k: summary.get(k) for k in ("status", "scored", "queued", "reasons", "export", "error") if k in summary}
