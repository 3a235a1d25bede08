"""Which exceptions are the user's to fix (shown as a one-paragraph message) rather than a bug (traceback)."""

from __future__ import annotations


def is_user_error(exc: BaseException) -> bool:
    from retrain.config import ConfigError
    from retrain.dataset import DatasetError
    from retrain.db import DatabaseError
    from retrain.registry import RegistryError

    if isinstance(exc, (ConfigError, DatabaseError, DatasetError, RegistryError, FileNotFoundError)):
        return True
    # validate.py imports great_expectations lazily; match by name to avoid importing it here.
    return type(exc).__name__ == "DataValidationError"
