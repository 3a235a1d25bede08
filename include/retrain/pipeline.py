"""Stage entry points: what each Airflow task (and each `retrain <stage>` CLI command) calls.

Each stage takes the run directory and returns a small JSON-able dict for XCom. The effective configuration
(use-case YAML + this run's parameters, validated) is frozen into ``run_config.json`` by the first stage, so
retries and later stages use exactly what the run started with.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain import db
from retrain.config import UseCase, apply_params, load_use_case, parse_run_params, parse_use_case, run_dir_for

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


def _recorded(stage: str, fields=None):
    """Record the stage's duration (and what ``fields(result)`` picks from its result) in pipeline_runs."""
    import functools

    def wrap(func):
        @functools.wraps(func)
        def inner(run_dir, *args, **kwargs):
            from retrain.runs import timed_stage

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


def load_run(run_dir: str | Path) -> tuple[UseCase, dict]:
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this run directory was not prepared (run prepare_run first)")
    meta = json.loads(path.read_text())
    return parse_use_case(meta["use_case"], str(path)), meta


def prepare_run(use_case: str, run_id: str, params: dict | None = None) -> dict:
    """Validate the use case and the run's parameters, create the run directory, make sure the schema exists."""
    uc = load_use_case(use_case)
    run_params = parse_run_params(params or {})
    uc = apply_params(uc, run_params)
    run_dir = run_dir_for(uc.name, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    from retrain.runs import record_stage

    with db.connection() as conn:
        db.ensure_schema(conn)
        available = db.count_examples(conn, uc.name)
        record_stage(conn, use_case=uc.name, run_id=run_id, stage="prepare_run", seconds=None, status="running",
                     run_dir=str(run_dir))
    _write_json(
        run_dir / RUN_CONFIG,
        {
            "run_id": run_id,
            "params": run_params.model_dump(),
            "use_case": uc.model_dump(mode="json"),
            "prepared_at": datetime.now(timezone.utc).isoformat(),
        },
    )
    log.info("run %s of %s prepared in %s (%d production examples in the table)", run_id, uc.name, run_dir, available)
    return {
        "run_dir": str(run_dir),
        "use_case": uc.name,
        "backend": uc.training.backend,
        "dry_run": run_params.dry_run,
        "production_examples": available,
    }


@_recorded("collect_examples", lambda r: {"rows_collected": r["rows"]})
def collect(run_dir: str | Path) -> dict:
    from retrain.collect import collect_examples

    uc, meta = load_run(run_dir)
    split = uc.data.split
    with db.connection() as conn:
        result = collect_examples(
            conn,
            uc.name,
            meta["run_id"],
            Path(run_dir) / "batch.jsonl",
            split_ratios=(split.train, split.val),
            sample_limit=meta["params"].get("sample_limit"),
        )
    _write_json(Path(run_dir) / "collect.json", result)
    return {k: result[k] for k in ("rows", "skipped", "replayed")}


@_recorded("build_dataset", lambda r: {"rows_rejected": r["counts"]["rejected"]})
def build(run_dir: str | Path) -> dict:
    from retrain.dataset import build_dataset

    uc, meta = load_run(run_dir)
    with db.connection() as conn:
        return build_dataset(conn, uc, meta["run_id"], Path(run_dir))


@_recorded("validate_dataset", lambda r: {"validation": {k: r[k] for k in ("success", "failed", "expectations")}})
def validate(run_dir: str | Path) -> dict:
    from retrain.validate import validate_dataset

    uc, _ = load_run(run_dir)
    return validate_dataset(run_dir, uc)


def summarize(run_dir: str | Path) -> dict:
    """One screen for the task log and the demo: where the dataset, its manifest and the Data Docs are."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    validation = json.loads((run_dir / "validation.json").read_text()) if (run_dir / "validation.json").is_file() else {}
    summary = {
        "run_dir": str(run_dir),
        "counts": manifest["counts"],
        "dataset": {s: str(run_dir / f"{s}.jsonl") for s in ("train", "val", "test")},
        "manifest": str(run_dir / "manifest.json"),
        "data_docs": validation.get("data_docs"),
        "validation_success": validation.get("success"),
    }
    _write_json(run_dir / "summary.json", summary)
    _, meta = load_run(run_dir)
    if meta["params"].get("dry_run"):
        from retrain.runs import record_run_stage

        record_run_stage(run_dir, "report_dataset", None, status="dry_run")
    return summary


# --- training, evaluation, gate, deploy ----------------------------------------------------------------------


def _candidate_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "candidate"


def _train_result(run_dir: str | Path) -> dict:
    path = _candidate_dir(run_dir) / "train_result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the training stage has not finished for this run")
    return json.loads(path.read_text())


def choose_backend(run_dir: str | Path) -> str:
    """Which training task runs: the configured backend (YAML default, overridable by the `backend` Param)."""
    uc, _ = load_run(run_dir)
    return uc.training.backend


@_recorded("register_candidate", lambda r: {"model_version": r["version"]})
def register_candidate(run_dir: str | Path) -> dict:
    """Record the trained candidate in the model registry (idempotent per run)."""
    from retrain import registry

    uc, meta = load_run(run_dir)
    with db.connection() as conn:
        db.ensure_schema(conn)
        row = registry.register_from_train_result(
            conn, use_case=uc.name, run_id=meta["run_id"], train_result=_train_result(run_dir)
        )
    _write_json(_candidate_dir(run_dir) / "registered.json", {"version": row["version"]})
    return {"version": row["version"], "artifact": row["artifact"]}


def candidate_spec(train_result: dict) -> dict:
    if train_result["backend"] == "openai":
        return {"kind": "openai", "model": train_result["model_id"], "base_url": train_result.get("base_url"),
                "label": "candidate"}
    return {"kind": "hf", "path": train_result["merged_path"], "label": "candidate"}


def _training_answers(run_dir: Path) -> list[str]:
    """The labelled answers of the run's train and validation splits (the assistant turns)."""
    answers = []
    for name in ("train.jsonl", "val.jsonl"):
        path = run_dir / name
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        messages = json.loads(line).get("messages") or []
                        if messages and messages[-1].get("role") == "assistant":
                            answers.append(str(messages[-1].get("content", "")))
    return answers


def _conversations(uc, inputs: list[str]) -> list[list[dict]]:
    """The prompts a model answers at evaluation: the use case's system prompt and each rendered input."""
    return [[{"role": "system", "content": uc.system_prompt}, {"role": "user", "content": uc.render_input(text)}]
            for text in inputs]


@_recorded("evaluate_candidate")
def evaluate(run_dir: str | Path) -> dict:
    """Candidate and baseline (production model, or the base model on a first run) answer the same frozen test set."""
    from retrain import inference, metrics, registry

    run_dir = Path(run_dir)
    uc, _ = load_run(run_dir)
    with db.connection() as conn:
        db.ensure_schema(conn)
        baseline = registry.baseline_spec(conn, uc)
    candidate = candidate_spec(_train_result(run_dir))
    inputs, references = metrics.load_test_set(uc, run_dir / "test.jsonl")
    conversations = _conversations(uc, inputs)
    out = run_dir / "evaluation"
    out.mkdir(exist_ok=True)
    # Both models get the same budget, bounded by the schema and by the longest answer they were trained on.
    budget = inference.max_new_tokens_for(uc, _training_answers(run_dir))
    scores = {}
    for name, spec in (("baseline", baseline), ("candidate", candidate)):
        log.info("evaluating %s model %s on %d test examples (at most %d new tokens each)", name,
                 spec.get("path") or spec.get("model"), len(inputs), budget)
        results, stats = inference.predict(spec, conversations, uc, max_new_tokens=budget)
        with open(out / f"predictions_{name}.jsonl", "w", encoding="utf-8") as fh:
            for text, result in zip(inputs, results):
                fh.write(json.dumps({"input": text, **result}, ensure_ascii=False) + "\n")
        scores[name] = metrics.score_predictions(uc, references, results, inputs=inputs, wall_seconds=stats["seconds"])
        log.info("%s: primary score %.3f, json validity %.3f, p95 latency %.3fs", name,
                 scores[name]["aggregate"]["primary_score"], scores[name]["aggregate"]["json_validity"],
                 stats.get("p95") or 0.0)
    comparison = metrics.compare(uc, scores["baseline"], scores["candidate"])
    metrics.write_metrics(run_dir, scores["baseline"], scores["candidate"], comparison)
    _write_json(out / "models.json", {"baseline": baseline, "candidate": candidate})
    return {
        "baseline_kind": baseline["baseline_kind"],
        "baseline_score": scores["baseline"]["aggregate"]["primary_score"],
        "candidate_score": scores["candidate"]["aggregate"]["primary_score"],
        "test_examples": len(inputs),
    }


def score_split(run_dir: str | Path, split: str = "val", models: tuple[str, ...] = ("base", "candidate")) -> dict:
    """Score models on one split of a run (no registry, no gate): e.g. the candidate vs the base on validation.

    ``models`` holds "base" (the use case's base model), "candidate" (this run's trained model) or model paths.
    Returns each model's aggregate metrics; nothing is written.
    """
    from retrain import inference, metrics

    run_dir = Path(run_dir)
    uc, _ = load_run(run_dir)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    path = run_dir / f"{split}.jsonl"
    if not path.is_file() and (run_dir / "backup.json").is_file():
        backup_id = json.loads((run_dir / "backup.json").read_text()).get("backup_id")
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
    def name(spec: dict) -> str:
        return str(spec.get("model") or spec.get("path"))

    kind = models["baseline"].get("baseline_kind", "base_model").replace("_", " ")
    return {"baseline": f"baseline ({kind}: {Path(name(models['baseline'])).name})",
            "candidate": f"candidate ({Path(name(models['candidate'])).name})"}


def decide(run_dir: str | Path) -> dict:
    """Apply the go/no-go thresholds, write decision.json and the report, record the decision in the registry."""
    from retrain import gate, registry

    run_dir = Path(run_dir)
    uc, _ = load_run(run_dir)
    models = json.loads((run_dir / "evaluation" / "models.json").read_text())
    out = gate.decide_run(run_dir, uc, baseline_kind=models["baseline"]["baseline_kind"], labels=_labels(models))
    version = json.loads((_candidate_dir(run_dir) / "registered.json").read_text())["version"]
    with db.connection() as conn:
        registry.record_decision(
            conn, use_case=uc.name, version=version,
            metrics=json.loads((run_dir / "evaluation" / "metrics.json").read_text())["comparison"]["metrics"],
            decision=json.loads((run_dir / "decision.json").read_text()),
        )
    from retrain.runs import decision_fields, record_run_stage

    record_run_stage(run_dir, "decide", None, model_version=version,
                     metrics=json.loads((run_dir / "evaluation" / "metrics.json").read_text())["comparison"]["metrics"],
                     **decision_fields(json.loads((run_dir / "decision.json").read_text())))
    log.info("go/no-go for %s v%s:\n%s\nreport: %s", uc.name, version, out["text"], out["report_html"])
    return {k: out[k] for k in ("decision", "summary", "candidate_score", "baseline_score", "report_html")} | {
        "version": version
    }


@_recorded("deploy_model", lambda r: {"status": "success"})
def deploy_candidate(run_dir: str | Path, actor: str) -> dict:
    from retrain import deploy

    uc, meta = load_run(run_dir)
    version = json.loads((_candidate_dir(run_dir) / "registered.json").read_text())["version"]
    decision = json.loads((Path(run_dir) / "decision.json").read_text())
    with db.connection() as conn:
        return _jsonable(deploy.deploy(conn, use_case=uc.name, version=version, actor=actor,
                                       reason=decision["summary"], run_id=meta["run_id"]))


@_recorded("reject_candidate", lambda r: {"status": "no_go"})
def reject_candidate(run_dir: str | Path, actor: str) -> dict:
    from retrain import registry

    uc, meta = load_run(run_dir)
    version = json.loads((_candidate_dir(run_dir) / "registered.json").read_text())["version"]
    decision = json.loads((Path(run_dir) / "decision.json").read_text())
    with db.connection() as conn:
        return _jsonable(registry.reject(conn, use_case=uc.name, version=version, actor=actor,
                                         reason=decision["summary"], run_id=meta["run_id"]))


# --- backups --------------------------------------------------------------------------------------------------


@_recorded("backup_to_s3", lambda r: {"backup_id": r.get("backup_id")})
def backup(run_dir: str | Path) -> dict:
    from retrain.backup import backup_to_s3

    result = backup_to_s3(run_dir)
    return {k: result.get(k) for k in ("backup_id", "skipped", "bytes", "ciphertext_bytes", "reused")}


@_recorded("verify_backup")
def verify_backup(run_dir: str | Path) -> dict:
    from retrain.backup import drill_backup

    result = drill_backup(run_dir)
    return {k: result.get(k) for k in ("backup_id", "sha256", "chunks", "verified", "skipped")}


@_recorded("prune_backups")
def prune_backups(run_dir: str | Path) -> dict:
    from retrain.backup import prune_stage

    return _jsonable(prune_stage(run_dir))


@_recorded("cleanup", lambda r: {"status": "success"})
def cleanup(run_dir: str | Path) -> dict:
    from retrain.backup import cleanup_stage

    result = cleanup_stage(run_dir)
    return {k: result.get(k) for k in ("removed", "bytes_freed", "skipped")}
