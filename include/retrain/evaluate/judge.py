"""LLM-as-judge, pairwise and checked: is the candidate's reply better than the baseline's, by a rubric?

Judges prefer whichever answer they see first (or second) more often than they should. Every prompt is therefore
judged twice, once with the candidate as reply A and once as reply B; the candidate wins a prompt only when both
orders prefer it, loses only when both prefer the baseline, and anything else is a tie. A judge that always answers
"A" thus produces only ties (win rate 0.5), and the number of prompts where the verdict followed the position
instead of the text is reported as ``position_bias``.

A judge's verdicts are only worth something once they agree with people: ``calibrate`` measures Cohen's kappa
between the judge (both orders, combined the same way) and a small human-labelled set; the generation gate counts
the judge only when that kappa reaches the use case's ``min_kappa``.

The endpoint is any OpenAI-compatible chat-completions API. The caller resolves the key and base URL (through
``retrain.settings.openai_credentials``); the key is never logged or put into an error message.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from retrain.evaluate.metrics import paired_bootstrap

log = logging.getLogger(__name__)

VERDICTS = ("A", "B", "tie")
SYSTEM_PROMPT = (
    "You are an impartial judge comparing two replies to the same request. Judge only by the rubric; ignore the "
    "order in which the replies are shown and their length unless the rubric says otherwise. "
    "Answer with exactly one word: A, B or tie."
)
_USER_TEMPLATE = ("Rubric:\n{rubric}\n\nRequest:\n{prompt}\n\n[Reply A]\n{a}\n[End of reply A]\n\n[Reply B]\n{b}\n"
                  "[End of reply B]\n\nWhich reply is better by the rubric? Answer A, B or tie.")
# Room for a one-word verdict, or a short JSON object with one, from chatty models.
_VERDICT_TOKENS = 32
_TIE_WORDS = {"tie", "draw", "equal", "same", "neither", "both"}
_EDGE = " \t\r\n.,;:!?*_`'\"()[]{}<>"
_PATTERNS = (
    re.compile(r"\b(?:verdict|answer|winner|decision|choice|better(?:\s+reply)?)\s*(?:is|[:=\-])\s*\**\s*"
               r"(?:reply\s+)?\"?(A|B|tie)\b", re.IGNORECASE),
    re.compile(r"\b(?:reply|response|answer|option)\s+(A|B)\s+is\s+(?:better|preferred|stronger)", re.IGNORECASE),
    re.compile(r"^\s*\**\s*(A|B)\s*\**\s*(?:[.:\-—]|is\s+better|$)", re.IGNORECASE),
    re.compile(r"\b(?:it'?s|it\s+is)\s+a\s+(tie)\b", re.IGNORECASE),
)


class JudgeError(RuntimeError):
    """The judge endpoint could not be used (the message names the model and endpoint, never the key)."""


class JudgeUnavailableError(JudgeError):
    """The endpoint did not answer, timed out, was rate-limited or failed on its side (HTTP 5xx): a retry may
    clear it. A refused key, an unknown model or a bad request (other HTTP 4xx) is a plain JudgeError."""


# --- settings --------------------------------------------------------------------------------------------------


def _setting(settings: Any, name: str, default: Any = None) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(name, default)
    return getattr(settings, name, default)


def engine_settings(config: Any, *, api_key: str | None, base_url: str | None, **extra: Any) -> dict:
    """Judge settings from the use case's ``evaluation.judge`` (JudgeConfig) and the credentials the caller resolved
    with ``retrain.settings.openai_credentials(config.connection, base_url=config.base_url)``."""
    return {"model": _setting(config, "model"), "min_kappa": _setting(config, "min_kappa"), "api_key": api_key,
            "base_url": base_url or _setting(config, "base_url"), **extra}


def _where(settings: Any) -> str:
    """The endpoint for an error message, without any user:password@ part."""
    from urllib.parse import urlsplit

    url = _setting(settings, "base_url")
    if not url:
        return "the OpenAI API"
    parts = urlsplit(str(url))
    return parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")).geturl() \
        if parts.hostname else "the configured endpoint"


def make_client(settings: Any):
    """An ``openai.OpenAI`` client from settings (``api_key``, ``base_url``, ``timeout_s``, ``max_retries``)."""
    from openai import OpenAI

    key, base_url = _setting(settings, "api_key"), _setting(settings, "base_url")
    if not key:
        if not base_url:
            raise JudgeError("no API key for the judge: set the password of the 'openai_default' Airflow connection "
                             "or OPENAI_API_KEY (or give a base_url for a local OpenAI-compatible server)")
        key = "unused"  # local servers (vLLM, Ollama) accept any key
    return OpenAI(api_key=key, base_url=base_url, timeout=float(_setting(settings, "timeout_s", 60.0) or 60.0),
                  max_retries=int(_setting(settings, "max_retries", 2) or 0))


# --- one verdict -----------------------------------------------------------------------------------------------


def parse_verdict(text: Any) -> str | None:
    """"A", "B" or "tie" from a judge's answer, or None when it does not say (clearly) which.

    Accepts a bare word ("A", "**B**.", "Tie"), JSON ({"verdict": "A"}), "Verdict: B", "Reply A is better",
    "It's a tie". Anything else (two different verdicts, prose without one) is None rather than a guess."""
    if not isinstance(text, str):
        return None
    stripped = text.strip()
    word = stripped.strip(_EDGE)
    if word.upper() in ("A", "B"):
        return word.upper()
    if word.casefold() in _TIE_WORDS:
        return "tie"
    try:
        obj = json.loads(stripped)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        for key in ("verdict", "winner", "answer", "choice"):
            if key in obj:
                return parse_verdict(str(obj[key]))
    found = set()
    for pattern in _PATTERNS:
        for match in pattern.finditer(stripped):
            value = match.group(1)
            found.add("tie" if value.casefold() == "tie" else value.upper())
    return found.pop() if len(found) == 1 else None


def _messages(rubric: str, prompt: str, a: str, b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _USER_TEMPLATE.format(rubric=rubric.strip(), prompt=prompt, a=a, b=b)}]


def _ask(client, settings: Any, rubric: str, prompt: str, a: str, b: str) -> tuple[str, bool]:
    """(verdict, parsed): up to ``max_attempts`` tries for a parseable answer, then a tie with parsed=False."""
    import openai

    model = _setting(settings, "model")
    attempts = max(1, int(_setting(settings, "max_attempts", 3) or 1))
    token_param = getattr(client, "_retrain_token_param", "max_tokens")
    attempt = 0
    while attempt < attempts:
        attempt += 1
        try:
            resp = client.chat.completions.create(model=model, messages=_messages(rubric, prompt, a, b),
                                                  temperature=0, **{token_param: _VERDICT_TOKENS})
        except openai.APIError as exc:
            status = getattr(exc, "status_code", None)
            if status == 400 and token_param == "max_tokens" and "max_completion_tokens" in str(exc):
                token_param, attempt = "max_completion_tokens", attempt - 1  # newer models renamed the parameter
                try:
                    client._retrain_token_param = token_param  # remembered for the other calls on this client
                except AttributeError:
                    pass
                continue
            # Not chained: the openai exception carries the request, whose headers hold the key.
            transient = status is None or status == 429 or status >= 500
            raise (JudgeUnavailableError if transient else JudgeError)(
                f"the judge model {model!r} at {_where(settings)} failed: {type(exc).__name__}"
                + (f" (HTTP {status})" if status else "")) from None
        choice = resp.choices[0] if resp.choices else None
        verdict = parse_verdict(choice.message.content if choice and choice.message else None)
        if verdict is not None:
            return verdict, True
        log.warning("judge %s gave no clear verdict (attempt %d/%d)", model, attempt, attempts)
    return "tie", False


def judge_pair(client, settings: Any, rubric: str, prompt: str, first: str, second: str) -> dict:
    """Judge one pair in both orders. ``verdict`` is in terms of (first, second): "A" = first is better
    (both orders agree), "B" = second is better, "tie" otherwise; ``followed_position`` when both orders named
    the same slot (a verdict about the position, not the text)."""
    v1, ok1 = _ask(client, settings, rubric, prompt, first, second)
    v2, ok2 = _ask(client, settings, rubric, prompt, second, first)
    v2_in_first_terms = {"A": "B", "B": "A", "tie": "tie"}[v2]
    verdict = v1 if v1 == v2_in_first_terms else "tie"
    return {"verdict": verdict, "orders": [v1, v2], "followed_position": v1 == v2 and v1 in ("A", "B"),
            "unparsed": int(not ok1) + int(not ok2)}


def _map(settings: Any, fn, items: list) -> list:
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, int(_setting(settings, "concurrency", 4) or 1))
    if workers == 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))  # map keeps the order: results are reproducible


# --- pairwise evaluation ---------------------------------------------------------------------------------------


def run_pairwise(engine_settings: Any, rubric: str, prompts: list[str], candidate_texts: list[str],
                 baseline_texts: list[str], *, client=None, seed: int = 0, n_resamples: int = 2000) -> dict:
    """Candidate vs baseline on each prompt, both orders. ``engine_settings``: mapping or object with ``model``,
    ``api_key``, ``base_url`` (and optional ``timeout_s``, ``max_retries``, ``max_attempts``, ``concurrency``).

    Returns {"n", "wins", "losses", "ties", "win_rate" (wins + ties/2 over n), "ci_low", "ci_high" (95% bootstrap),
    "position_bias": {"count", "share", "first", "second"}, "unparsed", "model", "per_prompt": [...]}."""
    if not (len(prompts) == len(candidate_texts) == len(baseline_texts)):
        raise ValueError(f"prompts, candidate_texts and baseline_texts must pair up, got {len(prompts)}, "
                         f"{len(candidate_texts)} and {len(baseline_texts)}")
    if not prompts:
        raise ValueError("run_pairwise needs at least one prompt")
    if not _setting(engine_settings, "model"):
        raise JudgeError("the judge settings name no model (evaluation.judge.model)")
    client = client or make_client(engine_settings)

    def one(i: int) -> dict:
        return judge_pair(client, engine_settings, rubric, str(prompts[i]), str(candidate_texts[i] or ""),
                          str(baseline_texts[i] or ""))

    pairs = _map(engine_settings, one, list(range(len(prompts))))
    outcome = {"A": "win", "B": "loss", "tie": "tie"}
    per_prompt = [{"index": i, "outcome": outcome[p["verdict"]], "orders": p["orders"],
                   "followed_position": p["followed_position"]} for i, p in enumerate(pairs)]
    counts = Counter(p["outcome"] for p in per_prompt)
    scores = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[p["outcome"]] for p in per_prompt]
    # The bootstrap of mean(scores) - 0 is the bootstrap of the win rate itself.
    boot = paired_bootstrap([0.0] * len(scores), scores, n=n_resamples, seed=seed)
    biased = [p for p in pairs if p["followed_position"]]
    n = len(per_prompt)
    return {
        "model": _setting(engine_settings, "model"),
        "n": n,
        "wins": counts["win"],
        "losses": counts["loss"],
        "ties": counts["tie"],
        "win_rate": sum(scores) / n,
        "ci_low": boot["ci_low"],
        "ci_high": boot["ci_high"],
        "ci": boot["ci"],
        "position_bias": {"count": len(biased), "share": len(biased) / n,
                          "first": sum(p["orders"][0] == "A" for p in biased),
                          "second": sum(p["orders"][0] == "B" for p in biased)},
        "unparsed": sum(p["unparsed"] for p in pairs),
        "per_prompt": per_prompt,
    }


# --- calibration -----------------------------------------------------------------------------------------------


def cohen_kappa(a: list, b: list) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (same as sklearn's cohen_kappa_score).

    None when it is undefined: no items, or both raters used one and the same label throughout (chance agreement
    is then 1, so agreement beyond chance cannot be measured)."""
    if len(a) != len(b):
        raise ValueError(f"the two raters must label the same items, got {len(a)} and {len(b)} labels")
    n = len(a)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    expected = sum(count_a[k] * count_b[k] for k in count_a) / (n * n)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1 - expected)


def _check_rows(rows: list[dict]) -> list[dict]:
    checked = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise ValueError(f"calibration row {i} must be an object with prompt, a, b and human, got {type(row).__name__}")
        missing = [k for k in ("prompt", "a", "b", "human") if k not in row]
        if missing:
            raise ValueError(f"calibration row {i} lacks {', '.join(missing)} (each row needs prompt, a, b and human)")
        human = parse_verdict(str(row["human"]))
        if human is None:
            raise ValueError(f"calibration row {i}: human must be \"A\", \"B\" or \"tie\", got {row['human']!r}")
        checked.append({"prompt": str(row["prompt"]), "a": str(row["a"]), "b": str(row["b"]), "human": human})
    return checked


def load_calibration(path) -> list[dict]:
    """Rows of a JSONL calibration file ({"prompt", "a", "b", "human": "A"|"B"|"tie"} per line)."""
    from pathlib import Path

    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as exc:
                raise ValueError(f"{path} line {n} is not JSON: {exc}") from None
    return _check_rows(rows)


def calibrate(settings: Any, rubric: str, calibration_rows: list[dict], *, min_kappa: float | None = None,
              client=None) -> dict:
    """Agreement of the judge with people on ``calibration_rows``: {"kappa", "n", "min_kappa", "calibrated",
    "reason", "agreement", "position_bias", "unparsed"}. ``min_kappa`` defaults to the settings' ``min_kappa``
    (JudgeConfig), else 0.6. The judge sees each pair in both orders, exactly as in ``run_pairwise``."""
    rows = _check_rows(list(calibration_rows))
    if min_kappa is None:
        min_kappa = _setting(settings, "min_kappa")
    threshold = float(0.6 if min_kappa is None else min_kappa)
    if not rows:
        return {"kappa": None, "n": 0, "min_kappa": threshold, "calibrated": False, "agreement": None,
                "position_bias": 0, "unparsed": 0,
                "reason": "the calibration set is empty: add human-labelled pairs to judge_calibration.jsonl"}
    if not _setting(settings, "model"):
        raise JudgeError("the judge settings name no model (evaluation.judge.model)")
    client = client or make_client(settings)
    pairs = _map(settings, lambda r: judge_pair(client, settings, rubric, r["prompt"], r["a"], r["b"]), rows)
    judge_labels = [p["verdict"] for p in pairs]
    human_labels = [r["human"] for r in rows]
    kappa = cohen_kappa(human_labels, judge_labels)
    agreement = sum(h == j for h, j in zip(human_labels, judge_labels)) / len(rows)
    if kappa is None:
        calibrated, reason = False, (f"kappa is undefined: the people and the judge used one and the same label for "
                                     f"all {len(rows)} pairs; add pairs with other verdicts")
    else:
        calibrated = kappa >= threshold
        reason = f"Cohen's kappa {kappa:.3f} {'>=' if calibrated else '<'} min_kappa {threshold:.2f} on {len(rows)} pairs"
    return {"kappa": kappa, "n": len(rows), "min_kappa": threshold, "calibrated": calibrated, "reason": reason,
            "agreement": agreement, "position_bias": sum(p["followed_position"] for p in pairs),
            "unparsed": sum(p["unparsed"] for p in pairs)}


def run_judge(settings: Any, rubric: str, calibration_rows: list[dict], prompts: list[str],
              candidate_texts: list[str], baseline_texts: list[str], *, client=None, seed: int = 0,
              n_resamples: int = 2000) -> dict:
    """What the generation gate takes as ``judge``: ``run_pairwise(...)`` plus ``"calibration": calibrate(...)``,
    both measured now with the same judge (a calibration from another run or model would prove nothing)."""
    client = client or make_client(settings)
    calibration = calibrate(settings, rubric, calibration_rows, client=client)
    result = run_pairwise(settings, rubric, prompts, candidate_texts, baseline_texts, client=client, seed=seed,
                          n_resamples=n_resamples)
    return {**result, "calibration": calibration}
