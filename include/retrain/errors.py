"""Which exceptions are the user's to fix (shown as a one-paragraph message) rather than a bug (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from retrain.schemas.use_case import ConfigError
    from retrain.data.dataset import DatasetError
    from retrain.db import DatabaseError
    from retrain.backup.operations import BackupError
    from retrain.registry.store import RegistryError
    from retrain.s3 import S3ConfigError
    from retrain.train.openai.job import OpenAIFineTuneError

    user_errors = (ConfigError, DatabaseError, DatasetError, RegistryError, BackupError, S3ConfigError,
                   OpenAIFineTuneError, FileNotFoundError)
    if isinstance(exc, user_errors):
        return True
    # validate.py imports great_expectations lazily; match by name to avoid importing it here.
    return type(exc).__name__ == "DataValidationError"
