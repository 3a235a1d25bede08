"""The run directory: every artifact's file name, and the atomic writes that put them there.

One run of one use case owns ``$RETRAIN_HOME/runs/<use_case>/<run id as a directory name>/``. Each stage reads
what earlier stages wrote there and adds its own files; this class is the only place that knows their names, so
"where does decide read the metrics from?" has one answer. The effective configuration is frozen into
``run_config.json`` by ``prepare_run`` and read back with :meth:`RunDir.load`.

Every write goes through :func:`write_json` / :func:`atomic_write`: a temporary file in the same directory,
then a rename, so a killed task never leaves half a file behind and a retried one overwrites cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from retrain import settings

SPLITS = ("train", "val", "test")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


# --- atomic files ---------------------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": encoding} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: str | Path, data: Any, *, indent: int | None = 2) -> Path:
    """Atomic JSON write (UTF-8, datetimes and paths as strings)."""
    with atomic_write(path) as fh:
        fh.write(json.dumps(data, indent=indent, ensure_ascii=False, default=str))
    return Path(path)


def read_json(path: str | Path, *, missing: str | None = None) -> Any:
    """Parsed JSON; ``missing`` is the sentence that explains a missing file (FileNotFoundError names the path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing" + (f": {missing}" if missing else ""))
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def assistant_turns(path: str | Path) -> list[str]:
    """The assistant turns (the labelled answers) of a split file in chat ``messages`` format; [] if it is absent."""
    out: list[str] = []
    path = Path(path)
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    messages = json.loads(line).get("messages") or []
                    if messages and messages[-1].get("role") == "assistant":
                        out.append(str(messages[-1].get("content", "")))
    return out


def run_dir_name(run_id: str) -> str:
    # Airflow run ids contain ':' and '+' (scheduled__2026-11-01T03:00:00+00:00): keep paths portable.
    return _SAFE.sub("_", run_id)


def tenant_dir_name(tenant: str) -> str:
    """A tenant (a user id from production data: anything) as one safe path component. A safe name is kept as it
    is; a name that had to change ('a/b', '..', 'josé') gets a short hash of the original, so 'a/b' and 'a_b'
    never share a directory and nothing escapes ``tenants/``."""
    safe = _SAFE.sub("_", tenant)[:64]
    if not safe or safe != tenant or safe.startswith("."):
        safe = f"{safe.lstrip('.')[:48] or 'tenant'}-{hashlib.sha256(tenant.encode('utf-8')).hexdigest()[:10]}"
    return safe


# --- the run directory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's artifacts. ``RunDir(path)`` for an existing directory, ``RunDir.for_run`` for a new one."""

    path: Path

    # File names, relative to the run directory (also what backups include and cleanup removes).
    RUN_CONFIG = "run_config.json"
    BATCH = "batch.jsonl"
    COLLECT = "collect.json"
    REJECTED = "rejected.jsonl"
    MANIFEST = "manifest.json"
    VALIDATION = "validation.json"
    DATA_DOCS = "data_docs"
    SUMMARY = "summary.json"
    DECISION = "decision.json"
    BACKUP_RECEIPT = "backup.json"
    TRAIN_OVERRIDES = "train_overrides.json"
    CANDIDATE = "candidate"
    EVALUATION = "evaluation"

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def for_run(cls, use_case: str, run_id: str) -> RunDir:
        return cls(settings.runs_dir() / use_case / run_dir_name(run_id))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # --- data stages --------------------------------------------------------------------------------------
    @property
    def run_config(self) -> Path:
        return self.path / self.RUN_CONFIG

    @property
    def batch(self) -> Path:
        return self.path / self.BATCH

    @property
    def collect(self) -> Path:
        return self.path / self.COLLECT

    @property
    def rejected(self) -> Path:
        return self.path / self.REJECTED

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return self.path / f"{name}.jsonl"

    @property
    def manifest(self) -> Path:
        return self.path / self.MANIFEST

    @property
    def validation(self) -> Path:
        return self.path / self.VALIDATION

    @property
    def data_docs(self) -> Path:
        return self.path / self.DATA_DOCS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    # --- training -----------------------------------------------------------------------------------------
    @property
    def train_overrides(self) -> Path:
        return self.path / self.TRAIN_OVERRIDES

    @property
    def candidate(self) -> Path:
        return self.path / self.CANDIDATE

    @property
    def checkpoints(self) -> Path:
        """Resumable training state: in the run directory, or on this worker's own disk when
        RETRAIN_CHECKPOINT_SCRATCH is set (then the S3 mirror is what a retry on another worker resumes from)."""
        return self.checkpoints_under(settings.checkpoint_scratch())

    def checkpoints_under(self, scratch: Path | None) -> Path:
        """The checkpoints directory in the run directory (``scratch`` None) or under a worker's scratch directory:
        ``<scratch>/<use case>/<run>/checkpoints`` (the run directory's path below the runs directory; a run
        directory elsewhere gets its name plus a hash of its path)."""
        if scratch is None:
            return self.candidate / "checkpoints"
        path = self.path.resolve()
        try:
            key = path.relative_to(settings.runs_dir().resolve())
        except ValueError:
            key = Path(f"{_SAFE.sub('_', path.name)}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}")
        return scratch / key / "checkpoints"

    @property
    def train_result(self) -> Path:
        return self.candidate / "train_result.json"

    @property
    def fingerprint(self) -> Path:
        """What the checkpoints were computed from (settings, base model, data): a mismatch discards them."""
        return self.checkpoints / "run_fingerprint.json"

    @property
    def checkpoint_mirror(self) -> Path:
        """What was mirrored to S3 (retrain.train.mirror): keys, steps, manifest digests, the last error."""
        return self.candidate / "checkpoint_mirror.json"

    @property
    def adapter(self) -> Path:
        return self.candidate / "adapter"

    @property
    def merged(self) -> Path:
        return self.candidate / "merged"

    @property
    def tensorboard(self) -> Path:
        return self.candidate / "tb"

    @property
    def loss_plot(self) -> Path:
        return self.candidate / "loss.png"

    @property
    def model_card(self) -> Path:
        return self.candidate / "model_card.md"

    @property
    def modelfile(self) -> Path:
        return self.candidate / "Modelfile"

    @property
    def trainer_log(self) -> Path:
        return self.candidate / "trainer.log"

    @property
    def trainer_pid(self) -> Path:
        return self.candidate / "trainer.pid"

    @property
    def registered(self) -> Path:
        return self.candidate / "registered.json"

    @property
    def openai_job(self) -> Path:
        return self.candidate / "openai_job.json"

    @property
    def openai_format_check(self) -> Path:
        return self.candidate / "openai_format_check.json"

    @property
    def openai_events(self) -> Path:
        return self.candidate / "openai_events.jsonl"

    # --- hyper-parameter sweep (retrain.sweep): one sub-run directory per candidate --------------------------
    SWEEP = "sweep"

    @property
    def sweep(self) -> Path:
        return self.path / self.SWEEP

    def sweep_candidate(self, name: str) -> RunDir:
        """A candidate's sub-run directory: its own run_config.json, train_overrides.json, links to the splits."""
        return RunDir(self.sweep / name)

    @property
    def sweep_plan(self) -> Path:
        return self.sweep / "plan.json"

    @property
    def sweep_scores(self) -> Path:
        """In a candidate's sub-run directory: its validation scores, one entry per rung."""
        return self.path / "sweep_scores.json"

    @property
    def sweep_rung1_result(self) -> Path:
        """In a candidate's sub-run directory: train_result.json of the first halving rung, moved aside."""
        return self.path / "rung1_train_result.json"

    @property
    def sweep_report_json(self) -> Path:
        return self.sweep / "report.json"

    @property
    def sweep_report_md(self) -> Path:
        return self.sweep / "report.md"

    @property
    def sweep_plot(self) -> Path:
        return self.sweep / "report.png"

    # --- active learning (retrain.review): the run's hard examples for human review ---------------------------
    REVIEW = "review"
    REVIEW_EXPORT = "label_studio_tasks.json"
    REVIEW_LABELING_CONFIG = "label_studio_config.xml"

    @property
    def review(self) -> Path:
        return self.path / self.REVIEW

    @property
    def review_summary(self) -> Path:
        """What select_for_review found: counts per reason, queued rows, status (the run summary and the UI)."""
        return self.review / "summary.json"

    @property
    def review_export(self) -> Path:
        """The Label Studio import file (tasks with data and predictions) of the run's queued examples."""
        return self.review / self.REVIEW_EXPORT

    @property
    def review_labeling_config(self) -> Path:
        """The Label Studio labeling config (XML) that the export's tasks and `retrain review import` expect."""
        return self.review / self.REVIEW_LABELING_CONFIG

    # --- generation use cases (retrain.data.dataset_text): one sub-run directory per tenant ------------------
    TENANTS = "tenants"
    TENANTS_MANIFEST = "tenants.json"

    @property
    def tenants_dir(self) -> Path:
        return self.path / self.TENANTS

    def tenant(self, name: str) -> RunDir:
        """A tenant's sub-run directory, laid out like a sweep candidate (run_config.json, splits, manifest.json)."""
        return RunDir(self.tenants_dir / tenant_dir_name(name))

    @property
    def tenants_manifest(self) -> Path:
        """Per tenant: split counts, eligible or not and why (retrain.data.dataset_text)."""
        return self.path / self.TENANTS_MANIFEST

    # --- generation use cases (retrain.generation): per-tenant plan, voice classifier, export, summary -------
    @property
    def tenants_plan(self) -> Path:
        """Which tenants this run trains and which it skips, with the reason (plan_tenants)."""
        return self.path / "tenants_plan.json"

    @property
    def voice_classifier(self) -> Path:
        """The voice-attribution classifier fitted on all tenants' training e-mails (once per run)."""
        return self.path / "voice_classifier.joblib"

    @property
    def tenants_summary(self) -> Path:
        return self.path / "tenants_summary.json"

    @property
    def tenants_summary_md(self) -> Path:
        return self.path / "tenants_summary.md"

    @property
    def tenant_export(self) -> Path:
        """In a tenant's sub-run: adapter/ + Ollama Modelfile, what deploy publishes (retrain.registry.tenants)."""
        return self.candidate / "export"

    # --- evaluation and decision --------------------------------------------------------------------------
    @property
    def evaluation(self) -> Path:
        return self.path / self.EVALUATION

    @property
    def metrics(self) -> Path:
        return self.evaluation / "metrics.json"

    @property
    def models(self) -> Path:
        return self.evaluation / "models.json"

    def predictions(self, name: str) -> Path:
        return self.evaluation / f"predictions_{name}.jsonl"

    @property
    def report_html(self) -> Path:
        return self.evaluation / "report.html"

    @property
    def report_md(self) -> Path:
        return self.evaluation / "report.md"

    @property
    def decision(self) -> Path:
        return self.path / self.DECISION

    @property
    def backup_receipt(self) -> Path:
        return self.path / self.BACKUP_RECEIPT

    # --- reading back -------------------------------------------------------------------------------------
    def load(self):
        """(UseCase, run_config dict) as frozen by prepare_run."""
        from retrain.schemas.use_case import parse_use_case

        if not self.run_config.is_file():
            raise FileNotFoundError(
                f"{self.run_config} is missing: this run directory was not prepared (run prepare_run first)")
        meta = json.loads(self.run_config.read_text(encoding="utf-8"))
        return parse_use_case(meta["use_case"], str(self.run_config)), meta

    def read_train_result(self) -> dict:
        return read_json(self.train_result, missing="the training stage has not finished for this run")

    def registered_version(self) -> int:
        return int(read_json(self.registered, missing="register_candidate has not run")["version"])

    def read_decision(self) -> dict:
        return read_json(self.decision, missing="decide has not run")

    def read_metrics(self) -> dict:
        return read_json(self.metrics, missing="evaluate_candidate has not run")

    def read_backup_receipt(self) -> dict | None:
        return json.loads(self.backup_receipt.read_text()) if self.backup_receipt.is_file() else None


def load_run(run_dir: str | Path | RunDir):
    """(UseCase, run_config dict) of a prepared run directory."""
    return (run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)).load()
