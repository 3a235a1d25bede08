"""Typed configuration: use-case YAML files, run parameters and platform settings.

Everything that comes from a human (a YAML file, the Airflow trigger form, environment variables) is
validated here, so a typo fails in the first task with the field's name instead of an hour later.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from retrain.schemas.training import TrainingSpec, with_overrides  # pydantic only: safe at DAG parse time
from retrain.settings import use_cases_dir

USE_CASE_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}$")


class ConfigError(ValueError):
    """A configuration file or parameter is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("min_row" for "min_rows"): reject them by name.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """Go/no-go rules applied to the candidate on the frozen test set (seed 004's decision framework)."""

    min_score: float = Field(0.85, ge=0, le=1, description="minimum absolute primary score")
    min_relative_improvement: float = Field(
        0.10, ge=-1, le=10, description="minimum relative gain of the primary score over the baseline"
    )
    max_p95_latency_regression: float = Field(
        0.25, ge=0, description="allowed relative increase of p95 latency over the baseline"
    )
    min_json_validity: float = Field(0.95, ge=0, le=1)
    require_significance: bool = False


class SplitRatios(_Strict):
    train: float = Field(0.8, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitRatios:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1.0, got {total:.4f}")
        return self


class DataRules(_Strict):
    """Rules for what counts as a usable month of production examples."""

    min_rows: int = Field(50, ge=1, description="fewest examples (all splits) a run may train on")
    min_input_chars: int = Field(3, ge=1)
    max_input_chars: int = Field(4000, ge=10)
    max_rejected_fraction: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a batch where more than this share of rows breaks the contract fails validation",
    )
    split: SplitRatios = SplitRatios()

    @model_validator(mode="after")
    def _bounds(self) -> DataRules:
        if self.min_input_chars >= self.max_input_chars:
            raise ValueError("min_input_chars must be smaller than max_input_chars")
        return self


class TrainingConfig(TrainingSpec):
    """A use case's ``training:`` block: which backend trains from which base model, plus every hyper-parameter of
    the local trainer (``retrain.schemas.training.TrainingSpec``: adapter and 4-bit settings, LoRA rank/alpha/dropout/
    target modules, learning rate and schedule, epochs and step cap, batch size, gradient accumulation, max length,
    gradient checkpointing, eval/save/early-stopping cadence, length grouping / padding-free / packing) and the
    OpenAI job's knobs. Cross-field rules (qlora => 4-bit, save_steps a multiple of eval_steps) come with the spec.
    """

    backend: Literal["qlora", "openai"] = "qlora"
    base_model: str = "smollm2-135m-instruct"
    openai_base_model: str = "gpt-4o-mini-2024-07-18"
    max_cost_usd: float = Field(10.0, ge=0, description="openai backend: default cost ceiling per job")
    openai_learning_rate_multiplier: float | None = Field(None, gt=0, description="openai backend; None = 'auto'")
    openai_batch_size: int | None = Field(None, ge=1, description="openai backend; None = batch_size")
    openai_price_per_1m_tokens: float | None = Field(
        None, ge=0, description="openai backend: USD per 1M training tokens for a model without a known price"
    )


class BackupConfig(_Strict):
    """Encrypted backup policy (retrain.backup.operations.backup_settings). An unset field falls back to its RETRAIN_BACKUP_*
    environment variable, then to the default, so one deployment-wide setting still works."""

    enabled: bool | None = Field(None, description="back up each run to S3 (default true)")
    keep: int | None = Field(None, ge=1, description="newest complete backups kept per use case (default 6)")
    cleanup: bool | None = Field(None, description="delete local training data after a verified backup (default "
                                                   "true)")
    cleanup_files: list[str] | None = Field(
        None, description="paths or globs relative to the run directory deleted by cleanup (default: batch, "
                          "rejected and split JSONL files)")

    @field_validator("cleanup_files")
    @classmethod
    def _relative(cls, v: list[str] | None) -> list[str] | None:
        for pattern in v or []:
            if not pattern.strip() or pattern.startswith("/") or ".." in Path(pattern).parts:
                raise ValueError(f"'{pattern}' must be a path or glob inside the run directory (relative, no '..')")
        return v


class EvaluationConfig(_Strict):
    """How models answer the frozen test set."""

    guided_decoding: bool = Field(
        True, description="local models decode under output_schema (enum values, property names, maxItems, a "
                          "repeated list item ends the list), as Ollama's format / vLLM's guided decoding serve "
                          "them; false scores raw greedy output")


class FieldRoles(_Strict):
    """Which output fields are scored how. Dotted paths address nested objects (``entities.po_number``)."""

    labels: list[str] = Field(min_length=1, description="single-choice fields scored by accuracy")
    entities: list[str] = Field(default_factory=list, description="extracted values scored by micro F1")
    sets: list[str] = Field(default_factory=list, description="list fields scored by exact-set accuracy")
    primary: str | None = Field(None, description="label field that drives the go/no-go score")


class UseCase(_Strict):
    name: str
    description: str
    system_prompt: str = Field(min_length=10)
    input_template: str = Field(description="user message; must contain {input}")
    output_schema: dict[str, Any]
    fields: FieldRoles
    thresholds: Thresholds = Thresholds()
    data: DataRules = DataRules()
    training: TrainingConfig = TrainingConfig()
    backup: BackupConfig = BackupConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not USE_CASE_NAME.match(v):
            raise ValueError("must be lower_snake_case (letters, digits, underscores), 2-63 characters")
        return v

    @field_validator("input_template")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{input}" not in v:
            raise ValueError("must contain the placeholder {input}")
        try:
            v.format(input="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"is not a valid template ({exc}); escape literal braces as {{ and }}") from exc
        return v

    @field_validator("output_schema")
    @classmethod
    def _schema(cls, v: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"is not a valid JSON Schema: {exc.message}") from exc
        if v.get("type") != "object":
            raise ValueError("must describe a JSON object (type: object)")
        return v

    @model_validator(mode="after")
    def _fields_exist(self) -> UseCase:
        for role in ("labels", "entities", "sets"):
            for path in getattr(self.fields, role):
                node = self.schema_at(path)
                if node is None:
                    raise ValueError(f"fields.{role}: '{path}' is not a property of output_schema")
                if role == "labels" and "enum" not in node:
                    raise ValueError(f"fields.labels: '{path}' needs an enum in output_schema (the allowed labels)")
                if role == "sets" and node.get("type") != "array":
                    raise ValueError(f"fields.sets: '{path}' must be an array in output_schema")
        if self.fields.primary is not None and self.fields.primary not in self.fields.labels:
            raise ValueError(f"fields.primary: '{self.fields.primary}' must be one of fields.labels")
        return self

    def schema_at(self, dotted: str) -> dict[str, Any] | None:
        node: dict[str, Any] | None = self.output_schema
        for part in dotted.split("."):
            if node is None:
                return None
            node = node.get("properties", {}).get(part)
        return node

    @property
    def primary_label(self) -> str:
        return self.fields.primary or self.fields.labels[0]

    @cached_property
    def allowed_labels(self) -> dict[str, list[Any]]:
        return {path: list(self.schema_at(path)["enum"]) for path in self.fields.labels}  # type: ignore[index]

    def render_input(self, text: str) -> str:
        return self.input_template.format(input=text)

    def extract_input(self, user_content: str) -> str:
        """Inverse of render_input for a message this use case rendered."""
        prefix, suffix = split_template(self.input_template)
        end = len(user_content) - len(suffix) if suffix else len(user_content)
        return user_content[len(prefix):end]


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against the documented fields)"
        lines.append(f"  - {loc}: {msg}")
    lines.append("Fix the file (or the trigger parameter) and run again.")
    return "\n".join(lines)


def parse_use_case(data: Any, source: str = "use case") -> UseCase:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of fields, got {type(data).__name__}")
    try:
        return UseCase.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def load_use_case_file(path: Path) -> UseCase:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    uc = parse_use_case(data, str(path))
    if uc.name != path.stem:
        raise ConfigError(f"{path}: name '{uc.name}' must match the file name '{path.stem}'")
    return uc


def list_use_cases(directory: Path | None = None) -> list[str]:
    directory = directory or use_cases_dir()
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_use_case(name: str, directory: Path | None = None) -> UseCase:
    directory = directory or use_cases_dir()
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(list_use_cases(directory)) or "none"
        raise ConfigError(f"unknown use case '{name}' (no {path}); known use cases: {known}")
    return load_use_case_file(path)


class RunParams(_Strict):
    """Per-run overrides from the Airflow trigger form (typed Params) or the CLI."""

    backend: Literal["qlora", "openai"] | None = None
    base_model: str | None = None
    sample_limit: int | None = Field(None, ge=1, description="collect at most this many new rows this run")
    dry_run: bool = False
    max_train_steps: int | None = Field(None, ge=1, description="cap optimizer steps of the qlora trainer")
    adapter: Literal["qlora", "lora"] | None = Field(None, description="qlora (4-bit base) or lora (full precision)")
    training_overrides: dict[str, Any] | None = Field(
        None, description="TrainingSpec fields for this run only, e.g. {\"lora_r\": 32, \"learning_rate\": 5e-4}"
    )
    max_cost_usd: float | None = Field(None, ge=0, description="openai backend: refuse jobs estimated above this")
    min_score: float | None = Field(None, ge=0, le=1)
    min_relative_improvement: float | None = Field(None, ge=-1, le=10)
    max_p95_latency_regression: float | None = Field(None, ge=0)
    min_json_validity: float | None = Field(None, ge=0, le=1)
    require_significance: bool | None = None

    @field_validator("base_model")
    @classmethod
    def _blank_is_default(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None


def parse_run_params(raw: dict[str, Any]) -> RunParams:
    # Airflow's trigger form sends "" and None for untouched optional fields.
    cleaned = {k: v for k, v in raw.items() if v not in ("", None)}
    try:
        return RunParams.model_validate(cleaned)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("run parameters", exc)) from None


def apply_params(uc: UseCase, params: RunParams) -> UseCase:
    """The use case with this run's overrides applied (validated again, so cross-field rules hold)."""
    data = uc.model_dump()
    if params.backend:
        data["training"]["backend"] = params.backend
    if params.base_model:
        # One form field, two backends: an OpenAI model name must not become the local (qlora) base model, and
        # the first run's baseline (registry.baseline_spec) must be the model the candidate was tuned from.
        key = "openai_base_model" if data["training"]["backend"] == "openai" else "base_model"
        data["training"][key] = params.base_model
    training = data["training"]
    overrides = dict(params.training_overrides or {})
    if params.adapter:
        overrides.setdefault("adapter", params.adapter)
    if params.max_train_steps:
        overrides["max_steps"] = params.max_train_steps
    data["training"] = with_overrides(training, overrides)
    for key in Thresholds.model_fields:
        value = getattr(params, key)
        if value is not None:
            data["thresholds"][key] = value
    return parse_use_case(data, f"use case '{uc.name}' with run parameters")


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around {input} in a rendered user message, to recover the raw input."""
    marker = "\x00INPUT\x00"
    prefix, suffix = template.format(input=marker).split(marker)
    return prefix, suffix
