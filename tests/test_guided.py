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


def test_from_first_token_the_answer_opens_with_the_object_not_prose_or_end_of_sequence():
    """The evaluation engine's mode: an untuned model that would open with prose ("Sure thing") or stop at once
    (end of sequence ranked first, '{' ranked last) answers with the object from its first token."""
    import torch

    model = ScriptedModel()
    vocab, eos = model.VOCAB, model.ids["<eos>"]
    guard = schema_guard_class()(PI, vocab.__getitem__, 2, 1, [eos], from_first_token=True)
    guided, ids = [], [7, 7]
    for _ in range(60):
        scores = model.scores(guided)
        if not guided:  # the end of sequence first, the object's opening brace last of all
            scores = torch.arange(len(vocab), 0, -1, dtype=torch.float)
            scores[eos], scores[model.ids["{"]] = 100.0, -100.0
        ids.append(int(guard(torch.tensor([ids]), scores.unsqueeze(0))[0].argmax()))
        guided.append(vocab[ids[-1]])
        if guided[-1] == "}":
            break
    text = "".join(guided)
    assert text.startswith("{") and guided[0] == "{"
    jsonschema.validate(json.loads(text), PI)
    # The default (what the guard class does without the flag) leaves text before the object to the model.
    free = schema_guard_class()(PI, vocab.__getitem__, 2, 1, [eos])
    first = vocab[int(free(torch.tensor([[7, 7]]), model.scores([]).unsqueeze(0))[0].argmax())]
    assert first == "Sure"


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


# --- string values are checked DECODED: escapes, lengths, keys, const ------------------------------------
# Real customer-support labels (77 snake_case values sharing prefixes); the three strings are answers the old cursor
# let through: an escape (\u03c2, \u0022) that cannot continue any label was accepted up to its last hex digit, the
# next token then had no allowed continuation and the row was left unguided.
BANKING = ["activate_my_card", "age_limit", "card_about_to_expire", "card_arrival", "card_delivery_estimate",
           "card_linking", "card_not_working", "card_payment_fee_charged", "card_payment_not_recognised",
           "card_payment_wrong_exchange_rate", "card_swallowed", "cash_withdrawal_charge",
           "disposable_card_limits", "get_disposable_virtual_card", "supported_cards_and_currencies",
           "virtual_card_not_working", "visa_or_mastercard"]
LABEL = {"type": "object", "additionalProperties": False, "required": ["label"],
         "properties": {"label": {"type": "string", "enum": BANKING}}}


def first_rejected(schema: dict, text: str) -> int | None:
    """Index of the first character the cursor refuses (None: all accepted)."""
    cursor = SchemaCursor(schema)
    for i, ch in enumerate(text):
        if not cursor.feed(ch):
            return i
    return None


@pytest.mark.parametrize("value, bad_from", [
    # In a label, printable ASCII is written as is, so the backslash itself is refused: no label continues with
    # a character that needs (or may take) an escape.
    ("supported_card\\u03c2_american_express", "supported_card\\"),
    ("card_n\\u03c2_card", "card_n\\"),
    ("disposable_card_l\\u00221", "disposable_card_l\\"),
    ("card_n\\\"", "card_n\\"),
    ("\\u0063ard_arrival", "\\"),  # 'c' spelled \\u0063: decodes to a label, refused all the same
    # Labels with characters that must or may be escaped: the escape is followed as it decodes.
    ("card_\\u03c3", "card_\\u03c3"),  # 'σ' (3c3): only 'ς' (3c2) continues "card_"
    ("card_\\u03", "card_\\u03"),  # \\u03.. can still be 'ς': only the quote that cuts it short is refused
    ("say \\u0022hi\\u0022x", "say \\u0022hi\\u0022x"),  # 'say "hi"' is complete: no 'x' after it
    ("say \\u0023", "say \\u0023"),  # '#' (23) where '"' (22) must come
    ("say \\\"hi\\x", "say \\\"hi\\x"),  # after 'say "hi' only '"' (an escaped one) continues
    ("back\\\\sl\\", "back\\\\sl\\"),
    ("card_\\ud83d", "card_\\ud"),  # \\ud8.. starts an astral character: "card_" goes on with 'ς'
])
def test_escapes_that_cannot_continue_an_enum_label_are_refused_at_their_first_offending_character(value, bad_from):
    schema = {"type": "object", "properties": {"label": {"enum": BANKING + ["card_ς", 'say "hi"', "back\\slash"]}}}
    text = '{"label": "' + value + '"}'
    at = first_rejected(schema, text)
    if bad_from == "card_\\u03":  # the partial escape is fine; the closing quote is not (it must become 'ς')
        assert at == len('{"label": "card_\\u03'), text
    else:
        assert at == len('{"label": "') + len(bad_from) - 1, text


def test_labels_are_accepted_with_the_escapes_json_needs_and_non_ascii_ones():
    schema = {"type": "object", "properties": {"label": {"enum": ["card_ς", 'say "hi"', "back\\slash"]}}}
    for text in ('{"label": "card_\\u03c2"}', '{"label": "card_\\u03C2"}', '{"label": "card_ς"}',
                 '{"label": "say \\"hi\\""}', '{"label": "say \\u0022hi\\u0022"}', '{"label": "back\\\\slash"}',
                 '{"label": "back\\u005cslash"}'):
        cursor = SchemaCursor(schema)
        assert all(cursor.feed(ch) for ch in text) and cursor.done, text


TRICKY = ['say "hi"', "back\\slash", "new\nline", "tab\there", "a/b", "ς_greek", "\U0001F600_emoji", "café",
          "say", "ς", "\x7f_del", "\u2028_sep"]


def spellings(value: str) -> list[str]:
    """JSON texts of a string: characters as is or escaped short, or every one that may be escaped (what JSON
    requires, non-ASCII) as \\uXXXX in either case."""
    def u(c: str, upper: bool) -> str:
        if " " <= c <= "~" and c not in '"\\':
            return c
        units = c.encode("utf-16-be")
        out = "".join("\\u%02x%02x" % (units[i], units[i + 1]) for i in range(0, len(units), 2))
        return out.upper().replace("\\U", "\\u") if upper else out
    return [json.dumps(value), json.dumps(value, ensure_ascii=False), '"' + "".join(u(c, False) for c in value) + '"',
            '"' + "".join(u(c, True) for c in value) + '"']


@pytest.mark.parametrize("value", TRICKY)
def test_every_enum_value_is_accepted_however_json_spells_it(value):
    schema = {"type": "object", "properties": {"v": {"enum": TRICKY}, "w": {"const": value},
                                               value: {"type": "string", "minLength": len(value),
                                                       "maxLength": len(value)}},
              "additionalProperties": False}
    for sp in spellings(value):
        for text in ('{"v": ' + sp + "}", '{"w": ' + sp + "}", "{" + sp + ": " + sp + "}"):
            cursor = SchemaCursor(schema)
            assert all(cursor.feed(ch) for ch in text) and cursor.done, text
            jsonschema.validate(json.loads(text), schema)
    # A free string takes any escape ('\\/', '\\u0061'); a label, only those of characters JSON must escape or
    # non-ASCII ones.
    free = {"type": "object", "properties": {"f": {"type": "string"}}}
    assert feeds('{"f": "\\u0061\\/b"}', free)
    assert first_rejected(schema, '{"v": "a\\/b"}') == len('{"v": "a')


def test_lengths_count_decoded_characters_and_surrogates_must_pair():
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 3}}}
    assert feeds('{"s": "ab\\u00e9"}', schema)  # 3 characters, 8 written
    assert feeds('{"s": "\\ud83d\\ude00x"}', schema)  # an astral character counts once
    assert first_rejected(schema, '{"s": "abc\\') == len('{"s": "abc')  # no room for the escaped character
    assert first_rejected(schema, '{"s": "\\u00e9"}') == len('{"s": "\\u00e9')  # 1 < minLength: no closing quote
    assert first_rejected(schema, '{"s": "\\udc00"') == len('{"s": "\\ud')  # \udc.. is a low surrogate: it cannot start
    assert first_rejected(schema, '{"s": "\\ud83d"') == len('{"s": "\\ud83d')  # a high one needs its pair
    assert first_rejected(schema, '{"s": "\\ud83d\\u0041"') == len('{"s": "\\ud83d\\u')


def test_const_and_keys_are_checked_decoded():
    schema = {"type": "object", "additionalProperties": False,
              "properties": {'a"b': {"const": "x\\y"}, "é": {"type": "integer", "const": 3}}}
    assert feeds('{"a\\u0022b": "x\\\\y", "\\u00e9": 3}', schema)
    assert first_rejected(schema, '{"a\\u0023') == len('{"a\\u002')
    assert first_rejected(schema, '{"a\\"b": "x\\\\z"') == len('{"a\\"b": "x\\\\z') - 1
    assert first_rejected(schema, '{"a\\"b": "xy"') == len('{"a\\"b": "x')
    assert first_rejected(schema, '{"\\u00e9": 4') == len('{"\\u00e9": ')
    assert first_rejected(schema, '{"\\u00e9": 30') == len('{"\\u00e9": 3')


# --- property: random enum schemas x a random-logit "model" -> every closed answer validates ----------------
# Label pieces share prefixes the way real label sets do (card_..., card_not_..., cash_...); the extras carry what
# JSON escapes (quote, backslash, newline) and non-ASCII characters (BMP and astral).
PIECES = ["card", "cards", "card_not", "cash", "c", "top", "top_up", "not", "working", "supported", "limit", "l",
          "n", "s", "and", "x"]
EXTRAS = ['say "hi"', "back\\slash", "new\nline", "ς", "card_ς", "café", "\U0001F600", "a/b", "tab\t"]
# A tokenizer-like vocabulary: every printable ASCII character (so any label can be spelled), multi-character
# pieces, escapes whole and in parts, non-ASCII characters, structure, literals, numbers, end of sequence.
VOCAB = ([chr(c) for c in range(0x20, 0x7F)] + PIECES + [
    "_", "card_", "_not", "cash_", "\\u03c2", "\\u0063", "\\u00", "\\u", "\\\\", '\\"', "\\n", "\\t", "\\/",
    "\\ud83d", "\\ude00", "\\ud83d\\ude00", "ς", "é", "\U0001F600", "\n", '{"', '": "', '": ', '", "', '"}', '"]',
    '["', '"]}', "},", "],", ", ", ": ", "{}", "[]", "true", "false", "null", "12", "-1", ".5", "e+", "00", "0",
    "<eos>"])
EOS = VOCAB.index("<eos>")
CLOSERS = [VOCAB.index(t) for t in ("{", '"', "]", "}")]


def random_labels(rng, n: int) -> list[str]:
    labels = set()
    while len(labels) < n:
        labels.add("_".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))))
    labels = sorted(labels)
    if rng.random() < 0.5:
        labels += rng.sample(EXTRAS, rng.randint(1, 3))
    return labels


def random_schema(rng, depth: int = 0) -> dict:
    """An object schema of enum-heavy properties: nested objects, arrays of enums, const, lengths, bounds."""
    def value(d: int) -> dict:
        kind = rng.choice(["enum", "enum", "enum", "const", "string", "integer", "number", "boolean", "array",
                           "array", "object", "nullable", "pattern", "numbers"] if d < 2
                          else ["enum", "const", "string", "integer", "pattern", "numbers", "boolean"])
        if kind == "enum":
            return {"type": "string", "enum": random_labels(rng, rng.randint(1, 12))}
        if kind == "const":
            return {"const": rng.choice(random_labels(rng, 3))}
        if kind == "string":
            low = rng.randint(0, 3)
            return {"type": "string", "minLength": low, "maxLength": low + rng.randint(0, 6)}
        if kind == "integer":
            low = rng.randint(-20, 20)
            return {"type": "integer", "minimum": low, "maximum": low + rng.choice([0, 1, 7, 150])}
        if kind == "number":
            return {"type": "number", "exclusiveMinimum": rng.choice([-1.5, 0, 2]), "maximum": rng.choice([3, 10.25])}
        if kind == "boolean":
            return {"type": "boolean"}
        if kind == "pattern":
            return {"type": "string", "pattern": rng.choice(["^[0-9]{2,4}$", "^[A-Z]{3}-[0-9]{2}$", "x",
                                                             "^(card|cash)_[a-z]+$"])}
        if kind == "numbers":
            return {"enum": rng.sample([0, 1, 2.5, -3, 10, 12, 100, 1e21], rng.randint(1, 4))}
        if kind == "nullable":
            return {"enum": random_labels(rng, 3) + [None]}
        if kind == "array":
            low, items = rng.randint(0, 2), value(d + 1)
            # uniqueItems is enforced for scalar items only (see guided.py).
            unique = items.get("type") not in ("array", "object") and rng.random() < 0.4
            return {"type": "array", "items": items, "minItems": low, "maxItems": low + rng.randint(0, 4),
                    **({"uniqueItems": True} if unique else {})}
        return random_schema(rng, d + 1)

    names = random_labels(rng, rng.randint(1, 4))
    props = {name: value(depth) for name in names}
    required = sorted(rng.sample(names, rng.randint(0, len(names))))
    sizes = {}
    if rng.random() < 0.2:
        sizes = {"minProperties": rng.randint(0, len(names)), "maxProperties": rng.randint(len(required), len(names))}
        sizes["minProperties"] = min(sizes.values())
    return {"type": "object", "properties": props, "additionalProperties": rng.random() < 0.3,
            "required": required, **sizes}


def guided_decode(schema: dict, seed: int, budget: int = 400, guard_class=None) -> tuple[str, str, bool]:
    """Greedy decoding of a random-logit model over VOCAB through the SchemaGuard, stopped by the engine's stop rule
    (the first JSON object closes) or end of sequence: ("closed", the object's text), ("budget", text) or
    ("eos", text); and whether the guard lost the row (no allowed token: the row went unguided)."""
    import torch

    from retrain.evaluate.inference import JsonScanner

    gen = torch.Generator().manual_seed(seed)
    guard = (guard_class or schema_guard_class())(schema, VOCAB.__getitem__, 1, 1, [EOS])
    scanner = JsonScanner()
    ids, text = [EOS], ""
    for _ in range(budget):
        scores = torch.randn((1, len(VOCAB)), generator=gen)
        scores[0, CLOSERS] += 1.0  # the answer starts soon and its strings and lists end now and then
        token = int(guard(torch.tensor([ids]), scores)[0].argmax())
        if token == EOS:
            return "eos", text, guard.cursors[0] is None
        ids.append(token)
        end = scanner.feed(VOCAB[token])
        text += VOCAB[token]
        if end >= 0:
            return "closed", text[text.index("{"):len(text) - len(VOCAB[token]) + end], guard.cursors[0] is None
    return "budget", text, guard.cursors[0] is None


def check_decodes(schema: dict, seeds, guard_class=None) -> dict:
    """Every answer that closed is valid JSON under the schema (asserted unless guard_class is given: then
    counted); counts per outcome."""
    counts = {"closed": 0, "valid": 0, "budget": 0, "eos": 0, "lost": 0}
    for seed in seeds:
        status, text, lost = guided_decode(schema, seed, guard_class=guard_class)
        counts[status] += 1
        counts["lost"] += lost
        assert guard_class or not lost, f"the guard found no allowed token: {text!r}\nschema: {json.dumps(schema)}"
        if status != "closed":
            continue
        try:
            jsonschema.validate(json.loads(text), schema)
            counts["valid"] += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            if guard_class is None:
                raise AssertionError(f"guided answer off the schema: {text!r}\nschema: {json.dumps(schema)}")
    return counts


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.randoms(use_true_random=False), st.integers(0, 2**31))
def test_property_random_enum_schemas_and_random_logits_always_give_schema_valid_answers(rng, seed):
    schema = random_schema(rng)
    jsonschema.Draft202012Validator.check_schema(schema)
    check_decodes(schema, range(seed, seed + 3))


def test_numbers_bounds_and_enums_are_steered_before_a_dead_end():
    schema = {"type": "object", "properties": {
        "q": {"type": "integer", "minimum": 1}, "r": {"type": "integer", "minimum": -12, "maximum": -5},
        "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 2.5}, "e": {"enum": [12, 2.5, -3]}}}
    for good in ('{"q": 1}', '{"q": 905}', '{"r": -12}', '{"r": -5}', '{"x": 0.001}', '{"x": 2.5}', '{"x": 2.49}',
                 '{"e": 12}', '{"e": 2.5}', '{"e": -3}'):
        assert feeds(good, schema), good
        jsonschema.validate(json.loads(good), schema)
    # Refused at the first character that rules every allowed value out.
    for bad, at in (('{"q": 0', 6), ('{"q": -', 6), ('{"r": 5', 6), ('{"r": -4', 7), ('{"r": -13', 8),
                    ('{"r": -1}', 8), ('{"x": 0}', 7), ('{"x": 2.6', 8), ('{"x": 3', 6), ('{"x": 1e', 7),
                    ('{"e": 1}', 7), ('{"e": 2.0', 8), ('{"e": 5', 6)):
        assert first_rejected(schema, bad) == at, bad


def test_unique_items_are_steered_away_from_repeats_and_full_lists():
    schema = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "ab", "b"]}, "uniqueItems": True},
        "n": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "uniqueItems": True},
        "z": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        "f": {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True},
        "s": {"type": "array", "items": {"type": "string", "maxLength": 1}, "uniqueItems": True}}}
    assert feeds('{"tags": ["a", "ab", "b"], "n": [1, 0], "z": [0, 1], "f": [true, false], "s": ["", "x"]}', schema)
    for bad, at in (('{"tags": ["ab", "ab', 18),  # "ab" is taken; "a" is still free, so '"a' passes
                    ('{"tags": ["a", "ab", "b",', 24),  # ... and the list is full: no ',' after the last
                    ('{"n": [1, 1', 10), ('{"n": [1, 0,', 11), ('{"z": [0, 0', 10), ('{"f": [true, t', 13),
                    ('{"s": ["x", "x', 13)):
        assert first_rejected(schema, bad) == at, bad
    assert feeds('{"z": [1, 12', schema) and feeds('{"tags": ["ab", "a"]', schema)


def test_patterns_and_property_counts():
    schema = {"type": "object", "maxProperties": 2, "required": ["po"], "properties": {
        "po": {"type": "string", "pattern": "^[0-9]{2,4}$"}, "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]$"}}}
    assert feeds('{"po": "1234"}', schema) and feeds('{"sku": "ABC-1", "po": "\\u0031\\u0032"}', schema)
    for bad, at in (('{"po": "1a', 9), ('{"po": "1"', 9), ('{"po": "12345', 12), ('{"sku": "AB1', 11),
                    ('{"po": "\\n', 9),  # an escape that decodes outside the pattern
                    ('{"sku": "ABC-1", "x', 18),  # the last free place goes to the required key
                    ('{"po": "12", "a": 1, ', 19)):  # maxProperties: no ',' after the second
        assert first_rejected(schema, bad) == at, bad


def test_real_smollm2_under_random_enum_schemas_writes_only_schema_valid_answers():
    """The real model, prompted with a worked example whose label is off the enum and escaped (as the failing
    evaluation answers were), under random label enums: every answer that closes validates, none is left
    unguided."""
    import random

    from retrain.evaluate.inference import make_engine

    rng = random.Random(19)
    shot = [{"role": "system", "content": "Reply with only a JSON object {\"label\": ...} naming the request."},
            {"role": "user", "content": "Which cards do you support? Amex?"},
            {"role": "assistant", "content": '{"label": "supported_card\\u03c2_american_express"}'},
            {"role": "user", "content": "My card is not working and the disposable card limit is too low"}]
    schemas = [LABEL] + [{"type": "object", "additionalProperties": False, "required": ["label", "more"],
                          "properties": {"label": {"enum": random_labels(rng, 12) + ['say "hi"', "ς_x"]},
                                         "more": {"type": "array", "maxItems": 3,
                                                  "items": {"enum": random_labels(rng, 6)}}}}
                         for _ in range(2)]
    engine = make_engine({"kind": "hf", "path": "smollm2-135m-instruct"}, batch_size=2, schema=LABEL)
    for schema in schemas:
        engine.schema = schema
        second = shot[:3] + [{"role": "user", "content": "How long until my new card arrives?"}]
        outs, info = engine.generate_ids([shot, second], max_new_tokens=48)
        closed = 0
        for ids in outs:
            text = engine.decode(ids)
            if text.rstrip().endswith("}"):
                jsonschema.validate(json.loads(text[text.index("{"):]), schema)
                closed += 1
            elif "{" in text:  # inside the object only the budget ends an answer
                assert len(ids) == 48 and not set(ids) & set(engine.eos_ids), text
        assert closed, "no answer closed"


# --- property: an adversarial model that tries escapes first still spells every label exactly ------------------
# The issue's failures: JSON-valid answers off a 77-label enum of snake_case labels sharing prefixes, written with
# escapes ("supported_card\\u03c2_american_express", "card_n\\u03c2_card", "disposable_card_l\\u00221"). This
# "model" ranks escapes, quotes and non-ASCII tokens above everything else at every step (random order among
# them), the rest at random: the guide must still produce the enum value spelled as is, every time.
SNAKE = ["card", "cards", "card_not", "card_n", "supported", "supported_card", "disposable", "disposable_card",
         "l", "limit", "limits", "virtual", "cash", "top_up", "american", "express", "working", "fee", "charged"]
ISSUE_LABELS = ["supported_cards_and_currencies", "card_not_working", "disposable_card_limits"]
ADVERSARIAL = ["\\u03c2", "\\u0022", "\\u00221", "\\u00", "\\u", "\\", "\\\\", '\\"', '"', "\\n",
               "\\/", "\\u0063", "ς", "é", "\U0001F600", "\\ud83d", "\\ud83d\\ude00", "_\\u03c2", "ç_", '"x']
ADV_VOCAB = VOCAB + [t for t in ADVERSARIAL if t not in VOCAB]
ADV_IDS = [ADV_VOCAB.index(t) for t in ADVERSARIAL]
ADV_EOS = ADV_VOCAB.index("<eos>")


def snake_labels(rng, n: int = 77) -> list[str]:
    labels = set(ISSUE_LABELS)
    while len(labels) < n:
        labels.add("_".join(rng.choice(SNAKE) for _ in range(rng.randint(1, 4))))
    return sorted(labels)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31), st.integers(0, 2**31))
def test_property_a_model_that_prefers_escapes_still_writes_every_label_exactly(label_seed, seed):
    import random

    import torch

    from retrain.evaluate.inference import JsonScanner

    rng = random.Random(label_seed)
    labels = snake_labels(rng)
    schema = {"type": "object", "additionalProperties": False, "required": ["label", "more"],
              "properties": {"label": {"type": "string", "enum": labels},
                             "more": {"type": "array", "maxItems": 3, "uniqueItems": True,
                                      "items": {"type": "string", "enum": rng.sample(labels, 10)}}}}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        guard = schema_guard_class()(schema, ADV_VOCAB.__getitem__, 1, 1, [ADV_EOS], from_first_token=True)
        scanner, ids, text = JsonScanner(), [ADV_EOS], ""
        for _ in range(600):
            scores = torch.randn((1, len(ADV_VOCAB)), generator=gen)
            scores[0, ADV_IDS] += 10.0 + torch.rand(len(ADV_IDS), generator=gen)  # always tried first
            token = int(guard(torch.tensor([ids]), scores)[0].argmax())
            assert token != ADV_EOS, text
            ids.append(token)
            text += ADV_VOCAB[token]
            end = scanner.feed(ADV_VOCAB[token])
            if end >= 0:  # the engine's stop rule: the answer ends where the object closes ('},' -> '}')
                text = text[:len(text) - len(ADV_VOCAB[token]) + end]
                break
        assert guard.cursors[0] is not None, f"left unguided: {text!r}"
        assert text.startswith("{") and text.endswith("}"), text
        answer_json = json.loads(text)
        jsonschema.validate(answer_json, schema)
        # Spelled exactly: ASCII labels are written as is, no escape anywhere in the answer.
        assert "\\" not in text, text
        assert f'"{answer_json["label"]}"' in text
        assert guard.masked > 0  # the model's escapes were overruled
