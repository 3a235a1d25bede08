"""Schema-guided decoding (retrain.evaluate.guided): the character cursor, the logits processor driven step by step, and
the engine with the real SmolLM2 model (batched == one by one with the guide on, every closed answer valid)."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from retrain.schemas.use_case import load_use_case
from retrain.evaluate.guided import SchemaCursor, schema_guard_class
from retrain.data.synthetic import generate_rows

USE_CASES = ("product_intent", "email_intel", "hr_leave")
PI = load_use_case("product_intent").output_schema


def feeds(text: str, schema: dict = PI) -> bool:
    return SchemaCursor(schema).feed(text)


def answer(**changes) -> dict:
    base = {"intent_type": "GIFT", "budget_tier": "premium", "category": "toys", "recipient": "niece",
            "context_tags": ["gift", "birthday"], "priority_features": ["quality"]}
    return {**base, **changes}


@pytest.mark.parametrize("name", USE_CASES)
def test_every_valid_answer_of_every_use_case_passes_whole_and_char_by_char(name):
    """The guide must never block an answer the schema allows, however it is spaced or escaped."""
    uc = load_use_case(name)
    rows = generate_rows(uc, 300, seed=4, dirty=0)
    labels = [r["corrected_output"] or r["model_output"] for r in rows]
    for label in labels:
        jsonschema.validate(label, uc.output_schema)
        for text in (json.dumps(label, ensure_ascii=False), json.dumps(label), json.dumps(label, indent=2),
                     json.dumps(label, separators=(",", ":"))):
            cursor = SchemaCursor(uc.output_schema)
            assert all(cursor.feed(ch) for ch in text), text
            assert cursor.done and cursor.free


@pytest.mark.parametrize("prefix", [
    '{"intent_type": "PERSONAL"}',  # not an enum value (its prefix is fine until the closing quote)
    '{"intent_type": "Gift"',  # no enum value starts with "Gi"
    '{"intent": 1',  # additionalProperties: false
    '{"intent_type": "GIFT", "intent_type"',  # repeated key
    '{"intent_type": "GIFT"}',  # '}' before the required keys
    '{"intent_type": GIFT',  # not JSON
    '{"intent_type": "GIFT",}',
    '{"category": "' + "x" * 61,  # maxLength 60
    '{"context_tags": [' + ", ".join(f'"t{i}"' for i in range(8)) + ", ",  # maxItems 8
    '{"context_tags": ["urgent", "asap", "urgent", ',  # a repeated item ends the list
    '{"context_tags": ["a",]',
    '{"category": "two\nlines"',  # raw control character inside a string
])
def test_cursor_rejects_what_the_schema_or_json_forbids(prefix):
    assert not feeds(prefix)


def test_cursor_accepts_prefixes_and_the_loop_guard_keeps_the_repeated_item():
    assert feeds('{"intent_type": "PERSONAL')  # may still become PERSONAL_USE
    assert feeds('{"context_tags": ["urgent", "asap", "urgent"]')  # ...but then the list must close
    assert feeds('{"context_tags": [' + ", ".join(f'"t{i}"' for i in range(8)) + "]")
    cursor = SchemaCursor(PI)
    assert cursor.free and cursor.feed('Sure! Here is the JSON: ```json\n') and cursor.free  # prose is free
    assert cursor.feed(json.dumps(answer())) and cursor.done
    assert cursor.feed("\n```\nanything { at all") and cursor.free  # after the object: free


def test_cursor_handles_nested_values_numbers_literals_and_escapes():
    schema = {"type": "object", "properties": {
        "n": {"type": "integer"}, "x": {"type": "number"}, "flag": {"type": "boolean"},
        "maybe": {"type": ["string", "null"]},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["k"],
                                                           "properties": {"k": {"enum": ["a", "b"]}}}}}}
    good = {"n": -12, "x": 2.5e-3, "flag": False, "maybe": None, "items": [{"k": "a"}, {"k": "a"}]}
    assert feeds(json.dumps(good), schema)
    assert feeds('{"maybe": "caf\\u00e9 \\"quoted\\" \\\\ done"}', schema)
    assert feeds('{"free": [1, [true, {"deep": null}], "s"]}', {})  # no schema: JSON syntax only
    for bad in ('{"n": 1.5', '{"n": 01', '{"x": 1.}', '{"flag": nul}', '{"flag": "yes"', '{"items": []',
                '{"items": [{}]', '{"items": [{"k": "c"', '{"maybe": "\\x"', '{"maybe": "\\u12g'):
        assert not feeds(bad, schema), bad


def test_cursor_clone_is_independent():
    cursor = SchemaCursor(PI)
    assert cursor.feed('{"context_tags": ["a"')
    trial = cursor.clone()
    assert trial.feed(', "b"]') and not trial.clone().feed("]")
    assert cursor.feed(', "b", "c"]')  # the trial's "b" did not reach the original list (else a repeat ends it)


# --- the logits processor, driven like generate drives it ----------------------------------------------


class ScriptedModel:
    """A 'model' over a toy vocabulary whose preferences depend on the tokens so far: it cycles list items
    forever and ranks a label one token off the enum first, the two failures the guide exists for."""

    VOCAB = ['{', '"intent_type"', ': ', '"PERSONAL"', '"PERSONAL_USE"', ', ', '"budget_tier"', '"premium"',
             '"category"', '"toys"', '"recipient"', '"self"', '"context_tags"', '[', '"urgent"', '"asap"', ']',
             '"priority_features"', '}', '<eos>', 'Sure', ' thing']
    KEYS = ['"intent_type"', '"budget_tier"', '"category"', '"recipient"', '"context_tags"', '"priority_features"']
    VALUES = {'"intent_type"': ['"PERSONAL"', '"PERSONAL_USE"', "<eos>"], '"budget_tier"': ['"premium"'],
              '"category"': ['"toys"'], '"recipient"': ['"self"'], '"context_tags"': ["["],
              '"priority_features"': ["["]}

    def __init__(self):
        self.ids = {t: i for i, t in enumerate(self.VOCAB)}

    def preferences(self, tokens: list[str]) -> list[str]:
        if "{" not in tokens:
            return ["Sure", "{"] if not tokens else [" thing", "{"] if tokens[-1] == "Sure" else ["{"]
        last = tokens[-1]
        keys = [t for t in tokens if t in self.KEYS]
        brackets = [t for t in tokens if t in "[]"]
        in_list = bool(brackets) and brackets[-1] == "["
        if last == "{":
            return [self.KEYS[0]]
        if last in self.KEYS:
            return [": "]
        if last == ": ":
            return self.VALUES[keys[-1]]
        if last == "[":
            return ['"urgent"', "]"]
        if in_list and last in ('"urgent"', '"asap"'):
            return [", ", "]"]
        if in_list and last == ", ":
            return ['"asap"', '"urgent"'] if tokens[-2] == '"urgent"' else ['"urgent"', '"asap"']
        if last == ", ":
            return [self.KEYS[len(keys)]] if len(keys) < len(self.KEYS) else ["}"]
        return [", ", "}"]

    def scores(self, tokens: list[str]):
        import torch

        scores = torch.full((len(self.VOCAB),), -10.0)
        for rank, tok in enumerate(self.preferences(tokens)):
            scores[self.ids[tok]] = 10.0 - rank
        return scores


def test_guard_steers_greedy_decoding_to_a_valid_answer_and_leaves_valid_choices_alone():
    import torch

    model = ScriptedModel()
    vocab, eos = model.VOCAB, model.ids["<eos>"]
    prompt = [7, 7]
    guard = schema_guard_class()(PI, vocab.__getitem__, len(prompt), 1, [eos])
    raw, guided, ids = [], [], list(prompt)
    for _ in range(60):  # the token budget
        raw.append(vocab[int(model.scores(raw).argmax())])
        if not guided or guided[-1] != "}":
            scores = guard(torch.tensor([ids]), model.scores(guided).unsqueeze(0))[0]
            ids.append(int(scores.argmax()))
            guided.append(vocab[ids[-1]])
    raw_text, guided_text = "".join(raw), "".join(guided)
    # On its own the model writes a label off the enum, then cycles list items until the budget runs out.
    assert '"PERSONAL",' in raw_text and raw_text.count('"urgent"') > 5 and not raw_text.endswith("}")
    assert guided_text.startswith("Sure thing{")  # prose before the object is untouched
    answer_json = json.loads(guided_text[guided_text.index("{"):])
    jsonschema.validate(answer_json, PI)
    assert answer_json["intent_type"] == "PERSONAL_USE"
    assert answer_json["context_tags"] == ["urgent", "asap", "urgent"]  # the repeat ended the list
    assert answer_json["priority_features"] == ["urgent", "asap", "urgent"]
    # Overruled: "PERSONAL", the ', ' after each repeated item, the ', ' after the last property.
    assert guard.masked == 4


# --- the engine, real SmolLM2 -----------------------------------------------------------------------------

JSON_PROMPT = ("Reply with only a JSON object with keys intent_type (GIFT, PERSONAL_USE, BUSINESS, COMPARISON or "
               "URGENT), budget_tier (economic, mid_range, premium or unspecified), category, recipient, "
               "context_tags (list) and priority_features (list).")


def test_guided_engine_on_real_smollm2_batched_equals_one_by_one_and_answers_follow_the_schema():
    from retrain.evaluate.inference import make_engine

    uc = load_use_case("product_intent")
    rows = list(generate_rows(uc, 8, seed=21, dirty=0))[:5]
    # One worked example (a few-shot turn) so the untuned model starts its answer with the JSON object.
    example = rows[0]["corrected_output"] or rows[0]["model_output"]
    shot = [{"role": "system", "content": JSON_PROMPT}, {"role": "user", "content": rows[0]["input"]},
            {"role": "assistant", "content": json.dumps(example, ensure_ascii=False)}]
    convs = [shot + [{"role": "user", "content": r["input"]}] for r in rows[1:]]
    # The untuned model copies the worked example's label; a schema that leaves that label out makes the guide
    # overrule the real model's first choice, the way it corrects an off-enum label at evaluation.
    schema = copy.deepcopy(uc.output_schema)
    schema["properties"]["intent_type"]["enum"] = ["GIFT", "BUSINESS", "COMPARISON", "URGENT"]
    engine = make_engine({"kind": "hf", "path": "smollm2-135m-instruct"}, batch_size=4, schema=schema)
    batched, info = engine.generate_ids(convs, max_new_tokens=72)
    single, _ = engine.generate_ids(convs, max_new_tokens=72, batch_size=1)
    assert batched == single  # the guide works per row: batching changes nothing
    assert info[0]["guided_tokens"] > 0  # the copied label was overruled
    closed = 0
    for ids in batched:
        text = engine.decode(ids)
        if text.rstrip().endswith("}"):
            answer_json = json.loads(text[text.index("{"):])
            jsonschema.validate(answer_json, schema)
            assert answer_json["intent_type"] != "PERSONAL_USE"
            closed += 1
        elif "{" in text:  # inside the object only the budget ends an answer, never the end-of-sequence token
            assert len(ids) == 72 and not set(ids) & set(engine.eos_ids), text
    assert closed >= 1, [engine.decode(i) for i in batched]
