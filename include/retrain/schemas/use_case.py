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
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from retrain.schemas.base import (  # noqa: F401 - ConfigError, Thresholds, Limits: re-exported for callers
    ConfigError,
    Limits,
    Thresholds,
    _format_validation_error,
    _Strict,
)
from retrain.schemas.generation import GenerationGate, JudgeConfig, OutputSpec, TenantRules
from retrain.schemas.pii import PiiConfig
from retrain.schemas.review import ReviewConfig
from retrain.schemas.sweep import SweepConfig
from retrain.schemas.training import TrainingSpec  # pydantic only: safe at DAG parse time
from retrain.settings import use_cases_dir

USE_CASE_NAME = re.compile(r"^[a-z][a-z0-9_]{1,62}$")


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


class DriftLevels(_Strict):
    """Warn and fail levels of one drift metric (a value above ``warn`` warns, above ``fail`` fails if action: fail)."""

    warn: float = Field(ge=0, description="warn when the metric is above this")
    fail: float = Field(ge=0, description="fail validation (data.drift.action: fail) when the metric is above this")

    @model_validator(mode="after")
    def _ordered(self) -> DriftLevels:
        if self.warn > self.fail:
            raise ValueError(f"warn ({self.warn}) must not be above fail ({self.fail})")
        return self


class DriftRules(_Strict):
    """``data.drift``: this month's batch against the accumulated dataset (retrain.data.drift). Metrics: per label
    field the population stability index (``label_psi``) and Jensen-Shannon divergence, base 2 (``label_js``) of the
    label distribution and the share of rows whose label the dataset has never seen (``unseen_labels``); for the
    input, the PSI over the dataset's length deciles (``length_psi``) and the two-sample KS statistic of the lengths
    (``length_ks``)."""

    action: Literal["warn", "fail"] = Field(
        "warn", description="warn: log and report drift, keep going; fail: a metric above its fail level fails "
                            "validation")
    min_rows: int = Field(100, ge=1, description="drift is n/a when the batch or the accumulated dataset has fewer "
                                                 "rows (too few for a stable distribution)")
    label_psi: DriftLevels = DriftLevels(warn=0.25, fail=1.0)
    label_js: DriftLevels = DriftLevels(warn=0.05, fail=0.2)
    unseen_labels: DriftLevels = DriftLevels(warn=0.05, fail=0.25)
    length_psi: DriftLevels = DriftLevels(warn=0.25, fail=1.0)
    length_ks: DriftLevels = DriftLevels(warn=0.2, fail=0.4)


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
    max_label_chars: int = Field(20_000, ge=100, description="a label (JSON text) longer than this is rejected")
    max_label_depth: int = Field(32, ge=2, le=256, description="a label nested deeper than this is rejected")
    min_new_rows: int = Field(
        1, ge=0, description="fewest new or relabelled train/val rows this month for a retrain (force_retrain "
                             "overrides)")
    drift: DriftRules = DriftRules()

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
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_cost_usd: float = Field(10.0, ge=0, description="openai backend: default cost ceiling per job")
    allowed_base_models: list[str] | None = Field(
        None, description="base_model values the trigger form may pick (qlora); unset = only base_model. Local "
                          "directories under <RETRAIN_HOME>/models/base are always allowed")
    allowed_openai_base_models: list[str] | None = Field(
        None, description="base_model values the trigger form may pick on the openai backend; unset = only "
                          "openai_base_model")
    openai_learning_rate_multiplier: float | None = Field(None, gt=0, description="openai backend; None = 'auto'")
    openai_batch_size: int | None = Field(None, ge=1, description="openai backend; None = batch_size")
    openai_price_per_1m_tokens: float | None = Field(
        None, ge=0, description="openai backend: USD per 1M training tokens for a model without a known price"
    )


    def base_models_allowed(self, backend: str | None = None) -> list[str]:
        """The model ids a run may override base_model with on ``backend`` (default: this block's backend)."""
        if (backend or self.backend) == "openai":
            return list(self.allowed_openai_base_models or [self.openai_base_model])
        return list(self.allowed_base_models or [self.base_model])


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
    slices: list[str] = Field(
        default_factory=list, description="gold output fields (dotted paths) whose values slice the test set in the "
                                          "report, besides input language and length; the gate's "
                                          "max_slice_regression applies to every slice of 5+ examples")
    baseline_prompt: str | None = Field(
        None, min_length=10, description="system prompt of the prompted zero-shot baseline (the untuned base model, "
                                         "scored next to the candidate); unset: generated from output_schema, every "
                                         "field with its allowed values (retrain.evaluate.baseline)")
    judge: JudgeConfig | None = Field(
        None, description="kind generation: an OpenAI-compatible LLM judge comparing candidate and baseline replies "
                          "pairwise (retrain.schemas.generation.JudgeConfig); null = no judge")


class FieldRoles(_Strict):
    """Which output fields are scored how. Dotted paths address nested objects (``entities.po_number``)."""

    labels: list[str] = Field(min_length=1, description="single-choice fields scored by accuracy")
    entities: list[str] = Field(default_factory=list, description="extracted values scored by micro F1")
    sets: list[str] = Field(default_factory=list, description="list fields scored by exact-set accuracy")
    primary: str | None = Field(None, description="label field that drives the go/no-go score")


class UseCase(_Strict):
    name: str
    kind: Literal["structured", "generation"] = Field(
        "structured", description="structured: a JSON answer under output_schema, scored per field; generation: "
                                  "free text (output.type: text), one adapter per tenant (retrain.schemas.generation)")
    description: str
    system_prompt: str = Field(min_length=10)
    input_template: str = Field(description="user message; must contain {input}")
    output_schema: dict[str, Any] | None = Field(None, description="kind structured (required): the answer's JSON "
                                                                   "Schema")
    fields: FieldRoles | None = Field(None, description="kind structured (required): which fields are scored how")
    output: OutputSpec = OutputSpec()
    tenants: TenantRules | None = Field(None, description="kind generation (required): the tenant column and the "
                                                          "examples a tenant needs")
    generation_gate: GenerationGate = GenerationGate()
    thresholds: Thresholds = Thresholds()
    data: DataRules = DataRules()
    training: TrainingConfig = TrainingConfig()
    backup: BackupConfig = BackupConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    pii: PiiConfig = PiiConfig()
    sweep: SweepConfig | None = Field(
        None, description="hyper-parameter sweep (retrain.schemas.sweep); runs only when the sweep Param asks")
    limits: Limits = Limits()
    review: ReviewConfig = Field(
        ReviewConfig(), description="active learning: hard production examples queued for human review after "
                                    "each evaluation (retrain.schemas.review)")
    approval: Literal["required", "none"] = Field(
        "none", description="required: a GO candidate waits for a human Deploy/Reject in Airflow (task "
                            "approve_deployment) before deploy_model; none: GO deploys at once")

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
    def _schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v  # required or forbidden by kind: _fits_kind says which
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"is not a valid JSON Schema: {exc.message}") from exc
        if v.get("type") != "object":
            raise ValueError("must describe a JSON object (type: object)")
        return v

    @model_validator(mode="after")
    def _fits_kind(self) -> UseCase:
        # Runs before the validators below, which assume a structured use case has its schema and fields.
        if self.kind == "structured":
            for name in ("output_schema", "fields"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required for kind structured (the JSON answer and how its fields "
                                     f"are scored); add it, or set kind: generation for a free-text use case")
            if self.output.type != "json":
                raise ValueError(f"output.type: '{self.output.type}' needs kind: generation (kind structured answers "
                                 "JSON): set output.type: json or kind: generation")
            if self.tenants is not None:
                raise ValueError("tenants: only kind generation trains one adapter per tenant; remove tenants: or "
                                 "set kind: generation")
            if self.evaluation.judge is not None:
                raise ValueError("evaluation.judge: the LLM judge compares free-text replies (kind generation); "
                                 "remove it or set kind: generation")
            return self
        if self.output.type != "text":
            raise ValueError(f"output.type: kind generation answers free text, got '{self.output.type}': set "
                             "output: {type: text, max_tokens: ...}")
        for name in ("output_schema", "fields"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: not used by kind generation (the answer is free text, scored by "
                                 f"generation_gate): remove it, or set kind: structured")
        if self.tenants is None:
            raise ValueError("tenants: required for kind generation (one adapter per tenant): add e.g. tenants: "
                             "{column: tenant, min_examples: 50}")
        if self.evaluation.slices:
            raise ValueError("evaluation.slices: slices are output_schema fields, which kind generation has none "
                             "of: remove them")
        return self

    @model_validator(mode="after")
    def _within_limits(self) -> UseCase:
        self.limits.check({name: getattr(self.training, name, None) for name in Limits.model_fields}, "training.")
        return self

    @model_validator(mode="after")
    def _sweep_fits_training(self) -> UseCase:
        if self.sweep is not None:
            self.sweep.check_values(self.training, self.limits)
        return self

    @model_validator(mode="after")
    def _fields_exist(self) -> UseCase:
        if self.fields is None:  # kind generation (_fits_kind checked it)
            return self
        for path in self.evaluation.slices:
            if self.schema_at(path) is None:
                raise ValueError(f"evaluation.slices: '{path}' is not a property of output_schema")
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

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"

    def schema_at(self, dotted: str) -> dict[str, Any] | None:
        node: dict[str, Any] | None = self.output_schema
        for part in dotted.split("."):
            if node is None:
                return None
            node = node.get("properties", {}).get(part)
        return node

    @property
    def primary_label(self) -> str | None:
        if self.fields is None:
            return None  # kind generation: no label fields
        return self.fields.primary or self.fields.labels[0]

    @cached_property
    def allowed_labels(self) -> dict[str, list[Any]]:
        if self.fields is None:
            return {}
        return {path: list(self.schema_at(path)["enum"]) for path in self.fields.labels}  # type: ignore[index]

    def render_input(self, text: str) -> str:
        return self.input_template.format(input=text)

    def extract_input(self, user_content: str) -> str:
        """Inverse of render_input for a message this use case rendered."""
        prefix, suffix = split_template(self.input_template)
        end = len(user_content) - len(suffix) if suffix else len(user_content)
        return user_content[len(prefix):end]


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


# RunParams, parse_run_params and apply_params live in retrain.schemas.run_params (which imports this module).


def split_template(template: str) -> tuple[str, str]:
    """(prefix, suffix) around {input} in a rendered user message, to recover the raw input."""
    marker = "\x00INPUT\x00"
    prefix, suffix = template.format(input=marker).split(marker)
    return prefix, suffix
