"""collect_examples on 1,000,000 rows vs `COPY ... TO STDOUT` of the same rows, in one run, with peak RSS.

Both sides read the same rows from the same PostgreSQL server and write them to a local file; each runs in its
own child process so its peak RSS is its own. COPY is the ceiling for getting rows out of PostgreSQL; our
collector also picks the trusted label, scrubs personal data, hashes each input for its split and keeps a
replayable watermark. Targets: rate >= 0.3x COPY, peak RSS < 300 MB.

    .venv/bin/python bench/collect_throughput.py [--rows 1000000] [--keep]

Uses an embedded PostgreSQL in a temporary directory unless RETRAIN_BENCH_DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
USE_CASE = "product_intent"

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
import psycopg2
mode, dsn, out = sys.argv[1], sys.argv[2], sys.argv[3]
conn = psycopg2.connect(dsn)
start = time.perf_counter()
if mode == "copy":
    sql = ("COPY (SELECT id, input, model_output, corrected_output, feedback, created_at FROM production_examples "
           "WHERE use_case = 'product_intent' ORDER BY id) TO STDOUT")
    with open(out, "w") as fh, conn.cursor() as cur:
        cur.copy_expert(sql, fh)
    rows = sum(1 for _ in open(out, "rb"))
    result = {"rows": rows}
else:
    from retrain.data.collect import collect_examples
    result = collect_examples(conn, "product_intent", "bench-run", out)
    result = {"rows": result["rows"], "skipped": sum(result["skipped"].values())}
elapsed = time.perf_counter() - start
# VmHWM, not ru_maxrss: ru_maxrss keeps the forking parent's high-water mark across exec.
hwm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
# Worker processes (parallel scrubbing) have their own memory: add the largest child's peak once per worker,
# an upper bound on the whole process tree.
workers = 0
if mode == "collect":
    from retrain.data.collect import _workers_for
    workers = _workers_for({"from_id": 0, "to_id": rows_hint}) if (rows_hint := int(sys.argv[5])) else 0
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
result.update(seconds=elapsed, peak_rss_mb=(hwm_kb + workers * child_kb) / 1024, workers=workers,
              bytes=__import__("os").path.getsize(out))
print(json.dumps(result))
"""


def run_child(mode: str, dsn: str, out: Path, rows: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, dsn, str(out), str(REPO / "include"), str(rows)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary database and files")
    args = ap.parse_args()

    from retrain import db
    from retrain.schemas.use_case import load_use_case
    from retrain.data.synthetic import seed_examples

    tmp = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    dsn = os.environ.get("RETRAIN_BENCH_DATABASE_URL") or db.start_embedded(tmp / "pg")
    try:
        with db.connection(dsn) as conn:
            db.ensure_schema(conn)
            with conn.cursor() as cur:
                cur.execute("TRUNCATE production_examples, collection_watermarks, collection_runs RESTART IDENTITY")
            conn.commit()
            t = time.perf_counter()
            seed_examples(conn, load_use_case(USE_CASE), args.rows, seed=7)
            print(f"seeded {args.rows:,} rows in {time.perf_counter() - t:.1f}s", flush=True)
        # Warm the server's cache once so neither side pays the first cold read.
        run_child("copy", dsn, tmp / "warm.tsv", args.rows)
        copy = run_child("copy", dsn, tmp / "copy.tsv", args.rows)
        ours = run_child("collect", dsn, tmp / "batch.jsonl", args.rows)
    finally:
        if not args.keep:
            db.stop_embedded(tmp / "pg")
            shutil.rmtree(tmp, ignore_errors=True)

    copy_rate = copy["rows"] / copy["seconds"]
    our_rate = (ours["rows"] + ours["skipped"]) / ours["seconds"]
    print(f"rows in table                : {args.rows:,}")
    print(f"COPY ... TO STDOUT (baseline): {copy['seconds']:7.2f}s  {copy_rate:10,.0f} rows/s  "
          f"peak RSS {copy['peak_rss_mb']:6.1f} MB")
    print(f"collect_examples (ours)      : {ours['seconds']:7.2f}s  {our_rate:10,.0f} rows/s  "
          f"peak RSS {ours['peak_rss_mb']:6.1f} MB  ({ours['rows']:,} written, {ours['skipped']:,} skipped; "
          f"{ours['workers']} scrub workers, RSS includes them)")
    print(f"ratio ours/COPY = {our_rate / copy_rate:.2f}x (target >= 0.3x); "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB (target < 300 MB)")


if __name__ == "__main__":
    main()
