"""Schema-guided greedy decoding for local models: the answer's JSON object follows the use case's output schema.

Serving stacks constrain a model's JSON the same way (Ollama's ``format`` with a JSON schema, vLLM's guided
decoding, OpenAI's structured outputs), so evaluating a local model under the schema measures what it will do in
production. On the demo's SmolLM2 candidate the raw greedy output lost 7 of 87 test answers to list items that
cycle until the token budget (``"urgent", "asap", "urgent", ...``) and 4 more to labels one token off the enum
(``"PERSONAL"``, ``"Gift"``).

How: at every step, each row's most likely token is checked against the schema by feeding its text to a
character-level cursor; a token the schema forbids is masked and the next most likely one is tried. Only
tokens ranked above the chosen one are touched, so a model that already follows the schema decodes exactly as
without the guide. The cursor accepts a prefix only while it can still be completed into a valid answer (no dead
end, where no token could continue the row and the guide would have to let it go), so every answer that closes
is schema-valid. With ``from_first_token`` (what the evaluation engine uses) the first token must open the object
(``{``, no prose or end of sequence before it); without it, text before the first ``{`` is free, as the stop rule
treats it. What it enforces once the object is open:

* JSON syntax (strings, numbers, literals, objects, arrays); no end-of-sequence token inside the object;
* strings by their DECODED value: escapes are decoded as they are written and a partial one (``\\``,
  ``\\u00``) is accepted only while it can still become a character that continues the value. ``enum`` /
  ``const`` values prefix by prefix, ``minLength``/``maxLength`` in decoded characters (an astral character,
  two ``\\u`` halves, counts once; unpaired surrogates are refused), ``pattern`` by partial regex matching
  (the ``regex`` package). In an enum label, a const or a key from a closed set, printable ASCII must be written
  as is: escapes only for the characters JSON must escape (quote, backslash, controls) and non-ASCII ones;
* objects: property names from ``properties`` when ``additionalProperties`` is false (decoded, like values),
  no repeated key, no ``}`` before every ``required`` key is present, ``minProperties``/``maxProperties`` (the
  last free places go to missing required keys);
* numbers: ``integer`` vs ``number``, ``enum``/``const`` (canonical spelling: ``12``, ``2.5``),
  ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` (a bounded number is written without an
  exponent, and a digit is refused once no completion fits the bounds); ``true``/``false``/``null`` in enums;
* arrays: ``maxItems``, ``minItems``, ``uniqueItems`` for scalar items (a label already in the list is steered
  away from as it is written, and ``,`` is refused when no unused value is left); and a loop guard: an item
  equal to an earlier item of the same array ends the array once ``minItems`` allows (the item is kept; set
  metrics ignore duplicates). Without it a cycling model writes until the budget and the whole answer is lost.

Not enforced (checked for JSON syntax only): ``anyOf``/``oneOf``/``allOf``/``not``/``$ref`` parts,
``multipleOf``, ``format``, ``patternProperties``/``propertyNames``, ``uniqueItems`` over objects or arrays,
enums of objects or arrays. A pattern combined with a tight ``maxLength`` can still dead-end. If no token of the
vocabulary can continue a row, the row is left unguided and logged (``lost``); over random enum schemas with a
tokenizer-like vocabulary this never happened (bench/guided_validity.py). The cursor is pure Python (tested
without torch); the Hugging Face ``LogitsProcessor`` is built on first use.
"""

from __future__ import annotations

import functools
import json
import math
import re
from bisect import bisect_left
from fractions import Fraction
from typing import Any

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?$")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)$")
# What a number may look like while it is being written (under bounds: without an exponent).
_NUMBER_PREFIX = re.compile(r"-?((0|[1-9][0-9]*)((\.[0-9]*)|(\.[0-9]+)?[eE][+-]?[0-9]*)?)?")
_INTEGER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?")
_PLAIN_PREFIX = re.compile(r"-?((0|[1-9][0-9]*)(\.[0-9]*)?)?")
_MAX_NUMBER = 40  # characters
_LITERALS = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_SHORT = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SHORT_OF = {c: "\\" + e for e, c in _SHORT.items()}
_HEX = frozenset("0123456789abcdefABCDEF")
# Characters tried for an escape inside a string with a pattern (non-ASCII ones must be written raw there).
_ESCAPABLE = "".join(map(chr, range(0x20, 0x7F))) + "\b\f\n\r\t"
_INF = float("inf")
_ANY: dict = {}
_FREE_KEY = (None, None, 0, _INF, None)  # the string rule of a key when any key may come
_CONTAINER = object()  # the value of a closed object or array (not tracked)


def _kind(value: Any) -> str:
    return ("null" if value is None else "boolean" if isinstance(value, bool) else "string" if isinstance(value, str)
            else "array" if isinstance(value, list) else "object" if isinstance(value, dict) else "number")


def _values(schema: dict) -> list | None:
    """The values an ``enum`` / ``const`` allows, or None."""
    if "const" in schema:
        return [schema["const"]] if "enum" not in schema else [v for v in schema["enum"] if v == schema["const"]]
    return schema.get("enum")


def _types(schema: dict) -> set[str] | None:
    """JSON types a schema admits, or None for any."""
    kind = schema.get("type")
    declared = None
    if kind is not None:
        declared = set(kind) if isinstance(kind, list) else {kind}
        if "integer" in declared:
            declared.add("number")
    values = _values(schema)
    if values is not None:
        kinds = {_kind(v) for v in values}
        return kinds if declared is None else kinds & declared
    return declared


def _child(schema: dict) -> dict:
    # Combinators are not followed: their values get syntax checks only.
    return _ANY if any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "not")) else schema


# --- escapes -------------------------------------------------------------------------------------------------
# A string is checked by its decoded value: an escape is decoded as it is written, and a partial escape ('\\',
# '\\u00') is accepted only while some character it can still become continues an allowed value (an enum
# label, a const, a key, the room maxLength leaves, the pattern). In a string with a fixed set of values (enum,
# const, keys), printable ASCII must be written as is: an escape is allowed only for a character JSON must escape
# (quote, backslash, control characters) or a non-ASCII one (a byte-level tokenizer may not spell it raw token by
# token). A model primed to escape otherwise spends six tokens per letter ('\\u0063ard') and runs out of budget.


def _may_escape(c: str) -> bool:
    """May an enum label / key / const write c as an escape?"""
    return not " " <= c <= "~" or c in '"\\'


def _unescape(esc: str) -> str | None:
    """An escape being written ('\\\\', '\\\\u00e', '\\\\ud83d\\\\ude0'): its character once complete, '' while
    it can still become one, None if it cannot (unknown letter, bad hex digit, unpaired surrogate)."""
    n = len(esc)
    if n == 1:
        return ""
    if esc[1] != "u":
        return _SHORT.get(esc[1])
    if not all(c in _HEX for c in esc[2:6]):
        return None
    if n < 6:  # can it still become something other than a low surrogate (which cannot start a character)?
        return "" if int(esc[2:].ljust(4, "0"), 16) < 0xDC00 or int(esc[2:].ljust(4, "f"), 16) > 0xDFFF else None
    high = int(esc[2:6], 16)
    if not 0xD800 <= high <= 0xDFFF:
        return chr(high)
    if high >= 0xDC00:
        return None
    if n == 6 or (n == 7 and esc[6] == "\\"):
        return ""
    if esc[6] != "\\" or esc[7] != "u" or not all(c in _HEX for c in esc[8:12]):
        return None
    if n == 8:
        return ""
    if int(esc[8:].ljust(4, "f"), 16) < 0xDC00 or int(esc[8:].ljust(4, "0"), 16) > 0xDFFF:
        return None  # the second half of a pair must be a low surrogate
    if n < 12:
        return ""
    return chr(0x10000 + ((high - 0xD800) << 10) + (int(esc[8:12], 16) - 0xDC00))


def _normal(esc: str) -> str:
    """Hex digits in lower case, as _spellings writes them."""
    return esc[:2] + esc[2:6].lower() + esc[6:8] + esc[8:].lower() if esc[1:2] == "u" else esc


@functools.lru_cache(maxsize=8192)
def _spellings(c: str) -> tuple[str, ...]:
    """Every escape JSON writes the character c with (lower-case hex)."""
    out = [_SHORT_OF[c]] if c in _SHORT_OF else []
    cp = ord(c)
    if cp < 0x10000:
        out.append("\\u%04x" % cp)
    else:
        cp -= 0x10000
        out.append("\\u%04x\\u%04x" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
    return tuple(out)


def _escapes_to(esc: str, c: str) -> bool:
    norm = _normal(esc)
    return any(s.startswith(norm) for s in _spellings(c))


# --- numbers under bounds ------------------------------------------------------------------------------------
def _bounds(schema: dict) -> tuple | None:
    """(low, low is exclusive, high, high is exclusive) as Fractions (None: unbounded), or None if unbounded."""
    low = high = None
    low_open = high_open = False
    for key, is_open in (("minimum", False), ("exclusiveMinimum", True)):
        v = schema.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = Fraction(v)
            if low is None or v > low or (v == low and is_open):
                low, low_open = v, is_open
    for key, is_open in (("maximum", False), ("exclusiveMaximum", True)):
        v = schema.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = Fraction(v)
            if high is None or v < high or (v == high and is_open):
                high, high_open = v, is_open
    return None if low is None and high is None else (low, low_open, high, high_open)


def _within(value: Fraction, bounds: tuple) -> bool:
    low, low_open, high, high_open = bounds
    return ((low is None or value > low or (value == low and not low_open)) and
            (high is None or value < high or (value == high and not high_open)))


def _overlap(a: Fraction | None, a_closed: bool, b: Fraction | None, b_closed: bool, integer: bool,
             bounds: tuple, used: frozenset) -> bool:
    """Does the interval from a to b (None: unbounded) hold a value within bounds (an integer, if integer) that
    is not in used?"""
    low, low_open, high, high_open = bounds
    lo, lo_closed = a, a_closed
    if low is not None and (lo is None or low > lo or (low == lo and low_open)):
        lo, lo_closed = low, not low_open
    hi, hi_closed = b, b_closed
    if high is not None and (hi is None or high < hi or (high == hi and high_open)):
        hi, hi_closed = high, not high_open
    if integer:
        first = None if lo is None else (math.floor(lo) + 1 if not lo_closed and lo == math.floor(lo)
                                         else math.ceil(lo))
        last = None if hi is None else (math.ceil(hi) - 1 if not hi_closed and hi == math.ceil(hi)
                                        else math.floor(hi))
        if first is None or last is None:
            return True
        return last - first + 1 > sum(1 for u in used if first <= u <= last and u == int(u))
    if lo is None or hi is None or lo < hi:
        return True
    return lo == hi and lo_closed and hi_closed and float(lo) not in used


_NONE: frozenset = frozenset()
_UNBOUNDED = (None, False, None, False)


def _reachable(buf: str, integer: bool, bounds: tuple | None, used: frozenset) -> bool:
    """Can the number prefix buf (no exponent) still become a number within bounds, not in used?"""
    bounds = bounds or _UNBOUNDED
    negative = buf.startswith("-")
    body = buf[1:] if negative else buf
    # Magnitudes the prefix can still reach: (from, to, to included).
    if not body:
        spans = [(Fraction(0), None, False)]
    elif "." in body:
        whole, frac = body.split(".")
        start = Fraction(int(whole + frac), 10 ** len(frac))
        spans = [(start, start + Fraction(1, 10 ** len(frac)), False)]
    elif body == "0":
        spans = [(Fraction(0), Fraction(0 if integer else 1), integer)]
    else:
        d = int(body)
        low, _, high, _ = bounds
        far = high if not negative else (None if low is None else -low)
        if far is None:
            return True  # unbounded on this side: a long enough number gets there
        spans = []
        scale = 1
        while d * scale <= far and len(body) + len(str(scale)) <= _MAX_NUMBER + 1:
            spans.append((Fraction(d * scale), Fraction((d + 1) * scale - (1 if integer else 0)), integer))
            scale *= 10
    for a, b, b_closed in spans:
        if negative:
            if _overlap(None if b is None else -b, b_closed, -a, True, integer, bounds, used):
                return True
        elif _overlap(a, True, b, b_closed, integer, bounds, used):
            return True
    return False


class SchemaCursor:
    """Accepts a JSON text one character at a time while it can still become a value the schema allows.

    ``feed(text)`` returns False (and leaves the cursor in an undefined state) as soon as a character cannot be
    part of a valid answer; use ``clone()`` to try a continuation. ``free`` is True before the object starts and
    after it closes: there any text is accepted. Every accepted prefix can still be completed into a valid
    answer (for the keywords listed in the module docstring), so a guided row never runs into a dead end.
    """

    __slots__ = ("schema", "stack", "started", "done", "memo")

    def __init__(self, schema: dict[str, Any], memo: dict | None = None):
        self.schema = schema
        self.stack: list[dict] = []
        self.started = False
        self.done = False
        # Per sub-schema rules (allowed strings, bounds...), shared by clones: id -> (schema, rule).
        self.memo = {} if memo is None else memo

    def clone(self) -> SchemaCursor:
        other = SchemaCursor.__new__(SchemaCursor)
        other.schema = self.schema
        # Frames hold immutable values (tuples, frozensets, strings), so copying the dicts is a full copy.
        other.stack = [dict(f) for f in self.stack]
        other.started = self.started
        other.done = self.done
        other.memo = self.memo
        return other

    @property
    def free(self) -> bool:
        return not self.started or self.done

    def feed(self, text: str) -> bool:
        for ch in text:
            if not self._char(ch):
                return False
        return True

    # --- per sub-schema rules, computed once -----------------------------------------------------------------
    def _rule(self, schema: dict, kind: str) -> tuple:
        hit = self.memo.get((kind, id(schema)))
        if hit is not None and hit[0] is schema:
            return hit[1]
        rule = self._string_rule(schema) if kind == "str" else self._number_rule(schema)
        self.memo[(kind, id(schema))] = (schema, rule)  # holding the schema keeps its id unique
        return rule

    @staticmethod
    def _string_rule(schema: dict) -> tuple:
        """(allowed values or None, the same as a set, minLength, maxLength, compiled pattern or None)."""
        low, high = schema.get("minLength", 0), schema.get("maxLength", _INF)
        pattern = schema.get("pattern")
        values = _values(schema)
        if values is not None:
            choices = tuple(sorted(v for v in values if isinstance(v, str) and low <= len(v) <= high
                                   and (pattern is None or re.search(pattern, v))))
            return choices, frozenset(choices), low, high, None
        return None, None, low, high, _pattern(pattern) if pattern is not None else None

    @staticmethod
    def _number_rule(schema: dict) -> tuple:
        """(integer only, canonical spellings of the allowed values or None, bounds or None)."""
        declared = schema.get("type")
        declared = set(declared) if isinstance(declared, list) else {declared}
        integer = "integer" in declared and "number" not in declared
        values = _values(schema)
        spelled = None
        if values is not None:
            spelled = frozenset(
                str(int(v)) if integer or (isinstance(v, float) and v.is_integer() and abs(v) < 1e16) else json.dumps(v)
                for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
                and (not integer or float(v).is_integer()) and math.isfinite(v))
        bounds = _bounds(schema)
        if spelled is not None and bounds is not None:
            spelled = frozenset(s for s in spelled if _within(Fraction(s), bounds))
        return integer, spelled, bounds

    # --- one character -------------------------------------------------------------------------------
    def _char(self, ch: str) -> bool:
        if self.done:
            return True
        if not self.started:
            if ch == "{":
                self.started = True
                return self._open_value({**self.schema, "type": "object"} if _types(self.schema) is None
                                        else self.schema, ch)
            return True
        frame = self.stack[-1]
        kind = frame["kind"]
        if kind == "str":
            return self._string_char(frame, ch)
        if kind == "num":
            if ch in "0123456789+-.eE":
                frame["buf"] += ch
                return self._number_prefix(frame["rule"], frame["buf"], frame.get("used", _NONE))
            if not self._number_done(frame["rule"], frame["buf"]):
                return False
            self.stack.pop()
            return self._value_done(float(frame["buf"])) and self._char(ch)
        if kind == "lit":
            word = frame["word"]
            if ch != word[frame["pos"]]:
                return False
            frame["pos"] += 1
            if frame["pos"] == len(word):
                self.stack.pop()
                return self._value_done(frame["value"])
            return True
        if kind == "obj":
            return self._object_char(frame, ch)
        return self._array_char(frame, ch)

    def _open_value(self, schema: dict, ch: str) -> bool:
        """ch starts a value of this schema (the caller skipped whitespace)."""
        kinds = _types(schema)

        def ok(kind: str) -> bool:
            return kinds is None or kind in kinds

        if ch == "{" and ok("object"):
            self.stack.append({"kind": "obj", "schema": _child(schema), "state": "start", "keys": frozenset(),
                               "key": None})
            return True
        if ch == "[" and ok("array"):
            self.stack.append({"kind": "arr", "schema": _child(schema), "state": "start", "items": ()})
            return True
        if ch == '"' and ok("string"):
            rule = self._rule(_child(schema), "str")
            if rule[0] is not None and not rule[0]:
                return False
            self.stack.append({"kind": "str", "rule": rule, "buf": "", "esc": None, "key": False})
            return True
        if (ch == "-" or ch.isdigit()) and ok("number"):
            rule = self._rule(_child(schema), "num")
            if not self._number_prefix(rule, ch):
                return False
            self.stack.append({"kind": "num", "buf": ch, "rule": rule})
            return True
        if ch in _LITERALS:
            word, value = _LITERALS[ch]
            if ok("null" if value is None else "boolean"):
                values = _values(schema)
                if values is not None and not any(v is value for v in values):
                    return False
                self.stack.append({"kind": "lit", "word": word, "pos": 1, "value": value})
                return True
        return False

    # --- strings -------------------------------------------------------------------------------------
    def _string_char(self, frame: dict, ch: str) -> bool:
        esc = frame["esc"]
        if esc is not None:
            esc += ch
            decoded = _unescape(esc)
            if decoded is None:
                return False
            if not decoded:
                frame["esc"] = esc
                return self._escape_viable(frame, esc)
            frame["esc"] = None
            if frame["rule"][0] is not None and not _may_escape(decoded):
                return False  # '\\/' for '/': printable ASCII is written as is in a label
            return self._extend(frame, decoded)
        if ch == "\\":
            frame["esc"] = ch
            return self._escape_viable(frame, ch)
        if ch == '"':
            self.stack.pop()
            value = frame["buf"]
            _, members, low, _, pattern = frame["rule"]
            if members is not None:
                if value not in members:
                    return False
            elif len(value) < low or (pattern is not None and pattern.search(value) is None):
                return False
            return self._key_done(value) if frame["key"] else self._value_done(value)
        if ch < " ":
            return False  # a raw control character
        return self._extend(frame, ch)

    def _extend(self, frame: dict, ch: str) -> bool:
        buf = frame["buf"] + ch
        frame["buf"] = buf
        choices, _, _, high, pattern = frame["rule"]
        if choices is not None:  # sorted: the values starting with buf are a run, from where buf would go
            i = bisect_left(choices, buf)
            return i < len(choices) and choices[i].startswith(buf)
        if len(buf) > high or (len(buf) == high and buf in frame.get("used", _NONE)):
            return False
        return pattern is None or _pattern_allows(pattern, buf, high)

    def _escape_viable(self, frame: dict, esc: str) -> bool:
        """Can the partial escape still decode to a character that continues the string?"""
        choices, _, _, high, pattern = frame["rule"]
        buf = frame["buf"]
        if choices is not None:
            n = len(buf)
            return any(len(v) > n and v.startswith(buf) and _may_escape(v[n]) and _escapes_to(esc, v[n])
                       for v in choices)
        if len(buf) >= high:
            return False
        return pattern is None or any(_escapes_to(esc, c) and _pattern_allows(pattern, buf + c, high)
                                      for c in _ESCAPABLE)

    # --- numbers -------------------------------------------------------------------------------------
    @staticmethod
    def _number_prefix(rule: tuple, buf: str, used: frozenset = frozenset()) -> bool:
        """Can buf still become an allowed number (not in used: the items of a uniqueItems list)?"""
        integer, spelled, bounds = rule
        if spelled is not None:
            return any(s.startswith(buf) and float(s) not in used for s in spelled)
        if len(buf) >= _MAX_NUMBER:  # at the limit, only a complete number (no dead end)
            return (len(buf) == _MAX_NUMBER and SchemaCursor._number_done(rule, buf)
                    and float(buf) not in used)
        plain = _INTEGER_PREFIX if integer else _PLAIN_PREFIX  # no exponent
        if bounds is not None:
            return plain.fullmatch(buf) is not None and _reachable(buf, integer, bounds, used)
        if (_INTEGER_PREFIX if integer else _NUMBER_PREFIX).fullmatch(buf) is None:
            return False
        return not used or plain.fullmatch(buf) is None or _reachable(buf, integer, None, used)

    @staticmethod
    def _number_done(rule: tuple, buf: str) -> bool:
        integer, spelled, bounds = rule
        if spelled is not None:
            return buf in spelled
        if not (_INTEGER if integer else _NUMBER).match(buf):
            return False
        return bounds is None or _within(Fraction(buf), bounds)

    # --- objects -------------------------------------------------------------------------------------
    def _allowed_keys(self, frame: dict) -> frozenset | None:
        schema = frame["schema"]
        keys = frame["keys"]
        if "maxProperties" in schema:
            missing = frozenset(schema.get("required", ())) - keys
            if schema["maxProperties"] - len(keys) <= len(missing):
                return missing  # the last places go to the required keys
        if schema.get("additionalProperties", True) is not False:
            return None
        return frozenset(schema.get("properties", {})) - keys

    def _object_char(self, frame: dict, ch: str) -> bool:
        state = frame["state"]
        if state == "value":
            if ch in _WS:
                return True
            schema = frame["schema"]
            props = schema.get("properties", {})
            extra = schema.get("additionalProperties", True)
            sub = props.get(frame["key"], extra if isinstance(extra, dict) else _ANY)
            return self._open_value(sub, ch)
        if ch in _WS:
            return True
        if state in ("start", "comma") and ch == '"':
            allowed = self._allowed_keys(frame)
            if allowed is not None and not allowed:
                return False
            rule = _FREE_KEY if allowed is None else (tuple(sorted(allowed)), allowed, 0, _INF, None)
            self.stack.append({"kind": "str", "rule": rule, "buf": "", "esc": None, "key": True})
            return True
        if state == "colon":
            if ch != ":":
                return False
            frame["state"] = "value"
            return True
        if state == "after" and ch == ",":
            allowed = self._allowed_keys(frame)
            if allowed is not None and not allowed:
                return False  # every allowed property is written: only '}' can follow
            frame["state"] = "comma"
            return True
        if state in ("start", "after") and ch == "}":
            schema = frame["schema"]
            if set(schema.get("required", ())) - frame["keys"] or len(frame["keys"]) < schema.get("minProperties", 0):
                return False
            self.stack.pop()
            return self._value_done(_CONTAINER)
        return False

    def _key_done(self, key: str) -> bool:
        frame = self.stack[-1]
        if key in frame["keys"]:
            return False
        allowed = self._allowed_keys(frame)
        if allowed is not None and key not in allowed:
            return False
        frame["key"] = key
        frame["keys"] = frame["keys"] | {key}
        frame["state"] = "colon"
        return True

    # --- arrays --------------------------------------------------------------------------------------
    def _array_char(self, frame: dict, ch: str) -> bool:
        if ch in _WS:
            return True
        state = frame["state"]
        schema = frame["schema"]
        if ch == "]" and state in ("start", "after"):
            if len(frame["items"]) < schema.get("minItems", 0):
                return False
            self.stack.pop()
            return self._value_done(_CONTAINER)
        if state == "after":
            if ch != "," or frame.get("closing"):
                return False
            if schema.get("uniqueItems") and not self._room(frame):
                return False  # every allowed item is in the list already
            frame["state"] = "value"
            return True
        if len(frame["items"]) >= schema.get("maxItems", _INF):
            return False
        items = schema.get("items")
        if not self._open_value(_child(items) if isinstance(items, dict) else _ANY, ch):
            return False
        if schema.get("uniqueItems"):  # the item must differ from the earlier ones: steer it early
            top = self.stack[-1]
            kind = top["kind"]
            if kind == "lit":
                return (type(top["value"]).__name__, top["value"]) not in frame["items"]
            if kind == "str":
                used = frozenset(v for t, v in frame["items"] if t == "str")
                choices = top["rule"][0]
                if choices is not None:
                    unused = tuple(c for c in choices if c not in used)
                    top["rule"] = (unused, frozenset(unused)) + top["rule"][2:]
                    return bool(unused)
                top["used"] = used
                return not (top["rule"][3] == 0 and "" in used)
            if kind == "num":
                top["used"] = frozenset(v for t, v in frame["items"] if t == "float")
                return self._number_prefix(top["rule"], top["buf"], top["used"])
        return True

    def _room(self, frame: dict) -> bool:
        """Under uniqueItems: is there an allowed item not yet in the list? (Checked for finite item sets: enums,
        booleans, null, bounded integers.)"""
        items = frame["schema"].get("items")
        sub = _child(items) if isinstance(items, dict) else _ANY
        kinds = _types(sub)
        used = set(frame["items"])
        values = _values(sub)
        if values is not None:
            strings = self._rule(sub, "str")[0] if "string" in kinds else ()
            numbers = self._rule(sub, "num")[1] if "number" in kinds else ()
            pool = ([("str", v) for v in strings] + [("float", float(v)) for v in numbers]
                    + [(type(v).__name__, v) for v in values if _kind(v) in kinds & {"boolean", "null"}])
            return any(p not in used for p in pool) or any(_kind(v) in ("array", "object") for v in values)
        if kinds is not None and kinds <= {"boolean", "null"}:
            pool = ([("bool", True), ("bool", False)] if "boolean" in kinds else []) + (
                [("NoneType", None)] if "null" in kinds else [])
            return any(p not in used for p in pool)
        if kinds == {"integer", "number"} and self._rule(sub, "num")[0]:
            bounds = _bounds(sub)
            if bounds is not None and bounds[0] is not None and bounds[2] is not None:
                return _overlap(bounds[0], True, bounds[2], True, True, bounds,
                                frozenset(v for t, v in used if t == "float"))
        return True

    # --- a value ended -------------------------------------------------------------------------------
    def _value_done(self, value: Any) -> bool:
        if not self.stack:
            self.done = True
            return True
        parent = self.stack[-1]
        if parent["kind"] == "obj":
            parent["state"] = "after"
            return True
        # Containers are not tracked: only scalar repeats count as a loop (or break uniqueItems).
        # Typed: True == 1.0 in Python.
        hashable = object() if value is _CONTAINER else (type(value).__name__, value)
        items = parent["items"]
        schema = parent["schema"]
        repeat = hashable in items
        if repeat and schema.get("uniqueItems"):
            return False
        # The loop guard: a repeated item ends the list (once minItems allows it to end).
        n = len(items) + 1
        parent["closing"] = (repeat and n >= schema.get("minItems", 0)) or n >= schema.get("maxItems", _INF)
        parent["items"] = items + (hashable,)
        parent["state"] = "after"
        return True


@functools.lru_cache(maxsize=256)
def _pattern(source: str):
    import regex  # partial matching: can the text still become a match?

    return regex.compile(source)


def _pattern_allows(pattern, text: str, high: float) -> bool:
    """text is a prefix of a string the pattern matches (a match itself if no room is left)."""
    if len(text) >= high:
        return pattern.search(text) is not None
    return pattern.search(text, partial=True) is not None


# --- the Hugging Face logits processor -------------------------------------------------------------------
# Candidates checked per row and step before scanning the whole vocabulary; a fine-tuned model's first choice
# passes almost always, an untuned one's within a few.
TOP_K = 32


@functools.cache
def schema_guard_class():
    from transformers import LogitsProcessor

    class SchemaGuard(LogitsProcessor):
        """Masks, per row, the tokens ranked above the most likely token the schema allows (greedy decoding)."""

        def __init__(self, schema: dict, token_text, prompt_len: int, batch_size: int, eos_ids, *,
                     from_first_token: bool = False):
            self.token_text = token_text
            # From the first token: the answer must open with '{' (no prose, no end of sequence before it), as a
            # serving stack's JSON-schema output does; otherwise text before the object is left to the model.
            self.from_first_token = from_first_token
            memo: dict = {}  # the schema's per-part rules, computed once for the batch
            self.cursors = [SchemaCursor(schema, memo) for _ in range(batch_size)]
            self.seen = prompt_len
            self.eos = frozenset(eos_ids)
            self.masked = 0  # tokens the guard overruled (logged by the engine)
            self.lost = 0  # rows left unguided: no token of the vocabulary could continue them

        def _allows(self, cursor: SchemaCursor, token: int) -> bool:
            if token in self.eos:
                return cursor.free and (cursor.started or not self.from_first_token)
            text = self.token_text(token)
            if self.from_first_token and not cursor.started and not text.startswith("{"):
                return False
            return cursor.clone().feed(text)

        def __call__(self, input_ids, scores):
            import torch

            new_cols = input_ids[:, self.seen:].tolist()
            self.seen = input_ids.shape[1]
            for b, cols in enumerate(new_cols):
                cursor = self.cursors[b]
                for token in cols:
                    if cursor is not None and not (token in self.eos or cursor.feed(self.token_text(token))):
                        cursor = None  # a row the guard could not steer (no allowed token): leave it free
                self.cursors[b] = cursor
            k = min(TOP_K, scores.shape[-1])
            values, indices = scores.topk(k, dim=-1)
            values, indices = values.tolist(), indices.tolist()
            for b, cursor in enumerate(self.cursors):
                if cursor is None or cursor.done:
                    continue
                # Greedy's order: by score, ties to the lower id (argmax takes the first maximal value).
                ranked = [t for _, t in sorted(zip(values[b], indices[b]), key=lambda p: (-p[0], p[1]))]
                if not cursor.started and not self.from_first_token and "{" not in self.token_text(ranked[0]):
                    continue  # prose before the object is free (end of sequence included)
                chosen = next((t for t in ranked if self._allows(cursor, t)), None)
                if chosen is None:
                    tried = set(ranked)
                    order = torch.sort(-scores[b], stable=True).indices.tolist()
                    chosen = next((t for t in order if t not in tried and self._allows(cursor, t)), None)
                    if chosen is None:
                        self.cursors[b] = None
                        self.lost += 1
                        continue
                if chosen != ranked[0]:
                    # Everything greedy would take before it (ties included) goes.
                    above = scores[b] >= scores[b, chosen]
                    above[chosen] = False
                    scores[b, above] = float("-inf")
                    self.masked += 1
            return scores

    return SchemaGuard
