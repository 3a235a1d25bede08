"""Which exceptions are the user's to fix (shown as a one-paragraph message) rather than a bug (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from retrain.config import ConfigError
    from retrain.dataset import DatasetError
    from retrain.db import DatabaseError

    if isinstance(exc, (ConfigError, DatabaseError, DatasetError, FileNotFoundError)):
        return True
    # validate.py imports great_expectations lazily; match by name to avoid importing it here.
    return type(exc).__name__ == "DataValidationError"
