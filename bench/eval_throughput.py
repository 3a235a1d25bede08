"""Batched evaluation (retrain.evaluate.inference) vs a per-example `generate` loop: same model, same inputs, same outputs.

The model is the real SmolLM2-135M-Instruct (the platform's default base model, i.e. the first run's baseline);
the inputs are product_intent-like test conversations built from retrain.data.synthetic (system prompt + rendered
user message, as in test.jsonl). Both sides use greedy decoding, the same stop rule (EOS, or the first JSON
object closing) and the same token budget. The batched side is the evaluation engine as the pipeline runs it:
prompts sorted by length, left-padded batches, the shared system-prompt prefix computed once per batch and its
key/value cache shared. The per-example side calls `model.generate` once per conversation (no padding, no
sharing). Both decode under the use case's output schema, as the pipeline does (retrain.evaluate.guided; --no-guided
turns it off on both sides). The script checks that both produce the same tokens for every example, then prints both timings
and the speed ratio. Target: >= 4x.

    .venv/bin/python bench/eval_throughput.py [--examples 64] [--batch-size 32] [--max-new-tokens 96]

--max-new-tokens defaults to 96, about the longest real product_intent answer (93 SmolLM2 tokens): a fine-tuned
candidate stops there, while the untuned base model often rambles in prose until the budget, and the full
schema budget (max_new_tokens_for: 336 here) makes the per-example side several times longer. Pass
--max-new-tokens 0 to use the schema budget anyway. The default run should take ~7-8 minutes on 2 idle cores
(estimated from per-step timings; this machine was never idle while it was written). On a
busy machine pass --threads 1: with more torch threads than free cores, OpenMP threads wait on each other and
the batched side's large matmuls suffer most. Exit status: 0 if outputs match and the ratio meets --target,
1 otherwise. Prints one JSON summary line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))


def build_conversations(use_case: str, n: int, seed: int) -> list[list[dict]]:
    from retrain.schemas.use_case import load_use_case
    from retrain.data.synthetic import generate_rows

    uc = load_use_case(use_case)
    seen, convs = set(), []
    # Clean rows only, distinct inputs (the frozen test set is deduplicated too).
    for row in generate_rows(uc, n * 4, seed=seed, dirty=0):
        if row["input"] in seen:
            continue
        seen.add(row["input"])
        convs.append([{"role": "system", "content": uc.system_prompt},
                      {"role": "user", "content": uc.render_input(row["input"])}])
        if len(convs) == n:
            break
    return convs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="as the pipeline (inference.DEFAULT_BATCH_SIZE)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="0 = the use case's schema budget")
    ap.add_argument("--use-case", default="product_intent")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="base model name, path or hub id")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-guided", action="store_true", help="decode without the output schema (both sides)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--target", type=float, default=4.0)
    ap.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    import torch

    from retrain.schemas.use_case import load_use_case
    from retrain.evaluate.inference import make_engine, max_new_tokens_for

    if args.threads:
        torch.set_num_threads(args.threads)
    uc = load_use_case(args.use_case)
    max_new = args.max_new_tokens or max_new_tokens_for(uc)
    convs = build_conversations(args.use_case, args.examples, args.seed)

    t0 = time.perf_counter()
    engine = make_engine({"kind": "hf", "path": args.model, "label": "bench"}, batch_size=args.batch_size,
                         schema=None if args.no_guided else uc.output_schema)
    load_s = time.perf_counter() - t0
    prompt_lens = [len(engine.prompt_ids(c)) for c in convs]
    print(f"model {engine.source} loaded in {load_s:.1f} s; {len(convs)} {args.use_case} conversations, "
          f"prompt tokens {min(prompt_lens)}-{max(prompt_lens)}, max_new_tokens {max_new}, "
          f"batch size {args.batch_size}, {'raw' if args.no_guided else 'schema-guided'} decoding, "
          f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}",
          flush=True)
    engine.generate_ids(convs[:2], max_new_tokens=4)  # warm-up: first-call allocations and lazy init

    # The engine sorts by prompt length and cuts batches; do the same here so each batch can be timed right
    # next to the per-example loop over the same conversations. On a shared machine the load drifts over
    # minutes: interleaving exposes both sides to the same drift, which timing them one after the other does not.
    order = sorted(range(len(convs)), key=lambda i: prompt_lens[i])
    batched: list[list[int]] = [[] for _ in convs]
    single: list[list[int]] = [[] for _ in convs]
    batched_s = single_s = batched_cpu = single_cpu = 0.0
    for k in range(0, len(order), args.batch_size):
        idx = order[k:k + args.batch_size]
        chunk = [convs[i] for i in idx]
        w, c = time.perf_counter(), time.process_time()
        outs, _ = engine.generate_ids(chunk, max_new_tokens=max_new)  # one left-padded batch
        batched_s += time.perf_counter() - w
        batched_cpu += time.process_time() - c
        w, c = time.perf_counter(), time.process_time()
        # The loop a straightforward evaluation script would write: one generate call per conversation.
        ones, _ = engine.generate_ids(chunk, max_new_tokens=max_new, batch_size=1)
        single_s += time.perf_counter() - w
        single_cpu += time.process_time() - c
        for i, a, b in zip(idx, outs, ones):
            batched[i], single[i] = a, b
        same = sum(a == b for a, b in zip(outs, ones))
        print(f"  examples {k + 1}-{k + len(idx)}: same outputs {same}/{len(idx)}; cumulative batched "
              f"{batched_s:7.1f} s, per-example {single_s:7.1f} s ({single_s / batched_s:.2f}x)", flush=True)
    print(f"batched:     {batched_s:8.1f} s wall, {batched_cpu:8.1f} s cpu  ({len(convs) / batched_s:.2f} examples/s)")
    print(f"per-example: {single_s:8.1f} s wall, {single_cpu:8.1f} s cpu  ({len(convs) / single_s:.2f} examples/s)")

    mismatched = [i for i, (a, b) in enumerate(zip(batched, single)) if a != b]
    for i in mismatched[:5]:
        print(f"  MISMATCH example {i}:\n    batched:     {engine.decode(batched[i])!r}\n"
              f"    per-example: {engine.decode(single[i])!r}")
    ratio = single_s / batched_s
    new_tokens = [len(g) for g in batched]
    stopped_json = sum(engine.decode(g).rstrip().endswith("}") for g in batched)
    print(f"same greedy outputs: {len(convs) - len(mismatched)}/{len(convs)}; generated tokens "
          f"mean {sum(new_tokens) / len(new_tokens):.0f}, max {max(new_tokens)}; {stopped_json} answers ended "
          f"with a closed JSON object")
    ok = not mismatched and ratio >= args.target
    print(f"speed ratio (per-example / batched): {ratio:.2f}x wall, {single_cpu / batched_cpu:.2f}x cpu time  "
          f"(target >= {args.target:g}x wall) -> {'OK' if ok else 'FAILED'}")
    print(json.dumps({"examples": len(convs), "batch_size": args.batch_size, "max_new_tokens": max_new,
                      "batched_s": round(batched_s, 2), "per_example_s": round(single_s, 2),
                      "ratio": round(ratio, 2), "cpu_ratio": round(single_cpu / batched_cpu, 2),
                      "mismatches": len(mismatched), "ok": ok}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
