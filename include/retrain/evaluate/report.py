"""Evaluation report: HTML (self-contained, plots embedded) and Markdown (plots as sibling PNG files).

Written to run_dir/evaluation/ next to metrics.json. The report is for the person who has to trust (or
overrule) the gate: the decision and every check come first, then the numbers, then the worst mistakes with
the input that caused them.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from retrain.schemas.use_case import UseCase
from retrain.evaluate.analysis import ERROR_CLASSES
from retrain.evaluate.gate import decide, decision_text, override_note
from retrain.rundir import RunDir, atomic_write, read_json, write_json
from retrain.evaluate.metrics import CATEGORIES

__all__ = ["write_report", "decision_text", "worst_errors"]

_SEVERITY = {c: i for i, c in enumerate(CATEGORIES)}
_BAR_METRICS = (
    ("primary_score", "primary accuracy"),
    ("label_accuracy_macro", "label accuracy (macro)"),
    ("all_labels_accuracy", "all labels right"),
    ("exact_match", "exact match"),
    ("json_validity", "JSON validity"),
    ("schema_validity", "schema validity"),
    ("entity_f1", "entity F1"),
)


# --- plots -----------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    # The object API (no pyplot) draws with Agg, keeps no global figure registry and needs no display,
    # so it is safe inside a long-lived Airflow worker.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot_confusion(path: Path, confusion: dict, title: str) -> Path:
    import numpy as np

    labels, columns, matrix = confusion["labels"], confusion["columns"], np.asarray(confusion["matrix"], float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    fig = _figure(max(4.5, 0.8 * len(columns) + 2.5), max(3.5, 0.55 * len(labels) + 2))
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=10)
    for i in range(len(labels)):
        for j in range(len(columns)):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.savefig(path, format="png")
    return path


def _three_models(comparison: dict) -> bool:
    """Whether a production model and the prompted base model were both scored (else one baseline column)."""
    baselines = comparison.get("baselines") or {}
    return bool(baselines.get("production") and baselines.get("base_model_prompted"))


def _bar_values(comparison: dict) -> list[tuple[str, float, float, float | None]]:
    """(label, baseline, candidate, prompted base model or None) per plotted metric."""
    metrics = comparison["metrics"]
    third = _three_models(comparison)
    out = []
    for key, label in _BAR_METRICS:
        m = metrics.get(key)
        if m and m["baseline"] is not None and m["candidate"] is not None:
            out.append((label, m["baseline"], m["candidate"], m.get("base_model_prompted") if third else None))
    for key, m in metrics.items():
        if key.startswith("set_jaccard:") and m["baseline"] is not None:
            out.append((f"{key.split(':', 1)[1]} Jaccard", m["baseline"], m["candidate"],
                        m.get("base_model_prompted") if third else None))
    return out


def _plot_bars(path: Path, comparison: dict, names: dict) -> Path:
    values = _bar_values(comparison)
    fig = _figure(7, 0.45 * len(values) + 1.5)
    ax = fig.add_subplot()
    ys = range(len(values))
    if _three_models(comparison):
        ax.barh([y + 0.27 for y in ys], [v[3] or 0.0 for v in values], height=0.27,
                label=names.get("base_model_prompted", "prompted base model"), color="#d9e2ec")
        ax.barh(list(ys), [v[1] for v in values], height=0.27, label=names["baseline"], color="#9aa5b1")
        ax.barh([y - 0.27 for y in ys], [v[2] for v in values], height=0.27, label=names["candidate"],
                color="#2f6fde")
    else:
        ax.barh([y + 0.2 for y in ys], [v[1] for v in values], height=0.4, label=names["baseline"], color="#9aa5b1")
        ax.barh([y - 0.2 for y in ys], [v[2] for v in values], height=0.4, label=names["candidate"], color="#2f6fde")
    ax.set_yticks(list(ys), [v[0] for v in values], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (higher is better)")
    # Below the axes: inside, it would hide the bars that reach 1.0.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3 if _three_models(comparison) else 2,
              frameon=False)
    ax.set_title("baselines vs candidate" if _three_models(comparison) else "baseline vs candidate", fontsize=10)
    fig.savefig(path, format="png")
    return path


def _plot_latency(path: Path, base_rows: list[dict], cand_rows: list[dict], names: dict) -> Path:
    fig = _figure(7, 3.2)
    ax = fig.add_subplot()
    def measured(rows: list[dict]) -> list[float]:
        return [r["latency_s"] for r in rows if r["latency_s"] is not None and not r.get("error")]

    series = [(names["baseline"], measured(base_rows), "#9aa5b1"), (names["candidate"], measured(cand_rows), "#2f6fde")]
    if not any(s[1] for s in series):
        ax.text(0.5, 0.5, "latency was not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        import numpy as np

        everything = [x for _, xs, _ in series for x in xs]
        bins = np.linspace(min(everything), max(everything) or 1.0, 30)
        for name, xs, color in series:
            if xs:
                ax.hist(xs, bins=bins, alpha=0.55, label=f"{name} (p95 {np.percentile(xs, 95):.3f} s)", color=color)
                ax.axvline(float(np.percentile(xs, 95)), color=color, linestyle="--", linewidth=1)
        ax.set_xlabel("latency per example (s)")
        ax.set_ylabel("examples")
        ax.legend(fontsize=8)
    ax.set_title("latency distribution (dashed: p95)", fontsize=10)
    fig.savefig(path, format="png")
    return path


# --- content ---------------------------------------------------------------------------------------


def worst_errors(baseline_scores: dict, candidate_scores: dict, n: int = 10) -> list[dict]:
    """The candidate's n most instructive mistakes: regressions (baseline right on the primary label,
    candidate wrong) first, then by severity of the error category, then slowest first."""
    base = {r["index"]: r for r in baseline_scores["per_example"]}
    wrong = [r for r in candidate_scores["per_example"] if r["category"] != "ok"]

    def key(r: dict) -> tuple:
        b = base.get(r["index"])
        regression = bool(b and b["primary_correct"] and not r["primary_correct"])
        return (not regression, _SEVERITY.get(r["category"], 99), -(r["latency_s"] or 0.0), r["index"])

    out = []
    for r in sorted(wrong, key=key)[:n]:
        b = base.get(r["index"])
        out.append({
            "index": r["index"],
            "category": r["category"],
            "regression": bool(b and b["primary_correct"] and not r["primary_correct"]),
            "baseline_category": b["category"] if b else None,
            "input": r.get("input"),
            "gold": json.dumps(r["gold"], ensure_ascii=False),
            "predicted": json.dumps(r["predicted"], ensure_ascii=False) if r["predicted"] is not None
            else (r.get("text") or r.get("error") or ""),
            "detail": _detail(r),
        })
    return out


def _detail(r: dict) -> str:
    parts = []
    if r.get("error"):
        parts.append(f"inference error: {r['error']}")
    if r["missing_fields"]:
        parts.append("missing " + ", ".join(r["missing_fields"]))
    wrong_labels = [f for f, ok in r["correct"].items() if not ok]
    if wrong_labels and r["predicted"] is not None:
        parts.append("wrong " + ", ".join(wrong_labels))
    if r["entities"]["hallucinated"]:
        parts.append("hallucinated " + ", ".join(r["entities"]["hallucinated"]))
    if r["entities"]["wrong"] and r["predicted"] is not None:
        parts.append("wrong/missed entity " + ", ".join(r["entities"]["wrong"]))
    bad_sets = [f for f, s in r["sets"].items() if not s["exact"]]
    if bad_sets and r["predicted"] is not None:
        parts.append("set differs: " + ", ".join(bad_sets))
    if not r["schema_valid"] and r["predicted"] is not None:
        parts.append(f"schema: {r['schema_error']}")
    return "; ".join(parts)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if pct:
            return f"{value * 100:.1f}%"
        # p-values are often tiny: keep their significant digits instead of printing 0.000.
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.3f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def _metric_header(comparison: dict, names: dict) -> list[str]:
    head = ["metric"] + (["prompted base model"] if _three_models(comparison) else [])
    return head + [_column(names["baseline"]), "candidate", "delta", "relative"]


def _column(label: str) -> str:
    """'baseline (production v2: v2)' -> 'baseline (production v2)': the table header stays short."""
    return label.split(":")[0] + (")" if "(" in label and ":" in label else "")


def _metric_rows(comparison: dict) -> list[list[str]]:
    third = _three_models(comparison)
    rows = []
    for name, m in comparison["metrics"].items():
        pct = not (name.startswith("latency") or name in ("throughput", "hallucinated_entities"))
        unit = " s" if name.startswith("latency") else (" ex/s" if name == "throughput" else "")
        delta = m["delta"]
        if delta is None:
            d = "n/a"
        elif pct:
            d = f"{delta * 100:+.1f} pt"
        else:
            d = f"{delta:+.3f}{unit}"
        rel = f"{m['relative'] * 100:+.1f}%" if m["relative"] is not None else ""
        def shown(value):
            return _fmt(value, pct) + ("" if pct or value is None else unit)

        rows.append([name, *([shown(m.get("base_model_prompted"))] if third else []), shown(m["baseline"]),
                     shown(m["candidate"]), d, rel])
    return rows


def _baseline_rows(comparison: dict, names: dict) -> list[list[str]]:
    """One row per baseline: its headline scores and the candidate's gain over it."""
    rows = []
    for kind, default in (("base_model_prompted", "prompted base model"), ("production", "production model")):
        b = (comparison.get("baselines") or {}).get(kind)
        if not b:
            continue
        ref = comparison.get("reference") == kind
        rows.append([b.get("label") or names.get(kind) or default, "yes" if ref else "no",
                     _fmt(b["primary_score"]), _fmt(b["json_validity"], True), _fmt(b["schema_validity"], True),
                     f"{b['delta']:+.3f}", "undefined (0 baseline)" if b["relative_gain"] is None
                     else f"{b['relative_gain'] * 100:+.1f}%"])
    return rows


_BASELINE_HEADER = ["baseline", "gate reference", "primary score", "JSON validity", "schema validity",
                    "candidate delta", "candidate relative gain"]


def _baselines_line(comparison: dict, names: dict) -> str:
    """Who was scored: the baselines (or the one baseline of an older run) and the candidate."""
    rows = _baseline_rows(comparison, names)
    if not rows:
        return f"Baseline: {names['baseline']}"
    return "Baselines: " + " · ".join(f"{r[0]} {r[2]}" + (" (gate reference)" if r[1] == "yes" else "")
                                      for r in rows)


def _per_class_rows(uc: UseCase, baseline_scores: dict, candidate_scores: dict) -> list[list[str]]:
    field = uc.primary_label
    b = baseline_scores["aggregate"]["per_class"][field]
    c = candidate_scores["aggregate"]["per_class"][field]
    return [[label, str(c[label]["support"]), _fmt(b.get(label, {}).get("f1")), _fmt(c[label]["precision"]),
             _fmt(c[label]["recall"]), _fmt(c[label]["f1"])] for label in c]


def _category_rows(baseline_scores: dict, candidate_scores: dict, comparison: dict | None = None) -> list[list[str]]:
    """Error classes of both models (retrain.evaluate.analysis), or the scorer's categories for older metrics."""
    errors = ((comparison or {}).get("analysis") or {}).get("errors")
    if errors:
        b, c = errors["baseline"]["counts"], errors["candidate"]["counts"]
        return [[cls, str(b.get(cls, 0)), str(c.get(cls, 0))] for cls in ERROR_CLASSES]
    b = baseline_scores["aggregate"]["error_categories"]
    c = candidate_scores["aggregate"]["error_categories"]
    return [[cat, str(b.get(cat, 0)), str(c.get(cat, 0))] for cat in CATEGORIES]


def _error_example_rows(comparison: dict) -> list[list[str]]:
    """Up to three examples of each error class, for each model."""
    errors = (comparison.get("analysis") or {}).get("errors") or {}
    rows = []
    for model in ("candidate", "baseline"):
        for cls, examples in (errors.get(model) or {}).get("examples", {}).items():
            for x in examples:
                rows.append([model, cls, str(x.get("index")), str(x.get("input") or "")[:200],
                             str(x.get("output") or "")[:200]])
    return rows


def _slice_rows(comparison: dict) -> list[list[str]]:
    return [[s["slice"], s["value"], str(s["n"]), f"{s['baseline']:.3f}", f"{s['candidate']:.3f}",
             f"{s['delta']:+.3f}", "" if s["gated"] else "too small to gate"]
            for s in (comparison.get("analysis") or {}).get("slices", [])]


def _significance_line(comparison: dict) -> str:
    sig = comparison.get("significance") or {}
    boot, mc = sig.get("bootstrap"), sig.get("mcnemar")
    if not boot or not mc:
        return "no significance results"
    return (f"{sig['metric']}: difference {boot['diff']:+.3f}, {boot['ci'] * 100:.0f}% paired-bootstrap CI "
            f"[{boot['ci_low']:+.3f}, {boot['ci_high']:+.3f}] ({boot['n_resamples']} resamples, p={boot['p']:.3g}); "
            f"McNemar ({mc['method']}): candidate fixed {mc['b01']}, broke {mc['b10']}, p={mc['p']:.3g} — "
            + ("significant" if sig.get("significant") else "not significant"))


# --- HTML ------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#1f2933;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #d9e2ec;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #d9e2ec;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f0f4f8}.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:.2em .8em;border-radius:.3em;color:#fff;font-weight:bold}
.GO{background:#2f9e44}.NO-GO{background:#c92a2a}.pass{color:#2f9e44;font-weight:bold}
.fail{color:#c92a2a;font-weight:bold}.info{color:#627d98;font-weight:bold}
pre,code{font-family:ui-monospace,Menlo,monospace;font-size:.85em;white-space:pre-wrap;word-break:break-word}
img{max-width:100%;border:1px solid #d9e2ec;margin:.4em 0}.muted{color:#627d98}
"""


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{e(c)}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _overrides_html(decision: dict) -> str:
    items = "".join(f"<li>{html.escape(override_note(o))}</li>" for o in decision.get("overrides") or [])
    return f'<h2>Gate overrides</h2><ul class="fail">{items}</ul>\n' if items else ""


_BASELINES_NOTE = ("The prompted base model is the untuned base model told every label (evaluation.baseline_prompt, "
                   "or one generated from output_schema) and decoded under the schema from the first token; the "
                   "gate's relative-gain rule uses the production model when one exists, else this one.")


def _baselines_html(comparison: dict, names: dict) -> str:
    rows = _baseline_rows(comparison, names)
    if not rows:
        return ""
    return (f"<h2>Baselines</h2>\n{_table(_BASELINE_HEADER, rows, numeric_from=2)}\n"
            f"<p class=muted>{html.escape(_BASELINES_NOTE)}</p>\n")


def _baselines_md(comparison: dict, names: dict) -> list[str]:
    rows = _baseline_rows(comparison, names)
    return ["## Baselines", "", _md_table(_BASELINE_HEADER, rows), "", _BASELINES_NOTE, ""] if rows else []


def _overrides_md(decision: dict) -> list[str]:
    notes = [f"- {override_note(o)}" for o in decision.get("overrides") or []]
    return ["## Gate overrides", "", *notes, ""] if notes else []


def _html(uc, comparison, decision, baseline_scores, candidate_scores, names, plots, errors) -> str:
    e = html.escape
    d = decision["decision"]
    checks = "".join(
        "<tr><td>{}</td><td class={}>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td><td>{}</td></tr>".format(
            e(c["name"]),
            ("pass" if c["passed"] else "fail") if c["required"] else "info",
            ("PASS" if c["passed"] else "FAIL") if c["required"] else ("yes" if c["passed"] else "no"),
            "required" if c["required"] else "info",
            e(_fmt(c["value"])), e(_fmt(c["threshold"])), e(c["reason"]),
        )
        for c in decision["checks"]
    )
    err_rows = "".join(
        "<tr><td class=num>{}</td><td>{}{}</td><td><pre>{}</pre></td><td><pre>{}</pre></td><td><pre>{}</pre></td>"
        "<td>{}</td></tr>".format(
            x["index"], e(x["category"]), " <b>(regression)</b>" if x["regression"] else "",
            e(x["input"] or ""), e(x["gold"]), e(x["predicted"][:1000]), e(x["detail"]),
        )
        for x in errors
    )
    n_base, n_cand = len(baseline_scores["per_example"]), len(candidate_scores["per_example"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(uc.name)} evaluation: {e(d)}</title>
<style>{_CSS}</style></head><body>
<h1>{e(uc.name)} — evaluation report <span class="badge {e(d)}">{e(d)}</span></h1>
<p>{e(decision['summary'])}</p>
<p class=muted>{e(_baselines_line(comparison, names))} ({e(decision.get('baseline_kind', ''))}) · Candidate:
{e(names['candidate'])} · {n_cand} test examples · primary label <code>{e(uc.primary_label)}</code></p>
{_overrides_html(decision)}<h2>Decision checks</h2>
<table><tr><th>check</th><th>result</th><th>kind</th><th>value</th><th>threshold</th><th>reason</th></tr>{checks}</table>
{_baselines_html(comparison, names)}<h2>Significance</h2><p>{e(_significance_line(comparison))}</p>
<h2>Metrics</h2>
{_table(_metric_header(comparison, names), _metric_rows(comparison))}
{_img(plots["bars"], "baseline vs candidate metrics")}
<h2>Confusion matrix: {e(uc.primary_label)}</h2>
{_img(plots["confusion_candidate"], "candidate confusion matrix")}
{_img(plots["confusion_baseline"], "baseline confusion matrix")}
{_table(["class", "support", "baseline F1", "precision", "recall", "F1"], _per_class_rows(uc, baseline_scores, candidate_scores))}
<h2>Latency</h2>
{_img(plots["latency"], "latency distribution")}
<h2>Error categories</h2>
{_table(["category", f"baseline (n={n_base})", f"candidate (n={n_cand})"], _category_rows(baseline_scores, candidate_scores, comparison))}
<h3>Examples per error class</h3>
{_table(["model", "class", "#", "input", "output"], _error_example_rows(comparison), numeric_from=9)}
<h2>Slices</h2>
{_table(["slice", "value", "n", "baseline", "candidate", "delta", "note"], _slice_rows(comparison), numeric_from=2)}
<h2>Worst candidate errors ({len(errors)})</h2>
<table><tr><th>#</th><th>category</th><th>input</th><th>gold</th><th>predicted</th><th>what is wrong</th></tr>{err_rows}</table>
</body></html>
"""


# --- Markdown --------------------------------------------------------------------------------------


def _md_cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _markdown(uc, comparison, decision, baseline_scores, candidate_scores, names, plots, errors) -> str:
    checks = [[c["name"], ("PASS" if c["passed"] else "FAIL") if c["required"] else "info",
               _fmt(c["value"]), _fmt(c["threshold"]), c["reason"]] for c in decision["checks"]]
    errs = [[str(x["index"]), x["category"] + (" (regression)" if x["regression"] else ""), (x["input"] or "")[:200],
             x["gold"][:300], x["predicted"][:300], x["detail"]] for x in errors]
    parts = [
        f"# {uc.name} — evaluation report: **{decision['decision']}**",
        "",
        decision["summary"],
        "",
        f"{_baselines_line(comparison, names)} ({decision.get('baseline_kind', '')}) · Candidate: {names['candidate']} · "
        f"{len(candidate_scores['per_example'])} test examples · primary label `{uc.primary_label}`",
        "",
        *_overrides_md(decision),
        "## Decision checks",
        "",
        _md_table(["check", "result", "value", "threshold", "reason"], checks),
        "",
        *_baselines_md(comparison, names),
        "## Significance",
        "",
        _significance_line(comparison),
        "",
        "## Metrics",
        "",
        _md_table(_metric_header(comparison, names), _metric_rows(comparison)),
        "",
        f"![baseline vs candidate]({plots['bars'].name})",
        "",
        f"## Confusion matrix: {uc.primary_label}",
        "",
        f"![candidate confusion]({plots['confusion_candidate'].name})",
        f"![baseline confusion]({plots['confusion_baseline'].name})",
        "",
        _md_table(["class", "support", "baseline F1", "precision", "recall", "F1"],
                  _per_class_rows(uc, baseline_scores, candidate_scores)),
        "",
        "## Latency",
        "",
        f"![latency]({plots['latency'].name})",
        "",
        "## Error categories",
        "",
        _md_table(["category", "baseline", "candidate"], _category_rows(baseline_scores, candidate_scores, comparison)),
        "",
        "### Examples per error class",
        "",
        _md_table(["model", "class", "#", "input", "output"], _error_example_rows(comparison)),
        "",
        "## Slices",
        "",
        _md_table(["slice", "value", "n", "baseline", "candidate", "delta", "note"], _slice_rows(comparison)),
        "",
        f"## Worst candidate errors ({len(errors)})",
        "",
        _md_table(["#", "category", "input", "gold", "predicted", "what is wrong"], errs) if errs else "None.",
        "",
        "## Decision (as logged)",
        "",
        "```",
        decision_text(decision),
        "```",
        "",
    ]
    return "\n".join(parts)


def write_report(
    run_dir: str | Path,
    uc: UseCase,
    comparison: dict,
    decision: dict,
    baseline_scores: dict,
    candidate_scores: dict,
    *,
    labels: dict | None = None,
    worst_n: int = 10,
) -> dict:
    """Write report.html, report.md and the PNG plots to run_dir/evaluation/.

    labels: display names, {"baseline": "...", "candidate": "..."} (e.g. "production v3", "qlora 2026-11").
    Returns {"html": path, "md": path, "plots": [paths]} as strings.
    """
    out = Path(run_dir) / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    names = {"baseline": "baseline", "candidate": "candidate", **{k: str(v) for k, v in (labels or {}).items() if v}}
    field = uc.primary_label
    plots = {
        "confusion_candidate": _plot_confusion(out / "confusion_candidate.png",
                                               candidate_scores["aggregate"]["confusion"][field],
                                               f"{names['candidate']}: {field}"),
        "confusion_baseline": _plot_confusion(out / "confusion_baseline.png",
                                              baseline_scores["aggregate"]["confusion"][field],
                                              f"{names['baseline']}: {field}"),
        "bars": _plot_bars(out / "metrics_bars.png", comparison, names),
        "latency": _plot_latency(out / "latency.png", baseline_scores["per_example"],
                                 candidate_scores["per_example"], names),
    }
    errors = worst_errors(baseline_scores, candidate_scores, worst_n)
    args = (uc, comparison, decision, baseline_scores, candidate_scores, names, plots, errors)
    html_path, md_path = out / "report.html", out / "report.md"
    # Written via a temporary name so a UI link never serves a half-written report.
    for path, text in ((html_path, _html(*args)), (md_path, _markdown(*args))):
        with atomic_write(path) as fh:
            fh.write(text)
    return {"html": str(html_path), "md": str(md_path), "plots": [str(p) for p in plots.values()]}


def write_decision(run_dir: str | Path, decision: dict) -> Path:
    """run_dir/decision.json, written atomically (a crashed task never leaves half a decision behind)."""
    return write_json(RunDir(run_dir).decision, decision)


def decide_run(run_dir: str | Path, uc: UseCase, *, baseline_kind: str, labels: dict | None = None,
               overrides: list[dict] | None = None) -> dict:
    """The gate stage on a run directory: read evaluation/metrics.json (written by retrain.evaluate.metrics.write_metrics),
    decide, write decision.json and the report. Returns a small dict for XCom and the branch."""
    rd = RunDir(run_dir)
    data = read_json(rd.metrics, missing="run the evaluation stage for this run first")
    decision = decide(uc, data["comparison"], baseline_kind=baseline_kind, overrides=overrides)
    write_decision(rd.path, decision)
    report = write_report(rd.path, uc, data["comparison"], decision, data["baseline"], data["candidate"],
                          labels=labels or {})
    return {
        "decision": decision["decision"],
        "summary": decision["summary"],
        "failed": decision["failed"],
        "baseline_kind": baseline_kind,
        "candidate_score": decision["candidate_score"],
        "baseline_score": decision["baseline_score"],
        "base_model_prompted_score": decision.get("base_model_prompted_score"),
        "decision_path": str(rd.decision),
        "decision_record": decision,
        "report_html": report["html"],
        "report_md": report["md"],
        "text": decision_text(decision),
    }
