"""The parts of the configuration the DAG files need at parse time (pydantic only, no YAML, no settings): the
strict model base, ConfigError and its formatting, the go/no-go thresholds and the per-use-case run limits.
``retrain.schemas.use_case`` re-exports them.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ConfigError(ValueError):
    """A configuration file or parameter is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("min_row" for "min_rows"): reject them by name. NaN and infinity
    # are never a meaningful threshold, bound or rate.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Thresholds(_Strict):
    """Go/no-go rules applied to the candidate on the frozen test set (seed 004's decision framework)."""

    min_score: float = Field(0.85, ge=0, le=1, description="minimum absolute primary score")
    min_relative_improvement: float = Field(
        0.10, ge=-1, le=10, description="minimum relative gain of the primary score over the baseline"
    )
    max_p95_latency_regression: float = Field(
        0.25, ge=0, le=10, description="allowed relative increase of p95 latency over the baseline"
    )
    min_json_validity: float = Field(0.95, ge=0, le=1, description="minimum share of answers that are valid JSON")
    require_significance: bool = Field(
        False, description="the gain must be significant (bootstrap CI above 0 and McNemar p < 0.05)"
    )
    max_slice_regression: float | None = Field(
        None, ge=0, le=1, description="no slice of the test set with 5+ examples (input language, input length, "
        "evaluation.slices) may lose more than this much primary score against the production model (0.05 = 5 "
        "points); null = reported only")

    def loosened_by(self, other: Thresholds) -> list[tuple[str, Any, Any]]:
        """(threshold, floor, value) for every rule ``other`` makes easier to pass than these (the floors)."""
        out: list[tuple[str, Any, Any]] = []
        for name in ("min_score", "min_relative_improvement", "min_json_validity"):
            if getattr(other, name) < getattr(self, name):
                out.append((name, getattr(self, name), getattr(other, name)))
        if other.max_p95_latency_regression > self.max_p95_latency_regression:
            out.append(("max_p95_latency_regression", self.max_p95_latency_regression,
                        other.max_p95_latency_regression))
        if self.require_significance and not other.require_significance:
            out.append(("require_significance", True, False))
        if self.max_slice_regression is not None and (
                other.max_slice_regression is None or other.max_slice_regression > self.max_slice_regression):
            out.append(("max_slice_regression", self.max_slice_regression, other.max_slice_regression))
        return out


class Limits(_Strict):
    """Upper bounds on what one run may ask for (one GPU worker), for the YAML and the trigger form alike. A use
    case that needs more raises them here; every bound is checked in prepare_run and named when exceeded."""

    max_steps: int = Field(100_000, ge=1, description="training.max_steps (the max_train_steps Param)")
    epochs: float = Field(100, gt=0, description="training.epochs")
    batch_size: int = Field(512, ge=1, description="training.batch_size")
    eval_batch_size: int = Field(512, ge=1, description="training.eval_batch_size")
    grad_accum: int = Field(1024, ge=1, description="training.grad_accum")
    max_length: int = Field(32_768, ge=16, description="training.max_length")
    lora_r: int = Field(1024, ge=1, description="training.lora_r")
    lora_alpha: int = Field(4096, ge=1, description="training.lora_alpha")
    lora_top_layers: int = Field(1024, ge=1, description="training.lora_top_layers")
    eval_steps: int = Field(100_000, ge=1, description="training.eval_steps")
    save_steps: int = Field(100_000, ge=1, description="training.save_steps")
    openai_batch_size: int = Field(512, ge=1, description="training.openai_batch_size")
    max_cost_usd: float = Field(1000.0, ge=0, description="training.max_cost_usd and the max_cost_usd Param")
    sample_limit: int = Field(10_000_000, ge=1, description="the sample_limit Param")

    def check(self, values: dict[str, Any], prefix: str) -> None:
        """Raise naming the field and the bound for the first value of ``values`` above its limit (or not finite)."""
        for name, value in values.items():
            if value is None or name not in type(self).model_fields or isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{prefix}{name}={value} must be a finite number")
            bound = getattr(self, name)
            if value > bound:
                raise ValueError(f"{prefix}{name}={value} is above limits.{name}={bound}: lower it, or raise "
                                 f"limits.{name} in the use case's YAML")


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
