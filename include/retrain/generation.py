"""Task bodies of a generation use case's DAG (issue 20): one LoRA adapter per tenant, evaluated and gated alone.

``dags/retrain_generation.py`` wires them after the shared stages (``retrain.stages.prepare_run`` / ``collect``)
and before the shared backup stages:

* :func:`build` / :func:`validate`: the text dataset (``retrain.data.dataset_text``: one sub-run directory per
  tenant, ``tenants.json``) and its Great Expectations suite (``retrain.data.validate_text``);
* :func:`plan_tenants`: which tenants train this run (eligible ones, unless a dry run or no new data), the others
  listed with the reason; fits the voice-attribution classifier once on all tenants' training e-mails;
* :func:`train_tenant` (mapped, gpu pool): ``retrain.train.launch.train_qlora`` in the tenant's sub-run
  directory (resumable like any run), then the export deploy publishes: adapter/ + an Ollama Modelfile;
* :func:`evaluate_tenant` (mapped): registers the adapter under ``<use_case>@<tenant>``, then the baseline (the
  tenant's production adapter, else the base model with the same instruction) and the candidate generate on the
  tenant's frozen test set; chrF, ROUGE-L, style, voice attribution, perplexity of the held-out replies, paired
  bootstrap CIs (``retrain.evaluate.generation_metrics``), the judge when one is configured;
* :func:`decide_tenant` (mapped): the generation gate, recorded in the registry; GO deploys the tenant's adapter
  (its own production alias), NO-GO rejects it;
* :func:`summarize`: one table for the run: every tenant, eligible or skipped with the reason, metrics with CIs,
  decision.

Every body takes the run directory or one planned tenant (a dict, the mapped tasks' argument) and returns a small
JSON-able dict for XCom. Stage timings go to pipeline_runs as for the structured DAG.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from retrain import db
from retrain.registry.runs import record_run_stage, timed_stage
from retrain.registry.tenants import model_key
from retrain.rundir import RunDir, assistant_turns, atomic_write, read_json, write_json

log = logging.getLogger(__name__)

ACTOR = "airflow:retrain_generation"
# Metrics shown per tenant in the run summary (with their 95% CI where the comparison has one).
SUMMARY_METRICS = ("chrf", "rouge_l", "attribution", "perplexity", "length_ratio")
CLASSIFIER_MIN_CONFIDENCE = 0.7


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def _tenant_run(item: dict) -> tuple[RunDir, RunDir, Any, dict]:
    """(tenant sub-run, parent run, use case, the sub-run's run_config) of one planned tenant."""
    sub = RunDir(item["run_dir"])
    uc, meta = sub.load()
    return sub, RunDir(item["parent_run_dir"]), uc, meta


# --- dataset --------------------------------------------------------------------------------------------------


def build(run_dir: str | Path) -> dict:
    """The per-tenant text dataset (``retrain.data.dataset_text.build``)."""
    from retrain.data import dataset_text

    with timed_stage(run_dir, "build_dataset") as rec:
        result = dataset_text.build(run_dir)
        rejected = ((result or {}).get("counts") or {}).get("rejected")
        if rejected is not None:
            rec["rows_rejected"] = rejected
    return _jsonable(result)


def validate(run_dir: str | Path) -> dict:
    """The text dataset's expectations (``retrain.data.validate_text.validate``); a failure fails the task."""
    from retrain.data import validate_text
    from retrain.data.validate import DataValidationError

    with timed_stage(run_dir, "validate_dataset") as rec:
        result = validate_text.validate(run_dir)
        rec["validation"] = {k: result.get(k) for k in ("success", "failed", "expectations")}
    if not result.get("success"):
        failed = result.get("failed")
        raise DataValidationError(f"the text dataset of {run_dir} failed validation: {failed}", result)
    return _jsonable(result)


# --- plan -----------------------------------------------------------------------------------------------------


def _fit_classifier(rd: RunDir, tenants: list[str]) -> dict:
    """Fit the voice classifier on every tenant's training e-mails (needs two tenants or more); cached per run."""
    from retrain.evaluate.attribution import VoiceClassifier

    texts, labels = [], []
    for name in tenants:
        for text in assistant_turns(rd.tenant(name).split("train")):
            texts.append(text)
            labels.append(name)
    if len(set(labels)) < 2:
        rd.voice_classifier.unlink(missing_ok=True)
        return {"fitted": False, "reason": "voice attribution needs training e-mails of at least two tenants"}
    # min_confidence: a generic reply is credited to nobody rather than to the argmax tenant (a base model's formal
    # e-mail would otherwise count as the most formal writer's voice).
    VoiceClassifier(min_confidence=CLASSIFIER_MIN_CONFIDENCE).fit(texts, labels).save(rd.voice_classifier)
    return {"fitted": True, "tenants": sorted(set(labels)), "examples": len(texts)}


def _training_decision(rd: RunDir, uc, meta: dict) -> tuple[bool, str]:
    """Train this run? No on a dry run, or when the dataset brought too little new data (unless force_retrain)."""
    from retrain.data import dataset

    params = meta.get("params") or {}
    if params.get("dry_run"):
        return False, "dry_run: the dataset is built and validated, nothing is trained"
    manifest = read_json(rd.manifest) if rd.manifest.is_file() else {}
    return dataset.training_decision(manifest, uc, bool(params.get("force_retrain")))


def plan_tenants(run_dir: str | Path) -> list[dict]:
    """The tenants this run trains (the mapped tasks' inputs); writes tenants_plan.json with every tenant's status."""
    rd = RunDir(Path(run_dir).resolve())
    uc, meta = rd.load()
    with timed_stage(rd, "plan_tenants"):
        manifest = read_json(rd.tenants_manifest, missing="build_dataset has not written the tenants' datasets")
        train, why = _training_decision(rd, uc, meta)
        tenants = manifest.get("tenants") or {}
        rows, planned = {}, []
        for name in sorted(tenants):
            info = tenants[name]
            if not info.get("eligible"):
                rows[name] = {"status": "skipped", "reason": info.get("reason"), **_counts(info)}
            elif not train:
                rows[name] = {"status": "not_trained", "reason": why, **_counts(info)}
            else:
                rows[name] = {"status": "planned", "reason": info.get("warning"), **_counts(info)}
                planned.append({"tenant": name, "key": model_key(uc.name, name), "run_dir": str(rd.tenant(name).path),
                                "parent_run_dir": str(rd.path)})
        with_data = [n for n in sorted(tenants) if rd.tenant(n).split("train").is_file()]
        classifier = _fit_classifier(rd, with_data) if planned else {"fitted": False, "reason": why}
        write_json(rd.tenants_plan, {"run_id": meta["run_id"], "train": train, "reason": why, "tenants": rows,
                                     "classifier": classifier, "min_examples": manifest.get("min_examples"),
                                     "recommended_examples": manifest.get("recommended_examples")})
    for name, row in rows.items():
        if row["status"] != "planned" or row["reason"]:
            log.warning("tenant %s: %s%s", name, row["status"], f" ({row['reason']})" if row["reason"] else "")
    if not train:
        log.warning("not training %s this run: %s", uc.name, why)
        record_run_stage(rd, "plan_tenants", None, status="dry_run" if meta["params"].get("dry_run") else "no_new_data",
                         decision_reasons=[why])
    log.info("%d tenant(s) to train: %s", len(planned), ", ".join(p["tenant"] for p in planned) or "none")
    return planned


def _counts(info: dict) -> dict:
    return {k: info.get(k) for k in ("train", "val", "test")}


# --- train ----------------------------------------------------------------------------------------------------


def train_tenant(item: dict) -> dict:
    """Train one tenant's adapter in its sub-run directory (resumes from its newest checkpoint when retried), then
    write the export deploy publishes (adapter/ + Modelfile)."""
    from retrain.registry.tenants import write_export
    from retrain.train.launch import train_qlora

    sub, parent, uc, meta = _tenant_run(item)
    with timed_stage(parent, f"train_tenant:{item['tenant']}"):
        result = train_qlora(str(sub.path))
        write_export(sub.tenant_export, adapter_dir=result["adapter_path"], base_model=uc.training.base_model,
                     base_path=result.get("base_model_path") or uc.training.base_model, key=item["key"],
                     run_id=meta["run_id"], system_prompt=uc.system_prompt, max_tokens=uc.output.max_tokens,
                     merged_dir=result.get("merged_path") if _export_merged(uc) else None)
    return {**item, **{k: result.get(k) for k in ("steps", "train_loss", "eval_loss", "seconds")},
            "export": str(sub.tenant_export)}


def _export_merged(uc) -> bool:
    """Deploy the merged model next to the adapter (seed 003's option B) when the use case asks for it."""
    return uc.tenants.export_merged


# --- evaluate -------------------------------------------------------------------------------------------------


def _register(conn, sub: RunDir, key: str, meta: dict) -> dict:
    from retrain.registry import store as registry

    result = sub.read_train_result()
    row = registry.register_candidate(
        conn, use_case=key, run_id=meta["run_id"], backend="qlora", base_model=str(result.get("base_model") or ""),
        artifact=str(sub.tenant_export),
        metrics={"training": {k: result[k] for k in ("train_loss", "eval_loss", "steps", "seconds")
                              if result.get(k) is not None}})
    write_json(sub.registered, {"version": row["version"], "key": key})
    return row


def _baseline(conn, uc, key: str) -> dict:
    """The tenant's production adapter, else the base model prompted with the same instruction."""
    from retrain.registry import store as registry
    from retrain.registry.deploy import model_path

    row = registry.production(conn, key)
    if row is None:
        return {"path": uc.training.base_model, "adapter": None, "label": "baseline", "baseline_kind": "base_model",
                "version": None}
    return {"path": row["base_model"] or uc.training.base_model, "adapter": model_path(row), "label": "baseline",
            "baseline_kind": "production", "version": row["version"]}


def _test_set(sub: RunDir) -> tuple[list[list[dict]], list[str], list[str]]:
    """(prompts without the answer, the tenant's real replies, the inputs) of the tenant's frozen test set."""
    from retrain.evaluate.inference import prompt_messages

    prompts, references, inputs = [], [], []
    path = sub.split("test")
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    messages = json.loads(line)["messages"]
                    prompts.append(prompt_messages(messages))
                    references.append(str(messages[-1]["content"]))
                    inputs.append(next((m["content"] for m in messages if m["role"] == "user"), ""))
    if not prompts:
        raise ValueError(f"{path} holds no test examples for this tenant: the gate has nothing to compare; "
                         "rebuild the dataset (build_dataset) or raise tenants.min_examples")
    return prompts, references, inputs


def evaluate_tenant(item: dict) -> dict:
    """Register the tenant's adapter, run baseline and candidate on its frozen test set, score and compare them."""
    from retrain.evaluate import generation_metrics
    from retrain.evaluate.attribution import VoiceClassifier
    from retrain.evaluate.textgen import TextModel

    sub, parent, uc, meta = _tenant_run(item)
    tenant, key = item["tenant"], item["key"]
    with timed_stage(parent, f"evaluate_tenant:{tenant}"):
        with db.connection() as conn:
            db.ensure_schema(conn)
            row = _register(conn, sub, key, meta)
            baseline = _baseline(conn, uc, key)
        candidate = {"path": uc.training.base_model, "adapter": str(sub.tenant_export), "label": "candidate",
                     "version": row["version"]}
        prompts, references, inputs = _test_set(sub)
        classifier = VoiceClassifier.load(parent.voice_classifier) if parent.voice_classifier.is_file() else None
        scores, texts = {}, {}
        sub.evaluation.mkdir(parents=True, exist_ok=True)
        for name, spec in (("baseline", baseline), ("candidate", candidate)):
            model = TextModel(spec)
            replies = model.generate(prompts, max_new_tokens=uc.output.max_tokens)
            nll = model.reply_nll(prompts, references)
            del model
            texts[name] = [r["text"] for r in replies]
            scores[name] = generation_metrics.score_texts(references, texts[name], tenant=tenant,
                                                          classifier=classifier, nll=nll)
            with atomic_write(sub.predictions(name)) as fh:
                for text, reference, reply, (loss, n) in zip(inputs, references, replies, nll):
                    fh.write(json.dumps({"input": text, "reference": reference, **reply, "reference_nll": loss,
                                         "reference_tokens": n}, ensure_ascii=False) + "\n")
        comparison = generation_metrics.compare(scores["baseline"], scores["candidate"])
        judge = _judge(uc, prompts, texts["candidate"], texts["baseline"])
        write_json(sub.metrics, {"tenant": tenant, "key": key, "baseline": scores["baseline"],
                                 "candidate": scores["candidate"], "comparison": comparison, "judge": judge})
        write_json(sub.models, {"baseline": baseline, "candidate": candidate})
    agg = {name: scores[name]["aggregate"] for name in scores}
    log.info("tenant %s (%s baseline): chrF %.1f -> %.1f, attribution %s -> %s, perplexity %s -> %s", tenant,
             baseline["baseline_kind"], agg["baseline"]["chrf"] or 0, agg["candidate"]["chrf"] or 0,
             agg["baseline"]["attribution"], agg["candidate"]["attribution"], agg["baseline"]["perplexity"],
             agg["candidate"]["perplexity"])
    return {**item, "version": row["version"], "baseline_kind": baseline["baseline_kind"],
            "test_examples": len(prompts)}


def _judge(uc, prompts: list[list[dict]], candidate: list[str], baseline: list[str]) -> dict | None:
    """The configured LLM judge's pairwise verdicts and its calibration (None without a judge)."""
    config = uc.evaluation.judge
    if config is None:
        return None
    from retrain.evaluate import judge
    from retrain.settings import openai_credentials, use_cases_dir

    api_key, base_url = openai_credentials(config.connection, base_url=config.base_url)
    settings = judge.engine_settings(config, api_key=api_key, base_url=base_url)
    rows = judge.load_calibration(config.calibration_path(use_cases_dir()))
    requests = [next((m["content"] for m in p if m["role"] == "user"), "") for p in prompts]
    # Calibrated in the same run against the same endpoint: a judge that disagrees with people only informs.
    return _jsonable(judge.run_judge(settings, config.rubric, rows, requests, candidate, baseline))


# --- decide ---------------------------------------------------------------------------------------------------


def decide_tenant(item: dict) -> dict:
    """Apply the generation gate, record it in the registry; GO deploys the tenant's adapter, NO-GO rejects it."""
    from retrain.evaluate import gate_generation
    from retrain.registry import store as registry
    from retrain.registry.deploy import deploy

    sub, parent, uc, meta = _tenant_run(item)
    tenant, key = item["tenant"], item["key"]
    with timed_stage(parent, f"decide_tenant:{tenant}"):
        data = sub.read_metrics()
        models = read_json(sub.models)
        version = sub.registered_version()
        decision = gate_generation.decide(uc.generation_gate, data["comparison"],
                                          baseline_kind=models["baseline"]["baseline_kind"], judge=data.get("judge"))
        decision = _jsonable({**decision, "tenant": tenant, "key": key, "version": version})
        write_json(sub.decision, decision)
        reason = f"{tenant}: {decision['summary']}"
        with db.connection() as conn:
            registry.record_decision(conn, use_case=key, version=version, metrics=data["comparison"],
                                     decision=decision)
            if decision["decision"] == "GO":
                moved = deploy(conn, use_case=key, version=version, actor=ACTOR, reason=reason, run_id=meta["run_id"])
            else:
                moved = registry.reject(conn, use_case=key, version=version, actor=ACTOR, reason=reason,
                                        run_id=meta["run_id"])
    log.info("tenant %s v%s: %s (%s)", tenant, version, decision["decision"], decision["summary"])
    applied = (moved.get("applied") or {}) if isinstance(moved, dict) else {}
    return {**item, "version": version, "decision": decision["decision"], "summary": decision["summary"],
            "production": applied.get("production")}


# --- summary --------------------------------------------------------------------------------------------------


def _metric_line(comparison: dict, name: str) -> dict | None:
    entry = (comparison.get("metrics") or {}).get(name)
    if not entry:
        return None
    return {k: entry.get(k) for k in ("baseline", "candidate", "gain", "ci_low", "ci_high")}


def summarize(run_dir: str | Path) -> dict:
    """Every tenant of the run: trained or skipped (with the reason), metrics with CIs, decision. Writes
    tenants_summary.json and .md; returns the summary (``decided``: how many tenants reached the gate)."""
    rd = RunDir(run_dir)
    uc, meta = rd.load()
    plan = read_json(rd.tenants_plan, missing="plan_tenants has not run")
    tenants = {}
    decisions = []
    for name, row in plan["tenants"].items():
        entry = dict(row)
        sub = rd.tenant(name)
        if row["status"] == "planned" and sub.decision.is_file():
            decision = sub.read_decision()
            comparison = sub.read_metrics()["comparison"]
            entry.update(status="decided", decision=decision["decision"], summary=decision["summary"],
                         version=decision.get("version"), key=decision.get("key"),
                         metrics={m: _metric_line(comparison, m) for m in SUMMARY_METRICS},
                         perplexity_regression=comparison.get("perplexity_regression"))
            decisions.append(f"{name}: {decision['decision']}")
        elif row["status"] == "planned":
            entry.update(status="not_decided", reason="training or evaluation did not finish (see its task)")
        tenants[name] = entry
    summary = {"run_id": meta["run_id"], "use_case": uc.name, "train": plan["train"], "reason": plan["reason"],
               "classifier": plan.get("classifier"), "tenants": tenants, "decided": len(decisions),
               "dry_run": bool(meta["params"].get("dry_run")), "summary_md": str(rd.tenants_summary_md)}
    write_json(rd.tenants_summary, summary)
    with atomic_write(rd.tenants_summary_md) as fh:
        fh.write(summary_markdown(summary))
    verdicts = [t.get("decision") for t in tenants.values() if t.get("decision")]
    status = "success" if "GO" in verdicts else "no_go" if verdicts else None  # dry run / no data: set already
    record_run_stage(rd, "summarize_tenants", None, status=status, decision_reasons=decisions or [plan["reason"]])
    log.info("tenants of run %s:\n%s", meta["run_id"], summary_markdown(summary))
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(line: dict | None) -> str:
    if not line:
        return "n/a"
    text = f"{_fmt(line['baseline'])} → {_fmt(line['candidate'])}"
    if line.get("ci_low") is not None:
        text += f" (gain {_fmt(line['gain'])}, 95% CI {_fmt(line['ci_low'])}..{_fmt(line['ci_high'])})"
    return text


def summary_markdown(summary: dict) -> str:
    head = ["tenant", "status", "train/val/test", "decision", *SUMMARY_METRICS, "reason"]
    lines = [f"# Tenants of {summary['use_case']} run {summary['run_id']}", "",
             f"Training: {'yes' if summary['train'] else 'no'} ({summary['reason']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in summary["tenants"].items():
        metrics = t.get("metrics") or {}
        cells = [name, t["status"], f"{t.get('train')}/{t.get('val')}/{t.get('test')}", t.get("decision") or "—",
                 *[_cell(metrics.get(m)) for m in SUMMARY_METRICS], t.get("summary") or t.get("reason") or ""]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"
