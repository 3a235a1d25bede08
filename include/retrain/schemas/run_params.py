"""Per-run parameters: the Airflow trigger form (Params) and ``retrain run --param`` share one pydantic model.

``RunParams`` is the single definition. :func:`form_fields` turns its JSON schema into the trigger form's fields
(title, description, type with ``null`` for optional fields, enum, minimum/maximum), with the defaults a use case's
YAML gives the mirrored fields (backend, adapter, max_cost_usd, the gate thresholds) and the maxima its ``limits:``
section sets. A field added here appears in the form of every DAG without touching the DAG file.

The trigger form may tighten the YAML's go/no-go thresholds (they are floors); loosening one needs
``gate_override_reason``, and the loosening is recorded (run_config.json, decision.json, the report, the registry
history) and announced to ops once. Numeric Params are bounded by the use case's ``limits`` (errors name the
field and the bound); base models must be on the use case's allow-list.

Imported by the DAG files at parse time: pydantic, jsonschema and ``retrain.schemas.base`` only, nothing that
touches a database, the network or a model.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from retrain.schemas.base import ConfigError, Limits, Thresholds, _format_validation_error

if TYPE_CHECKING:
    from retrain.schemas.use_case import UseCase

# The DAG files import this module at parse time for form_fields: the use-case model (and its YAML and settings
# imports) is imported by the functions that need it, in the task.

_RUN, _TRAIN, _GATE = "Run", "Training", "Go/no-go gate (the use case's thresholds are floors)"


def _f(default: Any, title: str, description: str, section: str, *, limit: str | None = None, **kw: Any) -> Any:
    extra: dict[str, Any] = {"section": section}
    if limit:
        extra["x-limit"] = limit  # the form's maximum is the use case's limits.<limit>
    return Field(default, title=title, description=description, json_schema_extra=extra, **kw)


class RunParams(BaseModel):
    """Per-run overrides from the Airflow trigger form (typed Params) or the CLI. None = the use case's value."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    dry_run: bool = _f(False, "Dry run", "stop after the dataset is validated (no training, nothing deployed)", _RUN)
    force_retrain: bool = _f(
        False, "Force retraining",
        "train even when the dataset brought no new rows since the last trained run (otherwise such a run stops "
        "after validation with status no_new_data)", _RUN)
    sample_limit: int | None = _f(None, "Sample limit", "collect at most this many new rows this run; empty = all",
                                  _RUN, limit="sample_limit", ge=1)
    backend: Literal["qlora", "openai"] | None = _f(
        None, "Training backend", "qlora: fine-tune locally on the gpu queue; openai: an OpenAI fine-tuning job",
        _TRAIN)
    base_model: str | None = _f(
        None, "Base model",
        "Hugging Face id or local directory (qlora), OpenAI model (openai); empty = the use case's default. Must be "
        "one of the use case's training.allowed_base_models (openai: allowed_openai_base_models) or a directory "
        "under <RETRAIN_HOME>/models/base", _TRAIN, max_length=500)
    adapter: Literal["qlora", "lora"] | None = _f(
        None, "Adapter", "qlora: LoRA on a 4-bit (nf4) base; lora: LoRA on a full-precision base", _TRAIN)
    max_train_steps: int | None = _f(None, "Max train steps", "cap optimizer steps (qlora); empty = from epochs",
                                     _TRAIN, limit="max_steps", ge=1)
    training_overrides: dict[str, Any] | None = _f(
        None, "Training overrides",
        'training fields for this run only (any field of the use case\'s training block), e.g. {"lora_r": 32, '
        '"learning_rate": 0.0005}; unknown or invalid fields fail prepare_run naming the field', _TRAIN)
    sweep: str = _f(
        "off", "Hyper-parameter sweep",
        "off: train one candidate; on: train the use case's sweep: candidates (its YAML section), pick the best on "
        "the validation split, record the others as not_selected; a number n: n of those candidates",
        _TRAIN, pattern=r"^(off|on|[2-9]|[1-5][0-9]|6[0-4])$")
    max_cost_usd: float | None = _f(
        None, "Max cost (USD)", "openai backend: refuse to start a fine-tuning job whose estimated cost is higher; empty = the "
        "use case's training.max_cost_usd",
        _TRAIN, limit="max_cost_usd", ge=0)
    min_score: float | None = _f(None, "Minimum score", "minimum absolute primary score of the candidate", _GATE,
                                 ge=0, le=1)
    min_relative_improvement: float | None = _f(
        None, "Minimum relative improvement", "minimum relative gain of the primary score over the baseline "
        "(0.1 = +10%)", _GATE, ge=-1, le=10)
    max_p95_latency_regression: float | None = _f(
        None, "Max p95 latency regression", "allowed relative increase of p95 latency over the baseline "
        "(0.25 = +25%)", _GATE, ge=0, le=10)
    min_json_validity: float | None = _f(None, "Minimum JSON validity", "minimum share of answers that are valid "
                                         "JSON", _GATE, ge=0, le=1)
    require_significance: bool | None = _f(
        None, "Require significance", "the gain must be statistically significant (bootstrap CI above 0 and "
        "McNemar p < 0.05)", _GATE)
    max_slice_regression: float | None = _f(
        None, "Max slice regression", "largest primary-score drop any test-set slice of 5+ examples may show against "
        "the production model (0.05 = 5 points); empty = the use case's value", _GATE, ge=0, le=1)
    approval: Literal["use_case", "required", "none"] = _f(
        "use_case", "Human approval",
        "use_case: as the use case's YAML says (approval:); required: a GO waits for a human Deploy/Reject in Airflow "
        "before deploy_model; none: deploy a GO at once - waiving a YAML approval: required needs "
        "gate_override_reason, recorded like a loosened threshold and sent to ops", _GATE)
    gate_override_reason: str | None = _f(
        None, "Gate override reason",
        "required to loosen any threshold below the use case's YAML (lower min_score, min_relative_improvement or "
        "min_json_validity, higher max_p95_latency_regression, require_significance off); recorded in "
        "decision.json, the report and the registry history, and sent to ops", _GATE, max_length=500)

    @field_validator("sweep", mode="before")
    @classmethod
    def _sweep_count(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("base_model", "gate_override_reason")
    @classmethod
    def _blank_is_none(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None


THRESHOLD_PARAMS = tuple(Thresholds.model_fields)
# Params that show the use case's own value as the form's default: (section of the YAML, key).
MIRRORS = {"backend": ("training", "backend"), "adapter": ("training", "adapter"),
           "max_cost_usd": ("training", "max_cost_usd"), **{k: ("thresholds", k) for k in THRESHOLD_PARAMS}}


def parse_run_params(raw: Mapping[str, Any]) -> RunParams:
    # Airflow's trigger form sends "" and None for untouched optional fields.
    cleaned = {k: v for k, v in dict(raw or {}).items() if v not in ("", None)}
    try:
        return RunParams.model_validate(cleaned)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error("run parameters", exc)) from None


def apply_params(uc: UseCase, params: RunParams) -> UseCase:
    """The use case with this run's overrides applied (validated again, so cross-field rules and limits hold).
    Policy (floors, base-model allow-list, run limits) is :func:`check_run_policy`'s, called by prepare_run."""
    from retrain.schemas.training import with_overrides
    from retrain.schemas.use_case import parse_use_case

    data = uc.model_dump()
    training = data["training"]
    # The allow-lists are the YAML's, whatever base model this run picks.
    training["allowed_base_models"] = uc.training.base_models_allowed("qlora")
    training["allowed_openai_base_models"] = uc.training.base_models_allowed("openai")
    if params.backend:
        training["backend"] = params.backend
    if params.base_model:
        # One form field, two backends: an OpenAI model name must not become the local (qlora) base model, and
        # the first run's baseline (registry.baseline_spec) must be the model the candidate was tuned from.
        key = "openai_base_model" if training["backend"] == "openai" else "base_model"
        training[key] = params.base_model
    if params.max_cost_usd is not None:
        training["max_cost_usd"] = params.max_cost_usd
    overrides = dict(params.training_overrides or {})
    if params.adapter:
        overrides.setdefault("adapter", params.adapter)
    if params.max_train_steps:
        overrides["max_steps"] = params.max_train_steps
    data["training"] = with_overrides(training, overrides)
    for key in THRESHOLD_PARAMS:
        value = getattr(params, key)
        if value is not None:
            data["thresholds"][key] = value
    return parse_use_case(data, f"use case '{uc.name}' with run parameters")


def _local_base_dir(value: str, base_root: Path) -> bool:
    try:
        path = Path(value).expanduser().resolve()  # symlinks resolved: a link out of the base directory is refused
        root = base_root.resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return path.is_dir() and path != root and path.is_relative_to(root)


def check_run_policy(uc: UseCase, params: RunParams, *, base_root: Path) -> None:
    """Refuse what the trigger form may not ask of this use case: run Params above its limits, a base model off its
    allow-list. ``uc`` is the use case as its YAML defines it; ``base_root`` the directory of local base models."""
    limits = uc.limits
    try:
        limits.check({"sample_limit": params.sample_limit, "max_cost_usd": params.max_cost_usd,
                      "max_steps": params.max_train_steps}, "")
    except ValueError as exc:
        raise ConfigError(f"run parameters: {str(exc).replace('max_steps=', 'max_train_steps=', 1)}") from None
    from retrain.schemas.sweep import sweep_size

    sweep_size(params.sweep, uc.sweep)  # sweep on without a sweep: section, or more candidates than it holds
    if params.base_model:
        backend = params.backend or uc.training.backend
        allowed = uc.training.base_models_allowed(backend)
        if params.base_model not in allowed and not (backend == "qlora" and _local_base_dir(params.base_model,
                                                                                             base_root)):
            key = "allowed_openai_base_models" if backend == "openai" else "allowed_base_models"
            where = "" if backend == "openai" else f" or a directory under {base_root}"
            raise ConfigError(
                f"run parameters: base_model '{params.base_model}' is not allowed for {uc.name} ({backend}): pick "
                f"one of training.{key} {allowed}{where}, or add it to training.{key} in the use case's YAML")


def gate_overrides(floors: Thresholds, applied: Thresholds, *, reason: str | None, by: str | None) -> list[dict]:
    """The thresholds this run loosens below the YAML's floors, as recorded in run_config.json and decision.json.
    Loosening without a reason raises, naming each threshold and its floor."""
    loosened = floors.loosened_by(applied)
    if loosened and not reason:
        named = "; ".join(f"{name}={value} is looser than the use case's floor {floor}" for name, floor, value in loosened)
        raise ConfigError(f"run parameters: {named}. Tighten it back, or give gate_override_reason (recorded and "
                          "sent to ops) to loosen the gate for this run")
    return [{"threshold": name, "floor": floor, "value": value, "by": by or "unknown", "reason": reason}
            for name, floor, value in loosened]


# --- the trigger form ---------------------------------------------------------------------------------------------


def _flatten(schema: dict) -> dict:
    """pydantic's ``anyOf: [T, null]`` as ``type: ["null", T]`` (what Airflow's form renders as an optional field)."""
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    variants = schema.get("anyOf")
    if variants:
        non_null = [v for v in variants if v.get("type") != "null"]
        nullable = len(non_null) < len(variants)
        if len(non_null) == 1:
            inner = dict(non_null[0])
            kind = inner.pop("type", None)
            out.update(inner)
            if kind:
                out["type"] = ["null", kind] if nullable else kind
            if nullable and "enum" in out:
                out["enum"] = [None, *out["enum"]]
    return out


@lru_cache(maxsize=1)
def _field_schemas() -> dict[str, dict]:
    props = RunParams.model_json_schema()["properties"]
    return {name: _flatten(schema) for name, schema in props.items()}


def _dig(spec: Mapping, path: tuple[str, ...]) -> Any:
    node: Any = spec
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _limits(spec: Mapping) -> dict[str, Any]:
    """The use case's limits, each one taken from the raw YAML only if it is a usable number (prepare_run reports
    a broken one, naming it)."""
    raw = spec.get("limits") if isinstance(spec.get("limits"), Mapping) else {}
    out = {}
    for name, info in Limits.model_fields.items():
        v = raw.get(name)
        out[name] = v if _is_number(v) and v > 0 else info.default
    return out


def _valid(schema: dict, value: Any) -> bool:
    import jsonschema  # Airflow validates every Param with it: already imported at parse time

    return jsonschema.Draft7Validator(schema).is_valid(value)


def form_fields(spec: Mapping[str, Any]) -> dict[str, dict]:
    """Trigger-form fields of one use case, ``{name: {"default": ..., **json_schema}}``, from its raw YAML mapping.

    Only valid values reach a default: a YAML value that breaks the field's schema falls back to the field's
    default (None), so the DAG always parses and its default form always validates; prepare_run names the broken
    field of the file.
    """
    limits = _limits(spec)
    out = {}
    for name, base in _field_schemas().items():
        schema = dict(base)
        schema.pop("default", None)
        limit = schema.pop("x-limit", None)
        if limit:
            schema["maximum"] = limits[limit]
        default = RunParams.model_fields[name].default
        if name in MIRRORS:
            value = _dig(spec, MIRRORS[name])
            if value is None and MIRRORS[name][0] == "thresholds":  # not in the file: the model's default
                value = Thresholds.model_fields[name].default
            if value is not None and _valid(schema, value):
                default = value
        if name == "base_model":
            model = _dig(spec, ("training", "base_model"))
            if isinstance(model, str):
                schema["description"] = f"{schema['description']} (this use case: {model})"
        out[name] = {"default": default, **schema}
    return out
