"""The ``kind: generation`` blocks of a use-case YAML: free-text output, tenants, the generation gate, the judge.

A generation use case (seed 003, "write e-mails in the user's voice") answers in free text, not JSON: there is no
output schema to validate and no label to score. What it needs instead:

* ``output``: the answer is text, at most ``max_tokens`` tokens (:class:`OutputSpec`);
* ``tenants``: which source column says whose example a row is, and how many examples a tenant needs before
  an adapter is trained for it (:class:`TenantRules`; seed 003: 50 minimum, 200+ recommended);
* ``generation_gate``: the go/no-go rules for a tenant's adapter (:class:`GenerationGate`);
* ``evaluation.judge``: an optional LLM-as-judge whose verdicts count only once calibrated (:class:`JudgeConfig`).

Pydantic only (no YAML, no settings): the DAG files import the use-case model at parse time.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, field_validator, model_validator

from retrain.schemas.base import _Strict

# A SQL identifier we are willing to put into a query (quoted with psycopg2.sql.Identifier anyway).
SQL_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# An Airflow connection id (letters, digits, '_', '-', '.').
CONNECTION_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")


class OutputSpec(_Strict):
    """``output:``: what the model answers. ``json`` (the default) is the structured kind's JSON object under
    ``output_schema``; ``text`` is free text (``kind: generation``)."""

    type: Literal["json", "text"] = Field("json", description="json: an object under output_schema; text: free text")
    max_tokens: int | None = Field(
        None, ge=1, le=8192, description="most new tokens a reply may have at evaluation and serving time; unset = "
                                         "the engine's default")
    # Text only: what a usable reply (the label of a generation example) looks like. build_dataset rejects a body
    # outside the bounds with the reason; validation checks the rest.
    min_chars: int = Field(1, ge=1, description="text: shortest reply kept (characters, after trimming)")
    max_chars: int = Field(4000, ge=10, le=1_000_000, description="text: longest reply kept (characters)")
    languages: list[Literal["en", "es"]] | None = Field(
        None, min_length=1, description="text: languages replies must be in (stop-word vote, "
                                        "retrain.evaluate.analysis.language); unset = not checked")
    min_language_share: float = Field(
        0.9, ge=0, le=1, description="text: share of replies that must be detected as one of languages (short "
                                     "replies have too few stop words to tell)")
    max_near_duplicate_fraction: float = Field(
        0.2, ge=0, le=1, description="text: most replies of a tenant allowed to repeat an earlier one up to case, "
                                     "digits, punctuation and spacing (templated mail teaches no voice)")

    @model_validator(mode="after")
    def _bounds(self) -> OutputSpec:
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be smaller than max_chars ({self.max_chars})")
        return self


class TenantRules(_Strict):
    """``tenants:``: one adapter per tenant (a user whose voice is learnt), keyed by a column of
    production_examples."""

    column: str = Field("tenant", description="production_examples column holding the tenant (user id)")
    min_examples: int = Field(
        50, ge=1, description="tenants with fewer usable examples (all splits) are listed and skipped (seed 003: "
                              "50 sent e-mails minimum)")
    recommended_examples: int = Field(
        200, ge=1, description="tenants between min_examples and this train with a warning in tenants.json")
    export_merged: bool = Field(
        False, description="also deploy each tenant's base with its adapter merged in, under merged/ next to "
                           "adapter/ (seed 003's option B: one full model copy per tenant, ~270 MB for "
                           "SmolLM2-135M in fp16; the default exports the adapter only, option A)")

    @field_validator("column")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not SQL_IDENTIFIER.match(v):
            raise ValueError(f"'{v}' is not a plain column name: use lower-case letters, digits and underscores "
                             "(at most 63 characters, not starting with a digit), e.g. tenant")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> TenantRules:
        if self.recommended_examples < self.min_examples:
            raise ValueError(f"recommended_examples ({self.recommended_examples}) must not be below min_examples "
                             f"({self.min_examples}): raise recommended_examples or lower min_examples")
        return self


class GenerationGate(_Strict):
    """``generation_gate:``: go/no-go rules for a tenant's adapter against the baseline on its frozen test set."""

    min_chrf_gain: float = Field(
        2.0, ge=-100, le=100, description="chrF points the candidate must gain over the baseline; the gain's 95% "
                                          "bootstrap CI must also exclude 0")
    min_attribution: float = Field(
        0.5, ge=0, le=1, description="share of the candidate's replies the voice classifier attributes to the "
                                     "tenant")
    max_perplexity_regression: float = Field(
        0.10, ge=0, le=10, description="candidate per-token perplexity on held-out replies may be at most this "
                                       "much (relative) above the baseline's")
    min_length_ratio: float = Field(
        0.5, gt=0, le=100, description="mean(candidate reply chars) / mean(reference chars) must be at least this")
    max_length_ratio: float = Field(
        2.0, gt=0, le=100, description="... and at most this")
    min_judge_win_rate: float = Field(
        0.5, ge=0, le=1, description="judge win rate of the candidate over the baseline; counts only when a judge "
                                     "is configured and calibrated (kappa >= evaluation.judge.min_kappa)")

    @model_validator(mode="after")
    def _length_window(self) -> GenerationGate:
        if self.min_length_ratio > self.max_length_ratio:
            raise ValueError(f"min_length_ratio ({self.min_length_ratio}) must not be above max_length_ratio "
                             f"({self.max_length_ratio}): swap them or widen the window")
        return self


class JudgeConfig(_Strict):
    """``evaluation.judge:``: an OpenAI-compatible model that compares candidate and baseline replies pairwise.
    Its verdicts count in the gate only when its agreement with the human-labelled ``calibration`` set reaches
    ``min_kappa`` (Cohen's kappa), measured in the same run."""

    model: str = Field(min_length=1, max_length=200, description="model name served by the endpoint")
    rubric: str = Field(min_length=10, description="what a better reply is (tone, voice, correctness)")
    min_kappa: float = Field(0.6, ge=0, le=1, description="agreement with the human labels needed before the "
                                                          "judge's verdicts count")
    calibration: str = Field(
        "judge_calibration.jsonl", description="human-labelled pairs, a path relative to include/use_cases/")
    connection: str = Field("openai_default", description="Airflow connection id holding base URL and API key")
    base_url: str | None = Field(None, description="endpoint override (else the connection's / OPENAI_BASE_URL)")

    @field_validator("calibration")
    @classmethod
    def _inside_use_cases(cls, v: str) -> str:
        path = PurePosixPath(v.replace("\\", "/"))
        if not v.strip() or path.is_absolute() or ".." in path.parts or v.startswith("~") or re.match(r"^[A-Za-z]:",
                                                                                                       v):
            raise ValueError(f"'{v}' must be a file inside include/use_cases/, given relative to it (no absolute "
                             "path, no '..'), e.g. judge_calibration.jsonl")
        return v

    def calibration_path(self, use_cases_dir: Path) -> Path:
        """The calibration file under ``use_cases_dir`` (include/use_cases/), resolved; a symlink that leads out of
        it is refused like a '..' path."""
        root = Path(use_cases_dir).resolve()
        path = (root / self.calibration).resolve()
        if not path.is_relative_to(root):
            raise ValueError(f"evaluation.judge.calibration: '{self.calibration}' resolves to {path}, outside "
                             f"{root}: keep the file inside the use-case directory")
        return path

    @field_validator("connection")
    @classmethod
    def _connection_id(cls, v: str) -> str:
        if not CONNECTION_ID.match(v):
            raise ValueError(f"'{v}' is not an Airflow connection id (letters, digits, '_', '-', '.'), e.g. "
                             "openai_default")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"'{v}' must be an http(s) URL, e.g. http://localhost:8000/v1")
        return v
