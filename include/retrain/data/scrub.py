"""PII scrubbing: replace personal data with typed placeholders before anything is written to disk.

Works on decoded text, never on serialized JSON: :func:`scrub_value` walks a parsed label and scrubs every string
(keys are left alone but used as context), :func:`scrub_text` scrubs one string. :func:`find_pii` /
:func:`find_pii_in_value` report what is left, with the same detectors, so scrubbing and checking cannot drift apart.

Each category is a candidate pattern plus a validator, so a number is personal data only when it has the shape *and*
the checksum of one:

- ``EMAIL``: Unicode local parts and domains (josé@correo.es), ``name [at] domain [dot] com``, ``name(at)domain.com``.
- ``IBAN``: country code, its registered length, ISO 13616 mod-97 check; grouped by spaces or not, any case.
- ``NATIONAL_ID``: Spanish DNI (8 digits, dots/dash/space allowed) and NIE (X/Y/Z + 7 digits) with the right
  control letter (number mod 23).
- ``CARD``: 14-19 digits, contiguous or in the printed groupings (4-4-4-4[-k], 4-6-5, 4-6-4) with one separator,
  an issuer prefix that exists for that length (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay, Maestro)
  and the Luhn check; a bare digit run after an order/barcode word, or a 14-digit run that is also a valid GTIN-14,
  is kept unless a card word precedes it.
- ``SSN``: US social security numbers 3-2-4 (dashes or spaces) with the SSA rules: no 000/666/9xx area, no 00
  group, no 0000 serial.
- ``PHONE``: E.164 with ``+`` or ``00``; national formats of ES (bare 9 digits starting 6/7/8/9, 3-3-3, 3-2-2-2,
  2-3-2-2), FR (0X XX XX XX XX), UK (020 7946 0958, 07700 900123), DE (030 1234567, 030/1234567), US/NANP
  ((555) 123-4567, 1-800-555-0199) and the same without ``+`` after a country code (34 612 345 678).
  Numbers without an international prefix are ambiguous: a context word just before them decides (``pedido``,
  ``order``, ``PO``, ``EAN``, ``tracking``... keep them; ``tel``, ``call``, ``móvil``... scrub them), and for a
  value inside a label the key is the context (``po_number`` vs ``phone``). A currency or unit right after a
  number (``€``, ``EUR``, ``units``) makes it an amount, not a phone or an SSN.
- ``NAME`` and ``ADDRESS`` (off unless the use case's ``pii:`` block turns them on): see :mod:`retrain.data.scrub_names`.

Order matters: e-mails first, then one scan finds IBANs, DNI/NIE and runs of digit groups; a run is split into
cards, SSNs and phones (``612345678 4111 1111 1111 1111`` holds two), and a candidate that fails its checksum is
rescanned from its next character so it cannot hide a number after it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retrain.schemas.pii import PiiConfig

KINDS = ("EMAIL", "IBAN", "NATIONAL_ID", "CARD", "SSN", "PHONE", "NAME", "ADDRESS")
PLACEHOLDER = re.compile(r"\[(?:EMAIL|IBAN|NATIONAL_ID|CARD|SSN|PHONE|NAME|ADDRESS)\]")

# --- e-mail ---------------------------------------------------------------------------------------------------
_LOCAL = r"[\w.%+'-]"
# Starts only where a local part can start (the lookbehind after the first character lets the engine skip ahead).
_EMAIL = re.compile(
    rf"{_LOCAL}(?<!{_LOCAL}{_LOCAL})(?<!\.){_LOCAL}*\s?@\s?[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{{2,}}(?![\w-])"
)
_TLDS = "com|org|net|es|fr|de|uk|io|co|eu|info|biz|edu|gov|mx|ar|cl|it|pt|nl|be|ch|at|us|ca|cat|me"
_AT = r"(?:\s*[\[({<]\s*(?:at|arroba|@)\s*[\])}>]\s*)"
_DOT = r"(?:\s*[\[({<]\s*(?:dot|punto|point)\s*[\])}>]\s*|\s+(?:dot|punto)\s+)"
_OBFUSCATED_EMAIL = re.compile(
    rf"(?i){_LOCAL}(?<!{_LOCAL}{_LOCAL}){_LOCAL}*(?:"
    rf"{_AT}[\w-]+(?:(?:\.|{_DOT})[\w-]+)*(?:\.|{_DOT})[^\W\d_]{{2,}}"  # name [at] domain [dot] com
    rf"|\s+(?:at|arroba)\s+[\w-]+(?:(?:\.|{_DOT})[\w-]+)*(?:{_DOT}[^\W\d_]{{2,}}|\.(?:{_TLDS}))"  # name at dom dot com
    rf")(?![\w-])"
)
# Every obfuscated form has "at"/"arroba" as a word (after a space or an opening bracket, before a space or a closing
# bracket) or "@" in brackets; searched on the lower-cased text, a pattern that opens with a literal lets the engine
# skip ahead (6x faster than the case-insensitive form). The detector starts from these hits too.
_OBFUSCATION_HINT = re.compile(r"a(?<=[\s\[({<]a)(?:t|rroba)(?=[\s\])}>])|@(?<=[\[({<]@)|@(?<=[\[({<]\s@)")
_OBF_CONNECTOR = re.compile(rf"(?i){_AT}|\s+(?:at|arroba)\s+")
_OBF_DOMAIN_BRACKETED = re.compile(rf"(?i)[\w-]+(?:(?:\.|{_DOT})[\w-]+)*(?:\.|{_DOT})[^\W\d_]{{2,}}(?![\w-])")
_OBF_DOMAIN_PLAIN = re.compile(rf"(?i)[\w-]+(?:(?:\.|{_DOT})[\w-]+)*(?:{_DOT}[^\W\d_]{{2,}}|\.(?:{_TLDS}))(?![\w-])")
_LOCAL_REVERSED = re.compile(r"[\w.%+'-]+")

# --- IBAN -------------------------------------------------------------------------------------------------------
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25,
    "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26, "UA": 29,
    "VG": 24, "XK": 20,
}
# Matched from its check digits (the country code is checked by lookbehinds and added back by the caller): a scan
# that pivots on digits skips the letters of ordinary text, which are most of it.
_IBAN = re.compile(r"\d(?<=[A-Za-z]{2}\d)(?<!\w[A-Za-z]{2}\d)\d(?:[ -]?[A-Za-z0-9]){10,32}")

# --- DNI / NIE ----------------------------------------------------------------------------------------------------
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"
_ID_CONTEXT = re.compile(r"(?i)\b(?:dni|nie|nif|documento|identidad|id)\b[^\n]{0,12}$")

# --- runs of digit groups (cards, SSNs, phones) -----------------------------------------------------------------
_GROUP = r"(?:\(\d{1,5}\)|\d+)"
_RUN_BODY = (
    r"(?:\+(?<![\w+]\+)\s?" + _GROUP + r"|\((?<![\w+]\()\d{1,5}\)|\d(?<![\w+]\d)(?<!\w[.\-/,]\d)\d*)"
    r"(?:(?:[ .\-/]|(?<=\))|(?=\())" + _GROUP + r")*"
)
_RUN_END = r"(?!\w)(?![.,]\d)"
# One scan for IBANs and runs of digit groups; a run may end with a DNI letter ("12.345.678-Z"), checked by the
# caller. NIEs (X/Y/Z first) get their own scan, cheap because those letters are rare.
_COMBINED = re.compile(  # (a run needs 7 digit/separator characters: "150 euros" is not even tried)
    "(?P<IBAN>" + _IBAN.pattern + r")|(?P<RUN>(?=[\d .()\-/+]{7})" + _RUN_BODY
    + r"(?:(?P<sep>[ \-]?)(?P<letter>[A-Za-z]))?" + _RUN_END + ")"
)
_NIE = re.compile(r"[XYZxyz](?<!\w[XYZxyz])[ \-]?(?:\d{7}|\d(?P<h>[. ])\d{3}(?P=h)\d{3})(?P<sep>[ \-]?)(?P<letter>[A-Za-z])(?!\w)")
_DNI_SHAPE = re.compile(r"\d{8}|\d{2}([. ])\d{3}\1\d{3}")
_TOKEN = re.compile(r"\((\d+)\)|(\d+)|([ .\-/])")
# Cheap pre-check: every numeric form above has >= 7 digits/separators starting and ending with a digit.
_NUMERIC_HINT = re.compile(r"\d[\d .()\-/]{5,}\d")

# Context words just before an ambiguous number (no +/00 prefix): the nearest one decides. Looked up as tokens of
# the lower-cased text before the number (a set lookup per token: an alternation of 100 words cost 12 us a number).
_NEG_WORDS = frozenset("""
pedido pedidos order orders po p.o oc invoice factura fra albaran albarán ref reference referencia ean gtin upc
barcode tracking seguimiento envio envío shipment awb sku art articulo artículo part pieza case caso ticket incidencia
expediente lote batch lot serial serie s/n sn qty cantidad units unidades id no nº n.º num rma asn commande bestellung
auftrag rechnung sendung model modelo version versión account cuenta contrato contract cliente customer precio price
total importe amount saldo balance stock coste cost isbn imei sscc cif
""".split())
_NEG_PHRASES = frozenset({
    "order number", "número de pedido", "numero de pedido", "reference number", "case number", "tracking number",
    "invoice number", "número de seguimiento", "numero de seguimiento", "número de serie", "numero de serie",
    "serial number", "part number", "número de factura", "numero de factura", "purchase order", "código de barras",
    "codigo de barras", "nº de pedido",
})
_POS_WORDS = frozenset("""
tel teléfono telefono tlf tfno phone telephone téléphone telephone mobile móvil movil cell call calls llama llámame
llamame llamar whatsapp fax contact contacto portable handy telefon mobil ring text sms número numero number appelez
anrufen rufen at al au unter
""".split())
_CONTEXT_TOKEN = re.compile(r"[\w/.º°\[\]]+")
# A unit or currency right after a number makes it an amount or a quantity, not a phone or an SSN.
_UNIT_AFTER = re.compile(r"(?i)\s?(?:€|eur\b|euros?\b|usd\b|\$|£|%|units?\b|unidades\b|uds\b|pcs\b|kg\b|"
                         r"cajas\b|palets\b|pallets\b|boxes\b|st(?:ü|ue)ck\b)")
_NO_UNIT = frozenset(["", ",", ".", ";", ":", ")", "]", "\n", "!", "?", "'", '"'])  # next chars that rule a unit out
_CONTEXT_CHARS = 30
_KEY_POS = re.compile(r"(?i)phone|tel|mobile|movil|móvil|fax|contact|whatsapp|card|tarjeta|ssn|iban|dni|nie|email|mail")
_KEY_NEG = re.compile(r"(?i)po|order|pedido|sku|ean|gtin|upc|track|invoice|factura|ref|case|ticket|id$|_id|num|code|"
                      r"qty|quantity|amount|price|serial|part|lot|batch|rma|asn|date|time|zip|postal")
_CARD_CONTEXT = re.compile(r"(?i)(?:card|tarjeta|visa|master\s?card|amex|carte|karte|cc|cvv|pago|payment)")
_SSN_CONTEXT = re.compile(r"(?i)(?:ssn|social security|seguridad social|ss#)[^\n]{0,15}$")


_DOUBLED = str.maketrans("0123456789", "0246813579")  # digit -> digit sum of twice the digit


def _luhn(digits: str) -> bool:
    # Sums of ASCII codes (C speed), minus 48 per digit.
    total = sum(digits[-1::-2].encode()) + sum(digits[-2::-2].translate(_DOUBLED).encode()) - 48 * len(digits)
    return total % 10 == 0


def _gtin_valid(digits: str) -> bool:
    total = sum((ord(ch) - 48) * (3 if i % 2 else 1) for i, ch in enumerate(reversed(digits)))
    return total % 10 == 0


def _card_issuer_ok(d: str) -> bool:
    n = len(d)
    if n == 15:
        return d[:2] in ("34", "37")
    if n == 14:
        return d[:2] in ("36", "38", "39") or "300" <= d[:3] <= "305"
    if not 16 <= n <= 19:
        return False
    first = d[0]
    if first == "4":
        return n in (16, 19)
    if first == "5":
        return n == 16 and "51" <= d[:2] <= "55" or d[:2] in ("50", "56", "57", "58")
    if first == "2":
        return n == 16 and "2221" <= d[:4] <= "2720"
    if first == "3":
        return "3528" <= d[:4] <= "3589"
    return first == "6"  # Discover 6011/64x/65, UnionPay 62, Maestro 6x


def iban_valid(value: str) -> bool:
    s = value.replace(" ", "").replace("-", "").upper()
    if _IBAN_LENGTHS.get(s[:2]) != len(s) or not s.isalnum():
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def dni_letter_ok(number: str, letter: str) -> bool:
    number = number.replace(".", "").replace("-", "").replace(" ", "").upper()
    if not number:
        return False
    if number[0] in "XYZ":
        number = str("XYZ".index(number[0])) + number[1:]
    return number.isdigit() and _DNI_LETTERS[int(number) % 23] == letter.upper()


def _context(before: str, key: str | None) -> str | None:
    """'neg', 'pos' or None: the nearest context word before a number, else the label key's hint."""
    tail = before[-_CONTEXT_CHARS:].lower()
    if len(before) > _CONTEXT_CHARS and (before[-_CONTEXT_CHARS - 1].isalnum() or before[-_CONTEXT_CHARS - 1] == "_"):
        tail = re.sub(r"^\w+", "", tail)  # a word cut by the window is no context word
    tokens = [t.strip(".") for t in _CONTEXT_TOKEN.findall(tail)]  # "[phone]" (a placeholder) is no context word
    for i in range(len(tokens) - 1, -1, -1):
        token = tokens[i]
        if i and (f"{tokens[i - 1]} {token}" in _NEG_PHRASES or
                  (i > 1 and f"{tokens[i - 2]} {tokens[i - 1]} {token}" in _NEG_PHRASES)):
            return "neg"
        if token in _NEG_WORDS:
            return "neg"
        if token in _POS_WORDS or (token == "el" and i and tokens[i - 1] == "en"):
            return "pos"
    if key:
        if _KEY_POS.search(key):
            return "pos"
        if _KEY_NEG.search(key):
            return "neg"
    return None


# --- classifying a window of digit groups -------------------------------------------------------------------------
# A group: (digits, in parentheses, separator before it: ' ', '-', '.', '/' or '' next to a parenthesis).

def _one_sep(groups: list, first: int = 1, allowed: str = " -.") -> bool:
    """The groups from ``first`` on are all separated by the same character, one of ``allowed``."""
    if len(groups) <= first:
        return True
    sep = groups[first][2]
    if not sep or sep not in allowed:
        return False
    for g in groups[first + 1:]:
        if g[2] != sep:
            return False
    return True


def _is_card(groups: list, lens: list[int], digits: str, plus: bool, before: str, key: str | None) -> bool:
    if plus or not _card_issuer_ok(digits) or not _luhn(digits):
        return False
    for g in groups:
        if g[1]:
            return False
    if len(lens) > 1:
        if not _one_sep(groups):
            return False
        if lens not in ([4, 6, 5], [4, 6, 4]) and not (
            all(n == 4 for n in lens[:4]) and len(lens) in (4, 5) and (len(lens) == 4 or 1 <= lens[4] <= 4)
        ):
            return False
    if len(lens) == 1:  # a bare digit run: barcodes and tracking numbers have the same shape
        ctx = _context(before, key)
        if ctx == "neg" and not _CARD_CONTEXT.search(before[-40:]):
            return False
        if len(digits) == 14 and _gtin_valid(digits) and ctx != "pos":
            return False
    return True


def _is_ssn(groups: list, lens: list[int], d: str, plus: bool, before: str, key: str | None) -> bool:
    if plus or any(g[1] for g in groups):
        return False
    if lens == [3, 2, 4]:
        if not (_one_sep(groups, 1, " -")):
            return False
    elif not (lens == [9] and (_SSN_CONTEXT.search(before[-40:]) or (key and re.search(r"(?i)ssn|social", key)))):
        return False
    if _context(before, key) == "neg" and not _SSN_CONTEXT.search(before[-40:]):
        return False  # "SKU 123-45-6789"
    area, group, serial = d[:3], d[3:5], d[5:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _nanp(d: str, strict: bool = True) -> bool:
    """A North American number: area code 2-9xx; ``strict`` also wants the exchange 2-9xx (unformatted digits)."""
    return len(d) == 10 and d[0] in "23456789" and (not strict or d[3] in "23456789")


def _es_national(lens: list[int], d: str) -> bool:
    return len(d) == 9 and d[0] in "6789" and lens in ([9], [3, 3, 3], [3, 2, 2, 2], [2, 3, 2, 2], [2, 7], [3, 6])


def _national_after_cc(cc: str, lens: list[int], d: str) -> bool:
    """Without '+': a country code group followed by that country's national number (no trunk 0)."""
    if cc == "34":
        return _es_national(lens, d)
    if cc == "33":
        return len(d) == 9 and d[0] != "0" and lens in ([9], [1, 2, 2, 2, 2], [3, 2, 2, 2])
    if cc == "44":
        return len(d) == 10 and d[0] in "1237" and lens in ([10], [2, 4, 4], [3, 3, 4], [4, 6], [4, 3, 3])
    if cc == "49":
        return 10 <= len(d) <= 11 and d[0] != "0" and len(lens) in (2, 3) and 2 <= lens[0] <= 4
    if cc == "1":
        return _nanp(d) and lens in ([3, 3, 4], [10])
    return False


def _is_phone(groups: list, lens: list[int], d: str, plus: bool, before: str, key: str | None) -> bool:
    if plus or (groups[0][0].startswith("00") and not groups[0][1] and 3 <= lens[0] <= 5):
        # International: +CC or 00CC, then 7-14 digits; an "(0)" trunk marker is not part of the number.
        digits = "".join([g[0] for g in groups if not (g[1] and g[0] == "0")])
        if not plus:
            digits = digits[2:]
        if digits[0] == "0" or not 8 <= len(digits) <= 15 or len(groups) > 7 or max(lens) > 12:
            return False
        for g in groups:
            if g[2] == "/":
                return False
        return True
    if any(g[2] == "/" for g in groups[2:]) or any(g[1] for g in groups[1:]):
        return False
    ok = False
    if len(groups) > 1 and groups[0][0] in ("34", "33", "44", "49", "1") and not groups[0][1] and \
            _one_sep(groups, 2) and groups[1][2] in " -.":
        ok = _national_after_cc(groups[0][0], lens[1:], d[len(groups[0][0]):]) or \
            (groups[0][0] == "1" and _nanp(d[1:]) and lens == [1, 3, 3, 4])
    if not ok and len(lens) == 1 and len(d) == 11 and d[:2] in ("34", "33"):
        ok = _national_after_cc(d[:2], [9], d[2:])
    if not ok and d[0] == "0":
        if lens == [2, 2, 2, 2, 2] and d[1] != "0":  # FR 01 23 45 67 89
            ok = _one_sep(groups)
        elif d[1] != "0" and 10 <= len(d) <= 12:  # UK / DE trunk-0 formats
            if len(lens) == 1:
                ok = len(d) <= 11
            elif len(lens) == 2:
                ok = 3 <= lens[0] <= 5 and lens[1] >= 3
            elif len(lens) == 3:
                ok = lens in ([3, 4, 4], [4, 3, 4], [5, 3, 3], [3, 3, 4], [4, 4, 3]) and _one_sep(groups, 2, " -")
            ok = ok and (len(lens) == 1 or groups[0][1] or groups[1][2] in " -/")
        elif d[1] != "0" and len(d) == 9 and len(lens) == 2 and 3 <= lens[0] <= 5 and lens[1] >= 5:
            ok = groups[1][2] in " -/" or groups[0][1]  # DE: 040-490404, 030/668858
    if not ok and _nanp(d, strict=False) and lens == [3, 3, 4]:
        ok = (groups[0][1] or groups[1][2] in " -.") and groups[2][2] in " -." and \
            (groups[0][1] or groups[1][2] == groups[2][2])
    if not ok and _es_national(lens, d) and (len(lens) == 1 or _one_sep(groups)):
        ok = True
    if not ok:
        return False
    return _context(before, key) != "neg"


def _parse_run(run: str, offset: int) -> tuple[bool, list]:
    if run.isdigit():  # the common case: one contiguous group
        return False, [(run, False, "", offset, offset + len(run))]
    plus = run.startswith("+")
    groups: list = []
    sep = ""
    pos = offset + (run.index(next(ch for ch in run if ch in "(0123456789")) if plus else 0)
    for paren, digits, sepchar in _TOKEN.findall(run):
        if sepchar:
            sep = sepchar
            pos += 1
        elif paren:
            groups.append((paren, True, sep, pos, pos + len(paren) + 2))
            pos += len(paren) + 2
            sep = ""
        else:
            groups.append((digits, False, sep, pos, pos + len(digits)))
            pos += len(digits)
            sep = ""
    return plus, groups


def _run_spans(text: str, m: re.Match, key: str | None, spans: list) -> None:
    """Split one run of digit groups into cards, SSNs and phones (a run may hold several, or none)."""
    run = m.group()
    if len(run) < 7:  # fewer than 7 digits: nothing numeric is that short
        return
    if run.isdigit():  # one contiguous group (the common case): a single window
        nd, start, end = len(run), m.start(), m.end()
        if nd > 19:
            return
        window, lens = [(run, False, "", start, end)], [nd]
        before = text[max(0, start - _CONTEXT_CHARS - 11):start]
        if nd >= 14 and _is_card(window, lens, run, False, before, key):
            spans.append((start, end, "CARD"))
        elif nd <= 16 and (text[end:end + 1] in _NO_UNIT or _UNIT_AFTER.match(text, end) is None):
            if nd == 9 and _is_ssn(window, lens, run, False, before, key):
                spans.append((start, end, "SSN"))
            elif _is_phone(window, lens, run, False, before, key):
                spans.append((start, end, "PHONE"))
        return
    plus, groups = _parse_run(run, m.start())
    n = len(groups)
    cum = [0]
    for g in groups:
        cum.append(cum[-1] + len(g[0]))
    if cum[-1] < 7:
        return
    i = 0
    while i < n:
        found = None
        for j in range(min(n, i + 7), i, -1):
            if not 7 <= cum[j] - cum[i] <= 19:  # no card, SSN or phone has that many digits
                continue
            window = groups[i:j]
            p = plus and i == 0
            start = m.start() if p else window[0][3]
            before = text[max(0, start - _CONTEXT_CHARS - 11):start]
            lens = [len(g[0]) for g in window]
            d = "".join(g[0] for g in window)
            nd = len(d)
            if nd >= 14 and _is_card(window, lens, d, p, before, key):
                found = (start, window[-1][4], "CARD")
            elif nd <= 16 and (p or text[window[-1][4]:window[-1][4] + 1] in _NO_UNIT
                               or _UNIT_AFTER.match(text, window[-1][4]) is None):
                if nd == 9 and _is_ssn(window, lens, d, p, before, key):
                    found = (start, window[-1][4], "SSN")
                elif _is_phone(window, lens, d, p, before, key):
                    found = (start, window[-1][4], "PHONE")
            if found:
                spans.append(found)
                i = j
                break
        if not found:
            i += 1


def _numeric_spans(text: str, key: str | None) -> list[tuple[int, int, str]]:
    """IBANs, DNI/NIE, cards, SSNs and phones. A candidate that fails its check (an IBAN's mod 97, a DNI's letter)
    is rescanned from its next character, so a phone right after a broken IBAN is still found."""
    spans: list[tuple[int, int, str]] = []
    if ("X" in text or "Y" in text or "Z" in text or "x" in text or "y" in text or "z" in text):
        for m in _NIE.finditer(text):
            span = _national_id_span(text, m)
            if span:
                spans.append(span)
    pos = 0
    search = _COMBINED.search
    while (m := search(text, pos)) is not None:
        if m.lastgroup == "IBAN":
            span = _iban_span(text, m)
            if span:
                spans.append(span)
                pos = span[1]
            else:
                pos = m.start() + 1
            continue
        letter = m.group("letter")
        if letter is None:
            _run_spans(text, m, key, spans)
        else:  # digits then a letter: a DNI, or a word glued to a number (then no run: "12345678A", "PO 123 a")
            number = text[m.start():m.start("sep")]
            if _DNI_SHAPE.fullmatch(number) and (span := _national_id_span(text, m)):
                spans.append(span)
            elif m.group("sep") and number[-1:].isdigit():
                shorter = _COMBINED.match(text[:m.start("sep")], m.start())
                if shorter is not None and shorter.lastgroup == "RUN":
                    _run_spans(text, shorter, key, spans)
        pos = m.end()
    if len(spans) > 1:
        spans.sort()
    return spans


def _iban_span(text: str, m: re.Match) -> tuple[int, int, str] | None:
    begin = m.start() - 2  # the country code before the check digits
    s = text[begin:m.end()]
    length = _IBAN_LENGTHS.get(s[:2].upper())
    if not length:
        return None
    count, end = 0, None
    for idx, ch in enumerate(s):
        if ch.isalnum():
            count += 1
            if count == length:
                end = idx + 1
                break
    if end is None:
        return None
    tail = text[begin + end:begin + end + 1]
    if tail.isalnum() or tail == "_":
        return None
    return (begin, begin + end, "IBAN") if iban_valid(s[:end]) else None


def _national_id_span(text: str, m: re.Match) -> tuple[int, int, str] | None:
    sep, letter = m.group("sep"), m.group("letter")
    number = text[m.start():m.start("sep")]
    if not dni_letter_ok(number, letter):
        return None
    # "12345678 a Madrid": a lone lower-case letter after a space is a word, unless the context says DNI.
    if sep == " " and letter.islower() and not _ID_CONTEXT.search(text[max(0, m.start() - 30):m.start()]):
        return None
    return m.start(), m.end(), "NATIONAL_ID"


_EMAIL_DOMAIN = re.compile(r"\s?[\w-]+(?:\.[\w-]+)*\.[^\W\d_]{2,}(?![\w-])")
_EMAIL_LOCAL_REVERSED = re.compile(r"\s?[\w.%+'-]+")


def _email_spans(text: str, key: str | None) -> list[tuple[int, int, str]]:
    """The matches of _EMAIL, found from each '@' outwards (a regex scan from every word start is 3x slower)."""
    spans = []
    at = text.find("@")
    while at != -1:
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        local = _EMAIL_LOCAL_REVERSED.match(text[max(0, at - 64):at][::-1]) if domain else None
        if local:
            start = at - len(local.group())
            while start < at and text[start] == ".":  # a local part does not start with a dot
                start += 1
            if start < at and not text[start].isspace():
                spans.append((start, domain.end(), "EMAIL"))
                at = text.find("@", domain.end())
                continue
        at = text.find("@", at + 1)
    return spans

def _obfuscated_email_spans(text: str, key: str | None) -> list[tuple[int, int, str]]:
    """``name [at] domain [dot] com`` and friends, found from each "at" outwards (matches of _OBFUSCATED_EMAIL)."""
    spans: list[tuple[int, int, str]] = []
    done = 0
    for hit in _OBFUSCATION_HINT.finditer(text.lower()):
        at = hit.start()
        if at < done:
            continue
        end_local = at
        while end_local > 0 and text[end_local - 1] in " \t\n[({<":
            end_local -= 1
        local = _LOCAL_REVERSED.match(text[max(0, end_local - 64):end_local][::-1])
        if not local:
            continue
        start = end_local - len(local.group())
        connector = _OBF_CONNECTOR.match(text, end_local)
        if start < done or not connector or connector.end() <= at:
            continue
        bracketed = any(ch in "[({<" for ch in connector.group())
        domain = (_OBF_DOMAIN_BRACKETED if bracketed else _OBF_DOMAIN_PLAIN).match(text, connector.end())
        if domain:
            spans.append((start, domain.end(), "EMAIL"))
            done = domain.end()
    return spans


def _apply(text: str, spans: list, counts: Counter[str] | None, found: list | None) -> str:
    out, pos = [], 0
    for start, end, kind in spans:
        if start < pos:
            continue
        out.append(text[pos:start])
        out.append(f"[{kind}]")
        if counts is not None:
            counts[kind] += 1
        if found is not None:
            found.append((kind, text[start:end]))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _scrub(text: str, counts: Counter[str] | None, config, key: str | None, found: list | None) -> str:
    """Run the detectors in order, each on the previous one's output; cheap pre-checks skip most of them (the
    collector calls this for every input and label string)."""
    numeric = _NUMERIC_HINT.search(text)
    if "@" in text and (spans := _email_spans(text, key)):
        text = _apply(text, spans, counts, found)
    if _OBFUSCATION_HINT.search(text.lower()) and (spans := _obfuscated_email_spans(text, key)):
        text = _apply(text, spans, counts, found)
    if numeric and (spans := _numeric_spans(text, key)):
        text = _apply(text, spans, counts, found)
    if config is not None and (config.names or config.addresses):
        from retrain.data import scrub_names

        if config.addresses and (spans := scrub_names.address_spans(text, key)):
            text = _apply(text, spans, counts, found)
        if config.names and (spans := scrub_names.name_spans(text, key)):
            text = _apply(text, spans, counts, found)
    return text


def scrub_text(text: str, counts: Counter[str] | None = None, config: PiiConfig | None = None, *,
               key: str | None = None) -> str:
    """Replace every PII match with ``[TYPE]``; ``counts`` (if given) accumulates matches per type.

    ``config`` (a use case's ``pii:`` block) turns on names and addresses; ``key`` is the label key the text sits
    under, a context hint for ambiguous numbers.
    """
    return _scrub(text, counts, config, key, None)


def find_pii(text: str, config: PiiConfig | None = None) -> list[tuple[str, str]]:
    """All (type, matched text) pairs still present in ``text``."""
    found: list[tuple[str, str]] = []
    _scrub(text, None, config, None, found)
    return found


def scrub_value(value: Any, counts: Counter[str] | None = None, config: PiiConfig | None = None, *,
                key: str | None = None) -> Any:
    """Scrub every string inside a decoded JSON value (labels can echo personal data too); keys are kept.

    An integer that is personal data (a phone stored as a number) becomes its placeholder string.
    """
    if isinstance(value, str):
        return _scrub(value, counts, config, key, None)
    if isinstance(value, dict):
        return {k: scrub_value(v, counts, config, key=k) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_value(v, counts, config, key=key) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1_000_000:
        text = str(value)
        scrubbed = _scrub(text, counts, config, key, None)
        return value if scrubbed == text else scrubbed
    return value


def find_pii_in_value(value: Any, config: PiiConfig | None = None, *, key: str | None = None) -> list[tuple[str, str]]:
    """(type, match) pairs in every decoded string (and large integer) of a JSON value; keys are not scanned."""
    found: list[tuple[str, str]] = []

    def walk(v: Any, k: str | None) -> None:
        if isinstance(v, str):
            _scrub(v, None, config, k, found)
        elif isinstance(v, dict):
            for kk, vv in v.items():
                walk(vv, kk)
        elif isinstance(v, list):
            for vv in v:
                walk(vv, k)
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1_000_000:
            _scrub(str(v), None, config, k, found)

    walk(value, key)
    return found


def might_contain_pii(raw: str) -> bool:
    """False only when no detector can fire on ``raw`` nor on any substring of it (the collector's fast path for
    JSON text without escapes: its strings are then substrings of the text)."""
    return "@" in raw or bool(_NUMERIC_HINT.search(raw)) or bool(_OBFUSCATION_HINT.search(raw.lower()))


def pii_regex_list() -> list[str]:
    """Regexes that match only what the detectors always scrub (e-mails, plain and obfuscated), for checks that
    can only take regexes (Great Expectations). Cards, IBANs, IDs and phones need checksums and context, which a
    regex cannot express: use :func:`find_pii` / :func:`find_pii_in_value` for those."""
    return [_EMAIL.pattern, _OBFUSCATED_EMAIL.pattern]
