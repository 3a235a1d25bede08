"""Drift of this month's batch against the accumulated dataset: pure functions over counts, no I/O.

build_dataset counts the label values and input lengths of both sides (the batch's accepted rows, one per input;
the dataset rows first seen before this run) and calls :func:`drift_report`; validate_dataset shows the report in
validation.json and Data Docs, logs every metric above its warn level at WARNING, and fails the run when
``data.drift.action`` is ``fail`` and a metric is above its fail level.

Metrics, each checked against ``data.drift.<metric>`` (``DriftLevels``: warn, fail):

* ``label_psi`` - population stability index of one label field's distribution, sum (a - e) * ln(a / e) over
  the values, proportions floored at 1e-4 (a value absent on one side counts, it does not divide by zero).
* ``label_js`` - Jensen-Shannon divergence of the same two distributions, base 2 (0 = identical, 1 = disjoint).
* ``unseen_labels`` - share of this month's rows whose value of the field never occurs in the dataset.
* ``length_psi`` - PSI of the input length over the dataset's length deciles.
* ``length_ks`` - two-sample Kolmogorov-Smirnov statistic of the input lengths (exact, from the histograms).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

_FLOOR = 1e-4
STATUS_ORDER = ("n/a", "ok", "warn", "fail")


def proportions(counts: Mapping[Any, int], keys: list[Any]) -> list[float]:
    total = sum(counts.values())
    return [counts.get(k, 0) / total if total else 0.0 for k in keys]


def psi(expected: Mapping[Any, int], actual: Mapping[Any, int]) -> float:
    """Population stability index of ``actual`` against ``expected`` (both: value -> count)."""
    keys = sorted(set(expected) | set(actual), key=str)
    e = [max(p, _FLOOR) for p in proportions(expected, keys)]
    a = [max(p, _FLOOR) for p in proportions(actual, keys)]
    return sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e))


def js_divergence(expected: Mapping[Any, int], actual: Mapping[Any, int]) -> float:
    """Jensen-Shannon divergence, base 2: 0 for identical distributions, 1 for disjoint ones."""
    keys = sorted(set(expected) | set(actual), key=str)
    p, q = proportions(expected, keys), proportions(actual, keys)
    m = [(pi + qi) / 2 for pi, qi in zip(p, q)]

    def kl(x: list[float]) -> float:
        return sum(xi * math.log2(xi / mi) for xi, mi in zip(x, m) if xi > 0)

    return max(0.0, min(1.0, (kl(p) + kl(q)) / 2))


def unseen_share(expected: Mapping[Any, int], actual: Mapping[Any, int]) -> float:
    total = sum(actual.values())
    return sum(n for value, n in actual.items() if value not in expected) / total if total else 0.0


def ks_statistic(expected: Mapping[int, int], actual: Mapping[int, int]) -> float:
    """max |F_expected(x) - F_actual(x)| over every x, from two histograms (value -> count)."""
    n_e, n_a = sum(expected.values()), sum(actual.values())
    if not n_e or not n_a:
        return 0.0
    ce = ca = 0
    worst = 0.0
    for x in sorted(set(expected) | set(actual)):
        ce += expected.get(x, 0)
        ca += actual.get(x, 0)
        worst = max(worst, abs(ce / n_e - ca / n_a))
    return worst


def decile_edges(histogram: Mapping[int, int], buckets: int = 10) -> list[int]:
    """Upper edges (inclusive) of the reference's quantile buckets; the last bucket is open."""
    total = sum(histogram.values())
    edges: list[int] = []
    seen = 0
    k = 1
    for x in sorted(histogram):
        seen += histogram[x]
        while k < buckets and seen >= total * k / buckets:
            if not edges or edges[-1] != x:
                edges.append(x)
            k += 1
    return edges


def bucketed(histogram: Mapping[int, int], edges: list[int]) -> Counter:
    out: Counter = Counter()
    for x, n in histogram.items():
        i = 0
        while i < len(edges) and x > edges[i]:
            i += 1
        out[i] += n
    return out


def _top(counts: Mapping[Any, int]) -> tuple[Any, float]:
    total = sum(counts.values())
    if not total:
        return None, 0.0
    value, n = max(counts.items(), key=lambda kv: (kv[1], str(kv[0])))
    return value, n / total


def _check(metric: str, field: str | None, value: float, levels: Any, detail: str) -> dict:
    status = "fail" if value > levels.fail else "warn" if value > levels.warn else "ok"
    subject = field if field is not None else "input length"
    message = (f"{subject}: {metric} {value:.3f} > {'fail' if status == 'fail' else 'warn'} "
               f"{levels.fail if status == 'fail' else levels.warn:g} (data.drift.{metric}: warn {levels.warn:g}, "
               f"fail {levels.fail:g}); {detail}")
    return {"metric": metric, "field": field, "value": round(value, 4), "warn": levels.warn, "fail": levels.fail,
            "status": status, "message": message if status != "ok" else None}


def not_applicable(reason: str, *, batch_rows: int = 0, reference_rows: int = 0, action: str = "warn") -> dict:
    return {"status": "n/a", "level": "n/a", "reason": reason, "action": action, "batch_rows": batch_rows,
            "reference_rows": reference_rows, "labels": {}, "input_length": {}, "checks": []}


def drift_report(rules: Any, reference_labels: Mapping[str, Mapping[Any, int]],
                 batch_labels: Mapping[str, Mapping[Any, int]], reference_lengths: Mapping[int, int],
                 batch_lengths: Mapping[int, int]) -> dict:
    """The drift section of manifest.json. ``rules`` is the use case's ``data.drift`` (DriftRules); label counts
    are per label field (value -> rows), lengths are histograms (input chars -> rows)."""
    n_ref, n_batch = sum(reference_lengths.values()), sum(batch_lengths.values())
    common = {"batch_rows": n_batch, "reference_rows": n_ref, "action": rules.action}
    if n_ref == 0:
        return not_applicable("first month: the accumulated dataset is empty, nothing to compare with", **common)
    if n_batch < rules.min_rows or n_ref < rules.min_rows:
        return not_applicable(
            f"too few rows for a stable comparison: {n_batch} this month, {n_ref} in the dataset "
            f"(data.drift.min_rows={rules.min_rows})", **common)
    labels: dict[str, dict] = {}
    checks: list[dict] = []
    for field in batch_labels:
        ref, cur = reference_labels.get(field, {}), batch_labels[field]
        top, share = _top(cur)
        ref_share = sum(ref.values()) and ref.get(top, 0) / sum(ref.values())
        unseen = sorted((str(v) for v in cur if v not in ref))
        labels[field] = {
            "psi": round(psi(ref, cur), 4), "js": round(js_divergence(ref, cur), 4),
            "unseen_share": round(unseen_share(ref, cur), 4), "unseen_values": unseen[:10],
            "top": {"value": top, "share": round(share, 4), "reference_share": round(ref_share, 4)},
        }
        detail = (f"{top!r} is {share:.1%} of this month's rows vs {ref_share:.1%} of the accumulated dataset")
        checks.append(_check("label_psi", field, labels[field]["psi"], rules.label_psi, detail))
        checks.append(_check("label_js", field, labels[field]["js"], rules.label_js, detail))
        checks.append(_check("unseen_labels", field, labels[field]["unseen_share"], rules.unseen_labels,
                             f"values never seen before: {', '.join(unseen[:5]) or 'none'}"))
    edges = decile_edges(reference_lengths)
    mean_ref = sum(k * n for k, n in reference_lengths.items()) / n_ref
    mean_cur = sum(k * n for k, n in batch_lengths.items()) / n_batch
    length = {"psi": round(psi(bucketed(reference_lengths, edges), bucketed(batch_lengths, edges)), 4),
              "ks": round(ks_statistic(reference_lengths, batch_lengths), 4), "decile_edges": edges,
              "mean_chars": round(mean_cur, 1), "reference_mean_chars": round(mean_ref, 1)}
    detail = f"mean input {mean_cur:.0f} chars this month vs {mean_ref:.0f} in the accumulated dataset"
    checks.append(_check("length_psi", None, length["psi"], rules.length_psi, detail))
    checks.append(_check("length_ks", None, length["ks"], rules.length_ks, detail))
    level = max((c["status"] for c in checks), key=STATUS_ORDER.index, default="ok")
    # status is the outcome for the run (fail only with action: fail); level is the highest level crossed.
    status = "warn" if level == "fail" and rules.action == "warn" else level
    return {"status": status, "level": level, "reason": None, **common, "labels": labels, "input_length": length,
            "checks": checks}


def drift_failures(report: Mapping[str, Any]) -> list[dict]:
    """The checks that fail validation: above their fail level with action: fail."""
    if report.get("action") != "fail":
        return []
    return [c for c in report.get("checks", []) if c.get("status") == "fail"]
