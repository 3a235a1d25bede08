"""What the OpenAI fine-tuning backend raises. ``OpenAIFineTuneError`` and its subclasses are the user's to fix
(retrain.errors.is_user_error): the message says what and how."""

from __future__ import annotations

NO_API_KEY = (
    "no OpenAI API key: create the Airflow connection 'openai_default' (password = the API key, extra "
    '{"base_url": "..."} for an OpenAI-compatible server) or set OPENAI_API_KEY (and OPENAI_BASE_URL).'
)


class OpenAIFineTuneError(RuntimeError):
    """Something the user must fix or decide; the message says what and how."""


class FormatCheckError(OpenAIFineTuneError):
    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class CostLimitExceeded(OpenAIFineTuneError):
    def __init__(self, message: str, estimate: dict):
        super().__init__(message)
        self.estimate = estimate


class FineTuneJobFailed(OpenAIFineTuneError):
    """The job ended failed or cancelled on OpenAI's side; the message carries OpenAI's own error."""

    def __init__(self, message: str, job_id: str, status: str, error: dict | None):
        super().__init__(message)
        self.job_id, self.status, self.error = job_id, status, error


def require_api_key(api_key: str | None) -> str:
    """The key, or OpenAIFineTuneError saying how to configure one."""
    if not api_key:
        raise OpenAIFineTuneError(NO_API_KEY)
    return api_key
