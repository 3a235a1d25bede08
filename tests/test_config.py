"""Use-case YAML and trigger parameters: valid files load, bad ones fail naming the field."""

from __future__ import annotations

import copy

import pytest
import yaml

from retrain.schemas.run_params import apply_params, parse_run_params
from retrain.schemas.use_case import (
    ConfigError,
    list_use_cases,
    load_use_case,
    load_use_case_file,
    parse_use_case,
)

BASE = load_use_case("product_intent").model_dump(mode="json")


def test_the_three_use_cases_load():
    assert list_use_cases() == ["email_intel", "email_voice", "hr_leave", "product_intent"]
    for name in list_use_cases():
        uc = load_use_case(name)
        assert uc.name == name and (uc.fields.labels if uc.kind == "structured" else uc.tenants)
        assert uc.extract_input(uc.render_input("texto {con} llaves")) == "texto {con} llaves"
    assert load_use_case("email_intel").allowed_labels["urgency"] == ["low", "medium", "high"]
    assert load_use_case("hr_leave").primary_label == "eligible"


def mutate(**changes):
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"data__min_row": 5}, "data.min_row: unknown field"),
        ({"data__min_rows": 0}, "data.min_rows: Input should be greater than or equal to 1"),
        ({"input_template": "no placeholder"}, "input_template: Value error, must contain the placeholder {input}"),
        ({"thresholds__min_score": 1.5}, "thresholds.min_score"),
        ({"training__adapter": "qlora", "training__load_in_4bit": False}, "requires load_in_4bit"),
        ({"fields__labels": ["colour"]}, "'colour' is not a property of output_schema"),
        ({"fields__labels": ["category"]}, "needs an enum"),
        ({"data__split": {"train": 0.8, "val": 0.1, "test": 0.2}}, "must sum to 1.0"),
        ({"name": "Product Intent"}, "lower_snake_case"),
        ({"evaluation": {"guided": True}}, "evaluation.guided: unknown field"),
        ({"evaluation": {"guided_decoding": "sometimes"}}, "evaluation.guided_decoding: Input should be a valid boolean"),
        ({"output_schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}, "not a valid JSON Schema"),
    ],
)
def test_bad_use_case_names_the_field(changes, expected):
    with pytest.raises(ConfigError) as exc:
        parse_use_case(mutate(**changes), "product_intent.yaml")
    assert expected in str(exc.value)
    assert "Fix the file" in str(exc.value) or "product_intent.yaml" in str(exc.value)


def test_file_name_must_match_and_yaml_errors_are_clear(tmp_path):
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(BASE))
    with pytest.raises(ConfigError, match="must match the file name"):
        load_use_case_file(tmp_path / "other.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_use_case_file(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="known use cases: email_intel, email_voice, hr_leave, product_intent"):
        load_use_case("nope")


def test_run_params_override_thresholds_and_reject_bad_values():
    uc = load_use_case("product_intent")
    params = parse_run_params({"backend": "openai", "min_score": 0.9, "base_model": "", "sample_limit": None})
    applied = apply_params(uc, params)
    assert applied.training.backend == "openai" and applied.thresholds.min_score == 0.9
    assert applied.training.base_model == uc.training.base_model
    # The base_model field names an OpenAI model on the openai backend, a local/HF model on qlora.
    openai_run = apply_params(uc, parse_run_params({"backend": "openai", "base_model": "gpt-4.1-mini"}))
    assert openai_run.training.openai_base_model == "gpt-4.1-mini"
    assert openai_run.training.base_model == uc.training.base_model
    qlora_run = apply_params(uc, parse_run_params({"base_model": "HuggingFaceTB/SmolLM2-360M-Instruct"}))
    assert qlora_run.training.base_model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert qlora_run.training.openai_base_model == uc.training.openai_base_model
    with pytest.raises(ConfigError, match="backend"):
        parse_run_params({"backend": "gpt"})
    with pytest.raises(ConfigError, match="sample_limit"):
        parse_run_params({"sample_limit": 0})
    with pytest.raises(ConfigError, match="unknown field"):
        parse_run_params({"min_scor": 0.5})


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"thresholds__min_score": float("nan")}, "thresholds.min_score: Input should be a finite number"),
        ({"training__max_cost_usd": float("inf")}, "training.max_cost_usd: Input should be a finite number"),
        ({"training__max_steps": 10**9}, "training.max_steps=1000000000 is above limits.max_steps=100000"),
        ({"training__batch_size": 4096}, "training.batch_size=4096 is above limits.batch_size=512"),
        ({"limits": {"max_step": 5}}, "limits.max_step: unknown field"),
        ({"thresholds__max_p95_latency_regression": 1e6}, "thresholds.max_p95_latency_regression"),
        ({"training__allowed_base_models": "smollm2"}, "training.allowed_base_models"),
    ],
)
def test_limits_bounds_and_finiteness_name_the_field(changes, expected):
    with pytest.raises(ConfigError) as exc:
        parse_use_case(mutate(**changes), "product_intent.yaml")
    assert expected in str(exc.value)


def test_run_params_reject_nan_and_unknown_and_keep_the_allow_lists():
    with pytest.raises(ConfigError, match="min_score: Input should be a finite number"):
        parse_run_params({"min_score": float("nan")})
    uc = load_use_case("product_intent")
    assert uc.training.base_models_allowed() == ["smollm2-135m-instruct"]
    assert uc.training.base_models_allowed("openai") == ["gpt-4o-mini-2024-07-18"]
    applied = apply_params(uc, parse_run_params({"max_cost_usd": 3.5, "force_retrain": True}))
    assert applied.training.max_cost_usd == 3.5
    assert applied.training.allowed_base_models == ["smollm2-135m-instruct"]
