"""Typed LoRA / QLoRA hyper-parameters for one training run (``TrainingSpec``).

The spec is derived, in this order of precedence, from: the use case's ``training`` block (YAML, possibly
overridden by the DAG's Params), ``run_dir/train_overrides.json`` (a hand-written file or what an operator
drops in before a retry), and the ``extra_overrides`` the Airflow task passes. It is validated here, in the
Airflow worker, before any process is launched, so a typo fails in a second with the field's name instead of
after a model load. This module imports only pydantic: it is safe to import from a DAG file.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class TrainingSpecError(ValueError):
    """The training hyper-parameters are invalid; the message names each bad field and what to change."""


class TrainingSpec(BaseModel):
    """Everything the trainer needs to know besides the data and the base model."""

    # Unknown keys are typos ("lora_rank" for "lora_r"): reject them by name.
    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- what is trained -----------------------------------------------------------------------------
    adapter: Literal["qlora", "lora"] = "qlora"
    load_in_4bit: bool | None = Field(
        None, description="quantise the frozen base to 4 bit; None follows the adapter (qlora: yes, lora: no)"
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    lora_r: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    # 0 rather than the common 0.05: PEFT draws a fresh dropout mask over every adapted layer's input at every
    # step, which cost a third of a CPU step on SmolLM2 (profiled: 9.3 -> 6.2 s at batch 8), and runs of a few
    # hundred steps over a few hundred examples do not need the regularisation (early stopping guards overfit).
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, or 'all-linear' (every linear layer but the LM head)"
    )
    lora_top_layers: int | None = Field(
        None, ge=1,
        description="adapt only the top N transformer layers (PEFT layers_to_transform); None = every layer. "
        "Without gradient checkpointing the backward pass then stops below them.",
    )

    # --- optimisation ----------------------------------------------------------------------------------
    # 1e-3 rather than the usual 2e-4: measured on SmolLM2-135M, product_intent, batch 8 (see the module
    # docstring of retrain.train.qlora.trainer) -- 2e-4 needs ~3x the steps for the same validation loss.
    learning_rate: float = Field(1e-3, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps (fewer if the epochs end first)")
    stop_at_step: int | None = Field(
        None, ge=1, description="halt (evaluated and checkpointed) at this optimiser step while keeping the learning-"
        "rate schedule of the full run; a later run without it resumes to the end (a sweep's successive halving)")
    batch_size: int = Field(8, ge=1, description="examples per device per forward pass")
    eval_batch_size: int | None = Field(None, ge=1, description="None = batch_size")
    grad_accum: int = Field(1, ge=1, description="forward passes per optimiser step")
    max_length: int = Field(512, ge=16, description="tokens per example (prompt + completion); longer ones are cut")
    gradient_checkpointing: bool | None = Field(
        None, description="trade compute for memory; None = on for CUDA, off on CPU (memory is not the limit there)"
    )
    seed: int = 42

    label_token_weight: float = Field(
        1.0, ge=1, le=100,
        description="training-loss weight of the tokens where the model picks a label (fields.labels) relative to "
        "the other answer tokens; 1 = plain SFT loss. Validation loss is always unweighted.",
    )

    # --- evaluation, checkpoints, early stopping -------------------------------------------------------
    eval_steps: int = Field(20, ge=1)
    save_steps: int = Field(20, ge=1)
    save_total_limit: int = Field(2, ge=1, description="checkpoints kept on disk (the best one is always kept)")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="evaluations without a better validation loss before stopping; None disables"
    )
    early_stopping_threshold: float = Field(0.0, ge=0)
    logging_steps: int = Field(5, ge=1)
    checkpoint_mirror: bool = Field(
        True, description="mirror each checkpoint to S3, encrypted like backups, so a retry on another worker resumes "
        "from it; applies when S3 and a backup key are configured (RETRAIN_CHECKPOINT_MIRROR=off disables it)",
    )
    mirror_keep: int = Field(2, ge=1, le=50, description="mirrored checkpoints kept in S3 (the best one is also kept)")

    # --- throughput ------------------------------------------------------------------------------------
    # Off by default although it cuts padding (~20% faster steps on product_intent): when length tracks the label
    # (short "A vs B" comparisons, long bulk orders) length-grouped batches hold one class each, the label's
    # prior then swings from batch to batch, and intent accuracy at 60 steps fell from 0.55 to 0.41 (measured).
    group_by_length: bool = Field(False, description="batch examples of similar length to cut padding")
    padding_free: bool = Field(
        False, description="flatten each batch into one sequence (no padding); best with FlashAttention on CUDA"
    )
    packing: bool = Field(False, description="pack several examples into max_length blocks (implies padding-free)")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one module (e.g. [q_proj, v_proj]) or be 'all-linear'")
            if "lm_head" in v:
                raise ValueError("lm_head cannot carry an adapter (TRL computes the loss from its weight directly)")
        return v

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingSpec:
        if self.adapter == "qlora" and self.load_in_4bit is False:
            raise ValueError("adapter 'qlora' requires load_in_4bit: true (use adapter 'lora' for full precision)")
        if self.adapter == "lora" and self.load_in_4bit is True:
            raise ValueError(
                "adapter 'lora' trains on a full-precision base, but load_in_4bit is true: "
                "use adapter 'qlora' for a 4-bit base, or set load_in_4bit: false"
            )
        if self.early_stopping_patience is not None and self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) when early "
                "stopping is on (the best checkpoint must be an evaluated one); or set early_stopping_patience: null"
            )
        return self

    @property
    def quantized(self) -> bool:
        return self.adapter == "qlora" if self.load_in_4bit is None else self.load_in_4bit

    def fingerprint(self) -> str:
        """Hash of the fields that change what training computes: a checkpoint from another spec is not resumed."""
        # Fields that only change when evaluation/logging happens or how many checkpoints are kept do not
        # invalidate a checkpoint.
        neutral = {"save_total_limit", "logging_steps", "early_stopping_patience", "early_stopping_threshold",
                   "eval_batch_size", "checkpoint_mirror", "mirror_keep",
                   "stop_at_step"}  # stop_at_step: where a run pauses (halving), not what it computes
        data = {k: v for k, v in self.model_dump(mode="json").items() if k not in neutral}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _format(exc: ValidationError, source: str) -> str:
    lines = [f"{source} is invalid:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(cross-field rule)"
        msg = "unknown field (check the spelling against TrainingSpec)" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  - {loc}: {msg}")
    lines.append("Fix the use case's training block, run_dir/train_overrides.json or the task's overrides and retry.")
    return "\n".join(lines)


def parse_spec(data: dict[str, Any], source: str = "training spec") -> TrainingSpec:
    if not isinstance(data, dict):
        raise TrainingSpecError(f"{source} must be a mapping of fields, got {type(data).__name__}")
    try:
        return TrainingSpec.model_validate(data)
    except ValidationError as exc:
        raise TrainingSpecError(_format(exc, source)) from None


def spec_from_use_case(training: Any, overrides: dict[str, Any] | None = None) -> TrainingSpec:
    """Spec from a use case's ``training`` block (``config.TrainingConfig``, a TrainingSpec subclass) plus overrides.

    The YAML can set every TrainingSpec field; the backend/base-model fields the block adds choose *which* trainer
    runs, not how it trains, and are left out here.
    """
    data: dict[str, Any] = {name: getattr(training, name) for name in TrainingSpec.model_fields if hasattr(training, name)}
    return parse_spec(with_overrides(data, overrides), "training spec (use case training block + overrides)")


def with_overrides(training: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``training`` (a dict of TrainingSpec fields) updated with ``overrides``; used for Params and override files.

    A block's load_in_4bit was written for the block's adapter: an override switching qlora -> lora must not
    keep a 4-bit base, so it falls back to None (follow the adapter) unless the override sets it too.
    """
    out = dict(training)
    overrides = dict(overrides or {})
    if "adapter" in overrides and "load_in_4bit" not in overrides:
        out["load_in_4bit"] = None
    out.update(overrides)
    return out
