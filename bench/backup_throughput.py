"""Encrypted streaming backup vs a plain boto3 ``upload_file`` of the same file to the same S3 endpoint.

One run starts a moto S3 server in its own process (its memory is not ours), writes a file of random bytes
(default 2 GiB; ``--sparse`` makes a sparse file instead, ``--size`` shrinks it), then uploads it

* plain  — ``boto3.client("s3").upload_file`` with boto3's default transfer settings (8 MiB parts, 10 threads);
* backup — ``retrain.backup.operations.backup_run`` on a run directory holding the same file (hard-linked as
           ``candidate/merged/model.safetensors``): tar stream -> AES-256-GCM chunks -> multipart upload,

each side in a fresh subprocess that reports its wall time and its peak RSS (VmHWM from /proc/self/status), with the
bucket emptied between runs. ``--rounds N`` alternates the order (plain, backup, backup, plain, ...) and reports
medians. Prints the throughput ratio backup/plain (target >= 0.9) and each side's peak RSS (target < 200 MB).

    .venv/bin/python bench/backup_throughput.py                  # 2 GiB, one round
    .venv/bin/python bench/backup_throughput.py --size 256M --rounds 3 --drill

The children set RETRAIN_S3_CONN_ID=, RETRAIN_BACKUP_KEY_CONN_ID= and RETRAIN_DB_CONN_ID= so no Airflow import
inflates the RSS of the backup side (inside an Airflow worker that import is paid by every task anyway). backup_run
pins each backup's manifest digest in PostgreSQL: without RETRAIN_DATABASE_URL the parent starts an embedded server
in its temporary directory and creates the tables before the timed children run.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: str | int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * mult)


# --- children ---------------------------------------------------------------------------------------------


def child(side: str, path: str, endpoint: str) -> None:
    import boto3  # noqa: F401 - imported before the baseline RSS is taken, on both sides alike
    from botocore.config import Config

    if side in ("backup", "drill"):
        import psycopg2  # noqa: F401 - the backup version pin goes to PostgreSQL

        from retrain.backup import operations as backup  # noqa: F401

    idle_rss = _vm("VmRSS")
    cpu0 = _cpu_seconds("self")
    started = time.perf_counter()
    if side == "plain":
        s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
        s3.upload_file(path, BUCKET, "plain/model.safetensors")
        extra = {}
    elif side == "backup":
        from retrain.backup.operations import backup_run

        run_dir = Path(path).parent / "run"
        result = backup_run(run_dir, use_case="product_intent", run_id="bench")
        extra = {"chunks": result["chunks"], "ciphertext_bytes": result["ciphertext_bytes"],
                 "backup_id": result["backup_id"]}
    else:  # drill
        from retrain.backup.operations import verify_backup

        result = verify_backup("product_intent/bench")
        extra = {"chunks": result["chunks"]}
    seconds = time.perf_counter() - started
    print(json.dumps({"side": side, "seconds": seconds, "bytes": os.path.getsize(path), "idle_rss": idle_rss,
                      "peak_rss": _vm("VmHWM"), "cpu": _cpu_seconds("self") - cpu0, **extra}))


def _run_child(side: str, path: Path, endpoint: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", side, "--file", str(path), "--endpoint", endpoint],
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{side} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- parent -----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start within 60 s")


def _empty_bucket(s3) -> None:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def _write_file(path: Path, size: int, sparse: bool) -> None:
    if sparse:
        with open(path, "wb") as fh:
            fh.truncate(size)
        return
    block = 8 << 20
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(os.urandom(min(block, left)))
            left -= block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="file size, e.g. 2G, 512M (default 2G)")
    ap.add_argument("--sparse", action="store_true", help="a sparse file (zeros) instead of random bytes")
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds; medians are reported")
    ap.add_argument("--drill", action="store_true", help="also time verify_backup (the restore drill)")
    ap.add_argument("--child", choices=["plain", "backup", "drill"], help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.file, args.endpoint)
        return

    import boto3
    from botocore.config import Config

    size = _parse_size(args.size)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "RETRAIN_S3_ENDPOINT_URL": endpoint, "RETRAIN_S3_BUCKET": BUCKET,
           "RETRAIN_S3_CONN_ID": "", "RETRAIN_BACKUP_KEY_CONN_ID": "", "RETRAIN_DB_CONN_ID": "",
           "RETRAIN_BACKUP_MASTER_KEY": base64.b64encode(os.urandom(32)).decode()}
    env.pop("RETRAIN_BACKUP_KMS_KEY_ID", None)
    tmp = Path(tempfile.mkdtemp(prefix="bench-backup-"))
    pg_dir = None
    if not env.get("RETRAIN_DATABASE_URL"):  # backup_run records each backup's manifest digest in PostgreSQL
        from retrain.db import connection, ensure_schema, start_embedded

        pg_dir = tmp / "postgres"
        env["RETRAIN_DATABASE_URL"] = start_embedded(pg_dir)
        with connection(env["RETRAIN_DATABASE_URL"]) as conn:  # tables created outside the timed children
            ensure_schema(conn)
    moto = _start_moto(port)
    try:
        data = tmp / "model.safetensors"
        t = time.perf_counter()
        _write_file(data, size, args.sparse)
        print(f"wrote {size / 2**20:.0f} MiB ({'sparse' if args.sparse else 'random'}) in "
              f"{time.perf_counter() - t:.1f} s; moto server pid {moto.pid} on {endpoint}")
        merged = tmp / "run" / "candidate" / "merged"
        merged.mkdir(parents=True)
        os.link(data, merged / "model.safetensors")  # same inode: same bytes, no second copy on disk
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="bench", aws_secret_access_key="bench",
                          region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket=BUCKET)

        results: dict[str, list[dict]] = {"plain": [], "backup": [], "drill": []}
        for r in range(args.rounds):
            order = ["plain", "backup"] if r % 2 == 0 else ["backup", "plain"]
            for side in order:
                server0 = _cpu_seconds(moto.pid)
                res = _run_child(side, data, endpoint, env)
                res["server_cpu"] = _cpu_seconds(moto.pid) - server0
                results[side].append(res)
                if side == "backup" and args.drill:
                    results["drill"].append(_run_child("drill", data, endpoint, env))
                _empty_bucket(s3)
                print(f"  round {r + 1} {side:6s} {res['bytes'] / 2**20 / res['seconds']:8.1f} MiB/s  "
                      f"peak RSS {res['peak_rss'] / 2**20:6.1f} MiB (after imports {res['idle_rss'] / 2**20:.1f})  "
                      f"CPU s: client {res['cpu']:.1f}, S3 server {res['server_cpu']:.1f}", flush=True)

        def med(side: str, key: str) -> float:
            return statistics.median(x[key] for x in results[side])

        plain_tp = size / med("plain", "seconds")
        backup_tp = size / med("backup", "seconds")
        ratio = backup_tp / plain_tp
        summary = {
            "size_bytes": size,
            "rounds": args.rounds,
            "plain_mib_s": round(plain_tp / 2**20, 1),
            "backup_mib_s": round(backup_tp / 2**20, 1),
            "ratio": round(ratio, 3),
            "plain_peak_rss_mib": round(med("plain", "peak_rss") / 2**20, 1),
            "backup_peak_rss_mib": round(med("backup", "peak_rss") / 2**20, 1),
            "backup_rss_after_imports_mib": round(med("backup", "idle_rss") / 2**20, 1),
            # CPU seconds per GiB: on a small shared machine the server and the client compete for the same
            # cores, so these explain a ratio that wall-clock noise alone would not.
            "plain_client_cpu_s_per_gib": round(med("plain", "cpu") / (size / 2**30), 2),
            "backup_client_cpu_s_per_gib": round(med("backup", "cpu") / (size / 2**30), 2),
            "server_cpu_s_per_gib_plain": round(med("plain", "server_cpu") / (size / 2**30), 2),
            "server_cpu_s_per_gib_backup": round(med("backup", "server_cpu") / (size / 2**30), 2),
        }
        if results["drill"]:
            summary["drill_mib_s"] = round(size / med("drill", "seconds") / 2**20, 1)
            summary["drill_peak_rss_mib"] = round(med("drill", "peak_rss") / 2**20, 1)
        print(json.dumps(summary))
        ok_ratio, ok_rss = ratio >= 0.9, summary["backup_peak_rss_mib"] < 200
        print(f"throughput ratio backup/plain = {ratio:.2f}x (target >= 0.9: {'ok' if ok_ratio else 'MISSED'}); "
              f"backup peak RSS {summary['backup_peak_rss_mib']:.0f} MiB (target < 200: {'ok' if ok_rss else 'MISSED'})"
              f"; plain peak RSS {summary['plain_peak_rss_mib']:.0f} MiB")
    finally:
        moto.terminate()
        try:
            moto.wait(timeout=10)
        except subprocess.TimeoutExpired:
            moto.kill()
        if pg_dir is not None:
            from retrain.db import stop_embedded

            stop_embedded(pg_dir)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
