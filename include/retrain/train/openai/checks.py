"""Before anything leaves the machine: the dataset's format check (what OpenAI's file validation would refuse,
plus a personal-data scan) and the cost gate.

No network here. ``check_and_estimate`` writes ``candidate/openai_format_check.json`` and raises FormatCheckError
or CostLimitExceeded with a message listing the problems / giving the estimate and the limit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retrain.rundir import RunDir, write_json
from retrain.train.openai.errors import CostLimitExceeded, FormatCheckError, OpenAIFineTuneError
from retrain.train.openai.tokens import TokenCounter, example_tokens, token_counter

log = logging.getLogger(__name__)

# --- prices and limits -----------------------------------------------------------------------------------
# USD per 1M *training* tokens (billed tokens = tokens in the training file x epochs; validation is not billed),
# from OpenAI's pricing page for supervised fine-tuning, 2025. Longest matching prefix wins, so dated snapshots
# ("gpt-4o-mini-2024-07-18") and continued fine-tunes ("ft:gpt-4o-mini-...") resolve to their family. Prices
# change: check https://openai.com/api/pricing and override per use case with
# training.openai_price_per_1m_tokens (also the way to price an OpenAI-compatible server, e.g. 0).
PRICE_PER_1M_TRAINING_TOKENS: dict[str, float] = {
    "gpt-4o-mini": 3.00,
    "gpt-4o": 25.00,
    "gpt-4.1-nano": 1.50,
    "gpt-4.1-mini": 5.00,
    "gpt-4.1": 25.00,
    "gpt-3.5-turbo": 8.00,
}
# Longest example (tokens) each family trains on; longer ones are truncated by OpenAI, which silently drops the
# end of the answer the model should learn, so the format check reports them instead.
EXAMPLE_TOKEN_LIMIT: dict[str, int] = {
    "gpt-4o-mini": 65_536,
    "gpt-4o": 65_536,
    "gpt-4.1": 65_536,
    "gpt-3.5-turbo": 16_385,
}
DEFAULT_EXAMPLE_TOKEN_LIMIT = 16_385  # unknown model: assume the smallest current limit
MIN_EXAMPLES = 10  # OpenAI rejects training files with fewer examples
DEFAULT_MAX_COST_USD = 10.0
ALLOWED_ROLES = ("system", "user", "assistant", "tool")
ALLOWED_MESSAGE_KEYS = {"role", "content", "name", "weight", "tool_calls", "tool_call_id", "function_call", "refusal"}


# --- model settings --------------------------------------------------------------------------------------


def _by_prefix(table: dict[str, Any], model: str) -> Any | None:
    base = model[3:] if model.startswith("ft:") else model
    for prefix in sorted(table, key=len, reverse=True):
        if base.startswith(prefix):
            return table[prefix]
    return None


def example_token_limit(model: str) -> int:
    return _by_prefix(EXAMPLE_TOKEN_LIMIT, model) or DEFAULT_EXAMPLE_TOKEN_LIMIT


def price_per_1m(model: str, override: float | None = None) -> float:
    if override is not None:
        return float(override)
    price = _by_prefix(PRICE_PER_1M_TRAINING_TOKENS, model)
    if price is None:
        known = ", ".join(sorted(PRICE_PER_1M_TRAINING_TOKENS))
        raise OpenAIFineTuneError(
            f"no fine-tuning price is known for model '{model}' (known families: {known}), so the cost cannot be "
            f"checked against max_cost_usd. Set training.openai_price_per_1m_tokens in the use case (USD per 1M "
            f"training tokens; 0 for a free OpenAI-compatible server) or pick a known model."
        )
    return price


# --- format check ----------------------------------------------------------------------------------------


def _decoded(content: str) -> Any:
    """A message's content as decoded JSON when it is JSON (an assistant label), else the text: personal data after
    a JSON escape (``\\n4111 1111 ...``) must be found too."""
    try:
        return json.loads(content)
    except (ValueError, RecursionError):
        return content


def check_chat_jsonl(path: str | Path, *, model: str, counter: TokenCounter | None = None,
                     min_examples: int | None = MIN_EXAMPLES, max_problems: int = 200) -> dict:
    """Check a chat JSONL file the way OpenAI's file validation would, plus a personal-data scan.

    Returns a report: examples, tokens (sum, max, per-example billed total), problems as
    ``{"line": n, "problem": "..."}`` (first ``max_problems``) and counts per problem kind. Personal data is
    reported by type and line, never by value (the report is logged).
    """
    from retrain.data.scrub import find_pii_in_value

    path = Path(path)
    counter = counter or token_counter(model)
    limit = example_token_limit(model)
    problems: list[dict] = []
    kinds: Counter[str] = Counter()

    def problem(line: int, kind: str, text: str) -> None:
        kinds[kind] += 1
        if len(problems) < max_problems:
            problems.append({"line": line, "kind": kind, "problem": text})

    examples = tokens = max_tokens = billed = 0
    if not path.is_file():
        problem(0, "missing_file", f"{path} does not exist (run build_dataset first)")
    else:
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    problem(n, "invalid_json", f"not valid JSON ({exc.msg})")
                    continue
                messages = row.get("messages") if isinstance(row, dict) else None
                if not isinstance(messages, list) or not messages:
                    problem(n, "missing_messages", 'needs a non-empty "messages" list')
                    continue
                ok = True
                for i, m in enumerate(messages):
                    if not isinstance(m, dict):
                        problem(n, "bad_message", f"message {i} is not an object")
                        ok = False
                        continue
                    if extra := sorted(set(m) - ALLOWED_MESSAGE_KEYS):
                        problem(n, "unknown_key", f"message {i} has unrecognised key(s) {extra}")
                    role = m.get("role")
                    if role not in ALLOWED_ROLES:
                        problem(n, "bad_role", f"message {i} has role {role!r}; allowed: {', '.join(ALLOWED_ROLES)}")
                        ok = False
                    content = m.get("content")
                    if content is None and not m.get("tool_calls") and not m.get("function_call"):
                        problem(n, "missing_content", f"message {i} ({role}) has no content")
                        ok = False
                    elif content is not None and (not isinstance(content, str) or not content.strip()):
                        problem(n, "empty_content", f"message {i} ({role}) has empty or non-text content")
                        ok = False
                    elif isinstance(content, str) and (pii := find_pii_in_value(_decoded(content))):
                        types = sorted({kind for kind, _ in pii})
                        problem(n, "personal_data", f"message {i} ({role}) contains unscrubbed {', '.join(types)}")
                        ok = False
                if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
                    problem(n, "no_assistant", "has no assistant message (nothing to learn)")
                    ok = False
                if ok:
                    examples += 1
                    t = example_tokens(messages, counter)
                    tokens += t
                    max_tokens = max(max_tokens, t)
                    billed += min(t, limit)
                    if t > limit:
                        problem(n, "too_long", f"has {t} tokens, over the {limit}-token limit of {model} "
                                              f"(OpenAI would truncate it)")
    if min_examples and examples < min_examples:
        problem(0, "too_few_examples", f"{examples} usable examples; OpenAI needs at least {min_examples} to "
                                       f"fine-tune")
    return {
        "file": str(path),
        "examples": examples,
        "tokens": tokens,
        "billed_tokens_per_epoch": billed,
        "max_example_tokens": max_tokens,
        "token_limit": limit,
        "tokenizer": counter.method,
        "tokens_exact": counter.exact,
        "problem_counts": dict(kinds),
        "problems": problems,
        "ok": not kinds,
    }


def _format_problems(reports: dict[str, dict], report_path: Path) -> str:
    lines = []
    for split, rep in reports.items():
        if rep["ok"]:
            continue
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(rep["problem_counts"].items()))
        lines.append(f"{split} ({rep['file']}): {counts}")
        for p in rep["problems"][:15]:
            where = f"line {p['line']}" if p["line"] else "file"
            lines.append(f"  - {where}: {p['problem']}")
        if sum(rep["problem_counts"].values()) > 15:
            lines.append(f"  ... see {report_path.name} in the run's {report_path.parent.name}/ directory for the "
                         f"full list")
    return "\n".join(lines)


# --- cost ------------------------------------------------------------------------------------------------


def estimate_cost(billed_tokens_per_epoch: int, n_epochs: int, model: str, *, price_override: float | None = None,
                  tokenizer: str = "", exact: bool = True) -> dict:
    price = price_per_1m(model, price_override)
    billed = billed_tokens_per_epoch * n_epochs
    return {
        "model": model,
        "billed_tokens_per_epoch": billed_tokens_per_epoch,
        "n_epochs": n_epochs,
        "billed_tokens": billed,
        "usd_per_1m_training_tokens": price,
        "estimated_usd": round(billed * price / 1_000_000, 4),
        "tokenizer": tokenizer,
        "tokens_exact": exact,
    }


def _usd(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def check_cost(estimate: dict, max_cost_usd: float) -> None:
    if estimate["estimated_usd"] > max_cost_usd:
        approx = "" if estimate["tokens_exact"] else " (token counts estimated, tiktoken encoding unavailable)"
        raise CostLimitExceeded(
            f"refusing to start the OpenAI fine-tuning job: the estimated cost is {_usd(estimate['estimated_usd'])}, "
            f"over the limit max_cost_usd={_usd(max_cost_usd)} ({estimate['billed_tokens']:,} training tokens = "
            f"{estimate['billed_tokens_per_epoch']:,} x {estimate['n_epochs']} epochs at "
            f"${estimate['usd_per_1m_training_tokens']:.2f} per 1M{approx}). Raise max_cost_usd in the trigger form "
            f"if this is intended, or reduce the data (sample_limit), the epochs or pick a cheaper base model.",
            estimate,
        )


# --- settings for a run ----------------------------------------------------------------------------------


def run_key(use_case: str, run_id: str) -> str:
    return hashlib.sha256(f"{use_case}\x00{run_id}".encode()).hexdigest()[:32]


def _present(value: Any) -> bool:
    return value is not None and value != ""


def job_settings(run_dir: str | Path, *, model: str | None = None, max_cost_usd: float | str | None = None) -> dict:
    """Everything the job is created from, resolved from the frozen run config (read defensively: the
    OpenAI-specific training fields are optional until the lead adds them to TrainingConfig)."""
    uc, meta = RunDir(run_dir).load()
    tr, params = uc.training, meta.get("params") or {}
    model = model or params.get("base_model") or tr.openai_base_model
    if _present(max_cost_usd):
        limit = float(max_cost_usd)
    elif _present(params.get("max_cost_usd")):
        limit = float(params["max_cost_usd"])
    else:
        limit = float(getattr(tr, "max_cost_usd", None) or DEFAULT_MAX_COST_USD)
    lr_mult = getattr(tr, "openai_learning_rate_multiplier", None)
    return {
        "use_case": uc.name,
        "run_id": meta["run_id"],
        "model": model,
        "max_cost_usd": limit,
        "price_override": getattr(tr, "openai_price_per_1m_tokens", None),
        "hyperparameters": {
            "n_epochs": max(1, int(round(tr.epochs))),
            "batch_size": int(getattr(tr, "openai_batch_size", None) or tr.batch_size),
            "learning_rate_multiplier": float(lr_mult) if lr_mult else "auto",
        },
        "seed": int(getattr(tr, "seed", None) or 42),
        # OpenAI allows 64 characters, lower-case letters, digits and dashes survive every compatible server.
        "suffix": re.sub(r"[^a-z0-9-]+", "-", uc.name.lower())[:40],
        "run_key": run_key(uc.name, meta["run_id"]),
    }


def check_and_estimate(run_dir: str | Path, *, model: str | None = None,
                       max_cost_usd: float | str | None = None) -> dict:
    """Format check + cost gate, no network. Writes candidate/openai_format_check.json; raises FormatCheckError
    or CostLimitExceeded with a message listing the problems / giving the estimate and the limit."""
    run = RunDir(run_dir)
    s = job_settings(run.path, model=model, max_cost_usd=max_cost_usd)
    counter = token_counter(s["model"])
    reports = {
        "train": check_chat_jsonl(run.split("train"), model=s["model"], counter=counter),
        "val": check_chat_jsonl(run.split("val"), model=s["model"], counter=counter, min_examples=None),
    }
    estimate = estimate_cost(reports["train"]["billed_tokens_per_epoch"], s["hyperparameters"]["n_epochs"],
                             s["model"], price_override=s["price_override"], tokenizer=counter.method,
                             exact=counter.exact)
    report = {"settings": s, "format": reports, "estimate": estimate, "max_cost_usd": s["max_cost_usd"],
              "tokenizer_note": counter.note, "checked_at": datetime.now(timezone.utc).isoformat()}
    write_json(run.openai_format_check, report)
    if not all(r["ok"] for r in reports.values()):
        raise FormatCheckError(
            "the dataset is not ready for OpenAI fine-tuning; nothing was uploaded:\n"
            + _format_problems(reports, run.openai_format_check)
            + "\nFix the data (or the use case's limits) and rebuild the dataset.",
            report,
        )
    log.info("format check passed: %d train / %d val examples, %d train tokens per epoch (%s)",
             reports["train"]["examples"], reports["val"]["examples"],
             reports["train"]["billed_tokens_per_epoch"], counter.method)
    check_cost(estimate, s["max_cost_usd"])
    log.info("estimated cost $%.4f <= max_cost_usd $%.2f (%s x %d epochs at $%.2f/1M)", estimate["estimated_usd"],
             s["max_cost_usd"], estimate["billed_tokens_per_epoch"], estimate["n_epochs"],
             estimate["usd_per_1m_training_tokens"])
    return report
