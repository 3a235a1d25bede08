"""Hyper-parameter sweeps (issue 19): candidates in sub-run directories, successive halving, selection, the report.

A sweep is asked for per run (the ``sweep`` Param: off / on / n) over the use case's ``sweep:`` section
(``retrain.schemas.sweep``). The DAG maps the training task over the candidates; this module is what those tasks do
besides training:

* :func:`plan` gives each candidate its own sub-run directory ``<run>/sweep/c<i>/`` (RunDir.sweep_candidate): a
  ``run_config.json`` (the run's, with the candidate's training values and its own run id), a
  ``train_overrides.json`` (the run's own overrides file, if any, plus the candidate's values: what
  ``retrain.train.spec.spec_for_run`` reads), and relative symlinks to the run's ``train.jsonl``, ``val.jsonl`` and
  ``manifest.json`` (no copy of the data: cleanup of the run removes it for every candidate; backups skip links).
  Each candidate trains, checkpoints and resumes exactly like a run of its own.
* With ``halving``, :func:`plan` gives every candidate ``stop_at_step`` = its first budget; :func:`halve` scores
  the first rung on the validation split and returns the best ceil(n / eta) without it, and their second task
  resumes from the rung's checkpoint (``stop_at_step`` is not part of the checkpoint fingerprint, and the first
  rung ran the full run's learning-rate schedule) to the full steps.
* :func:`select` scores the finished candidates on the validation split with the evaluation engine (the primary
  metric, not the training loss), writes ``sweep/report.json``, ``report.md`` and ``report.png`` (the metric
  against each swept field), and moves the winner's ``candidate/`` to the run's ``candidate/`` so register,
  evaluate and the gate work unchanged. The others are returned for the registry (status ``not_selected``); their
  merged models and checkpoints are deleted (the adapters stay).

Scoring is the caller's (``score(run_dir) -> aggregate metrics``): the stage passes ``stages.score_split``.

On the **openai** backend each candidate is its own fine-tuning job (``epochs`` / ``openai_learning_rate_multiplier``
/ ``openai_batch_size`` from its sub-run's ``run_config.json``; the job's key is the candidate's run id, so a retried
task re-attaches to its job). :func:`check_openai_budget` runs before any job exists: the data's format check, then
the sum of the candidates' estimates against ``max_cost_usd``. Halving does not apply (a job cannot be stopped at a
rung and resumed); selection, the report and the registry rows are the same as for QLoRA.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from retrain.rundir import RunDir, atomic_write, read_json, write_json
from retrain.schemas.sweep import (
    OPENAI_FIELDS,
    SweepError,
    candidates as candidate_values,
    check_sweep_cost,
    halving_schedule,
    survivors,
    sweep_size,
)
from retrain.schemas.training import TrainingSpec, TrainingSpecError, spec_from_use_case

log = logging.getLogger(__name__)

Score = Callable[[str], dict]


# --- plan ---------------------------------------------------------------------------------------------------


def requested(run_dir: str | Path) -> int:
    """Candidates this run sweeps (0: no sweep), from its frozen sweep Param and the use case's sweep section."""
    uc, meta = RunDir(run_dir).load()
    return sweep_size((meta.get("params") or {}).get("sweep"), uc.sweep)


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


def total_steps(spec: TrainingSpec, train_examples: int, processes: int = 1) -> int:
    """Optimizer steps of a full run (the trainer's rule: epochs, capped by max_steps)."""
    per_epoch = max(1, math.ceil(math.ceil(train_examples / (spec.batch_size * processes)) / spec.grad_accum))
    total = max(1, math.ceil(spec.epochs * per_epoch))
    return min(total, spec.max_steps) if spec.max_steps else total


def _link(target: Path, link: Path) -> None:
    """``link`` -> ``target`` (relative). Whatever else is in its place (a file, a link elsewhere) is replaced: a
    candidate trains on the run's data and nothing else."""
    if link.is_symlink() and link.resolve() == target.resolve():
        return
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        raise SweepError(f"{link} is a directory; remove it and retry plan_sweep")
    if target.exists():
        os.symlink(os.path.relpath(target, link.parent), link)


def plan(run_dir: str | Path) -> list[dict]:
    """Create (or find again) the candidates' sub-run directories; returns one dict per candidate for the mapped
    training task. Every candidate's effective spec is validated here: a combination that breaks a cross-field rule
    fails naming the candidate and the field, before anything trains."""
    from retrain.train.spec import read_overrides_file

    rd = RunDir(Path(run_dir).resolve())
    uc, meta = rd.load()
    n = sweep_size((meta.get("params") or {}).get("sweep"), uc.sweep)
    if not n:
        raise SweepError("this run was not triggered with a sweep (sweep Param is off): nothing to plan")
    config = uc.sweep
    openai = uc.training.backend == "openai"  # one fine-tuning job per candidate: no optimizer steps, no halving
    base_overrides = read_overrides_file(rd.path)
    train_examples = _count_lines(rd.split("train")) if rd.split("train").is_file() else 0
    rows = []
    for i, values in enumerate(candidate_values(config, n), start=1):
        name = f"c{i}"
        spec_values = {k: v for k, v in values.items() if k not in OPENAI_FIELDS}
        try:
            spec = spec_from_use_case(uc.training, {**base_overrides, **spec_values})
        except TrainingSpecError as exc:
            raise SweepError(f"sweep candidate {name} {values} is not a valid training spec: {exc}") from None
        rows.append({"name": name, "values": values, "spec_values": spec_values,
                     "total_steps": None if openai else total_steps(spec, train_examples)})
    halving = None
    if config.halving and openai:
        log.info("sweep.halving does not apply on the openai backend (a job cannot stop at a rung and resume): "
                 "every candidate trains in full")
    elif config.halving and len(rows) > 1:
        halving = halving_schedule([r["total_steps"] for r in rows], config.halving.eta,
                                   config.halving.first_budget_fraction)
        halving |= {"eta": config.halving.eta, "first_budget_fraction": config.halving.first_budget_fraction}
    out = []
    for i, row in enumerate(rows):
        sub = rd.sweep_candidate(row["name"])
        sub.path.mkdir(parents=True, exist_ok=True)
        use_case = dict(meta["use_case"])
        use_case["training"] = {**use_case["training"], **row["values"]}
        write_json(sub.run_config, {**meta, "run_id": candidate_run_id(meta["run_id"], row["name"]),
                                    "use_case": use_case,
                                    "sweep_candidate": {"name": row["name"], "values": row["values"],
                                                        "parent_run_dir": str(rd.path),
                                                        "parent_run_id": meta["run_id"]}})
        write_json(sub.train_overrides, {**base_overrides, **row["spec_values"]})
        for target, link in ((rd.split("train"), sub.split("train")), (rd.split("val"), sub.split("val")),
                             (rd.manifest, sub.manifest)):
            _link(target, link)
        first = halving["first_budget"][i] if halving else None
        stop_at = first if first is not None and first < row["total_steps"] else None
        out.append({"name": row["name"], "run_dir": str(sub.path), "parent_run_dir": str(rd.path),
                    "values": row["values"], "total_steps": row["total_steps"], "stop_at_step": stop_at,
                    "rung": 1})
    write_json(rd.sweep_plan, {"run_id": meta["run_id"], "method": config.method, "space": config.space,
                               "backend": uc.training.backend, "requested": n, "halving": halving,
                               "candidates": out})
    log.info("sweep of %d candidates over %s%s", len(out), ", ".join(config.space),
             f"; successive halving: first budgets {halving['first_budget']}, keep {halving['keep']}, at most "
             f"{halving['max_optimizer_steps']} optimizer steps against {halving['full_grid_steps']} for the full grid"
             if halving else "")
    return out


def check_openai_budget(run_dir: str | Path) -> dict:
    """Before any of the sweep's OpenAI jobs exists (nothing uploaded yet): the dataset's format check, then the
    cost gate over the sum of the candidates' estimates (:func:`openai_cost_check`). The run's own one-job estimate
    only prices a training epoch here: the sum decides, also when one job at the YAML's epochs would not fit."""
    from retrain.train.openai.checks import check_and_estimate, job_settings
    from retrain.train.openai.errors import CostLimitExceeded

    limit = job_settings(run_dir)["max_cost_usd"]
    try:
        estimate = check_and_estimate(run_dir, max_cost_usd=limit)["estimate"]
    except CostLimitExceeded as exc:
        estimate = exc.estimate
    cost = openai_cost_check(run_dir, estimate, limit)
    log.info("OpenAI sweep: the candidates' estimates (%s) sum to $%.4f <= max_cost_usd $%g",
             ", ".join(f"{k} ${v:.4f}" for k, v in cost["estimates"].items()), cost["total_usd"], limit)
    return cost


def candidate_run_id(run_id: str, name: str) -> str:
    """A candidate's own run id (its registry row when not selected; its OpenAI job key)."""
    return f"{run_id}#sweep-{name}"


# --- training -----------------------------------------------------------------------------------------------


def train(candidate: dict) -> dict:
    """Train one candidate in its sub-run directory (resumable like any run). A candidate planned with
    ``stop_at_step`` trains its first halving rung; one without it trains to the end, resuming from the first rung's
    checkpoint whose result is moved aside first (else the launcher would reuse it as finished)."""
    from retrain.train.launch import train_qlora

    sub = RunDir(candidate["run_dir"])
    stop_at = candidate.get("stop_at_step")
    if not stop_at and sub.train_result.is_file():
        previous = read_json(sub.train_result)
        if (previous.get("spec") or {}).get("stop_at_step"):
            os.replace(sub.train_result, sub.sweep_rung1_result)
    result = train_qlora(str(sub.path), extra_overrides={"stop_at_step": stop_at} if stop_at else None)
    resumed = result.get("resumed_from_step") or 0
    return {**{k: candidate[k] for k in ("name", "run_dir", "parent_run_dir", "values", "total_steps")},
            "stop_at_step": stop_at, "rung": candidate.get("rung", 1), "steps": result.get("steps"),
            "steps_trained": (result.get("steps") or 0) - resumed, "eval_loss": result.get("eval_loss")}


# --- scoring, halving, selection ----------------------------------------------------------------------------


def scored(run_dir: str | Path, score: Score) -> dict:
    """The candidate's validation metrics for its current training result (cached in its sub-run directory, keyed
    by the steps trained, so a retried task does not score twice)."""
    sub = RunDir(run_dir)
    steps = sub.read_train_result().get("steps")
    cache = read_json(sub.sweep_scores) if sub.sweep_scores.is_file() else {}
    key = f"step_{steps}"
    if key not in cache:
        cache[key] = {"steps": steps, **score(str(sub.path))}
        write_json(sub.sweep_scores, cache)
    return cache[key]


def halve(results: list[dict], score: Score) -> list[dict]:
    """After the first rung: score every candidate on validation, keep the best ceil(n / eta); returns them planned
    for the second rung (to their full steps)."""
    if not results:
        raise SweepError("no candidate finished the first rung")
    rd = RunDir(results[0]["parent_run_dir"])
    plan_data = read_json(rd.sweep_plan)
    keep = (plan_data.get("halving") or {}).get("keep") or len(results)
    scores = {r["name"]: scored(r["run_dir"], score).get("primary_score") for r in results}
    kept = survivors(scores, keep, {r["name"]: r.get("eval_loss") for r in results})
    log.info("halving: validation scores after the first rung %s; continuing %s",
             ", ".join(f"{k}={_fmt(v)}" for k, v in scores.items()), ", ".join(kept))
    plan_data["rung1"] = {"scores": scores, "kept": kept, "steps_trained": {r["name"]: r["steps_trained"]
                                                                              for r in results}}
    write_json(rd.sweep_plan, plan_data)
    return [{**r, "stop_at_step": None, "rung": 2} for r in results if r["name"] in kept]


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def select(results: list[dict], score: Score) -> dict:
    """Score the finished candidates on validation, pick the best, write the report, move the winner's
    ``candidate/`` to the run's. Returns the report: the winner and every candidate's row (for the registry)."""
    if not results:
        raise SweepError("no sweep candidate finished training")
    rd = RunDir(results[0]["parent_run_dir"])
    if rd.sweep_report_json.is_file():  # a retry: the report is written before the winner moves
        report = read_json(rd.sweep_report_json)
    else:
        report = _report(rd, results, score)
    winner = RunDir(rd.sweep_candidate(report["winner"]).path)
    done = rd.train_result.is_file() and read_json(rd.train_result).get("sweep_candidate") == report["winner"]
    if not done:
        _promote(winner, rd)
    for row in report["candidates"]:
        if row["status"] == "not_selected":
            _slim(RunDir(row["run_dir"]))
    log.info("sweep winner %s on validation (report %s):\n%s", report["winner"], rd.sweep_report_md,
             report_markdown(report))
    return report


def _report(rd: RunDir, results: list[dict], score: Score) -> dict:
    plan_data = read_json(rd.sweep_plan)
    finals = {r["name"]: r for r in results}
    final_scores = {name: scored(r["run_dir"], score).get("primary_score") for name, r in finals.items()}
    winner = survivors(final_scores, 1, {name: r.get("eval_loss") for name, r in finals.items()})[0]
    rung1_steps = (plan_data.get("rung1") or {}).get("steps_trained") or {}
    # What decided who continued: every candidate's validation score after the first rung (halving only).
    rung1_scores = (plan_data.get("rung1") or {}).get("scores") or {}
    table = []
    for c in plan_data["candidates"]:
        name = c["name"]
        sub = RunDir(c["run_dir"])
        result = sub.read_train_result()
        metrics = scored(sub.path, score)
        table.append({
            "name": name, "values": c["values"], "primary_score": metrics.get("primary_score"),
            "json_validity": metrics.get("json_validity"), "eval_loss": result.get("eval_loss"),
            "steps": result.get("steps"),
            "steps_trained": _steps_trained(rung1_steps.get(name, 0), finals[name] if name in finals else None),
            "trained": "full" if name in finals else "first rung", "rung1_score": rung1_scores.get(name),
            "status": "selected" if name == winner else "not_selected",
            "run_id": candidate_run_id(plan_data["run_id"], name), "run_dir": c["run_dir"],
            "backend": result.get("backend"), "base_model": result.get("base_model"),
            "artifact": None if name == winner else result.get("adapter_path") or result.get("model_id")})
    report = {"run_id": plan_data["run_id"], "method": plan_data["method"], "space": plan_data["space"],
              "metric": "primary_score (validation split)", "winner": winner, "candidates": table,
              "halving": plan_data.get("halving"), "optimizer_steps": _sum_or_none(r["steps_trained"] for r in table),
              "full_grid_steps": _sum_or_none(c["total_steps"] for c in plan_data["candidates"]),
              "report_md": str(rd.sweep_report_md), "plot": str(rd.sweep_plot)}
    write_plot(table, plan_data["space"], rd.sweep_plot)
    with atomic_write(rd.sweep_report_md) as fh:
        fh.write(report_markdown(report))
    write_json(rd.sweep_report_json, report)
    return report


def _steps_trained(rung1: int, final: dict | None) -> int | None:
    """Optimizer steps a candidate trained over both rungs (None: an OpenAI job, whose steps are OpenAI's)."""
    if final is None:
        return rung1
    return None if final.get("steps_trained") is None else rung1 + final["steps_trained"]


def _sum_or_none(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _promote(sub: RunDir, rd: RunDir) -> None:
    """The winner's candidate/ becomes the run's candidate/ (a rename: no copy of the merged model), with the paths
    in its train_result.json, Modelfile and model card rewritten."""
    if rd.candidate.exists() or rd.candidate.is_symlink():
        if rd.train_result.is_file():
            raise SweepError(f"{rd.candidate} already holds a trained candidate that is not the sweep's winner; move "
                             "it away and retry select_candidate")
        shutil.rmtree(rd.candidate)  # leftovers of an unfinished attempt
    os.replace(sub.candidate, rd.candidate)
    old, new = str(sub.candidate), str(rd.candidate)
    text = rd.train_result.read_text(encoding="utf-8").replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    result = json.loads(text)
    result["sweep_candidate"] = sub.path.name
    write_json(rd.train_result, result)
    for path in (rd.modelfile, rd.model_card):
        if path.is_file():
            text = path.read_text(encoding="utf-8").replace(old, new)
            with atomic_write(path) as fh:
                fh.write(text)


def _slim(sub: RunDir) -> None:
    """A candidate that lost keeps its adapter, scores and results; its merged model and checkpoints go."""
    for path in (sub.merged, sub.checkpoints):
        shutil.rmtree(path, ignore_errors=True)


# --- report -------------------------------------------------------------------------------------------------


def report_markdown(report: dict) -> str:
    fields = list(report["space"])
    halving = any(r.get("rung1_score") is not None for r in report["candidates"])
    head = ["candidate", *fields, "val primary score", "JSON validity", "eval loss", "steps trained", "trained",
            *(["val score after rung 1"] if halving else []), "status"]
    lines = [f"# Sweep of run {report['run_id']}", "",
             f"{report['method']} over {', '.join(fields)}; metric: {report['metric']}; winner: "
             f"**{report['winner']}**", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["candidates"]:
        steps = "n/a" if r["steps_trained"] is None else str(r["steps_trained"])
        cells = [r["name"], *[str(r["values"].get(f)) for f in fields], _fmt(r["primary_score"]),
                 _fmt(r["json_validity"]), _fmt(r["eval_loss"]), steps, r["trained"],
                 *([_fmt(r.get("rung1_score"))] if halving else []),
                 f"**{r['status']}**" if r["status"] == "selected" else r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    if report["optimizer_steps"] is not None:
        lines += ["", f"Optimizer steps: {report['optimizer_steps']} (the full grid: {report['full_grid_steps']})."]
    else:
        lines += ["", "One OpenAI fine-tuning job per candidate (steps are OpenAI's; cost gate: the sum of the "
                      "candidates' estimates)."]
    if report.get("halving"):
        h = report["halving"]
        lines.append(f"Successive halving: eta {h['eta']}, first budget {h['first_budget_fraction']:g} of each "
                     f"candidate's steps, {h['keep']} continued.")
    return "\n".join(lines) + "\n"


def write_plot(table: list[dict], space: dict[str, list], path: Path) -> Path:
    """The validation metric against each swept field (one panel per field; the winner in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fields = list(space)
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.2), squeeze=False)
    for ax, field in zip(axes[0], fields):
        values = space[field]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        for r in table:
            x = r["values"].get(field)
            x = x if numeric else values.index(x)
            y = r["primary_score"] if r["primary_score"] is not None else float("nan")
            ax.scatter([x], [y], color="tab:red" if r["status"] == "selected" else "tab:blue",
                       marker="o" if r["trained"] == "full" else "x", zorder=3)
            ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
            # Ticks at the swept values only, spelled as in the YAML: log-scale minor labels overlap.
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(sorted(set(values)), [f"{v:g}" for v in sorted(set(values))], fontsize=8)
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(field)
        ax.set_ylabel("validation primary score")
        ax.grid(alpha=0.3)
    fig.suptitle("sweep: red = selected, x = stopped after the first rung", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=100)
    plt.close(fig)
    return path


# --- OpenAI backend -----------------------------------------------------------------------------------------


def openai_cost_check(run_dir: str | Path, estimate: dict, max_cost_usd: float) -> dict:
    """The sweep's OpenAI jobs (one per candidate) share the run's cost gate: the sum of their estimates must fit
    max_cost_usd. ``estimate`` is the run's own job estimate (``train.openai.checks.check_and_estimate``); a
    candidate's scales with its n_epochs (the learning-rate multiplier does not change the cost)."""
    from retrain.train.openai.checks import estimate_cost

    rd = RunDir(run_dir)
    uc, meta = rd.load()
    n = sweep_size((meta.get("params") or {}).get("sweep"), uc.sweep)
    estimates = {}
    for i, values in enumerate(candidate_values(uc.sweep, n), start=1):
        epochs = max(1, int(round(values.get("epochs", uc.training.epochs))))
        estimates[f"c{i}"] = estimate_cost(estimate["billed_tokens_per_epoch"], epochs, estimate["model"],
                                           price_override=uc.training.openai_price_per_1m_tokens)["estimated_usd"]
    total = check_sweep_cost(estimates, max_cost_usd)
    return {"estimates": estimates, "total_usd": total, "max_cost_usd": max_cost_usd}
