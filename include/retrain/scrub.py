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
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?\b")),
    # Payment cards: 13-19 digits, optionally grouped by spaces or dashes.
    ("CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    # US SSN and Spanish DNI/NIE.
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("NATIONAL_ID", re.compile(r"\b(?:\d{8}|[XYZ]\d{7})-?[A-HJ-NP-TV-Z]\b")),
    # Phones: international (+34 612 345 678) or national with separators ((555) 123-4567, 612-345-678).
    (
        "PHONE",
        re.compile(
            r"(?:(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}\b)"
            r"|(?:(?<![\w-])\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}\b)"
            r"|(?:(?<![\w-])\d{3}[ .-]\d{3}[ .-]\d{3,4}\b)"
        ),
    ),
]

PLACEHOLDER = re.compile(r"\[(?:EMAIL|IBAN|CARD|SSN|NATIONAL_ID|PHONE)\]")


def scrub_text(text: str, counts: Counter[str] | None = None) -> str:
    """Replace every PII match with ``[TYPE]``; ``counts`` (if given) accumulates matches per type."""
    for kind, pattern in PII_PATTERNS:
        text, n = pattern.subn(f"[{kind}]", text)
        if n and counts is not None:
            counts[kind] += n
    return text


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
