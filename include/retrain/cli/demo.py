"""The local harness behind `retrain run`, `retrain demo` and `retrain ui`: Airflow pointed at this repo, the
embedded services (S3 API server, backup key), dag.test() with one progress line per task, and the run summary.

This is the one module (with cli/main.py) allowed to set process-wide environment: it configures the Airflow and
service variables of *this* CLI process before Airflow is imported.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from retrain.rundir import RunDir
from retrain.settings import REPO_ROOT, state_dir


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


class _StageProgress:
    """One line per task of a dag.test() run on the terminal, while the full Airflow log goes to a file.

    dag.test() runs each task through airflow.sdk.definitions.dag._run_task (private; Airflow 3.3 has no public
    per-task hook for dag.test()); wrapping it is the one place that sees every task start and end, whatever the
    logging setup. The wrap lives only for the duration of run_dag_with_progress (restored in its finally), in the
    CLI's own process. The trainer's own progress lines (step, loss, tokens/s,
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
    rd = RunDir(run_dir)
    summary = _read(rd.summary)
    if summary:
        c = summary["counts"]
        print(f"rows         : {c['collected']} collected this run, {c['rejected']} rejected, "
              f"{c['duplicates_removed']} duplicates removed; dataset train={c['train']} val={c['val']} test={c['test']}")
        print(f"Data Docs    : {summary['data_docs']}")
        drift = summary.get("drift") or {}
        for warning in drift.get("warnings") or []:
            print(f"DRIFT        : {warning}")
        if summary.get("label_conflicts"):
            print(f"conflicts    : {summary['label_conflicts']} inputs with disagreeing labels (manifest.json 'conflicts')")
    train = _read(rd.train_result)
    if train and train.get("backend") == "qlora":
        print(f"training     : {train['adapter']} on {train['base_model']}, {train['steps']} steps in "
              f"{train['seconds']:.0f}s; train loss {train['train_loss_first']:.3f} -> {train['train_loss']:.3f}, "
              f"validation loss {train.get('eval_loss_initial') or float('nan'):.3f} -> {train['eval_loss']:.3f}")
    elif train:
        print(f"training     : OpenAI job {train.get('job_id')} -> {train.get('model_id')}")
    metrics = _read(rd.metrics)
    if metrics:
        m = metrics["comparison"]["metrics"]
        print(f"metrics      : {'':8s}{'baseline':>9s} {'candidate':>9s}   (frozen test set, n={metrics['comparison']['n']})")
        for key in ("primary_score", "all_labels_accuracy", "exact_match", "json_validity", "schema_validity",
                    "entity_f1", "latency_p95"):
            if key in m:
                b, c = m[key].get("baseline"), m[key].get("candidate")
                fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
                print(f"  {key:19s}: {fmt(b):>9s} {fmt(c):>9s}")
    if rd.tenants_summary_md.is_file():  # generation use cases: one line per tenant (retrain.generation.summarize)
        print(rd.tenants_summary_md.read_text(encoding="utf-8").rstrip())
    decision = _read(rd.decision)
    if decision:
        print(f"decision     : {decision['decision']} - {decision['summary']}")
        if decision.get("baselines"):  # the prompted base model and, when one exists, the production model
            print(f"{'':15s}{decision['baselines']}")
    from retrain.review.workflow import summary_line  # active learning (select_for_review)

    review = summary_line(_read(rd.review_summary))
    if review:
        print(f"REVIEW       : {review.removeprefix('REVIEW: ')}")
    for label, path in (("report", rd.report_html), ("loss curve", rd.loss_plot)):
        if path.is_file():
            print(f"{label:13s}: {path}")
    backup = _read(rd.backup_receipt)
    if backup:
        drill = "restore drill passed" if backup.get("drill") else "not verified"
        print(f"backup       : {backup['backup_id']} -> s3://{backup['bucket']}/{backup['archive_key']} "
              f"(AES-256-GCM, {drill})")
    if result.get("failed_tasks"):
        print(f"FAILED tasks : {', '.join(result['failed_tasks'])} (see the log file for the task's error)")
    if (_read(rd.run_config) or {}).get("params", {}).get("dry_run"):
        print("dry run      : stopped after validation (training, evaluation, gate, deploy, backup skipped)")
    print(f"run dir      : {run_dir}")
    print(f"total        : {total_seconds:.0f}s")
