"""A use case's ``sweep:`` section (issue 19): which training fields a hyper-parameter sweep tries, and how.

```yaml
sweep:
  method: grid            # grid: every combination of the values; random: max_candidates of them, drawn by seed
  space:                  # any training field (TrainingSpec / the use case's training block), each with its values
    learning_rate: [0.0005, 0.001, 0.002]
    lora_r: [8, 16]
  max_candidates: 4       # at most this many candidates train (grid: the grid may not be larger)
  seed: 0                 # draws the random candidates (and a smaller subset asked for by the sweep Param)
  halving:                # optional successive halving: all train first_budget_fraction of their steps, the best
    eta: 3                #   ceil(n / eta) on the validation metric continue from their checkpoints to the end
    first_budget_fraction: 0.25
```

A sweep runs only when a run asks for it (the ``sweep`` trigger Param: ``off`` (default), ``on``, or a number of
candidates). This module is pydantic only (safe at DAG parse time) and holds the pure parts: the candidate
list, the halving schedule and the cost-sum rule of OpenAI sweeps.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from retrain.schemas.base import ConfigError, _Strict
from retrain.schemas.training import TrainingSpec

# Fields a sweep may not vary: stop_at_step is the sweep's own tool (halving's first rung), the mirror settings are
# not hyper-parameters; the OpenAI-only knobs below are the only fields outside TrainingSpec that mean something to a candidate.
NOT_SWEEPABLE = ("stop_at_step", "checkpoint_mirror", "mirror_keep")
OPENAI_FIELDS = ("openai_learning_rate_multiplier", "openai_batch_size")
SWEEPABLE = tuple(f for f in TrainingSpec.model_fields if f not in NOT_SWEEPABLE) + OPENAI_FIELDS
MAX_CANDIDATES = 64


class SweepError(ConfigError):
    """A sweep cannot run as configured (too many candidates, over the cost limit); the message says what to change."""


class HalvingConfig(_Strict):
    eta: int = Field(3, ge=2, le=16, description="keep the best ceil(n / eta) candidates after the first rung")
    first_budget_fraction: float = Field(
        0.25, gt=0, lt=1, description="share of each candidate's optimizer steps trained in the first rung")


class SweepConfig(_Strict):
    method: Literal["grid", "random"] = "grid"
    space: dict[str, list[Any]] = Field(
        min_length=1, description="training field -> the values to try, e.g. {learning_rate: [0.0005, 0.001]}")
    max_candidates: int = Field(4, ge=2, le=MAX_CANDIDATES, description="candidates trained per sweep")
    seed: int = 0
    halving: HalvingConfig | None = None

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for name, values in v.items():
            if name not in SWEEPABLE:
                hint = ("it is set by the sweep itself" if name in NOT_SWEEPABLE
                        else "not a training field (check the spelling against the training block)")
                raise ValueError(f"'{name}' cannot be swept: {hint}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"'{name}' needs a non-empty list of values, e.g. {name}: [a, b]")
            if len({repr(x) for x in values}) != len(values):
                raise ValueError(f"'{name}' lists a value twice: {values}")
        return v

    @model_validator(mode="after")
    def _size(self) -> SweepConfig:
        if self.method == "grid" and self.grid_size > self.max_candidates:
            raise ValueError(
                f"max_candidates: the grid has {self.grid_size} combinations, more than max_candidates="
                f"{self.max_candidates}; raise max_candidates, shrink space, or use method: random")
        if self.grid_size < 2:
            raise ValueError("space: a sweep needs at least two candidates (give some field two or more values)")
        return self

    @property
    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values())

    def check_values(self, training: Any, limits: Any = None) -> None:
        """Each value of the space applied alone to ``training`` (the use case's training block) must give a valid
        spec within the use case's ``limits``: a wrong type or bound fails here naming ``sweep.space.<field>``
        instead of when the candidate trains."""
        from retrain.schemas.training import TrainingSpecError, spec_from_use_case

        for name, values in self.space.items():
            for value in values:
                if name in OPENAI_FIELDS:
                    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                        raise ValueError(f"sweep.space.{name}: {value!r} must be a positive number")
                else:
                    try:
                        spec_from_use_case(training, {name: value})
                    except TrainingSpecError as exc:
                        detail = "; ".join(line.strip(" -") for line in str(exc).splitlines()[1:-1])
                        raise ValueError(f"sweep.space.{name}: value {value!r} is invalid ({detail})") from None
                if limits is not None:
                    limits.check({name: value}, "sweep.space.")


def sweep_size(param: str | int | None, config: SweepConfig | None) -> int:
    """Candidates a run trains for its ``sweep`` Param: 0 = no sweep (off), the YAML's max_candidates (on), or n."""
    value = str(param if param is not None else "off").strip().lower()
    if value in ("off", "", "0", "false", "none"):
        return 0
    if config is None:
        raise SweepError("run parameters: sweep is on but the use case has no sweep: section; add one to its YAML "
                         "(method, space, max_candidates) or trigger with sweep=off")
    if value in ("on", "true"):
        return min(config.max_candidates, config.grid_size)
    try:
        n = int(value)
    except ValueError:
        raise SweepError(f"run parameters: sweep={param!r} must be off, on or a number of candidates") from None
    if not 2 <= n <= MAX_CANDIDATES:
        raise SweepError(f"run parameters: sweep={n} must be between 2 and {MAX_CANDIDATES} candidates")
    if n > config.grid_size:
        raise SweepError(f"run parameters: sweep={n} asks for more candidates than the sweep's space holds "
                         f"({config.grid_size} combinations); lower it or add values to sweep.space")
    return n


def candidates(config: SweepConfig, n: int | None = None) -> list[dict[str, Any]]:
    """The candidates' training values, in a stable order. Grid: every combination (in the order of ``space``);
    random, or fewer than the grid holds (the sweep Param ``n``): ``n`` combinations drawn without replacement by
    ``seed``. Always the same list for the same config and n."""
    names = list(config.space)
    grid = [dict(zip(names, combo)) for combo in itertools.product(*(config.space[k] for k in names))]
    n = min(n or config.max_candidates, len(grid))
    if config.method == "grid" and n >= len(grid):
        return grid
    picked = sorted(random.Random(config.seed).sample(range(len(grid)), n))
    return [grid[i] for i in picked]


def halving_schedule(total_steps: list[int], eta: int, first_budget_fraction: float) -> dict:
    """Successive halving over candidates whose full runs take ``total_steps[i]`` optimizer steps.

    Rung 1 trains every candidate for ceil(fraction x its steps) (at least 1); the best ceil(n / eta) on the
    validation metric continue from their checkpoints to their full steps. Returns the per-candidate first budget,
    how many survive, and the optimizer steps of the sweep at most (survivors taken as the longest runs) against the
    full grid's."""
    if not total_steps:
        raise ValueError("halving needs at least one candidate")
    first = [min(t, max(1, math.ceil(t * first_budget_fraction))) for t in total_steps]
    keep = max(1, math.ceil(len(total_steps) / eta))
    rest = sorted((t - f for t, f in zip(total_steps, first)), reverse=True)
    halving = sum(first) + sum(rest[:keep])
    full = sum(total_steps)
    return {"first_budget": first, "keep": keep, "max_optimizer_steps": halving, "full_grid_steps": full,
            "saving": round(1 - halving / full, 4) if full else 0.0}


def survivors(scores: dict[str, float | None], keep: int, losses: dict[str, float | None] | None = None) -> list[str]:
    """The ``keep`` best candidate names by validation score (a missing score ranks last). Ties go to the lower
    validation loss (``losses``), then to plan order."""
    order = list(scores)
    losses = losses or {}

    def key(c: str) -> tuple:
        score, loss = scores[c], losses.get(c)
        return (-(score if score is not None else -math.inf), loss if loss is not None else math.inf, order.index(c))

    return sorted(order, key=key)[:keep]


def check_sweep_cost(estimates: dict[str, float], max_cost_usd: float) -> float:
    """OpenAI sweeps: the candidates' jobs share one cost gate. Returns the sum, or raises naming sum and limit."""
    total = round(sum(estimates.values()), 4)
    if total > max_cost_usd:
        each = ", ".join(f"{name} ${usd:.4f}" for name, usd in estimates.items())
        # Cents hide a small limit ($0.0001 is not $0.00): four decimals below a dollar.
        limit = f"{max_cost_usd:.2f}" if max_cost_usd >= 1 else f"{max_cost_usd:.4f}"
        raise SweepError(
            f"refusing to start the sweep's OpenAI fine-tuning jobs: the estimated costs sum to ${total:.4f}, over "
            f"the limit max_cost_usd=${limit} ({each}). Raise max_cost_usd, or sweep fewer candidates "
            f"(the sweep Param) or fewer epochs")
    return total
