"""Schema-guided decoding (retrain.evaluate.guided): schema validity over random schemas x random-logit decodes,
and the cost of the per-token check.

Validity: N random object schemas (enums of snake_case labels sharing prefixes, some with quotes, backslashes,
newlines and non-ASCII characters; const; minLength/maxLength; integer/number bounds; nested objects; arrays of
enums with minItems/maxItems/uniqueItems) x M decodes each by a "model" that draws random logits over a fixed
tokenizer-like vocabulary (single characters, multi-character pieces, escapes whole and in parts, structure), greedy
through the real SchemaGuard logits processor. Every answer whose object closed is checked with json.loads +
jsonschema. The generators are the ones tests/test_guided.py's property test draws from.

Speed: the guard's per-token work on real answers: the synthetic rows of the three demo use cases, split into
1-4 character "tokens"; per token, the guard's trial (clone + feed) and the row's own cursor feed. Reported as
CPU microseconds per token (best of 5).

    .venv/bin/python bench/guided_validity.py [--schemas 200] [--decodes 10] [--answers 300]
        [--module path/to/guided.py]   # measure another version of the module (e.g. the one before a change)

Prints one JSON summary line last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
sys.path.insert(0, str(REPO / "tests"))


def load_module(path: str | None):
    if path is None:
        from retrain.evaluate import guided

        return guided
    spec = importlib.util.spec_from_file_location("guided_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validity(module, n_schemas: int, n_decodes: int, seed: int) -> dict:
    from test_guided import check_decodes, random_schema

    rng = random.Random(seed)
    totals = {"closed": 0, "valid": 0, "budget": 0, "eos": 0, "lost": 0}
    guard_class = module.schema_guard_class()
    for i in range(n_schemas):
        schema = random_schema(rng)
        counts = check_decodes(schema, range(i * n_decodes, (i + 1) * n_decodes), guard_class=guard_class)
        for k, v in counts.items():
            totals[k] += v
    totals["validity"] = round(totals["valid"] / totals["closed"], 4) if totals["closed"] else None
    return totals


def speed(module, n_answers: int, seed: int) -> dict:
    from retrain.data.synthetic import generate_rows
    from retrain.schemas.use_case import load_use_case

    rng = random.Random(seed)
    work = []
    for name in ("product_intent", "email_intel", "hr_leave"):
        uc = load_use_case(name)
        for row in generate_rows(uc, n_answers // 3, seed=seed, dirty=0):
            text = json.dumps(row["corrected_output"] or row["model_output"], ensure_ascii=False)
            tokens, i = [], 0
            while i < len(text):
                step = rng.randint(1, 4)
                tokens.append(text[i:i + step])
                i += step
            work.append((uc.output_schema, tokens))
    n_tokens = sum(len(t) for _, t in work)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()  # CPU time: the machine may be shared
        for schema, tokens in work:
            cursor = module.SchemaCursor(schema)
            for token in tokens:
                assert cursor.clone().feed(token)  # the guard's trial of the chosen token
                assert cursor.feed(token)  # the row's cursor follows the generated token
        best = min(best, time.process_time() - started)
    return {"answers": len(work), "tokens": n_tokens, "us_per_token": round(best / n_tokens * 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", type=int, default=200)
    parser.add_argument("--decodes", type=int, default=10)
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--module", help="a guided.py to measure instead of retrain.evaluate.guided")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-validity", action="store_true")
    args = parser.parse_args()
    module = load_module(args.module)
    summary = {"module": args.module or "retrain.evaluate.guided", "speed": speed(module, args.answers, args.seed)}
    print(f"per-token check: {summary['speed']['us_per_token']} us over {summary['speed']['tokens']} tokens "
          f"of {summary['speed']['answers']} answers", flush=True)
    if not args.skip_validity:
        started = time.perf_counter()
        summary["validity"] = validity(module, args.schemas, args.decodes, args.seed)
        summary["validity"]["seconds"] = round(time.perf_counter() - started, 1)
        v = summary["validity"]
        print(f"{args.schemas} schemas x {args.decodes} decodes: {v['closed']} closed, {v['valid']} schema-valid "
              f"({v['validity']}); {v['budget']} hit the budget, {v['eos']} ended by end-of-sequence outside an object; "
              f"rows the guard lost (no allowed token, left unguided): {v['lost']}", flush=True)
    print(json.dumps(summary))
    return 0 if summary.get("validity", {}).get("validity") in (1.0, None) else 1


if __name__ == "__main__":
    sys.exit(main())
