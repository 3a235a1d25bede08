"""Scoring a model's answers on the frozen test set, and comparing two models with paired statistics.

What is scored comes from the use-case YAML (``fields``): label fields by accuracy, entity fields by micro
precision/recall/F1 over (field, normalised value) pairs, set fields by exact-set accuracy and Jaccard. Every
example also gets one error category so a report can say *how* a model fails, not only how often.

Baseline and candidate answer the same test examples in the same order, so their per-example correctness is
paired: the significance tests (paired bootstrap, McNemar) use that pairing, which is far more sensitive than
comparing two independent accuracies.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

from retrain.schemas.use_case import UseCase

# Error categories, most severe first: an example gets the first one that applies.
CATEGORIES = (
    "invalid_json",
    "missing_field",
    "wrong_label",
    "hallucinated_entity",
    "wrong_entity",
    "wrong_set",
    "ok",
)
INVALID, MISSING, OTHER = "(invalid)", "(missing)", "(other)"
MISSING = object()
# Enough to recognise an example in a report without making metrics.json as big as the test set.
INPUT_EXCERPT = 400
TEXT_EXCERPT = 1000
# Bootstrap resamples are drawn in chunks so memory stays bounded on large test sets.
_BOOTSTRAP_CHUNK_ELEMENTS = 4_000_000
# Below this many discordant pairs the chi-square approximation of McNemar's test is poor; use the exact test.
MCNEMAR_EXACT_BELOW = 25


# --- parsing ---------------------------------------------------------------------------------------


def parse_output(text: Any) -> tuple[dict | None, bool]:
    """(first JSON object in the text or None, whether the whole text was exactly one JSON object).

    Chat models often wrap JSON in code fences or a sentence of prose; the lenient parse rescues those so the
    label fields can still be scored, while the strict flag feeds json_validity (what a consumer that calls
    json.loads on the raw answer would see).
    """
    if not isinstance(text, str) or not text.strip():
        return None, False
    stripped = text.strip()
    try:
        obj = json.loads(stripped)
    except ValueError:
        pass
    else:
        if isinstance(obj, dict):
            return obj, True
    decoder = json.JSONDecoder()
    start = stripped.find("{")
    attempts = 0
    # Each attempt is linear in the text; the cap keeps a long non-JSON answer from going quadratic.
    while start != -1 and attempts < 64:
        attempts += 1
        try:
            obj, _ = decoder.raw_decode(stripped, start)
        except ValueError:
            start = stripped.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            return obj, False
        start = stripped.find("{", start + 1)
    return None, False


def lookup(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return MISSING
        obj = obj[part]
    return obj


def _canonical(value: Any) -> str:
    # json.dumps keeps True and 1 apart (Python's == does not), and sort_keys makes key order irrelevant.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def label_key(value: Any) -> str:
    """How a label value is shown in a confusion matrix (booleans as true/false, like the JSON)."""
    return value if isinstance(value, str) else _canonical(value)


def normalize(value: Any) -> str:
    """Normalised form of an entity or set item: case, Unicode form, spacing and 5 vs "5" do not matter."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(sorted(normalize(v) for v in value)) + "]"
    if isinstance(value, dict):
        return _canonical(value)
    text = unicodedata.normalize("NFKC", str(value)).casefold()
    return " ".join(text.split())


def _present(value: Any) -> bool:
    return value is not MISSING and value is not None and value != ""


def _required_missing(schema: dict, obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of required properties absent from obj (recursing into the nested objects that are there)."""
    missing: list[str] = []
    if not isinstance(obj, dict):
        return missing
    props = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in obj:
            missing.append(prefix + name)
    for name, sub in props.items():
        if isinstance(sub, dict) and sub.get("type") == "object" and isinstance(obj.get(name), dict):
            missing.extend(_required_missing(sub, obj[name], prefix + name + "."))
    return missing


# --- per-example scoring ---------------------------------------------------------------------------


def _score_one(uc: UseCase, validator, gold: dict, pred: dict) -> dict:
    text = pred.get("text")
    obj, strict = parse_output(text)
    schema_error = None
    if obj is not None:
        error = next(iter(validator.iter_errors(obj)), None)
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(root)"
            schema_error = f"{where}: {error.message[:200]}"
    else:
        schema_error = "no JSON object in the output"

    correct = {}
    for field in uc.fields.labels:
        got = lookup(obj, field) if obj is not None else MISSING
        correct[field] = got is not MISSING and _canonical(got) == _canonical(lookup(gold, field))

    # Per field: tp (right value), wrong (different value: a miss and a false claim), miss (not predicted),
    # hallucinated (predicted but the gold answer has none), or absent from both.
    ent = {"tp": 0, "fp": 0, "fn": 0, "hallucinated": [], "wrong": [], "outcome": {}}
    for field in uc.fields.entities:
        g = lookup(gold, field)
        p = lookup(obj, field) if obj is not None else MISSING
        if _present(g) and _present(p):
            outcome = "tp" if normalize(g) == normalize(p) else "wrong"
        elif _present(g):
            outcome = "miss"
        else:
            outcome = "hallucinated" if _present(p) else "none"
        ent["outcome"][field] = outcome
        ent["tp"] += outcome == "tp"
        ent["fp"] += outcome in ("wrong", "hallucinated")
        ent["fn"] += outcome in ("wrong", "miss")
        if outcome in ("wrong", "miss"):
            ent["wrong"].append(field)
        elif outcome == "hallucinated":
            ent["hallucinated"].append(field)

    sets = {}
    for field in uc.fields.sets:
        g = lookup(gold, field)
        p = lookup(obj, field) if obj is not None else MISSING
        gs = {normalize(v) for v in g} if isinstance(g, list) else set()
        if isinstance(p, list):
            ps = {normalize(v) for v in p}
            union = gs | ps
            jaccard = len(gs & ps) / len(union) if union else 1.0
            sets[field] = {"exact": gs == ps, "jaccard": jaccard}
        else:
            sets[field] = {"exact": False, "jaccard": 0.0}

    missing = []
    if obj is not None:
        missing = _required_missing(uc.output_schema, obj)
        for field in (*uc.fields.labels, *uc.fields.sets):
            if lookup(obj, field) is MISSING and field not in missing:
                missing.append(field)

    if obj is None:
        category = "invalid_json"
    elif missing:
        category = "missing_field"
    elif not all(correct.values()):
        category = "wrong_label"
    elif ent["hallucinated"]:
        category = "hallucinated_entity"
    elif ent["wrong"]:
        category = "wrong_entity"
    elif not all(s["exact"] for s in sets.values()):
        category = "wrong_set"
    else:
        category = "ok"

    latency = pred.get("latency_s")
    return {
        "gold": gold,
        "predicted": obj,
        "text": text[:TEXT_EXCERPT] if isinstance(text, str) else None,
        "error": pred.get("error"),
        "json_valid": strict,
        "json_parsed": obj is not None,
        "schema_valid": schema_error is None,
        "schema_error": schema_error,
        "correct": correct,
        "primary_correct": correct[uc.primary_label],
        "all_labels_correct": all(correct.values()),
        "exact_match": obj is not None and _canonical(obj) == _canonical(gold),
        "entities": ent,
        "sets": sets,
        "missing_fields": missing,
        "category": category,
        "latency_s": float(latency) if isinstance(latency, (int, float)) and not isinstance(latency, bool) else None,
        "tokens": pred.get("tokens") if isinstance(pred.get("tokens"), int) else None,
    }


# --- aggregation -----------------------------------------------------------------------------------


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def _confusion(uc: UseCase, field: str, rows: list[dict]) -> dict:
    allowed = [label_key(v) for v in uc.allowed_labels[field]]
    # Compared canonically so the string "true" is not mistaken for the boolean true.
    allowed_canonical = {_canonical(v) for v in uc.allowed_labels[field]}
    counts: Counter = Counter()
    for row in rows:
        gold_value = lookup(row["gold"], field)
        gold = MISSING if gold_value is MISSING else label_key(gold_value)
        obj = row["predicted"]
        if obj is None:
            pred = INVALID
        else:
            value = lookup(obj, field)
            if value is MISSING:
                pred = MISSING
            else:
                pred = label_key(value) if _canonical(value) in allowed_canonical else OTHER
        counts[(gold, pred)] += 1
    # Columns: the allowed labels, then only the failure columns that actually occur (keeps plots readable).
    extra = [c for c in (OTHER, MISSING, INVALID) if any(p == c for _, p in counts)]
    gold_extra = sorted({g for g, _ in counts} - set(allowed))
    labels = allowed + gold_extra
    columns = labels + extra
    matrix = [[counts[(g, p)] for p in columns] for g in labels]
    per_class = {}
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(matrix[r][i] for r in range(len(labels)))
        per_class[label] = {**_prf(tp, predicted - tp, support - tp), "support": support}
    return {"labels": labels, "columns": columns, "matrix": matrix, "per_class": per_class}


def score_predictions(
    uc: UseCase,
    references: list[dict],
    predictions: list[dict],
    *,
    inputs: list[str] | None = None,
    wall_seconds: float | None = None,
) -> dict:
    """Score one model's predictions against the gold outputs.

    references: parsed gold outputs, in test.jsonl order. predictions: the inference layer's results
    ({"text", "latency_s", "tokens", "error"}), same order. inputs (optional): the raw inputs, kept as
    excerpts so a report can show the worst errors. wall_seconds (optional): elapsed time of the whole
    evaluation, for throughput; without it throughput is derived from the per-example latencies.
    Returns {"aggregate": {...}, "per_example": [...]}.
    """
    if len(references) != len(predictions):
        raise ValueError(
            f"got {len(references)} gold outputs but {len(predictions)} predictions: the inference layer must "
            "return exactly one result per test example, in test.jsonl order; re-run the evaluation"
        )
    if not references:
        raise ValueError("the test set is empty: nothing to score (check test.jsonl in the run directory)")
    if inputs is not None and len(inputs) != len(references):
        raise ValueError(f"got {len(inputs)} inputs for {len(references)} gold outputs; pass one input per example")
    import jsonschema

    validator = jsonschema.Draft202012Validator(uc.output_schema)
    rows = []
    for i, (gold, pred) in enumerate(zip(references, predictions)):
        row = {"index": i, **_score_one(uc, validator, gold, pred or {})}
        if inputs is not None:
            row["input"] = inputs[i][:INPUT_EXCERPT] if isinstance(inputs[i], str) else None
        rows.append(row)

    n = len(rows)
    accuracy = {f: sum(r["correct"][f] for r in rows) / n for f in uc.fields.labels}
    entities = None
    if uc.fields.entities:
        tp, fp, fn = (sum(r["entities"][k] for r in rows) for k in ("tp", "fp", "fn"))
        per_field = {}
        for field in uc.fields.entities:
            outcomes = Counter(r["entities"]["outcome"][field] for r in rows)
            per_field[field] = _prf(
                outcomes["tp"], outcomes["wrong"] + outcomes["hallucinated"], outcomes["wrong"] + outcomes["miss"]
            )
        entities = {
            **_prf(tp, fp, fn),
            "hallucinated": sum(len(r["entities"]["hallucinated"]) for r in rows),
            "examples_with_hallucination": sum(bool(r["entities"]["hallucinated"]) for r in rows),
            "per_field": per_field,
        }
    sets = {
        f: {
            "exact_accuracy": sum(r["sets"][f]["exact"] for r in rows) / n,
            "jaccard": sum(r["sets"][f]["jaccard"] for r in rows) / n,
        }
        for f in uc.fields.sets
    }
    # A failed request reports latency 0 (the inference layer's convention): it would flatter p50/p95.
    latencies = [r["latency_s"] for r in rows if r["latency_s"] is not None and not r["error"]]
    tokens = [r["tokens"] for r in rows if r["tokens"] is not None]
    if wall_seconds and wall_seconds > 0:
        seconds, source = float(wall_seconds), "wall_clock"
    elif latencies and sum(latencies) > 0:
        # Serial-equivalent estimate: understates a batched engine's real throughput; pass wall_seconds instead.
        seconds, source = float(sum(latencies)), "sum_of_latencies"
    else:
        seconds, source = None, "unmeasured"
    confusion = {f: _confusion(uc, f, rows) for f in uc.fields.labels}
    categories = Counter(r["category"] for r in rows)
    aggregate = {
        "n": n,
        "use_case": uc.name,
        "primary_label": uc.primary_label,
        "primary_score": accuracy[uc.primary_label],
        "accuracy": accuracy,
        "label_accuracy_macro": sum(accuracy.values()) / len(accuracy),
        "all_labels_accuracy": sum(r["all_labels_correct"] for r in rows) / n,
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "json_validity": sum(r["json_valid"] for r in rows) / n,
        "json_parseable": sum(r["json_parsed"] for r in rows) / n,
        "schema_validity": sum(r["schema_valid"] for r in rows) / n,
        "entities": entities,
        "sets": sets,
        "latency": {
            "p50": _percentile(latencies, 50),
            "p95": _percentile(latencies, 95),
            "mean": sum(latencies) / len(latencies) if latencies else None,
            "max": max(latencies) if latencies else None,
            "measured": len(latencies),
        },
        "throughput": {
            "examples_per_s": n / seconds if seconds else None,
            "tokens_per_s": sum(tokens) / seconds if seconds and tokens else None,
            "seconds": seconds,
            "source": source,
        },
        "confusion": {f: {k: c[k] for k in ("labels", "columns", "matrix")} for f, c in confusion.items()},
        "per_class": {f: c["per_class"] for f, c in confusion.items()},
        "error_categories": {c: categories.get(c, 0) for c in CATEGORIES},
        "inference_errors": sum(1 for r in rows if r["error"]),
    }
    return {"aggregate": aggregate, "per_example": rows}


# --- significance ----------------------------------------------------------------------------------


def paired_bootstrap(a: list[float], b: list[float], *, n: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Paired bootstrap of mean(b) - mean(a): resample examples (keeping each pair together).

    p is two-sided: twice the share of resampled differences on the far side of zero, with the +1 correction
    so a finite number of resamples never claims p = 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired samples must have equal length, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired_bootstrap needs at least one pair")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be between 0 and 1 (e.g. 0.95), got {ci}")
    import numpy as np

    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    m = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // m)
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        means[start:start + k] = d[rng.integers(0, m, size=(k, m))].mean(axis=1)
    alpha = (1 - ci) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    below = int((means <= 0).sum())
    above = int((means >= 0).sum())
    p = min(1.0, 2 * (min(below, above) + 1) / (n + 1))
    return {
        "diff": float(d.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "ci": ci,
        "p": p,
        "n_resamples": n,
        "n": m,
        "seed": seed,
    }


def _binom_two_sided_half(k: int, n: int) -> float:
    # Exact two-sided binomial test with p=0.5: the distribution is symmetric, so it is twice the smaller tail.
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """McNemar's test on paired correctness. b01: a wrong & b right; b10: a right & b wrong.

    Exact binomial test when there are fewer than 25 discordant pairs, chi-square with continuity correction
    otherwise (the usual rule: the approximation is poor for small counts).
    """
    if len(a_correct) != len(b_correct):
        raise ValueError(f"paired samples must have equal length, got {len(a_correct)} and {len(b_correct)}")
    b01 = sum(1 for x, y in zip(a_correct, b_correct) if not x and y)
    b10 = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    discordant = b01 + b10
    if discordant == 0:
        return {"b01": 0, "b10": 0, "statistic": 0.0, "p": 1.0, "method": "no_discordant_pairs"}
    if discordant < MCNEMAR_EXACT_BELOW:
        return {"b01": b01, "b10": b10, "statistic": float(min(b01, b10)),
                "p": _binom_two_sided_half(min(b01, b10), discordant), "method": "exact_binomial"}
    stat = (abs(b01 - b10) - 1) ** 2 / discordant
    # Survival function of chi-square with 1 degree of freedom, without importing scipy.
    p = math.erfc(math.sqrt(stat / 2))
    return {"b01": b01, "b10": b10, "statistic": float(stat), "p": float(p), "method": "chi2_continuity"}


# --- comparison ------------------------------------------------------------------------------------

def _headline(agg: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {
        "primary_score": agg["primary_score"],
        "label_accuracy_macro": agg["label_accuracy_macro"],
        "all_labels_accuracy": agg["all_labels_accuracy"],
        "exact_match": agg["exact_match"],
        "json_validity": agg["json_validity"],
        "json_parseable": agg["json_parseable"],
        "schema_validity": agg["schema_validity"],
    }
    for field, value in agg["accuracy"].items():
        out[f"accuracy:{field}"] = value
    if agg.get("entities"):
        for k in ("precision", "recall", "f1"):
            out[f"entity_{k}"] = agg["entities"][k]
        out["hallucinated_entities"] = agg["entities"]["hallucinated"]
    for field, s in agg["sets"].items():
        out[f"set_exact:{field}"] = s["exact_accuracy"]
        out[f"set_jaccard:{field}"] = s["jaccard"]
    out["latency_p50"] = agg["latency"]["p50"]
    out["latency_p95"] = agg["latency"]["p95"]
    out["latency_mean"] = agg["latency"]["mean"]
    out["throughput"] = agg["throughput"]["examples_per_s"]
    return out


LOWER_IS_BETTER = {"latency_p50", "latency_p95", "latency_mean", "hallucinated_entities"}


def compare(uc: UseCase, baseline: dict, candidate: dict, *, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Baseline vs candidate (both score_predictions outputs): every headline metric side by side, plus
    significance of the primary score's difference (paired bootstrap CI and McNemar's test)."""
    base_rows, cand_rows = baseline["per_example"], candidate["per_example"]
    if len(base_rows) != len(cand_rows):
        raise ValueError(
            f"baseline was scored on {len(base_rows)} examples and the candidate on {len(cand_rows)}: both must "
            "answer the same test.jsonl; re-run the evaluation for both models"
        )
    for br, cr in zip(base_rows, cand_rows):
        if _canonical(br["gold"]) != _canonical(cr["gold"]):
            raise ValueError(
                f"example {br['index']} has different gold outputs for baseline and candidate: the two models were "
                "scored on different test sets (or in a different order); re-run the evaluation for both"
            )
    base_head, cand_head = _headline(baseline["aggregate"]), _headline(candidate["aggregate"])
    metrics = {}
    for name in cand_head:
        b, c = base_head.get(name), cand_head[name]
        delta = c - b if b is not None and c is not None else None
        relative = delta / b if delta is not None and b else None
        metrics[name] = {"baseline": b, "candidate": c, "delta": delta, "relative": relative,
                         "higher_is_better": name not in LOWER_IS_BETTER}
    a_ok = [r["primary_correct"] for r in base_rows]
    b_ok = [r["primary_correct"] for r in cand_rows]
    boot = paired_bootstrap([float(x) for x in a_ok], [float(x) for x in b_ok], n=n_resamples, seed=seed)
    mc = mcnemar(a_ok, b_ok)
    # Regressions (baseline right, candidate wrong) are what a reviewer should look at first.
    regressions = [br["index"] for br, cr in zip(base_rows, cand_rows) if br["primary_correct"] and not cr["primary_correct"]]
    return {
        "use_case": uc.name,
        "primary_label": uc.primary_label,
        "n": len(cand_rows),
        "metrics": metrics,
        "significance": {
            "metric": f"accuracy:{uc.primary_label}",
            "bootstrap": boot,
            "mcnemar": mc,
            "significant": bool(boot["ci_low"] > 0 and mc["p"] < 0.05),
        },
        "regressions": regressions[:50],
        "regression_count": len(regressions),
    }


def _baseline_summary(agg: dict, cand_agg: dict, label: str | None) -> dict:
    base, cand = agg["primary_score"], cand_agg["primary_score"]
    return {"label": label, "primary_score": base, "json_validity": agg["json_validity"],
            "schema_validity": agg["schema_validity"], "exact_match": agg["exact_match"],
            "delta": cand - base, "relative_gain": (cand - base) / base if base else None}


def add_baselines(comparison: dict, candidate: dict, prompted: dict, production: dict | None = None, *,
                  labels: dict | None = None) -> dict:
    """Name both baselines in a comparison (``compare``'s output, made against the gate's reference: production
    when it exists, else the prompted base model). Adds, per headline metric, the prompted base model's value
    (``base_model_prompted``) and the production model's (``production``, when one exists), and
    ``comparison["baselines"]``: each baseline's headline scores and the candidate's gain over it. Existing keys keep
    their meaning: ``baseline`` is the reference."""
    labels = labels or {}
    cand_agg = candidate["aggregate"]
    heads = {"base_model_prompted": _headline(prompted["aggregate"])}
    if production is not None:
        heads["production"] = _headline(production["aggregate"])
    for name, m in comparison["metrics"].items():
        for kind, head in heads.items():
            m[kind] = head.get(name)
    comparison["baseline_kind"] = "production" if production is not None else "base_model"
    comparison["reference"] = "production" if production is not None else "base_model_prompted"
    comparison["baselines"] = {
        "base_model_prompted": _baseline_summary(prompted["aggregate"], cand_agg, labels.get("base_model_prompted")),
        "production": (_baseline_summary(production["aggregate"], cand_agg, labels.get("production"))
                       if production is not None else None),
    }
    return comparison


# --- run-directory helpers -------------------------------------------------------------------------


def load_test_set(uc: UseCase, path: str | Path) -> tuple[list[str], list[dict]]:
    """(raw inputs, parsed gold outputs) from a chat-format test.jsonl written by build_dataset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the dataset for this run first (retrain build)")
    inputs, references = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                messages = {m["role"]: m["content"] for m in json.loads(line)["messages"]}
                inputs.append(uc.extract_input(messages["user"]))
                references.append(json.loads(messages["assistant"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{lineno} is not a chat example with user and assistant messages ({exc}); "
                    "rebuild the dataset (retrain build)"
                ) from None
    return inputs, references


def write_metrics(run_dir: str | Path, baseline: dict, candidate: dict, comparison: dict, *,
                  base_model_prompted: dict | None = None) -> Path:
    """run_dir/evaluation/metrics.json: the score outputs (with per-example rows) and the comparison.

    ``baseline`` is the gate's reference (production, or the prompted base model on a first run);
    ``base_model_prompted`` the prompted base model's scores (the same as ``baseline`` on a first run)."""
    from retrain.rundir import RunDir, write_json

    data = {"baseline": baseline, "candidate": candidate, "comparison": comparison}
    if base_model_prompted is not None:
        data["base_model_prompted"] = base_model_prompted
    return write_json(RunDir(run_dir).metrics, data)
