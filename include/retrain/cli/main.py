"""`retrain` command line: run any stage outside Airflow, seed demo traffic, or run a whole DAG locally.

    retrain seed --use-case product_intent --rows 1000 [--dirty 0.3]
    retrain run --use-case product_intent [--param sample_limit=500 ...]   # the DAG, via dag.test()
    retrain demo [--ui]                                                     # seed if empty, run, summary
    retrain ui                                                              # Airflow UI on these DAGs
    retrain prepare|collect|build|validate ...                              # one stage
    retrain check-config                                                    # validate every use-case YAML
    retrain review export --use-case X [--run-id R] | review import FILE     # active learning (Label Studio)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from retrain.cli.demo import (configure_airflow_env, ensure_airflow_db, ensure_local_services, print_run_summary,
                              run_dag, run_dag_with_progress)
from retrain.schemas.use_case import ConfigError, list_use_cases, load_use_case
from retrain.settings import state_dir

log = logging.getLogger("retrain")


def _print(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _parse_params(pairs: list[str]) -> dict:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--param expects key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def cmd_seed(args) -> int:
    from retrain import db
    from retrain.data.synthetic import seed_examples

    uc = load_use_case(args.use_case)
    with db.connection() as conn:
        db.ensure_schema(conn)
        result = seed_examples(conn, uc, args.rows, seed=args.seed, dirty=args.dirty)
        result["total_rows"] = db.count_examples(conn, uc.name)
    _print(result)
    return 0


def cmd_run(args) -> int:
    for line in ensure_local_services().values():
        print(f"[retrain] {line}", flush=True)
    result = run_dag(args.use_case, _parse_params(args.param))
    _print(result)
    return 0 if result["state"].endswith("success") else 1


def cmd_demo(args) -> int:
    from retrain import db
    from retrain.rundir import RunDir
    from retrain.data.synthetic import seed_examples

    uc = load_use_case(args.use_case)
    t0 = time.monotonic()
    print(f"[demo] database: {db.database_dsn()[1]}", flush=True)
    for line in ensure_local_services().values():
        print(f"[demo] {line}", flush=True)
    with db.connection() as conn:
        db.ensure_schema(conn)
        have = db.count_examples(conn, uc.name)
        if have == 0:
            print(f"[demo] seeding {args.rows} synthetic production examples for {uc.name}", flush=True)
            seed_examples(conn, uc, args.rows, seed=args.seed)
        else:
            print(f"[demo] {have} production examples already in the table (make clean-state to start over)")
    log_file = state_dir() / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(f"[demo] running DAG retrain_{uc.name} with dag.test(); full Airflow log: {log_file}", flush=True)
    result = run_dag_with_progress(uc.name, _parse_params(args.param), log_file)
    print_run_summary(RunDir.for_run(uc.name, result["run_id"]).path, result, time.monotonic() - t0)
    ok = result["state"].endswith("success")
    if args.ui:
        return cmd_ui(args)
    return 0 if ok else 1


def cmd_ui(args) -> int:
    """The Airflow UI (airflow standalone) on this repo's DAGs, with the same embedded services as the demo."""
    ensure_airflow_db()
    for line in ensure_local_services().values():
        print(f"[ui] {line}", flush=True)
    home = Path(os.environ["AIRFLOW_HOME"])
    print(f"[ui] starting `airflow standalone` (AIRFLOW_HOME={home}); open http://localhost:8080 - the admin "
          f"password is printed below and kept in {home / 'simple_auth_manager_passwords.json.generated'}. "
          "Ctrl-C stops it.", flush=True)
    airflow = Path(sys.executable).with_name("airflow")
    # `airflow standalone` starts its components as a bare `airflow` found on PATH: put this interpreter's bin
    # directory first, so `make ui` works without activating the virtualenv.
    env = {**os.environ, "PATH": os.pathsep.join([str(airflow.parent), os.environ.get("PATH", "")])}
    # A child, not exec: the embedded S3 server lives in this process and the backup tasks need it.
    proc = subprocess.Popen([str(airflow), "standalone"], env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def cmd_rollback(args) -> int:
    import getpass

    from retrain.registry.deploy import run_rollback

    if not args.tenant and load_use_case(args.use_case).kind == "generation":
        raise SystemExit(f"{args.use_case} has one model per tenant: add --tenant <user id>")
    if args.tenant:  # a generation use case: one tenant's adapter (retrain.registry.tenants)
        from retrain.registry.tenants import run_rollback as run_tenant_rollback

        _print(run_tenant_rollback(args.use_case, args.tenant, to_version=args.to_version, reason=args.reason,
                                   actor=f"cli:{getpass.getuser()}"))
        return 0
    _print(run_rollback(args.use_case, to_version=args.to_version, reason=args.reason,
                        actor=f"cli:{getpass.getuser()}"))
    return 0


def cmd_registry(args) -> int:
    from retrain import db
    from retrain.registry import store as registry

    load_use_case(args.use_case)
    with db.connection() as conn:
        db.ensure_schema(conn)
        _print(registry.summary(conn, args.use_case))
    return 0


def cmd_backup(args) -> int:
    from retrain.backup import operations as backup

    if args.action == "list":
        result = backup.list_backups(args.use_case)
    elif args.action == "verify":
        result = backup.verify_backup(args.backup_id)
    elif args.action == "restore":
        result = backup.restore_backup(args.backup_id, args.target_dir, overwrite=args.overwrite)
    else:
        result = backup.prune_backups(args.use_case, args.keep)
    _print(result)
    return 0


def cmd_check_config(args) -> int:
    names = list_use_cases()
    bad = 0
    for name in names:
        try:
            load_use_case(name)
            print(f"ok   {name}")
        except ConfigError as exc:
            bad += 1
            print(f"FAIL {exc}")
    return 1 if bad else 0


def cmd_review(args) -> int:
    """Active learning: export a run's review queue for Label Studio, or import the reviewers' answers."""
    from retrain.review import workflow

    if args.action == "export":
        result = workflow.export(args.use_case, args.run_id, args.out)
        print(f"{result['tasks']} tasks of {result['use_case']} run {result['run_id']} ({result['reviewed']} already "
              f"reviewed) -> {result['export']}; labeling config: {result['labeling_config']}")
        return 0
    result = workflow.import_file(args.file)
    for line in result["errors"]:
        print(f"error: {line}", file=sys.stderr)
    print(f"{result['imported']} reviewed answers written as corrections, {result['unchanged']} unchanged, "
          f"{result['not_reviewed']} tasks not reviewed yet, {len(result['errors'])} refused ({result['file']})")
    return 1 if result["errors"] else 0


def cmd_score(args) -> int:
    from retrain import stages

    _print(stages.score_split(args.run_dir, args.split, tuple(args.model or ("base", "candidate"))))
    return 0


def cmd_stage(args) -> int:
    from retrain import stages

    if args.command == "prepare":
        result = stages.prepare_run(args.use_case, args.run_id, _parse_params(args.param))
    else:
        result = {"collect": stages.collect, "build": stages.build, "validate": stages.validate}[args.command](
            args.run_dir
        )
    _print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrain", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("seed", help="insert synthetic production examples")
    p.add_argument("--use-case", required=True)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--dirty", type=float, default=0.01, help="fraction of deliberately broken rows")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_seed)

    for name, func in (("run", cmd_run), ("demo", cmd_demo)):
        p = sub.add_parser(name, help="run the DAG locally with dag.test()" if name == "run" else "seed + run")
        p.add_argument("--use-case", required=(name == "run"), default="product_intent")
        p.add_argument("--param", action="append", default=[], help="trigger parameter key=value (repeatable)")
        if name == "demo":
            p.add_argument("--rows", type=int, default=1000)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--ui", action="store_true", help="then start the Airflow UI with the DAGs ready")
        p.set_defaults(func=func)

    p = sub.add_parser("prepare", help="stage 1: validate config, create run dir")
    p.add_argument("--use-case", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--param", action="append", default=[])
    p.set_defaults(func=cmd_stage)
    for name in ("collect", "build", "validate"):
        p = sub.add_parser(name, help=f"run the {name} stage on a prepared run directory")
        p.add_argument("--run-dir", required=True)
        p.set_defaults(func=cmd_stage)

    p = sub.add_parser("score", help="score the base model and the run's candidate on one split (no gate, no writes)")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--split", choices=["train", "val", "test"], default="val")
    p.add_argument("--model", action="append", help="base, candidate or a model directory (repeatable; default both)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("rollback", help="move production back to a named or the previous model version")
    p.add_argument("--use-case", required=True)
    p.add_argument("--to-version", type=int, default=None)
    p.add_argument("--reason", required=True, help="why (recorded in the registry history)")
    p.add_argument("--tenant", default=None, help="generation use cases: the tenant whose adapter rolls back")
    p.set_defaults(func=cmd_rollback)
    p = sub.add_parser("registry", help="model versions and history of a use case")
    p.add_argument("--use-case", required=True)
    p.set_defaults(func=cmd_registry)

    p = sub.add_parser("backup", help="list, verify, restore or prune encrypted backups in S3")
    bsub = p.add_subparsers(dest="action", required=True)
    b = bsub.add_parser("list")
    b.add_argument("--use-case", required=True)
    b = bsub.add_parser("verify")
    b.add_argument("backup_id")
    b = bsub.add_parser("restore")
    b.add_argument("backup_id")
    b.add_argument("--target-dir", default=None)
    b.add_argument("--overwrite", action="store_true")
    b = bsub.add_parser("prune")
    b.add_argument("--use-case", required=True)
    b.add_argument("--keep", type=int, required=True)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("ui", help="start the Airflow UI (airflow standalone) on this repo's DAGs")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("stack", help="the docker-compose.yaml process list natively: CeleryExecutor, Redis, "
                                     "PostgreSQL, api-server, scheduler, dag-processor, triggerer, default + gpu worker")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for every component to be ready")
    p.add_argument("--rows", type=int, default=1000, help="synthetic examples to seed when the table is empty (0: none)")
    from retrain.cli.stack import cmd_stack

    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("review", help="active learning: export a run's review queue for Label Studio, import the "
                                      "reviewed answers as corrections")
    rsub = p.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("export", help="write the queue as a Label Studio import file (+ labeling config)")
    r.add_argument("--use-case", required=True)
    r.add_argument("--run-id", default=None, help="default: the newest run with a review queue")
    r.add_argument("--out", default=None, help="default: review/label_studio_tasks.json in the run directory")
    r = rsub.add_parser("import", help="write a Label Studio JSON export back as corrected_output (feedback "
                                       "corrected); exit 1 when a task was refused")
    r.add_argument("file")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("check-config", help="validate every use-case YAML")
    p.set_defaults(func=cmd_check_config)

    args = parser.parse_args(argv)
    # Before anything imports Airflow (even a connection lookup does): Airflow reads AIRFLOW_HOME once, on import.
    configure_airflow_env()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # stage errors already say what to do; don't bury them under a traceback
        from retrain.errors import is_user_error, one_line

        if is_user_error(exc):
            print(f"error: {one_line(exc) if type(exc).__name__ == 'ParamValidationError' else exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
