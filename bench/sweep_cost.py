"""Successive halving vs the full grid: optimizer steps and the winner (issue 19).

The same 4-candidate sweep (learning rates) over the same product_intent train/validation split, twice, with the
real sweep code (``retrain.sweep``: sub-run directories, the trainer process, resume from the first rung's
checkpoint) and the real validation scoring (``retrain.stages.score_split``: the evaluation engine, guided decoding,
the primary metric):

* full grid: every candidate trains its full steps; the best validation score wins;
* successive halving: every candidate trains ``--first-fraction`` of its steps, the best ceil(4 / eta) continue from
  their checkpoints to the end; the best of those wins.

Goal: halving costs <= 2x the optimizer steps of one full candidate and picks the same winner as the full grid.

Both arms really train: the halving result is NOT derived from the grid run. It could be only if a candidate's
training were identical up to the first rung (it is: same seed and data order, ``stop_at_step`` keeps the learning
rate schedule of the full step count) AND resuming from the rung's checkpoint were bit-exact, which no test
establishes here (dataloader skipping, RNG state of dropout): so the survivors' second rung is trained, as the DAG
trains it (``sweep.plan`` / ``train`` / ``halve`` / ``train`` / ``select``).

    .venv/bin/python bench/sweep_cost.py --tiny                  # tiny random Llama (minutes)
    nice -n 10 .venv/bin/python bench/sweep_cost.py --steps 24 --val 40 --rows 600 --work /tmp/sweep-cost
                                                                 # SmolLM2-135M, QLoRA nf4 (~25 min on 2 idle cores)

``--work DIR`` keeps the run directories and makes the bench resumable: an arm whose ``sweep/report.json`` exists is
read back, an unfinished one continues (planning is idempotent, training resumes from checkpoints). ``--arm full`` /
``--arm halving`` run one arm (two processes on a shared machine get twice the CPU share); a later run with the same
``--work`` and ``--arm both`` prints the comparison from the two reports. Seconds per arm: from the run
directory's creation to its sweep report.

Prints the per-candidate validation scores of both sweeps, both figures, and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
sys.path.insert(0, str(REPO / "bench"))


def chat_examples(n: int, seed: int) -> list[dict]:
    from retrain.data.synthetic import generate_rows
    from retrain.schemas.use_case import load_use_case

    uc = load_use_case("product_intent")
    out = []
    for r in generate_rows(uc, n, seed=seed, dirty=0.0):
        label = r["corrected_output"] or r["model_output"]
        if r["feedback"] == "rejected" or not isinstance(label, dict):
            continue
        out.append({"messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(r["input"])},
            {"role": "assistant", "content": json.dumps(label, ensure_ascii=False)},
        ]})
    return out


def make_run(root: Path, base_model: str, training: dict, sweep: dict, rows: list[dict], val: int) -> Path:
    """A prepared run directory as build_dataset leaves it, triggered with sweep=on."""
    from retrain.rundir import RunDir, write_json
    from retrain.schemas.use_case import load_use_case

    rd = RunDir(root)
    root.mkdir(parents=True, exist_ok=True)
    data = load_use_case("product_intent").model_dump(mode="json")
    data["training"].update({"base_model": base_model, **training})
    data["sweep"] = sweep
    config = {"run_id": f"bench__{root.name}", "params": {"sweep": "on"}, "use_case": data}
    if rd.run_config.is_file() and json.loads(rd.run_config.read_text()) != json.loads(json.dumps(config)):
        raise SystemExit(f"{root} holds a run with other settings: pick another --work directory")
    if not rd.run_config.is_file():  # a resumed arm keeps its data (and the creation time of run_config.json)
        write_json(rd.run_config, config)
        parts = {"train": rows[val:], "val": rows[:val]}
        for name, part in parts.items():
            rd.split(name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        write_json(rd.manifest, {"counts": {k: len(v) for k, v in parts.items()}})
    rd.load()  # validates the use case with its sweep section
    return root


def run_sweep(root: Path, halving: bool, score) -> dict:
    from retrain import sweep
    from retrain.rundir import RunDir

    rd = RunDir(root)
    if not rd.sweep_report_json.is_file():
        planned = sweep.plan(root)
        results = [sweep.train(c) for c in planned]
        if halving:
            results = [sweep.train(c) for c in sweep.halve(results, score)]
        sweep.select(results, score)
    report = json.loads(rd.sweep_report_json.read_text())
    report["seconds"] = round(rd.sweep_report_json.stat().st_mtime - rd.run_config.stat().st_mtime, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of a full candidate (tiny: 60, real: 160)")
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (tiny: 400, real: 1000)")
    p.add_argument("--val", type=int, default=None, help="validation examples scored per candidate (tiny: 60, real: 80)")
    p.add_argument("--eta", type=int, default=4)
    p.add_argument("--first-fraction", type=float, default=0.25)
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (4 candidates)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--work", type=Path, default=None, help="work directory (kept; resumable; see the docstring)")
    p.add_argument("--arm", choices=("both", "full", "halving"), default="both", help="which sweep(s) to run")
    args = p.parse_args(argv)

    from retrain.stages import score_split

    steps = args.steps or (60 if args.tiny else 160)
    rows = chat_examples(args.rows or (400 if args.tiny else 1000), seed=21)
    val = args.val or (60 if args.tiny else 80)
    work = args.work or Path(tempfile.mkdtemp(prefix="sweep-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from train_throughput import tiny_model

        to_pc = [{"prompt": r["messages"][:2], "completion": r["messages"][2:]} for r in rows]
        (work / "tiny").mkdir(exist_ok=True)
        base = tiny_model(work / "tiny", to_pc)
        training = {"max_steps": steps, "eval_steps": max(1, steps // 4), "save_steps": max(1, steps // 4),
                    "batch_size": 8, "lora_top_layers": None, "warmup_ratio": 0.0, "logging_steps": 10,
                    "early_stopping_patience": None}
        lrs = [float(x) for x in (args.lrs or "0.0003,0.001,0.003,0.01").split(",")]
    else:
        base = "smollm2-135m-instruct"
        training = {"max_steps": steps, "eval_steps": max(1, steps // 4), "save_steps": max(1, steps // 4),
                    "early_stopping_patience": None, "logging_steps": 10}
        lrs = [float(x) for x in (args.lrs or "0.0002,0.0005,0.001,0.002").split(",")]
    space = {"learning_rate": lrs}
    score = lambda d: score_split(d, "val", ("candidate",))["models"]["candidate"]  # noqa: E731

    arms = {}
    if args.arm in ("both", "full"):
        arms["full grid"] = run_sweep(make_run(work / "full", base, training,
                                               {"space": space, "max_candidates": len(lrs)}, rows, val), False, score)
    if args.arm in ("both", "halving"):
        arms["halving"] = run_sweep(make_run(work / "halving", base, training, {
            "space": space, "max_candidates": len(lrs),
            "halving": {"eta": args.eta, "first_budget_fraction": args.first_fraction}}, rows, val), True, score)
    if len(arms) == 1:
        ((name, rep),) = arms.items()
        print(f"--- {name}: {rep['optimizer_steps']} optimizer steps, {rep['seconds']} s, winner {rep['winner']}")
        print("\n".join(_table(rep)))
        print(f"work directory: {work} (run --arm both --work {work} with the same settings for the comparison)")
        return 0
    full, halved = arms["full grid"], arms["halving"]

    one = steps
    for name, rep in (("full grid", full), ("halving", halved)):
        print(f"--- {name}: {rep['optimizer_steps']} optimizer steps, {rep['seconds']} s")
        print("\n".join(line for line in _table(rep)))
    ratio = halved["optimizer_steps"] / one
    print(f"successive halving over {len(lrs)} candidates: {halved['optimizer_steps']} optimizer steps = "
          f"{ratio:.2f}x one full candidate ({one} steps; goal <= 2x); the full grid: {full['optimizer_steps']} "
          f"({full['optimizer_steps'] / one:.2f}x)")
    print(f"winner: full grid {full['winner']} ({_lr(full)}), halving {halved['winner']} ({_lr(halved)}): "
          f"{'same' if full['winner'] == halved['winner'] else 'DIFFERENT'}")
    print(json.dumps({"model": "tiny" if args.tiny else base, "steps_per_candidate": one, "candidates": len(lrs),
                      "eta": args.eta, "first_budget_fraction": args.first_fraction,
                      "halving_steps": halved["optimizer_steps"], "full_grid_steps": full["optimizer_steps"],
                      "halving_vs_one_candidate": round(ratio, 3), "winner_full": full["winner"],
                      "winner_halving": halved["winner"], "same_winner": full["winner"] == halved["winner"],
                      "seconds": {"full": full["seconds"], "halving": halved["seconds"]},
                      "scores_full": {r["name"]: r["primary_score"] for r in full["candidates"]},
                      "scores_halving": {r["name"]: r["primary_score"] for r in halved["candidates"]}}))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}")
    return 0


def _lr(report: dict) -> str:
    (row,) = [r for r in report["candidates"] if r["name"] == report["winner"]]
    return f"learning_rate {row['values']['learning_rate']:g}"


def _table(report: dict) -> list[str]:
    from retrain.sweep import report_markdown

    return [ln for ln in report_markdown(report).splitlines() if ln.startswith("|")]


if __name__ == "__main__":
    sys.exit(main())
