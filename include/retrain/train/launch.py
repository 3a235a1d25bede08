"""Launch the QLoRA trainer as its own process and stream its progress into the caller's log.

This is what the Airflow ``train_candidate`` task calls (on ``queue="gpu"``, ``pool="gpu"``). The trainer runs
out of process so that GPU memory is returned to the worker when it exits (there is no reliable way to free
it inside a long-lived Python process), a native crash (CUDA, bitsandbytes) fails the task instead of the
worker, and several GPUs can be used through ``accelerate launch``. Killing the task kills the trainer; the
next try resumes from the newest complete checkpoint in ``run_dir/candidate/checkpoints`` (or, with
RETRAIN_CHECKPOINT_SCRATCH set, in ``<scratch>/<use case>/<run>/checkpoints`` on the worker's own disk: see
``RunDir.checkpoints``). When S3 is configured, each checkpoint is also mirrored there, encrypted, by a background
thread of this process (``retrain.train.mirror``), and a try on another worker whose disk lacks it resumes from the
mirrored copy.

Only the standard library and pydantic are imported here (plus retrain.settings / retrain.rundir, which import
nothing else): DAG files import this module. Nothing here touches TRL or transformers: the trainer process
applies its own library patches (retrain.train.qlora.cpu).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from retrain import settings
from retrain.rundir import RunDir

log = logging.getLogger(__name__)

STDERR_TAIL_LINES = 60
_PROGRESS_BAR = re.compile(r"\d+%\|")


class TrainingFailed(RuntimeError):
    """The trainer process exited with an error; the message carries the tail of its stderr."""


def visible_gpus() -> int:
    """GPUs this task may use, without importing torch (which would also initialise CUDA in the worker)."""
    visible = settings.cuda_visible_devices()
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        return len(ids)
    smi = shutil.which("nvidia-smi")
    if not smi:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(run_dir: Path, overrides: dict | None, *, processes: int | None = None) -> tuple[list[str], int]:
    """(argv, process count) for the trainer.

    One process: ``python -m retrain.train.qlora.trainer``. Several (more than one GPU visible, or
    RETRAIN_TRAIN_PROCESSES > 1): ``accelerate launch --multi_gpu --num_processes N``, which runs torchrun; on a
    machine without CUDA the processes train on the CPU over gloo. (``accelerate launch --cpu --num_processes N``
    would start a single process: accelerate 1.x only fans out CPU training through mpirun.)
    """
    gpus = visible_gpus()
    n = processes or settings.train_processes() or max(gpus, 1)
    script = ["-m", "retrain.train.qlora.trainer", "--run-dir", str(run_dir), "--resume", "auto"]
    if overrides:
        script += ["--overrides", json.dumps(overrides)]
    if n <= 1:
        return [sys.executable, *script], 1
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
        "--mixed_precision", "no",  # the trainer picks bf16 on CUDA itself
        "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]
    if not gpus:
        cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))]
    return cmd + script, n


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    log.warning("stopping the trainer (pid %d)", proc.pid)
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _stop_when_orphaned(proc: subprocess.Popen, parent: int, interval: float = 1.0) -> None:
    """Stop the trainer when this process loses its parent. Under Airflow the task runs in a process group of its
    own, so a worker killed outright (OOM killer, SIGKILL of its group) leaves it behind, training on, while the
    retried try starts a second trainer on the same checkpoints. (The trainer itself dies with this process.)"""
    while proc.poll() is None:
        if os.getppid() != parent:
            log.error("the task's parent process %d is gone (worker killed?): stopping the trainer", parent)
            _stop(proc, grace=10)
            return
        time.sleep(interval)


def _start_mirror(run: RunDir, use_case: str, meta: dict, spec, fingerprint: dict):
    """The run's checkpoint mirror (retrain.train.mirror), after restoring a newer mirrored checkpoint into the
    local checkpoints directory; None when mirroring is off. Never raises: mirroring must not fail training."""
    from retrain.train.mirror import mirror_for_run, restore_before_start

    mirror = mirror_for_run(run, use_case=use_case, run_id=str(meta.get("run_id") or run.path.name),
                            fingerprint=fingerprint, enabled=spec.checkpoint_mirror, keep=spec.mirror_keep)
    if mirror is not None:
        restore_before_start(mirror)
        mirror.start()
    return mirror


def train_qlora(run_dir: str, *, extra_overrides: dict | None = None) -> dict:
    """Fine-tune the candidate of a prepared run directory in a separate process; returns train_result.json.

    ``extra_overrides`` are TrainingSpec fields (e.g. from the DAG's Params) applied on top of the use case's
    training block and ``run_dir/train_overrides.json``. They are validated here, before anything starts.
    If the run directory already holds a finished result for the same settings, it is returned as is (a task
    retried after training succeeded does not train again). Raises TrainingFailed (a RuntimeError) with the
    tail of the trainer's stderr when the trainer fails; the full output is in candidate/trainer.log.
    """
    from retrain.train.spec import run_fingerprint, spec_for_run

    run = RunDir(Path(run_dir).resolve())
    run_dir_path = run.path
    uc, meta = run.load()
    # Validated here, in the worker, so a typo fails in a second naming the field instead of after a model load.
    spec = spec_for_run(run_dir_path, extra_overrides)
    out = run.candidate
    result_path = run.train_result
    fingerprint = run_fingerprint(run_dir_path, spec, uc.training.base_model)
    if result_path.is_file():
        try:
            previous = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        same = previous.get("fingerprint") == fingerprint
        if same and Path(previous.get("merged_path", "")).is_dir():
            log.info("training already finished for these settings: reusing %s", result_path)
            return previous
    out.mkdir(parents=True, exist_ok=True)
    if settings.checkpoint_scratch() is not None:
        log.info("checkpoints on this worker's own disk (RETRAIN_CHECKPOINT_SCRATCH): %s", run.checkpoints)
    mirror = _start_mirror(run, uc.name, meta, spec, fingerprint)

    cmd, processes = trainer_command(run_dir_path, extra_overrides)
    # PYTHONUNBUFFERED: progress lines must arrive as they happen, not when a buffer fills.
    env = settings.subprocess_env(PYTHONUNBUFFERED="1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info("launching the trainer (%d process%s): %s", processes, "" if processes == 1 else "es", " ".join(cmd))

    trainer_log = run.trainer_log
    tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
    started = time.time()
    with open(trainer_log, "a", encoding="utf-8") as log_file:
        log_file.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log_file.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
            cwd=str(run_dir_path),
        )
        run.trainer_pid.write_text(str(proc.pid))
        lock = threading.Lock()

        def pump_stderr() -> None:
            # Warnings and tracebacks: kept whole in trainer.log, the tail goes into the exception, and each
            # line is logged so a hang is visible in the task log too.
            for line in proc.stderr:  # type: ignore[union-attr]
                line = line.rstrip("\n")
                tail.append(line)
                with lock:
                    log_file.write("[stderr] " + line + "\n")
                    log_file.flush()
                # tqdm redraws a bar with carriage returns, which text mode splits into one line per redraw:
                # a 272-tensor GGUF conversion became 272 task-log lines. Only a finished bar reaches the log.
                if line.strip() and not (_PROGRESS_BAR.search(line) and "100%" not in line):
                    log.info("trainer stderr: %s", line)

        reader = threading.Thread(target=pump_stderr, name="trainer-stderr", daemon=True)
        reader.start()
        threading.Thread(target=_stop_when_orphaned, args=(proc, os.getppid()), name="trainer-orphan-watch",
                         daemon=True).start()
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                line = line.rstrip("\n")
                with lock:
                    log_file.write(line + "\n")
                    log_file.flush()
                if line.strip():
                    log.info("%s", line)
                if mirror is not None and line.startswith("[save] checkpoint-"):
                    mirror.notify()  # written completely: the mirror uploads it in the background
            code = proc.wait()
        finally:
            # Task killed or interrupted while streaming: take the trainer down with it to free the GPU.
            _stop(proc)
            reader.join(timeout=10)
            run.trainer_pid.unlink(missing_ok=True)
            if mirror is not None:
                # A failed trainer may be retried on another worker: its newest checkpoint goes up first.
                mirror.close(catch_up=proc.returncode != 0)

    if code != 0:
        last = "\n".join(tail) or "(nothing on stderr)"
        raise TrainingFailed(
            f"the trainer {_describe_exit(code)} after {time.time() - started:.0f} s "
            f"(run dir {run_dir_path}). Last stderr lines:\n{last}\n"
            f"Full output: {trainer_log}. Fix the cause and retry the task: training resumes from the newest "
            f"complete checkpoint in {run.checkpoints}."
        )
    if not result_path.is_file():
        raise TrainingFailed(
            f"the trainer exited normally but wrote no {result_path}; see {trainer_log} and retry the task"
        )
    result = json.loads(result_path.read_text())
    log.info(
        "training finished: %s steps, train loss %s, eval loss %s, merged model %s",
        result.get("steps"), result.get("train_loss"), result.get("eval_loss"), result.get("merged_path"),
    )
    return result
