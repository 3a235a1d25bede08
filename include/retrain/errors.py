"""Which exceptions are the user's to fix (shown as a one-paragraph message) rather than a bug (traceback), and which
of those a retry cannot fix (the Airflow task layer fails them at once: ``retrain.dagtasks.fail_fast``)."""

from __future__ import annotations

import re


def _user_error_types() -> tuple[type[BaseException], ...]:
    from retrain.schemas.use_case import ConfigError
    from retrain.schemas.training import TrainingSpecError
    from retrain.data.dataset import DatasetError
    from retrain.db import DatabaseError
    from retrain.backup.operations import BackupError
    from retrain.registry.store import RegistryError
    from retrain.s3 import S3ConfigError
    from retrain.settings import SettingsError
    from retrain.train.openai.job import OpenAIFineTuneError
    from retrain.evaluate.attribution import AttributionError
    from retrain.evaluate.judge import JudgeError

    return (ConfigError, TrainingSpecError, DatabaseError, DatasetError, RegistryError, BackupError, S3ConfigError,
            SettingsError, OpenAIFineTuneError, AttributionError, JudgeError, FileNotFoundError)


# Matched by name: great_expectations (validate.py) and Airflow are imported lazily, never here.
_BY_NAME = ("DataValidationError", "ParamValidationError")


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, _user_error_types()) or type(exc).__name__ in _BY_NAME


def is_transient(exc: BaseException) -> bool:
    """A user-facing error that may clear by itself (a database or S3 outage): worth the task's retries."""
    from retrain.db import DatabaseError
    from retrain.backup.operations import BackupUnavailableError
    from retrain.evaluate.judge import JudgeUnavailableError

    return isinstance(exc, (DatabaseError, BackupUnavailableError, JudgeUnavailableError))


def is_retry_futile(exc: BaseException) -> bool:
    """A bad file, parameter, dataset or state: the same input fails the same way on every retry."""
    return is_user_error(exc) and not is_transient(exc)


def one_line(exc: BaseException, limit: int = 1000) -> str:
    """The error as one line: Airflow's ParamValidationError keeps its first line (the rest is the JSON schema);
    a multi-line ConfigError keeps every line, joined with '; '."""
    text = str(exc).strip()
    if type(exc).__name__ == "ParamValidationError":
        text = text.splitlines()[0] if text else type(exc).__name__
    text = "; ".join(re.sub(r"^-\s+", "", line.strip()) for line in text.splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"
