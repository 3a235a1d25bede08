"""The prompted zero-shot baseline: the untuned base model, told the labels, answers the frozen test set.

A real user of the platform compares a fine-tuned model with the model they would use without fine-tuning: the
base model with a good prompt (seed 004's long system prompt spelled out every label). Scoring the base model with
the candidate's short trained prompt instead ("Classify the shopper's query as product-intent JSON.") measures a
model that was never told the labels, so it scores 0 and the gate's relative-gain rule has no denominator.

So evaluation scores up to three models on the same test set:

* ``base_model_prompted``: the base model with the **baseline prompt** (``evaluation.baseline_prompt``, or one
  generated from ``output_schema``: every field with its type and allowed values), decoded under the schema from
  the first token when ``evaluation.guided_decoding`` is on (the answer opens with ``{`` because the schema says
  so);
* ``production``: the deployed model with the use case's system prompt, when one exists;
* ``candidate``: the new model with the use case's (short, trained) system prompt.

The gate's reference (metrics.json's ``baseline``) is the production model when one exists, else the prompted base
model; both baselines are reported.
"""

from __future__ import annotations

import json
from typing import Any

PROMPTED = "base_model_prompted"
PROMPTED_TITLE = "prompted base model"
_TYPE_WORDS = {"string": "text", "integer": "integer", "number": "number", "boolean": "true or false",
               "null": "null", "object": "object", "array": "list"}


def _value(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False)


def _describe(schema: dict[str, Any]) -> str:
    """One line of what a value of this schema may be: its allowed values, or its type and limits."""
    if "enum" in schema:
        return "one of " + ", ".join(_value(v) for v in schema["enum"])
    if "const" in schema:
        return f"always {_value(schema['const'])}"
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    if "array" in kinds:
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        parts = []
        if "enum" in items:
            parts.append("list of values from " + ", ".join(_value(v) for v in items["enum"]))
        else:
            parts.append("list of " + (_TYPE_WORDS.get(items.get("type"), "values") if items else "values"))
        if "minItems" in schema:
            parts.append(f"at least {schema['minItems']}")
        if "maxItems" in schema:
            parts.append(f"at most {schema['maxItems']}")
        if schema.get("uniqueItems"):
            parts.append("no repeats")
        return ", ".join(parts)
    words = " or ".join(_TYPE_WORDS.get(k, str(k)) for k in kinds) or "any value"
    limits = []
    if "pattern" in schema:
        limits.append(f"matching {schema['pattern']}")
    if "maxLength" in schema:
        limits.append(f"at most {schema['maxLength']} characters")
    for key, op in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            limits.append(f"{op} {schema[key]}")
    return words + (f" ({', '.join(limits)})" if limits else "")


def _field_lines(schema: dict[str, Any], indent: str = "") -> list[str]:
    required = set(schema.get("required", ()))
    lines = []
    for name, sub in (schema.get("properties") or {}).items():
        sub = sub if isinstance(sub, dict) else {}
        tag = "" if name in required else " (optional)"
        if sub.get("type") == "object" and sub.get("properties"):
            lines.append(f"{indent}- {name}{tag}: object with")
            lines.extend(_field_lines(sub, indent + "  "))
        else:
            lines.append(f"{indent}- {name}{tag}: {_describe(sub)}")
    return lines


def generated_prompt(uc) -> str:
    """A zero-shot system prompt from the use case's description and output schema: every field with its allowed
    values (labels spelled as the schema spells them) or its type, like seed 004's hand-written prompt."""
    description = " ".join(str(uc.description).split())
    keys = list((uc.output_schema.get("properties") or {}))
    # The keys in the schema's order, first key first: a small model that starts with a free-text field rambles in
    # it and runs out of tokens before the label the gate scores.
    shape = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    lines = [f"Task: {description}", "",
             "Reply with only one JSON object (no prose, no code fence) with these fields:",
             *_field_lines(uc.output_schema), "", f"Write the fields in this order: {shape}",
             "Keep every text and list short. Return only valid JSON."]
    return "\n".join(lines)


def baseline_prompt(uc) -> str:
    """The system prompt of the prompted baseline: the use case's ``evaluation.baseline_prompt``, else generated."""
    return uc.evaluation.baseline_prompt or generated_prompt(uc)


def prompted_base_spec(uc) -> dict:
    """Model spec of the prompted base model (the model the candidate is tuned from, on the run's backend)."""
    if uc.training.backend == "openai":
        spec = {"kind": "openai", "model": uc.training.openai_base_model, "base_url": None}
        base = uc.training.openai_base_model
    else:
        spec = {"kind": "hf", "path": uc.training.base_model}
        base = uc.training.base_model
    return spec | {"label": PROMPTED, "baseline_kind": "base_model", "prompt": "baseline", "version": None,
                   "base_model": base}


def conversations(uc, inputs: list[str], system_prompt: str) -> list[list[dict]]:
    """The prompts a model answers: a system prompt and each rendered input."""
    return [[{"role": "system", "content": system_prompt}, {"role": "user", "content": uc.render_input(text)}]
            for text in inputs]


def system_prompt_for(uc, spec: dict) -> str:
    """The prompted base model gets the baseline prompt; trained models the prompt they were trained with."""
    return baseline_prompt(uc) if spec.get("prompt") == "baseline" else uc.system_prompt


def plan(reference: dict, candidate: dict, prompted: dict) -> dict[str, dict]:
    """The models to score, by name: the prompted base, the production model when ``reference`` is one (the
    registry's baseline_spec), and the candidate. Scored in this order."""
    models = {PROMPTED: prompted}
    if reference.get("baseline_kind") == "production":
        models["production"] = reference
    models["candidate"] = candidate
    return models


def reference_name(models: dict[str, dict]) -> str:
    """Which scored model the gate compares with: production when it exists, else the prompted base model."""
    return "production" if "production" in models else PROMPTED
