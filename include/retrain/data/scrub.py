"""PII scrubbing: replace personal data with typed placeholders before anything is written to disk.

The same patterns are used by validation (an unscrubbed match there fails the run), so scrubbing and
checking cannot drift apart. Order matters: IBANs and card numbers are long digit runs that the phone
pattern would otherwise eat first.
"""

from __future__ import annotations

import re
from collections import Counter

# (placeholder type, compiled pattern). Patterns favour recall: a false positive costs one token of
# context, a false negative leaks personal data into a training set, a backup and maybe OpenAI.
PII_PATTERNS: list[tuple[str, re.Pattern[str]]] = [
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")),
    # IBAN: country code, 2 check digits, 11-30 alphanumerics, optionally grouped by spaces.
    # (Like every numeric pattern below, it opens with a character class and checks the preceding character with a
    # lookbehind placed after it: the regex engine can then jump to candidate positions. That makes scrubbing,
    # the bulk of collection time, several times faster than the textbook `\b...` form.)
    ("IBAN", re.compile(r"[A-Z](?<!\w[A-Z])[A-Z]\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")),
    # Payment cards: 13-19 digits, optionally grouped by spaces or dashes.
    ("CARD", re.compile(r"\d(?<!\w\d)(?:[ .-]?\d){12,18}\b")),
    # US SSN and Spanish DNI/NIE.
    ("SSN", re.compile(r"\d(?<!\w\d)\d{2}(?:-\d{2}-| \d{2} )\d{4}\b")),
    ("NATIONAL_ID", re.compile(r"[\dXYZ](?<!\w[\dXYZ])(?:(?<=\d)\d{7}|(?<=[XYZ])\d{7})-?[A-HJ-NP-TV-Z]\b")),
    # Phones: international (+34 612 345 678) or national with separators ((555) 123-4567, 612-345-678), US
    # 1-800-555-0199, Spanish mobile 612 34 56 78 and landline 91 123 45 67. Each branch starts with its first
    # character (see IBAN above).
    (
        "PHONE",
        re.compile(
            r"\+(?<![\w+]\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}\b"
            r"|\((?<![\w-]\()\d{3}\)[ .-]?\d{3}[ .-]\d{4}\b"
            r"|\d(?<![\w-]\d)(?:"
            r"\d{2}[ .-]\d{3}[ .-]\d{3,4}\b"
            r"|(?<=1)[ .-]\d{3}[ .-]\d{3}[ .-]\d{4}\b"
            r"|(?<=[6789])\d{2}(?:[ .]\d{2}){3}\b"
            r"|(?<=[89])\d[ .]\d{3}(?:[ .]\d{2}){2}\b"
            r")"
        ),
    ),
]

# Cheap pre-checks: every numeric pattern above contains a run of >= 7 digits/separators that starts and ends with
# a digit, and an e-mail needs an '@'. Most texts fail both, and skip the six full scans (collection speed).
_NUMERIC_HINT = re.compile(r"\d[\d .()\-]{5,}\d")

PLACEHOLDER = re.compile(r"\[(?:EMAIL|IBAN|CARD|SSN|NATIONAL_ID|PHONE)\]")


# The numeric patterns as one alternation, in priority order: one scan per text instead of five. At any position
# the earlier branch wins, which is the same precedence as applying the patterns one after another.
_NUMERIC = re.compile("|".join(f"(?P<{kind}>{p.pattern})" for kind, p in PII_PATTERNS if kind != "EMAIL"))
_EMAIL = PII_PATTERNS[0][1]


def scrub_text(text: str, counts: Counter[str] | None = None) -> str:
    """Replace every PII match with ``[TYPE]``; ``counts`` (if given) accumulates matches per type."""
    has_at = "@" in text
    if has_at:
        text, n = _EMAIL.subn("[EMAIL]", text)
        if n and counts is not None:
            counts["EMAIL"] += n
    if not _NUMERIC_HINT.search(text):
        return text

    def placeholder(m: re.Match) -> str:
        if counts is not None:
            counts[m.lastgroup] += 1
        return f"[{m.lastgroup}]"

    return _NUMERIC.sub(placeholder, text)


def scrub_value(value, counts: Counter[str] | None = None):
    """Scrub strings anywhere inside a JSON-like value (labels can echo personal data too)."""
    if isinstance(value, str):
        return scrub_text(value, counts)
    if isinstance(value, list):
        return [scrub_value(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: scrub_value(v, counts) for k, v in value.items()}
    return value


def find_pii(text: str) -> list[tuple[str, str]]:
    """All (type, matched text) pairs still present in ``text``."""
    return [(kind, m.group(0)) for kind, pattern in PII_PATTERNS for m in pattern.finditer(text)]


def pii_regex_list() -> list[str]:
    return [pattern.pattern for _, pattern in PII_PATTERNS]
