"""PII scrubbing: every kind is replaced by a typed placeholder, business identifiers survive."""

from __future__ import annotations

from collections import Counter

import pytest

from retrain.data.scrub import find_pii, scrub_text, scrub_value


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to maria.lopez+shop@correo.es please", "EMAIL"),
        ("llámame al +34 612 345 678 mañana", "PHONE"),
        ("call (555) 123-4567 today", "PHONE"),
        ("mi móvil 612-345-678", "PHONE"),
        ("card 4111 1111 1111 1111 exp 12/28", "CARD"),
        ("card 4111-1111-1111-1111", "CARD"),
        ("IBAN ES91 2100 0418 4502 0005 1332 for the refund", "IBAN"),
        ("IBAN DE89370400440532013000", "IBAN"),
        ("SSN 123-45-6789", "SSN"),
        ("SSN 123 45 6789", "SSN"),
        ("card 4111.1111.1111.1111", "CARD"),
        ("móvil 612 34 56 78", "PHONE"),
        ("oficina 91 123 45 67", "PHONE"),
        ("call 1-800-555-0199", "PHONE"),
        ("DNI 12345678Z", "NATIONAL_ID"),
    ],
)
def test_each_kind_is_replaced(text, kind):
    counts: Counter[str] = Counter()
    out = scrub_text(text, counts)
    assert f"[{kind}]" in out and counts[kind] == 1
    assert find_pii(out) == []


@pytest.mark.parametrize(
    "text",
    [
        "PO 12345678 for 100 units of XHU-00001, SPA CAS-091284-B0C6Q4, EDI CUST850",
        "Duration: 12 days, Balance: 21 days, from 2026-11-03 to 2026-11-14",
        "presupuesto de 150 euros para un regalo",
    ],
)
def test_business_identifiers_are_kept(text):
    assert scrub_text(text) == text


def test_scrub_value_walks_nested_labels():
    counts: Counter[str] = Counter()
    out = scrub_value({"a": ["mail me: x@y.com"], "b": {"c": "+1 415 555 0100"}, "n": 3}, counts)
    assert out == {"a": ["mail me: [EMAIL]"], "b": {"c": "[PHONE]"}, "n": 3}
    assert counts == Counter({"EMAIL": 1, "PHONE": 1})
