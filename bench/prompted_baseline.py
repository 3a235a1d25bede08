"""The prompted zero-shot baseline on the real SmolLM2-135M-Instruct: primary score, JSON and schema validity.

For each use case the data is made the way `retrain demo` makes it: synthetic production rows seeded into a fresh
embedded PostgreSQL (``seed_examples``, 1000 rows, seed 0, the demo's defaults), then the pipeline's own
``prepare_run`` / ``collect`` / ``build`` stages write the frozen test split. On that split the base model answers

* ``prompted``: with the baseline prompt (retrain.evaluate.baseline: every field and every label) under schema-guided
  decoding from the first token: the prompted baseline month 1's gate now compares with;
* ``trained_prompt`` (``--also-trained-prompt``): with the candidate's short trained system prompt and the same
  decoding, i.e. what the untuned base model scores when nobody tells it the labels.

    nice -n 10 .venv/bin/python bench/prompted_baseline.py [--use-cases product_intent,email_intel,hr_leave]
        [--max-examples 0] [--also-trained-prompt] [--threads 2]

Everything lives in a temporary RETRAIN_HOME (the base model is converted there once, ~30 s; ``--home`` reuses an
earlier one's model and test splits). Prints one line per use case and model, then one JSON summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))


def test_split(use_case: str, rows: int, seed: int) -> tuple[object, Path]:
    """(use case, path of the frozen test split) built by the pipeline's own stages from seeded synthetic rows."""
    from retrain import db, stages
    from retrain.data.synthetic import seed_examples
    from retrain.schemas.use_case import load_use_case

    from retrain.rundir import RunDir

    uc = load_use_case(use_case)
    run_id = f"bench__prompted_baseline_{use_case}"
    existing = RunDir.for_run(use_case, run_id)
    if existing.split("test").is_file():  # --home of an earlier run: same data, no database needed
        return uc, existing.split("test"), existing.path
    if not os.environ.get("RETRAIN_DATABASE_URL"):
        from retrain.db import start_embedded

        os.environ["RETRAIN_DATABASE_URL"] = start_embedded(Path(os.environ["RETRAIN_HOME"]) / "postgres")
    with db.connection() as conn:
        db.ensure_schema(conn)
        seed_examples(conn, uc, rows, seed=seed)
    run_dir = Path(stages.prepare_run(use_case, run_id, {})["run_dir"])
    stages.collect(run_dir)
    stages.build(run_dir)
    return uc, RunDir(run_dir).split("test"), run_dir


def rows_of(uc, references, results) -> list[dict]:
    from retrain.evaluate import metrics

    return metrics.score_predictions(uc, references, results)["per_example"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--use-cases", default="product_intent,email_intel,hr_leave")
    ap.add_argument("--max-examples", type=int, default=0, help="cap per use case (0 = the whole test split)")
    ap.add_argument("--skip", type=int, default=0, help="start at this test example (to split a long run)")
    ap.add_argument("--rows", type=int, default=1000, help="seeded rows (the demo's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--also-trained-prompt", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--home", help="RETRAIN_HOME of an earlier run of this script: reuse its model and test splits")
    args = ap.parse_args(argv)

    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="retrain-bench-baseline-"))
    os.environ["RETRAIN_HOME"] = str(home)
    os.environ.pop("RETRAIN_DATABASE_URL", None)

    import torch

    from retrain.evaluate import baseline as baselines
    from retrain.evaluate import inference, metrics
    from retrain.stages import _training_answers

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = {}
    for name in args.use_cases.split(","):
        uc, path, run_dir = test_split(name, args.rows, args.seed)
        inputs, references = metrics.load_test_set(uc, path)
        n_all = len(inputs)
        inputs, references = inputs[args.skip:], references[args.skip:]
        if args.max_examples:
            inputs, references = inputs[:args.max_examples], references[:args.max_examples]
        budget = inference.max_new_tokens_for(uc, _training_answers(run_dir))
        prompts = {"prompted": baselines.baseline_prompt(uc)}
        if args.also_trained_prompt:
            prompts["trained_prompt"] = uc.system_prompt
        for kind, prompt in prompts.items():
            spec = {"kind": "hf", "path": args.model, "label": f"{name}:{kind}"}
            started = time.perf_counter()
            results, stats = inference.predict(spec, baselines.conversations(uc, inputs, prompt), uc,
                                               max_new_tokens=budget)
            agg = metrics.score_predictions(uc, references, results, inputs=inputs,
                                            wall_seconds=stats["seconds"])["aggregate"]
            row = {"n": len(inputs), "test_split": n_all, "budget": budget,
                   "primary_label": uc.primary_label, "primary_score": round(agg["primary_score"], 4),
                   "json_validity": round(agg["json_validity"], 4), "schema_validity": round(agg["schema_validity"], 4),
                   "skip": args.skip, "correct": sum(1 for r in rows_of(uc, references, results) if r["primary_correct"]),
                   "json_valid": sum(1 for r in rows_of(uc, references, results) if r["json_valid"]),
                   "schema_valid": sum(1 for r in rows_of(uc, references, results) if r["schema_valid"]),
                   # Closed = the whole answer is one JSON object (a guided answer is cut where its object closes;
                   # the lenient parse may also find a nested object inside an answer the budget cut short).
                   "closed": sum(1 for r in rows_of(uc, references, results) if r["json_valid"]),
                   "closed_schema_valid": sum(1 for r in rows_of(uc, references, results)
                                              if r["json_valid"] and r["schema_valid"]),
                   "starts_with_brace": sum((r["text"] or "").startswith("{") for r in results) / len(results),
                   "seconds": round(time.perf_counter() - started, 1)}
            summary[f"{name}:{kind}"] = row
            print(f"{name:15s} {kind:15s} n={row['n']:3d}/{n_all:3d} {uc.primary_label} accuracy "
                  f"{row['primary_score']:.3f}  JSON validity {row['json_validity']:.3f}  schema validity "
                  f"{row['schema_validity']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
