"""Training three tenants' adapters vs one (issue 20): does the per-tenant fan-out cost more than N single trainings?

The generation DAG trains one LoRA adapter per tenant, each in its own trainer process (``train_tenant`` mapped over
the tenants, ``retrain.train.launch.train_qlora`` in the tenant's sub-run directory), as the gpu pool schedules them
(one slot: one after the other). Every process loads the base model again: that load (interpreter + torch +
transformers start, base weights, the merge of the adapter afterwards) is the per-process overhead this bench
isolates, next to the optimiser steps themselves (the trainer's ``train_runtime``).

Each tenant gets its own sub-run directory built from the synthetic voices (``retrain.data.synthetic.email_voice``)
with the email_voice YAML and ``--steps`` optimiser steps, exactly what the DAG's tenant directories hold.

    nice -n 10 .venv/bin/python bench/tenant_training.py                    # SmolLM2-135M, QLoRA nf4, 6 steps each
    .venv/bin/python bench/tenant_training.py --base /path/to/tiny-model    # any saved HF model (e.g. a test's)

Prints one line per training (wall seconds, optimiser seconds, overhead) and a final JSON line with the ratio
``three_tenants_s / one_tenant_s`` (3.0 = three single trainings; more = the fan-out adds cost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))

TENANTS = ("alice", "bob", "carmen")


def tenant_dir(root: Path, tenant: str, *, steps: int, rows: int, base: str | None) -> Path:
    """A tenant sub-run directory as dataset_text writes it (run_config.json, train/val.jsonl, manifest.json)."""
    from retrain.data.synthetic.email_voice import rows as voice_rows
    from retrain.rundir import RunDir, write_json
    from retrain.schemas.use_case import load_use_case

    uc = load_use_case("email_voice")
    data = uc.model_dump(mode="json")
    data["training"].update({"max_steps": steps, "eval_steps": max(1, steps), "save_steps": max(1, steps),
                             "early_stopping_patience": None})
    if base:
        data["training"].update({"base_model": base, "adapter": "lora", "load_in_4bit": False,
                                 "lora_top_layers": None, "max_length": 1024})
    rd = RunDir(root / tenant)
    rd.path.mkdir(parents=True, exist_ok=True)
    run_id = f"bench#tenant-{tenant}"
    write_json(rd.run_config, {"run_id": run_id, "params": {}, "use_case": data,
                               "tenant": {"name": tenant, "parent_run_dir": str(root), "parent_run_id": "bench"}})
    examples = []
    for r in voice_rows({tenant: rows}, seed=7):
        examples.append(json.dumps({"messages": [
            {"role": "system", "content": uc.system_prompt},
            {"role": "user", "content": uc.render_input(r["input"])},
            {"role": "assistant", "content": r["corrected_output"]}]}, ensure_ascii=False))
    cut = int(len(examples) * 0.9)
    rd.split("train").write_text("\n".join(examples[:cut]) + "\n")
    rd.split("val").write_text("\n".join(examples[cut:]) + "\n")
    write_json(rd.manifest, {"counts": {"train": cut, "val": len(examples) - cut, "test": 0}, "new_rows": rows})
    return rd.path


def train(path: Path) -> dict:
    from retrain.train.launch import train_qlora

    started = time.perf_counter()
    result = train_qlora(str(path))
    wall = time.perf_counter() - started
    optimiser = float(result.get("train_runtime") or 0.0)
    return {"tenant": path.name, "wall_s": round(wall, 1), "train_runtime_s": round(optimiser, 1),
            "overhead_s": round(wall - optimiser, 1), "steps": result.get("steps")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per tenant")
    parser.add_argument("--rows", type=int, default=60, help="e-mails per tenant")
    parser.add_argument("--base", default=None, help="base model directory (default: the use case's SmolLM2)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="tenant-training-"))
    one = [train(tenant_dir(work / "one", "alice", steps=args.steps, rows=args.rows, base=args.base))]
    three = [train(tenant_dir(work / "three", t, steps=args.steps, rows=args.rows, base=args.base)) for t in TENANTS]
    for label, rows in (("one tenant", one), ("three tenants", three)):
        for r in rows:
            print(f"{label:14s} {r['tenant']:7s} wall {r['wall_s']:7.1f} s = optimiser {r['train_runtime_s']:6.1f} s "
                  f"+ process/base load/merge {r['overhead_s']:6.1f} s ({r['steps']} steps)")
    one_s = sum(r["wall_s"] for r in one)
    three_s = sum(r["wall_s"] for r in three)
    overhead = sum(r["overhead_s"] for r in one + three) / len(one + three)
    summary = {"one_tenant_s": round(one_s, 1), "three_tenants_s": round(three_s, 1),
               "ratio": round(three_s / one_s, 2), "overhead_per_process_s": round(overhead, 1),
               "overhead_share": round(overhead / (sum(r["wall_s"] for r in one + three) / len(one + three)), 2),
               "steps": args.steps, "base": args.base or "smollm2-135m-instruct", "work": str(work)}
    print(f"three tenants cost {summary['ratio']:.2f}x one tenant ({three_s:.0f} s vs {one_s:.0f} s); each process "
          f"spends {overhead:.0f} s ({summary['overhead_share']:.0%}) outside the optimiser steps")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
