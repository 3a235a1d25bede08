"""The evaluation report: HTML, Markdown and PNG plots written from real scores and a real decision."""

from __future__ import annotations

import json
import re
from pathlib import Path

from retrain.schemas.use_case import load_use_case
from retrain.evaluate.gate import decide
from retrain.evaluate.metrics import compare, score_predictions
from retrain.evaluate.report import decision_text, worst_errors, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INTENTS = ["GIFT", "PERSONAL_USE", "BUSINESS", "COMPARISON", "URGENT"]


def _case(n: int = 30):
    uc = load_use_case("product_intent")
    golds = [{"intent_type": INTENTS[i % 5], "budget_tier": "mid_range", "category": "electronics",
              "recipient": "self", "context_tags": ["personal"], "priority_features": ["quality"]} for i in range(n)]
    inputs = [f"query number {i}" for i in range(n)]
    inputs[7] = "<script>alert('x')</script> regalo para mi madre"
    base_preds, cand_preds = [], []
    for i, g in enumerate(golds):
        # Baseline: right on the first half, prose without JSON on the rest.
        if i < n // 2:
            base_preds.append({"text": json.dumps(g), "latency_s": 0.30 + i * 0.01, "tokens": 30, "error": None})
        else:
            base_preds.append({"text": "It is a shopping query.", "latency_s": 0.9, "tokens": 60, "error": None})
        # Candidate: right almost everywhere; #7 is a regression (baseline got it right) and #20 invents.
        obj = dict(g)
        if i == 7:
            obj["intent_type"] = "GIFT" if g["intent_type"] != "GIFT" else "URGENT"
        if i == 20:
            obj["recipient"] = "mother"
        cand_preds.append({"text": json.dumps(obj), "latency_s": 0.20 + i * 0.005, "tokens": 30, "error": None})
    base = score_predictions(uc, golds, base_preds, inputs=inputs)
    cand = score_predictions(uc, golds, cand_preds, inputs=inputs)
    comparison = compare(uc, base, cand)
    decision = decide(uc, comparison, baseline_kind="production")
    return uc, comparison, decision, base, cand


def test_write_report_creates_html_md_and_pngs(tmp_path):
    uc, comparison, decision, base, cand = _case()
    assert decision["decision"] == "GO", decision["summary"]
    out = write_report(tmp_path, uc, comparison, decision, base, cand,
                       labels={"baseline": "production v1", "candidate": "qlora 2026-11"})

    assert Path(out["html"]) == tmp_path / "evaluation" / "report.html"
    assert Path(out["md"]) == tmp_path / "evaluation" / "report.md"
    names = sorted(Path(p).name for p in out["plots"])
    assert names == ["confusion_baseline.png", "confusion_candidate.png", "latency.png", "metrics_bars.png"]
    for p in out["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 2000

    html = Path(out["html"]).read_text()
    assert '<span class="badge GO">GO</span>' in html
    for check in decision["checks"]:
        assert check["name"] in html
    # Self-contained: all four plots embedded, no external references.
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    assert "http://" not in html and "https://" not in html
    # User-controlled text is escaped, never executed.
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "production v1" in html and "qlora 2026-11" in html
    assert "(regression)" in html

    md = Path(out["md"]).read_text()
    assert "**GO**" in md and decision["summary"] in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / "evaluation" / link).is_file()
    assert "| min_relative_improvement | PASS |" in md
    # No temporary files left for a UI to serve.
    assert not [p for p in (tmp_path / "evaluation").iterdir() if p.name.startswith(".")]


def test_worst_errors_put_regressions_first():
    _, _, _, base, cand = _case()
    errors = worst_errors(base, cand, n=5)
    assert [e["index"] for e in errors] == [7, 20]
    assert errors[0]["regression"] and errors[0]["category"] == "wrong_label"
    assert errors[0]["input"].startswith("<script>")
    assert errors[1]["category"] == "wrong_entity" and "recipient" in errors[1]["detail"]


def test_report_for_a_no_go_without_latency(tmp_path):
    uc, comparison, _, base, cand = _case()
    for scores in (base, cand):
        for row in scores["per_example"]:
            row["latency_s"] = None
    decision = decide(uc, comparison, baseline_kind="production")
    decision = {**decision, "decision": "NO-GO", "summary": "NO-GO: forced for the test"}
    out = write_report(tmp_path, uc, comparison, decision, base, cand, labels={})
    html = Path(out["html"]).read_text()
    assert '<span class="badge NO-GO">NO-GO</span>' in html and "NO-GO: forced for the test" in html
    assert Path(out["plots"][-1]).read_bytes()[:8] == PNG_MAGIC
    assert decision_text(decision).startswith("NO-GO")
