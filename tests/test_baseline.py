"""The prompted zero-shot baseline (retrain.evaluate.baseline): the base model told every label is scored next to the
candidate (and the production model when one exists), and the gate's relative-gain rule uses a real denominator."""

from __future__ import annotations

import json

import pytest

from retrain import stages
from retrain.evaluate import baseline as baselines
from retrain.evaluate.gate import decision_text
from retrain.evaluate.report import decide_run
from retrain.rundir import RunDir, write_json
from retrain.schemas.use_case import ConfigError, load_use_case, parse_use_case

USE_CASES = ("product_intent", "email_intel", "hr_leave")
INTENTS = ["GIFT", "PERSONAL_USE", "BUSINESS", "COMPARISON", "URGENT"]
N = 40


def _enum_values(schema: dict):
    """Every enum value of a schema (nested objects and array items included)."""
    if "enum" in schema:
        yield from schema["enum"]
    for sub in (schema.get("properties") or {}).values():
        yield from _enum_values(sub)
    if isinstance(schema.get("items"), dict):
        yield from _enum_values(schema["items"])


@pytest.mark.parametrize("name", USE_CASES)
def test_generated_baseline_prompt_lists_every_field_and_every_enum_value(name):
    uc = load_use_case(name)
    prompt = baselines.baseline_prompt(uc)
    values = list(_enum_values(uc.output_schema))
    assert values
    for value in values:
        assert json.dumps(value, ensure_ascii=False) in prompt, value
    for field in uc.output_schema["properties"]:
        assert f"- {field}" in prompt
    # The candidate keeps its short trained prompt; the baseline's is the long one.
    assert prompt != uc.system_prompt and len(prompt) > len(uc.system_prompt)


def test_a_configured_baseline_prompt_is_used_verbatim_and_a_blank_one_names_the_field():
    data = load_use_case("product_intent").model_dump(mode="json")
    data["evaluation"]["baseline_prompt"] = "You are a Product Intent Classifier. Return only valid JSON."
    uc = parse_use_case(data)
    assert baselines.baseline_prompt(uc) == "You are a Product Intent Classifier. Return only valid JSON."
    data["evaluation"]["baseline_prompt"] = "short"
    with pytest.raises(ConfigError, match="evaluation.baseline_prompt"):
        parse_use_case(data)


def test_the_prompted_base_follows_the_backend():
    uc = load_use_case("product_intent")
    spec = baselines.prompted_base_spec(uc)
    assert (spec["kind"], spec["path"], spec["label"], spec["prompt"]) == ("hf", uc.training.base_model,
                                                                           "base_model_prompted", "baseline")
    data = uc.model_dump(mode="json")
    data["training"]["backend"] = "openai"
    spec = baselines.prompted_base_spec(parse_use_case(data))
    assert (spec["kind"], spec["model"]) == ("openai", uc.training.openai_base_model)


# --- the evaluate stage, with canned answers per model ----------------------------------------------------------


def _gold(i: int) -> dict:
    return {"intent_type": INTENTS[i % 5], "budget_tier": "mid_range", "category": "toys", "recipient": "self",
            "context_tags": ["gift"], "priority_features": ["quality"]}


RIGHT = {"base_model_prompted": 20, "production": 32, "candidate": 38}  # of N: 0.50, 0.80, 0.95


def _run(tmp_path, uc) -> RunDir:
    rd = RunDir(tmp_path / "run")
    rd.path.mkdir()
    write_json(rd.run_config, {"run_id": "manual__baseline", "params": {}, "use_case": uc.model_dump(mode="json")})
    with open(rd.split("test"), "w", encoding="utf-8") as fh:
        for i in range(N):
            row = {"messages": [{"role": "system", "content": uc.system_prompt},
                                {"role": "user", "content": uc.render_input(f"query {i}")},
                                {"role": "assistant", "content": json.dumps(_gold(i))}]}
            fh.write(json.dumps(row) + "\n")
    rd.train_result.parent.mkdir(parents=True, exist_ok=True)
    write_json(rd.train_result, {"backend": "qlora", "merged_path": str(tmp_path / "candidate" / "merged")})
    return rd


@pytest.fixture
def scored(monkeypatch, db_conn):
    """Replace the models by canned answers: returns the calls made ((model label, system prompt) per predict)."""
    from retrain.evaluate import inference

    calls = []

    def predict(spec, conversations, uc, **kwargs):
        label = spec.get("label")
        calls.append((label, conversations[0][0]["content"]))
        right = RIGHT[label if label != "baseline" else "production"]
        results = []
        for i in range(len(conversations)):
            answer = _gold(i) if i < right else {**_gold(i), "intent_type": "URGENT" if i % 5 != 4 else "GIFT"}
            results.append({"text": json.dumps(answer), "latency_s": 0.1, "tokens": 30, "error": None})
        return results, {"seconds": 1.0, "p95": 0.1}

    monkeypatch.setattr(inference, "predict", predict)
    return calls


def _production(monkeypatch):
    def baseline_spec(conn, uc):
        return {"kind": "hf", "path": "/models/product_intent/versions/1", "label": "baseline",
                "baseline_kind": "production", "version": 1, "base_model": uc.training.base_model}

    monkeypatch.setattr("retrain.registry.deploy.baseline_spec", baseline_spec)


def test_first_run_scores_the_prompted_base_and_the_candidate_and_gains_are_relative_to_the_prompted_base(
        tmp_path, scored):
    uc = load_use_case("product_intent")
    rd = _run(tmp_path, uc)
    out = stages.evaluate(rd.path)
    # Two models: the prompted base model (told every label) and the candidate (its short trained prompt).
    assert [c[0] for c in scored] == ["base_model_prompted", "candidate"]
    assert scored[0][1] == baselines.baseline_prompt(uc) and scored[1][1] == uc.system_prompt
    assert out["baseline_kind"] == "base_model" and out["baseline_score"] == out["base_model_prompted_score"] == 0.5
    assert out["production_score"] is None and out["candidate_score"] == 0.95

    models = json.loads(rd.models.read_text())
    assert models["baseline"]["baseline_kind"] == "base_model" and models["baseline"]["prompt"] == "baseline"
    assert models["base_model_prompted"] == models["baseline"]
    data = rd.read_metrics()
    assert data["base_model_prompted"]["aggregate"]["primary_score"] == 0.5
    comparison = data["comparison"]
    assert comparison["metrics"]["primary_score"]["baseline"] == 0.5  # existing keys keep their meaning
    assert comparison["metrics"]["primary_score"]["base_model_prompted"] == 0.5
    assert "production" not in comparison["metrics"]["primary_score"]
    assert comparison["baselines"]["production"] is None and comparison["reference"] == "base_model_prompted"
    assert comparison["baselines"]["base_model_prompted"]["relative_gain"] == pytest.approx(0.9)
    for name in ("baseline", "base_model_prompted", "candidate"):
        assert sum(1 for _ in open(rd.predictions(name))) == N

    result = decide_run(rd.path, uc, baseline_kind=models["baseline"]["baseline_kind"],
                        labels=stages._labels(models))
    decision = result["decision_record"]
    rel = next(c for c in decision["checks"] if c["name"] == "min_relative_improvement")
    # A real denominator on month 1: the rule is computed (not "undefined because the base model scored 0").
    assert rel["value"] == pytest.approx((0.95 - 0.5) / 0.5) and rel["passed"]
    assert "relative to the prompted base model (0.950 vs 0.500)" in rel["reason"]
    assert "vs 0.500 (prompted base model)" in decision["summary"]
    assert result["base_model_prompted_score"] == 0.5
    html = (rd.evaluation / "report.html").read_text()
    md = (rd.evaluation / "report.md").read_text()
    for text in (html, md):
        assert "Baselines" in text and "prompted base model (smollm2-135m-instruct)" in text
    assert "| prompted base model (smollm2-135m-instruct) | yes | 0.500 |" in md


def test_with_a_production_model_three_models_are_scored_and_gains_are_relative_to_production(
        tmp_path, scored, monkeypatch):
    uc = load_use_case("product_intent")
    _production(monkeypatch)
    rd = _run(tmp_path, uc)
    out = stages.evaluate(rd.path)
    assert [c[0] for c in scored] == ["base_model_prompted", "baseline", "candidate"]
    assert [c[1] for c in scored] == [baselines.baseline_prompt(uc), uc.system_prompt, uc.system_prompt]
    assert (out["baseline_kind"], out["baseline_score"], out["base_model_prompted_score"], out["production_score"]) \
        == ("production", 0.8, 0.5, 0.8)

    models = json.loads(rd.models.read_text())
    assert models["baseline"]["baseline_kind"] == "production" and models["base_model_prompted"]["prompt"] == "baseline"
    data = rd.read_metrics()
    assert data["baseline"]["aggregate"]["primary_score"] == 0.8
    assert data["base_model_prompted"]["aggregate"]["primary_score"] == 0.5
    m = data["comparison"]["metrics"]["primary_score"]
    assert (m["baseline"], m["production"], m["base_model_prompted"], m["candidate"]) == (0.8, 0.8, 0.5, 0.95)
    assert data["comparison"]["baselines"]["production"]["relative_gain"] == pytest.approx(0.15 / 0.8)
    assert data["comparison"]["baselines"]["base_model_prompted"]["relative_gain"] == pytest.approx(0.9)
    # The reference's predictions keep their old file name; the prompted base model's have their own.
    assert sum(1 for _ in open(rd.predictions("baseline"))) == N
    assert sum(1 for _ in open(rd.predictions("base_model_prompted"))) == N

    result = decide_run(rd.path, uc, baseline_kind="production", labels=stages._labels(models))
    decision = result["decision_record"]
    rel = next(c for c in decision["checks"] if c["name"] == "min_relative_improvement")
    assert rel["value"] == pytest.approx(0.15 / 0.8) and rel["passed"]
    assert "relative to the production model (0.950 vs 0.800)" in rel["reason"]
    assert "vs 0.800 (production model), prompted base model 0.500" in decision["summary"]
    text = decision_text(decision)
    assert ("baselines: prompted base model 0.500 (candidate +90.0%); production model 0.800 (candidate +18.7%)"
            in text)
    html = (rd.evaluation / "report.html").read_text()
    md = (rd.evaluation / "report.md").read_text()
    assert "<th>prompted base model</th><th>baseline (production v1)</th><th>candidate</th>" in html
    assert "| primary_score | 50.0% | 80.0% | 95.0% |" in md
    assert "| prompted base model (merged) | no | 0.500 |" not in md  # labels name the base model, not the path
    assert "| prompted base model (smollm2-135m-instruct) | no | 0.500 |" in md
    assert "| baseline (production v1: 1) | yes | 0.800 |" in md


def test_the_prompted_base_with_a_relative_gain_below_the_threshold_stops_month_1(tmp_path, scored, monkeypatch):
    """Against a prompted base at 0.90, a 0.95 candidate gains 5.6% < 10%: the first gate is no formality."""
    uc = load_use_case("product_intent")
    monkeypatch.setitem(RIGHT, "base_model_prompted", 36)
    rd = _run(tmp_path, uc)
    stages.evaluate(rd.path)
    models = json.loads(rd.models.read_text())
    decision = decide_run(rd.path, uc, baseline_kind="base_model", labels=stages._labels(models))["decision_record"]
    assert decision["decision"] == "NO-GO" and decision["failed"] == ["min_relative_improvement"]
