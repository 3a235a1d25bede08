"""Error analysis and slices: what kind of mistakes a model makes, and where it is weak.

Each scored example (``metrics.score_predictions``' per-example rows) gets one error class, the most telling first:

| class | meaning |
|---|---|
| ``empty`` | the model answered nothing (or only whitespace) |
| ``truncated`` | the answer hit the token budget with the JSON object still open |
| ``schema_error`` | no JSON object, or one that breaks the output schema (format errors) |
| ``wrong_label`` | a label field (``fields.labels``) differs from the gold answer |
| ``missing_entity`` | an entity the gold answer has is absent or different |
| ``hallucinated_entity`` | an entity the gold answer does not have |
| ``wrong_set`` | a set field (``fields.sets``) is not the gold set |
| ``ok`` | nothing of the above |

Slices split the test set by input language (a small ES/EN stop-word vote, offline), input-length bucket and any
gold field listed in the use case's ``evaluation.slices``; each slice gets the primary score of both models, so
the gate can refuse a candidate that wins on average but loses a slice (``thresholds.max_slice_regression``).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

ERROR_CLASSES = ("empty", "truncated", "schema_error", "wrong_label", "missing_entity", "hallucinated_entity",
                 "wrong_set", "ok")
EXAMPLES_PER_CLASS = 3
LENGTH_BUCKETS = ((0, 60, "short (<60 chars)"), (60, 200, "medium (60-199)"), (200, 10**9, "long (200+)"))
MIN_SLICE_SIZE = 5  # smaller slices are reported but never gated: one example would swing them by 20 points

_WORD = re.compile(r"[a-záéíóúñü]+")
_ES = frozenset("de la que el en los las un una por para con no es se del al lo como más pero sus le ya o "
                "este esta quiero busco necesito regalo algo mi mis para barato precio comprar".split())
_EN = frozenset("the of and to a in is it you that for on with as are this be at have i my me want need "
                "looking buy gift cheap price something".split())


def language(text: Any) -> str:
    """'es', 'en' or 'other' by a stop-word vote (good enough to slice shopping queries and e-mails)."""
    words = _WORD.findall(str(text or "").lower())
    es, en = sum(w in _ES for w in words), sum(w in _EN for w in words)
    if es == en:
        return "other"
    return "es" if es > en else "en"


def length_bucket(text: Any) -> str:
    n = len(str(text or ""))
    return next(name for lo, hi, name in LENGTH_BUCKETS if lo <= n < hi)


def _truncated(row: dict, budget: int | None) -> bool:
    text = (row.get("text") or "").rstrip()
    if not text or row.get("json_parsed"):
        return False
    hit_budget = budget is not None and row.get("tokens") is not None and row["tokens"] >= budget
    return hit_budget or text.count("{") > text.count("}")


def error_class(row: dict, budget: int | None = None) -> str:
    """The error class of one scored example (see the module docstring)."""
    if not (row.get("text") or "").strip():
        return "empty"
    if _truncated(row, budget):
        return "truncated"
    if not row.get("json_parsed") or not row.get("schema_valid") or row.get("missing_fields"):
        return "schema_error"
    if not row.get("all_labels_correct"):
        return "wrong_label"
    outcomes = (row.get("entities") or {}).get("outcome", {})
    if any(o in ("miss", "wrong") for o in outcomes.values()):
        return "missing_entity"
    if any(o == "hallucinated" for o in outcomes.values()):
        return "hallucinated_entity"
    if not all(s.get("exact") for s in (row.get("sets") or {}).values()):
        return "wrong_set"
    return "ok"


def error_analysis(rows: list[dict], budget: int | None = None) -> dict:
    """{"counts": {class: n}, "examples": {class: [up to 3 examples]}} over one model's scored rows."""
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        cls = error_class(row, budget)
        counts[cls] += 1
        if cls != "ok" and len(examples[cls]) < EXAMPLES_PER_CLASS:
            examples[cls].append({"index": row.get("index"), "input": row.get("input"),
                                  "output": (row.get("text") or "")[:300], "gold": row.get("gold")})
    return {"counts": {c: counts.get(c, 0) for c in ERROR_CLASSES}, "examples": dict(examples)}


def _gold_value(gold: Any, dotted: str) -> str:
    node = gold
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "(none)" if node is None else str(node)


def slice_keys(row: dict, slice_fields: list[str]) -> list[tuple[str, str]]:
    """The (slice family, slice value) pairs one example belongs to."""
    text = row.get("input")
    keys = [("language", language(text)), ("input_length", length_bucket(text))]
    keys += [(f"gold.{field}", _gold_value(row.get("gold"), field)) for field in slice_fields]
    return keys


def slice_scores(baseline_rows: list[dict], candidate_rows: list[dict], slice_fields: list[str] | None = None) -> list[dict]:
    """Per slice: n, baseline and candidate primary score, delta. Both row lists are in test-set order."""
    if len(baseline_rows) != len(candidate_rows):
        raise ValueError("baseline and candidate were scored on different test sets: re-run the evaluation")
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, row in enumerate(candidate_rows):
        for key in slice_keys(row, list(slice_fields or [])):
            groups[key].append(i)
    out = []
    for (family, value), idx in sorted(groups.items()):
        base = sum(bool(baseline_rows[i].get("primary_correct")) for i in idx) / len(idx)
        cand = sum(bool(candidate_rows[i].get("primary_correct")) for i in idx) / len(idx)
        out.append({"slice": family, "value": value, "n": len(idx), "baseline": round(base, 4),
                    "candidate": round(cand, 4), "delta": round(cand - base, 4), "gated": len(idx) >= MIN_SLICE_SIZE})
    return out


def worst_slice_regression(slices: list[dict]) -> dict | None:
    """The gated slice where the candidate loses most against the baseline (None when no gated slice loses)."""
    losing = [s for s in slices if s["gated"] and s["delta"] < 0]
    return min(losing, key=lambda s: s["delta"]) if losing else None


def report(uc, baseline_rows: list[dict], candidate_rows: list[dict], *, budget: int | None = None) -> dict:
    """What metrics.json's comparison carries: error classes of both models and the slice table."""
    slices = slice_scores(baseline_rows, candidate_rows, list(uc.evaluation.slices))
    return {"errors": {"baseline": error_analysis(baseline_rows, budget),
                       "candidate": error_analysis(candidate_rows, budget)},
            "slices": slices, "worst_slice_regression": worst_slice_regression(slices)}
