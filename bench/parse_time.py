"""DAG parse time of dags/retrain_use_cases.py vs empty DAGs, measured the way the DAG processor parses.

Airflow 3's DAG processor parses each file in a fresh child of a process that already imported Airflow, so each
trial here forks a child from a warm parent and times one DagBag fill of a single file. Compared in one run:

* ours      — dags/retrain_use_cases.py (one DAG per use-case YAML);
* baseline  — a file that builds the same number of DAGs with the same 17 task ids, dependencies, branches and
              15-field trigger form, but every task body is empty and nothing is imported from our package or read from disk
              ("empty DAGs" of the same shape: the ratio is then what our wiring, imports and YAML reads cost);
* minimal   — one DAG with one empty @task (printed for reference).

Prints medians and the ratio ours/baseline (target ≤ 1.5).

    .venv/bin/python bench/parse_time.py [--trials 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

MINIMAL = textwrap.dedent(
    """
    from datetime import datetime
    from airflow.sdk import dag, task

    @dag(dag_id="minimal", schedule=None, start_date=datetime(2026, 1, 1))
    def minimal():
        @task
        def noop():
            pass

        noop()

    minimal()
    """
)

SAME_SHAPE = textwrap.dedent(
    """
    from datetime import datetime, timedelta
    from airflow.sdk import Param, chain, dag, task
    from airflow.sdk.bases.operator import BaseOperator

    def noop(*a, **k):
        return None

    # The trigger form's shape: 15 fields, the same types, bounds and descriptions as RunParams generates.
    def form():
        n = ["null", "number"]
        return {{
            "dry_run": Param(False, type="boolean", title="Dry run", description="d" * 60, section="Run"),
            "force_retrain": Param(False, type="boolean", title="Force", description="d" * 60, section="Run"),
            "sample_limit": Param(None, type=["null", "integer"], minimum=1, maximum=10**7, title="t",
                                  description="d" * 60, section="Run"),
            "backend": Param("qlora", type=["null", "string"], enum=[None, "qlora", "openai"], title="t",
                             description="d" * 60, section="Training"),
            "base_model": Param(None, type=["null", "string"], maxLength=500, title="t", description="d" * 200,
                                section="Training"),
            "adapter": Param("qlora", type=["null", "string"], enum=[None, "qlora", "lora"], title="t",
                             description="d" * 60, section="Training"),
            "max_train_steps": Param(None, type=["null", "integer"], minimum=1, maximum=100000, title="t",
                                     description="d" * 60, section="Training"),
            "training_overrides": Param(None, type=["null", "object"], title="t", description="d" * 150,
                                        section="Training"),
            "max_cost_usd": Param(10.0, type=n, minimum=0, maximum=1000, title="t", description="d" * 60,
                                  section="Training"),
            "min_score": Param(0.85, type=n, minimum=0, maximum=1, title="t", description="d" * 60, section="G"),
            "min_relative_improvement": Param(0.1, type=n, minimum=-1, maximum=10, title="t", description="d" * 60,
                                              section="G"),
            "max_p95_latency_regression": Param(0.25, type=n, minimum=0, maximum=10, title="t", description="d",
                                                section="G"),
            "min_json_validity": Param(0.95, type=n, minimum=0, maximum=1, title="t", description="d", section="G"),
            "require_significance": Param(False, type=["null", "boolean"], title="t", description="d", section="G"),
            "gate_override_reason": Param(None, type=["null", "string"], maxLength=500, title="t",
                                          description="d" * 200, section="G"),
        }}

    for name in {names!r}:
        @dag(dag_id="retrain_" + name, schedule="0 3 1 * *", start_date=datetime(2026, 1, 1), catchup=False,
             max_active_runs=1, tags=["retrain", name], doc_md="x" * 3000, is_paused_upon_creation=True,
             default_args={{"retries": 2, "retry_delay": timedelta(minutes=1), "retry_exponential_backoff": True,
                           "execution_timeout": timedelta(hours=1)}},
             params=form(), render_template_as_native_obj=True)
        def shaped():
            t = {{i: task(task_id=i)(noop) for i in ["prepare_run", "collect_examples", "build_dataset",
                  "validate_dataset", "report_dataset", "train_qlora", "register_candidate", "evaluate_candidate",
                  "deploy_model", "reject_candidate", "backup_to_s3", "verify_backup", "prune_backups", "cleanup"]}}
            run = t["prepare_run"]()
            validated = t["validate_dataset"](run)
            chain(run, t["collect_examples"](run), t["build_dataset"](run), validated)
            validated >> t["report_dataset"](run)
            trained = [t["train_qlora"](run), BaseOperator(task_id="train_openai")]
            validated >> task.branch(task_id="choose_backend")(noop)(run) >> trained
            registered = t["register_candidate"]()
            trained >> registered
            outcome = [t["deploy_model"](run), t["reject_candidate"](run)]
            chain(registered, t["evaluate_candidate"](run), task.branch(task_id="decide")(noop)(run), outcome)
            backup = t["backup_to_s3"]()
            outcome >> backup
            chain(backup, t["verify_backup"](run), t["prune_backups"](run), t["cleanup"](run))
        globals()["d_" + name] = shaped()
    """
)


def time_parse_in_child(path: Path) -> float:
    """Fork, fill a DagBag from one file in the child, return the child's wall time in seconds."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        from airflow.dag_processing.dagbag import DagBag

        start = time.perf_counter()
        bag = DagBag(str(path))
        elapsed = time.perf_counter() - start
        ok = not bag.import_errors and bag.dags
        os.write(write_fd, f"{elapsed if ok else -1}".encode())
        os._exit(0)
    os.close(write_fd)
    data = os.read(read_fd, 64).decode()
    os.close(read_fd)
    os.waitpid(pid, 0)
    value = float(data)
    if value < 0:
        sys.exit(f"{path} failed to parse")
    return value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=30)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "include"))
    from retrain.dagspec import use_case_specs

    names = [s["_file_stem"] for s in use_case_specs()]
    tmp = Path(tempfile.mkdtemp(prefix="bench-parse-"))
    (tmp / "minimal.py").write_text(MINIMAL)
    (tmp / "same_shape.py").write_text(SAME_SHAPE.format(names=names))
    ours = REPO / "dags" / "retrain_use_cases.py"

    # Warm parent: what the DAG processor has loaded before it forks a parser.
    import airflow.sdk  # noqa: F401
    from airflow.dag_processing.dagbag import DagBag  # noqa: F401

    results: dict[str, list[float]] = {"ours": [], "baseline": [], "minimal": []}
    files = {"ours": ours, "baseline": tmp / "same_shape.py", "minimal": tmp / "minimal.py"}
    for _ in range(args.trials):  # interleaved so machine noise hits all three alike
        for key, path in files.items():
            results[key].append(time_parse_in_child(path))

    med = {k: statistics.median(v) * 1000 for k, v in results.items()}
    print(f"DAG parse time, median of {args.trials} forked parses ({len(names)} use cases -> {len(names)} DAGs)")
    print(f"  ours     dags/retrain_use_cases.py     {med['ours']:8.1f} ms")
    print(f"  baseline same-shape empty DAGs         {med['baseline']:8.1f} ms")
    print(f"  minimal  one DAG, one empty @task      {med['minimal']:8.1f} ms")
    print(f"ratio ours/baseline = {med['ours'] / med['baseline']:.2f}x (target <= 1.5x)")
    print(f"ratio ours/minimal  = {med['ours'] / med['minimal']:.2f}x (for reference; {len(names)} DAGs vs 1)")


if __name__ == "__main__":
    main()
