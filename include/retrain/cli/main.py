"""`retrain` command line: run any stage outside Airflow, seed demo traffic, or run a whole DAG locally.

    retrain seed --use-case product_intent --rows 1000 [--dirty 0.3]
    retrain run --use-case product_intent [--param sample_limit=500 ...]   # the DAG, via dag.test()
    retrain demo [--ui]                                                     # seed if empty, run, summary
    retrain ui                                                              # Airflow UI on these DAGs
    retrain prepare|collect|build|validate ...                              # one stage
    retrain check-config                                                    # validate every use-case YAML
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

from retrain.schemas.use_case import ConfigError, list_use_cases, load_use_case
from retrain.settings import REPO_ROOT, state_dir

log = logging.getLogger("retrain")


def _print(data) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def configure_airflow_env() -> Path:
    """Point Airflow at this repo's dags/ and a local SQLite metadata DB unless the user configured otherwise."""
    home = Path(os.environ.setdefault("AIRFLOW_HOME", str(state_dir() / "airflow")))
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO_ROOT / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO_ROOT / "plugins"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    return home


def ensure_airflow_db() -> None:
    home = configure_airflow_env()
    marker = home / ".retrain-db-migrated"
    if marker.exists():
        return
    airflow = Path(sys.executable).with_name("airflow")
    print(f"[retrain] initialising the Airflow metadata database in {home} (first run only)", flush=True)
    proc = subprocess.run([str(airflow), "db", "migrate"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"`airflow db migrate` failed (exit {proc.returncode}); see the output above")
    # train_qlora runs in the `gpu` pool (one slot per GPU in production; one here, where training uses the CPU).
    proc = subprocess.run([str(airflow), "pools", "set", "gpu", "1", "training slots (one per GPU)"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-2000:])
        raise SystemExit("`airflow pools set gpu` failed; see the output above")
    marker.write_text("ok\n")


def ensure_local_services() -> dict:
    """Embedded defaults for local runs: an S3 API server (moto) on 127.0.0.1 and a backup master key file.

    Only when nothing is configured: an Airflow connection `retrain_s3` / RETRAIN_S3_ENDPOINT_URL, or a master key
    (connection `retrain_backup_key` / RETRAIN_BACKUP_MASTER_KEY / a KMS key id), always win. moto keeps objects in
    memory, so demo backups live as long as this process; docker-compose uses MinIO instead.
    """
    import base64
    import secrets

    info = {}
    if not (os.environ.get("RETRAIN_S3_ENDPOINT_URL") or os.environ.get("AIRFLOW_CONN_RETRAIN_S3")):
        import socket

        from moto.server import ThreadedMotoServer

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        _services.append(server)
        os.environ["RETRAIN_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        # moto accepts any credentials; real ones are never needed (or used) for the embedded server.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "embedded-moto")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "embedded-moto")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        info["s3"] = f"embedded S3 API server (moto) at http://127.0.0.1:{port}"
    if not (os.environ.get("RETRAIN_BACKUP_MASTER_KEY") or os.environ.get("AIRFLOW_CONN_RETRAIN_BACKUP_KEY")
            or os.environ.get("RETRAIN_BACKUP_KMS_KEY_ID")):
        key_file = state_dir() / "backup-master.key"
        if not key_file.exists():
            key_file.touch(mode=0o600)
            key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        os.environ["RETRAIN_BACKUP_MASTER_KEY"] = key_file.read_text().strip()
        info["backup_key"] = f"local master key file {key_file} (mode 600; set RETRAIN_BACKUP_MASTER_KEY to use yours)"
    return info


_services: list = []


def run_dag(use_case: str, params: dict, *, bag=None) -> dict:
    """Run retrain_<use_case> in this process with dag.test(): real Airflow task execution, no scheduler."""
    ensure_airflow_db()
    from airflow.dag_processing.dagbag import DagBag

    dag_id = f"retrain_{use_case}"
    bag = bag or DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise SystemExit(f"DAG files failed to import: {bag.import_errors}")
    dag = bag.dags.get(dag_id)
    if dag is None:
        raise SystemExit(f"no DAG {dag_id}; known: {', '.join(sorted(bag.dags))}")
    started = time.monotonic()
    dag_run = dag.test(run_conf=params)
    state = str(getattr(dag_run, "state", "unknown"))
    result = {"dag_id": dag_id, "run_id": dag_run.run_id, "state": state, "seconds": round(time.monotonic() - started, 1)}
    states = {ti.task_id: str(ti.state).rsplit(".", 1)[-1].lower() for ti in dag_run.get_task_instances()}
    failed = sorted(t for t, s in states.items() if s == "failed")
    if failed:
        result["failed_tasks"] = failed
        result["not_run"] = sorted(t for t, s in states.items() if s == "upstream_failed")
    return result


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


class _StageProgress:
    """One line per task of a dag.test() run on the terminal, while the full Airflow log goes to a file.

    dag.test() runs each task through airflow.sdk.definitions.dag._run_task; wrapping it is the one place that sees
    every task start and end, whatever the logging setup. The trainer's own progress lines (step, loss, tokens/s,
    ETA) are echoed too: the training stage is most of the wall time and must not look frozen.
    """

    ECHO = ("[train]", "[eval]", "[done]", "[data]")

    def __init__(self, out, total: int):
        self.out, self.total, self.done = out, total, 0
        self.started = time.monotonic()

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def wrap(self, run_task):
        def run(*args, **kwargs):
            ti = kwargs.get("ti") or args[0]
            t0 = time.monotonic()
            self.line(f"  [{self.done + 1:2d}/{self.total}] {ti.task_id} ...")
            try:
                return run_task(*args, **kwargs)
            finally:
                self.done += 1
                state = str(ti.state).rsplit(".", 1)[-1].lower() if ti.state else "?"
                self.line(f"  [{self.done:2d}/{self.total}] {ti.task_id:20s} {state:8s} {time.monotonic() - t0:6.1f}s"
                          f"   (elapsed {time.monotonic() - self.started:.0f}s)")

        return run

    def handler(self) -> logging.Handler:
        progress = self

        class Echo(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith(progress.ECHO):
                    progress.line(f"          {msg}")

        return Echo(level=logging.INFO)


def run_dag_with_progress(use_case: str, params: dict, log_file: Path) -> dict:
    """run_dag with the Airflow output in log_file and a progress line per task on the terminal."""
    import airflow.sdk.definitions.dag as sdk_dag

    log_file.parent.mkdir(parents=True, exist_ok=True)
    ensure_airflow_db()  # says so on the terminal when it migrates (first run only)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(1), "w", buffering=1)
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a", encoding="utf-8") as fh:
        # fd level: Airflow's log handlers hold on to the stdout/stderr objects of the moment they were configured.
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        original = sdk_dag._run_task
        progress = _StageProgress(terminal, total=0)
        echo = progress.handler()
        launch_log = logging.getLogger("retrain.train.launch")
        launch_log.addHandler(echo)
        try:
            from airflow.dag_processing.dagbag import DagBag

            bag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
            dag = bag.dags.get(f"retrain_{use_case}")
            progress.total = len(dag.tasks) if dag else 0
            sdk_dag._run_task = progress.wrap(original)
            return run_dag(use_case, params, bag=bag)
        finally:
            sdk_dag._run_task = original
            launch_log.removeHandler(echo)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def print_run_summary(run_dir: Path, result: dict, total_seconds: float) -> None:
    """The demo's closing screen: rows, baseline vs candidate, decision, backup, where the reports are."""
    print("\n==== summary ====")
    print(f"DAG run      : {result['dag_id']} / {result['run_id']} -> {result['state']} in {result['seconds']}s")
    summary = _read(run_dir / "summary.json")
    if summary:
        c = summary["counts"]
        print(f"rows         : {c['collected']} collected this run, {c['rejected']} rejected, "
              f"{c['duplicates_removed']} duplicates removed; dataset train={c['train']} val={c['val']} test={c['test']}")
        print(f"Data Docs    : {summary['data_docs']}")
    train = _read(run_dir / "candidate" / "train_result.json")
    if train and train.get("backend") == "qlora":
        print(f"training     : {train['adapter']} on {train['base_model']}, {train['steps']} steps in "
              f"{train['seconds']:.0f}s; train loss {train['train_loss_first']:.3f} -> {train['train_loss']:.3f}, "
              f"validation loss {train.get('eval_loss_initial') or float('nan'):.3f} -> {train['eval_loss']:.3f}")
    elif train:
        print(f"training     : OpenAI job {train.get('job_id')} -> {train.get('model_id')}")
    metrics = _read(run_dir / "evaluation" / "metrics.json")
    if metrics:
        m = metrics["comparison"]["metrics"]
        print(f"metrics      : {'':8s}{'baseline':>9s} {'candidate':>9s}   (frozen test set, n={metrics['comparison']['n']})")
        for key in ("primary_score", "all_labels_accuracy", "exact_match", "json_validity", "schema_validity",
                    "entity_f1", "latency_p95"):
            if key in m:
                b, c = m[key].get("baseline"), m[key].get("candidate")
                fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
                print(f"  {key:19s}: {fmt(b):>9s} {fmt(c):>9s}")
    decision = _read(run_dir / "decision.json")
    if decision:
        print(f"decision     : {decision['decision']} - {decision['summary']}")
    for label, name in (("report", "evaluation/report.html"), ("loss curve", "candidate/loss.png")):
        if (run_dir / name).is_file():
            print(f"{label:13s}: {run_dir / name}")
    backup = _read(run_dir / "backup.json")
    if backup:
        drill = "restore drill passed" if backup.get("drill") else "not verified"
        print(f"backup       : {backup['backup_id']} -> s3://{backup['bucket']}/{backup['archive_key']} "
              f"(AES-256-GCM, {drill})")
    if result.get("failed_tasks"):
        print(f"FAILED tasks : {', '.join(result['failed_tasks'])} (see the log file for the task's error)")
    if (_read(run_dir / "run_config.json") or {}).get("params", {}).get("dry_run"):
        print("dry run      : stopped after validation (training, evaluation, gate, deploy, backup skipped)")
    print(f"run dir      : {run_dir}")
    print(f"total        : {total_seconds:.0f}s")


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
    # A child, not exec: the embedded S3 server lives in this process and the backup tasks need it.
    proc = subprocess.Popen([str(airflow), "standalone"])
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def cmd_rollback(args) -> int:
    import getpass

    from retrain.registry.deploy import run_rollback

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
        from retrain.errors import is_user_error

        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
