"""Generate tests/pii_corpus/corpus.jsonl: a labelled corpus for the PII detectors (retrain.data.scrub).

Deterministic (one seeded RNG, no imports from retrain: the corpus must not be shaped by the detectors):

    .venv/bin/python tests/pii_corpus/make_corpus.py        # rewrites corpus.jsonl

Each line: {"id", "category", "kind", "source", "text", "values"}.

- ``category`` EMAIL / PHONE / CARD / IBAN / SSN / NATIONAL_ID: a positive; every string in ``values`` is personal
  data that scrubbing must remove (and replace with ``[CATEGORY]``).
- ``category`` NEGATIVE: ordinary business text (barcodes, tracking numbers, dates, timestamps, prices, PO and
  order numbers, SKUs, case ids, quantities...): scrubbing must leave it unchanged.
- ``category`` NAME / ADDRESS: the optional detectors (``pii: {names: true, addresses: true}``), measured, no target.
- ``source`` "hand": written and checked by hand (the cases from issue 16 among them); "generated": from the
  templates below with random but valid values (real Luhn / mod-97 / DNI letters / SSA rules).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).with_name("corpus.jsonl")
rng = random.Random(20261203)


def pick(seq):
    return seq[rng.randrange(len(seq))]


def digits(n: int, first: str = "0123456789") -> str:
    return pick(first) + "".join(str(rng.randrange(10)) for _ in range(n - 1))


# --- checksums (independent implementations) ------------------------------------------------------------------
def luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return body + str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    return luhn_complete(number[:-1]) == number


def gtin_complete(body: str) -> str:
    total = sum(int(ch) * (3 if i % 2 == 0 else 1) for i, ch in enumerate(reversed(body)))
    return body + str((10 - total % 10) % 10)


def iban(country: str, bban: str) -> str:
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


DNI = "TRWAGMYFPDXBNJZSQVHLCKE"

# --- positives -------------------------------------------------------------------------------------------------
FIRST = ["ana", "maria", "josé", "maría", "lucía", "jürgen", "françois", "zoë", "john", "emily", "carlos", "sofia",
         "pablo", "olivia", "raúl", "marta", "jean", "kevin", "priya", "nuria", "iñigo", "björn"]
LAST = ["garcia", "garcía", "lópez", "martinez", "müller", "dupont", "smith", "o'neil", "navarro", "ruiz",
        "peña", "schmidt", "brown", "fernández", "costa"]
DOMAINS = ["gmail.com", "correo.es", "empresa.es", "acme-corp.com", "mail.example.org", "outlook.fr", "t-online.de",
           "uni.edu", "sub.domain.co.uk", "globex.io", "yahoo.es", "correos.com.mx", "bücher.de"]


def email() -> tuple[str, str]:
    f, last = pick(FIRST), pick(LAST).replace("'", "")
    local = pick([f"{f}.{last}", f"{f}{last[0]}{rng.randrange(1, 99)}", f"{f[0]}{last}", f"{f}_{last}",
                  f"{f}.{last}+shop", f"{f}-{last}", f"{f.upper()}.{last.capitalize()}"])
    dom = pick(DOMAINS)
    style = rng.random()
    if style < 0.70:
        return f"{local}@{dom}", "plain"
    name, tld = dom.rsplit(".", 1)
    ob = pick([f"{local} [at] {name} [dot] {tld}", f"{local}(at){dom}", f"{local} (at) {name} (dot) {tld}",
               f"{local} at {name} dot {tld}", f"{local} [at] {dom}", f"{local} @ {dom}", f"{local}[arroba]{dom}"])
    return ob, "obfuscated"


EMAIL_T = ["escribe a {v}", "my email is {v}.", "Contact: {v}", "{v}", "reply to {v}, thanks", "line\n{v}",
           "\t{v}", "\"{v}\"", "mándalo a <{v}>", "mailto:{v}", "email {v} o llama", "Mon adresse : {v}",
           "E-Mail: {v}\nDanke", "cc {v}; bcc nobody", "from: {v}"]


def phone() -> tuple[str, str]:
    es_m = digits(9, "67")
    es_l = digits(9, "89")
    fr = "0" + digits(9, "123456789")
    choice = rng.randrange(30)
    if choice < 12:
        n = pick([es_m, es_m, es_l])
        forms = [f"+34 {n[:3]} {n[3:6]} {n[6:]}", f"+34{n}", f"0034 {n[:3]} {n[3:6]} {n[6:]}", n,
                 f"{n[:3]} {n[3:6]} {n[6:]}", f"{n[:3]}-{n[3:6]}-{n[6:]}", f"{n[:3]} {n[3:5]} {n[5:7]} {n[7:]}",
                 f"{n[:2]} {n[2:5]} {n[5:7]} {n[7:]}", f"34 {n[:3]} {n[3:6]} {n[6:]}", f"34{n}",
                 f"{n[:3]}.{n[3:6]}.{n[6:]}", f"+34 {n[:2]} {n[2:5]} {n[5:7]} {n[7:]}"]
        return pick(forms), "ES"
    if choice < 17:
        pairs = " ".join(fr[i:i + 2] for i in range(0, 10, 2))
        forms = [pairs, pairs.replace(" ", "."), f"+33 {fr[1]} {' '.join(fr[i:i + 2] for i in range(2, 10, 2))}",
                 f"0033 {fr[1]} {' '.join(fr[i:i + 2] for i in range(2, 10, 2))}", fr, f"+33{fr[1:]}"]
        return pick(forms), "FR"
    if choice < 22:
        london, mob, manc = "20" + digits(8, "3478"), "7" + digits(9), "161" + digits(7, "2345678")
        forms = [f"0{london[:2]} {london[2:6]} {london[6:]}", f"+44 {london[:2]} {london[2:6]} {london[6:]}",
                 f"0{mob[:4]} {mob[4:]}", f"+44 {mob[:4]} {mob[4:]}", f"0{manc[:3]} {manc[3:6]} {manc[6:]}",
                 f"(0{london[:2]}) {london[2:6]} {london[6:]}", f"+44 (0){london[:2]} {london[2:6]} {london[6:]}",
                 f"0{mob}"]
        return pick(forms), "UK"
    if choice < 26:
        area = pick(["30", "89", "40", "221", "171", "151", "69"])
        sub = digits(rng.randrange(6, 9), "123456789")
        forms = [f"0{area} {sub}", f"0{area}/{sub}", f"+49 {area} {sub}", f"+49 (0){area} {sub}", f"0{area}-{sub}",
                 f"0049 {area} {sub}"]
        return pick(forms), "DE"
    area, ex, line = digits(3, "23456789"), digits(3, "23456789"), digits(4)
    forms = [f"({area}) {ex}-{line}", f"{area}-{ex}-{line}", f"{area}.{ex}.{line}", f"+1 {area} {ex} {line}",
             f"1-{area}-{ex}-{line}", f"+1 ({area}) {ex}-{line}", f"{area} {ex} {line}", f"+1{area}{ex}{line}",
             f"1 ({area}) {ex}-{line}"]
    return pick(forms), "US"


PHONE_T = ["llámame al {v}", "call me at {v}", "mi móvil {v}", "tel: {v}", "Phone: {v}", "{v}",
           "contact {v} after 5pm", "whatsapp {v}", "my number is {v}.", "appelez le {v}", "erreichbar unter {v}",
           "Tel.\n{v}", "dad\t{v}", "ring {v} tomorrow", "ok {v} thanks", "o al {v}, gracias", "(móvil: {v})",
           "Best,\nAna\n{v}", "fax {v}", "número {v}"]


def card() -> tuple[str, str]:
    brand = rng.randrange(10)
    if brand < 3:
        num, kind = luhn_complete("4" + digits(14)), "visa"
    elif brand < 5:
        num, kind = luhn_complete(str(rng.randrange(51, 56)) + digits(13)), "mastercard"
    elif brand == 5:
        num, kind = luhn_complete(str(rng.randrange(2221, 2721)) + digits(11)), "mastercard2"
    elif brand == 6:
        num = luhn_complete(pick(["34", "37"]) + digits(12))
        return pick([f"{num[:4]} {num[4:10]} {num[10:]}", num, f"{num[:4]}-{num[4:10]}-{num[10:]}"]), "amex"
    elif brand == 7:
        num, kind = luhn_complete(pick(["6011", "65" + digits(2)]) + digits(11)), "discover"
    elif brand == 8:
        num, kind = luhn_complete(str(rng.randrange(3528, 3590)) + digits(11)), "jcb"
    else:
        num = luhn_complete("36" + digits(11))
        return pick([f"{num[:4]} {num[4:10]} {num[10:]}", num]), "diners"
    sep = pick([" ", " ", "-", "", "."])
    return sep.join(num[i:i + 4] for i in range(0, 16, 4)), kind


CARD_T = ["card {v} exp 12/28", "tarjeta {v}", "pago con {v}", "{v}", "dad\n{v}", "cc: {v}", "Visa {v}, cvv 123",
          "my card number is {v}.", "cobrar en la {v} por favor", "numéro de carte {v}", "use {v} for the refund"]

IBAN_FORMATS = {
    "ES": lambda: digits(20), "DE": lambda: digits(18), "FR": lambda: digits(10) + "".join(
        pick("ABCDEFGHJK0123456789") for _ in range(11)) + digits(2),
    "GB": lambda: "".join(pick("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + digits(14),
    "IT": lambda: pick("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + digits(10) + digits(12),
    "NL": lambda: "".join(pick("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + digits(10),
    "PT": lambda: digits(21), "BE": lambda: digits(12), "CH": lambda: digits(17), "AT": lambda: digits(16),
    "IE": lambda: "".join(pick("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + digits(14),
    "PL": lambda: digits(24),
}


def iban_value() -> tuple[str, str]:
    country = pick(list(IBAN_FORMATS) + ["ES", "ES", "DE"])
    value = iban(country, IBAN_FORMATS[country]())
    style = rng.random()
    if style < 0.55:
        value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    elif style < 0.65:
        value = value.lower()
    return value, country


IBAN_T = ["IBAN {v} for the refund", "IBAN: {v}", "cuenta {v}", "{v}", "transfer to {v}, ref invoice 2026-114",
          "Payroll IBAN\n{v}", "mi cuenta es {v}.", "Konto {v}", "RIB/IBAN : {v}"]


def ssn() -> tuple[str, str]:
    area = rng.randrange(1, 900)
    while area == 666:
        area = rng.randrange(1, 900)
    a, g, s = f"{area:03d}", f"{rng.randrange(1, 100):02d}", f"{rng.randrange(1, 10000):04d}"
    return pick([f"{a}-{g}-{s}", f"{a}-{g}-{s}", f"{a} {g} {s}"]), "ssn"


SSN_T = ["SSN {v}", "social security number {v}", "my SSN is {v}.", "{v}", "SSN: {v}\nDOB 1980-01-01", "ssn={v}",
         "W-4 attached, SSN {v}"]


def national_id() -> tuple[str, str]:
    if rng.random() < 0.65:
        num = rng.randrange(1_000_000, 100_000_000)
        letter = DNI[num % 23]
        n = f"{num:08d}"
        forms = [f"{n}{letter}", f"{n[:2]}.{n[2:5]}.{n[5:]}-{letter}", f"{n}-{letter}", f"{n} {letter}",
                 f"{n}{letter.lower()}", f"{n[:2]}.{n[2:5]}.{n[5:]}{letter}"]
        return pick(forms), "DNI"
    prefix = rng.randrange(3)
    body = rng.randrange(0, 10_000_000)
    letter = DNI[int(f"{prefix}{body:07d}") % 23]
    p = "XYZ"[prefix]
    forms = [f"{p}{body:07d}{letter}", f"{p.lower()}{body:07d}{letter.lower()}", f"{p}-{body:07d}-{letter}",
             f"{p} {body:07d} {letter}", f"{p}{body:07d}-{letter}"]
    return pick(forms), "NIE"


ID_T = ["DNI {v}", "mi DNI es {v}", "NIE: {v}", "{v}", "documento {v}", "NIF {v} para la factura", "dni\n{v}",
        "con DNI {v}, gracias"]

HAND_POSITIVES = [
    ("EMAIL", "escribe a josé@correo.es", ["josé@correo.es"]),
    ("EMAIL", "Saludos, maría.garcía@empresa.es", ["maría.garcía@empresa.es"]),
    ("EMAIL", "line one\nana.lopez@example.com", ["ana.lopez@example.com"]),
    ("EMAIL", "write to maria.lopez+shop@correo.es please", ["maria.lopez+shop@correo.es"]),
    ("EMAIL", "contact: pedro [at] globex [dot] io", ["pedro [at] globex [dot] io"]),
    ("EMAIL", "jane(at)acme-corp.com", ["jane(at)acme-corp.com"]),
    ("PHONE", "mi móvil 612345678", ["612345678"]),
    ("PHONE", "appelez le +33 1 23 45 67 89", ["+33 1 23 45 67 89"]),
    ("PHONE", "office 020 7946 0958", ["020 7946 0958"]),
    ("PHONE", "call me\tat 612 345 678", ["612 345 678"]),
    ("PHONE", "llámame al +34 612 345 678 mañana", ["+34 612 345 678"]),
    ("PHONE", "call (555) 123-4567 today", ["(555) 123-4567"]),
    ("PHONE", "call 1-800-555-0199", ["1-800-555-0199"]),
    ("PHONE", "oficina 91 123 45 67", ["91 123 45 67"]),
    ("PHONE", "Tel. 030/1234567", ["030/1234567"]),
    ("PHONE", "+49 (0)89 12345678", ["+49 (0)89 12345678"]),
    ("CARD", "recipient: dad\n4111 1111 1111 1111", ["4111 1111 1111 1111"]),
    ("CARD", "card 4111-1111-1111-1111", ["4111-1111-1111-1111"]),
    ("CARD", "amex 3782 822463 10005", ["3782 822463 10005"]),
    ("CARD", "612345678 4111111111111111", ["4111111111111111", "612345678"]),
    ("IBAN", "IBAN ES91 2100 0418 4502 0005 1332 for the refund", ["ES91 2100 0418 4502 0005 1332"]),
    ("IBAN", "IBAN DE89370400440532013000", ["DE89370400440532013000"]),
    ("IBAN", "GB82 WEST 1234 5698 7654 32", ["GB82 WEST 1234 5698 7654 32"]),
    ("SSN", "SSN 123-45-6789", ["123-45-6789"]),
    ("SSN", "SSN 123 45 6789", ["123 45 6789"]),
    ("NATIONAL_ID", "DNI 12.345.678-Z", ["12.345.678-Z"]),
    ("NATIONAL_ID", "DNI 12345678 Z", ["12345678 Z"]),
    ("NATIONAL_ID", "nie x1234567l", ["x1234567l"]),
    ("NATIONAL_ID", "DNI 12345678Z", ["12345678Z"]),
    # Written by hand after the detectors, to check they generalise beyond the templates above.
    ("PHONE", "+34-612-345-678", ["+34-612-345-678"]),
    ("PHONE", "tel:+34612345678", ["+34612345678"]),
    ("PHONE", "+44 (0) 20 7946 0958", ["20 7946 0958"]),
    ("PHONE", "07700-900-123", ["07700-900-123"]),
    ("PHONE", "+1-415-555-0100", ["415-555-0100"]),
    ("PHONE", "+1.415.555.0100", ["415.555.0100"]),
    ("PHONE", "+33 (0)1 23 45 67 89", ["23 45 67 89"]),
    ("PHONE", "06-12-34-56-78", ["06-12-34-56-78"]),
    ("PHONE", "0612345678", ["0612345678"]),
    ("PHONE", "+4930123456", ["+4930123456"]),
    ("PHONE", "llámame: 612 345 678.", ["612 345 678"]),
    ("PHONE", "móvil:612345678", ["612345678"]),
    ("PHONE", "Tlf. 954 12 34 56", ["954 12 34 56"]),
    ("PHONE", "+34 91 123 45 67", ["91 123 45 67"]),
    ("PHONE", "0044 20 7946 0958", ["20 7946 0958"]),
    ("PHONE", "(415)555-0100", ["555-0100"]),
    ("EMAIL", "ANA@GMAIL.COM", ["ANA@GMAIL.COM"]),
    ("EMAIL", "ana.garcia @ gmail.com", ["ana.garcia"]),
    ("EMAIL", "ana.garcia at gmail dot com", ["ana.garcia"]),
    ("EMAIL", "ana.garcia[at]gmail.com", ["ana.garcia"]),
    ("EMAIL", "ana_garcia(arroba)gmail.com", ["ana_garcia"]),
    ("EMAIL", "María <maria@x.es>", ["maria@x.es"]),
    ("EMAIL", "ana.garcia{at}gmail{dot}com", ["ana.garcia"]),
    ("EMAIL", "ana AT gmail DOT com", ["gmail"]),
    ("CARD", "4111111111111111.", ["4111111111111111"]),
    ("CARD", "Card: 5500 0000 0000 0004 exp", ["5500 0000 0000 0004"]),
    ("CARD", "tarjeta 4111-1111-1111-1111/12", ["4111-1111-1111-1111"]),
    ("IBAN", "ES91-2100-0418-4502-0005-1332", ["2100-0418-4502-0005-1332"]),
    ("IBAN", "IBAN:ES9121000418450200051332", ["ES9121000418450200051332"]),
    ("IBAN", "es91 2100 0418 4502 0005 1332", ["2100 0418 4502 0005 1332"]),
    ("NATIONAL_ID", "DNI: 12 345 678 Z", ["345 678"]),
    ("NATIONAL_ID", "12345678-z", ["12345678"]),
    ("NATIONAL_ID", "NIE Y-1234567-X", ["1234567"]),
    ("SSN", "SSN#123-45-6789", ["123-45-6789"]),
    ("SSN", "ssn:123456789", ["123456789"]),
    ("SSN", "SSN: 123 45 6789.", ["123 45 6789"]),
]

# --- negatives ---------------------------------------------------------------------------------------------------


def ean13() -> str:
    return gtin_complete(pick(["84", "40", "30", "50", "76", "49", "37", "80"]) + digits(10))


def negative() -> tuple[str, str]:
    k = rng.randrange(24)
    if k == 0:
        return pick(["EAN {v}", "código de barras {v}", "barcode {v}", "{v} x 12 uds", "EAN13: {v}"]).format(
            v=ean13()), "ean13"
    if k == 1:
        return pick(["GTIN {v}", "GTIN-14 {v} (caja de 6)", "case GTIN {v}", "{v} - pallet"]).format(
            v=gtin_complete(pick("0123456789") + ean13()[:-1])), "gtin14"
    if k == 2:
        upc = gtin_complete(digits(11))
        return pick(["UPC {v}", "UPC-A {v} on the label", "scan {v}"]).format(v=upc), "upc"
    if k == 3:
        usps = "9400" + digits(18)
        fx = digits(12, "1234579")
        dhl = digits(10)
        ups = "1Z" + "".join(pick("0123456789ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(16))
        return pick([f"tracking {usps}", f"USPS {' '.join(usps[i:i + 4] for i in range(0, 22, 4))}",
                     f"FedEx tracking {fx}", f"DHL {dhl}", f"UPS {ups}", f"seguimiento {fx}",
                     f"número de seguimiento: {dhl}", f"AWB {digits(11)}"]), "tracking"
    if k == 4:
        y, m, d = rng.randrange(2020, 2030), rng.randrange(1, 13), rng.randrange(1, 29)
        y2, m2, d2 = y, m, min(d + rng.randrange(1, 10), 28)
        return pick([f"del {d:02d}/{m:02d}/{y} al {d2:02d}/{m2:02d}/{y2}", f"{y}-{m:02d}-{d:02d} {y2}-{m2:02d}-{d2:02d}",
                     f"from {y}-{m:02d}-{d:02d} to {y2}-{m2:02d}-{d2:02d}", f"{d:02d}.{m:02d}.{y} {d2:02d}.{m2:02d}.{y2}",
                     f"{y}{m:02d}{d:02d} {y2}{m2:02d}{d2:02d}", f"{m:02d}/{d:02d}/{y} - {m2:02d}/{d2:02d}/{y2}",
                     f"vacaciones {d:02d}/{m:02d}/{y}-{d2:02d}/{m2:02d}/{y2}"]), "dates"
    if k == 5:
        ts = f"{rng.randrange(2020, 2030)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}" \
             f"{rng.randrange(24):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"
        return pick(["timestamp {v}", "ts={v}", "export_{v}.csv", "batch {v} done", "{v}"]).format(v=ts), "timestamp"
    if k == 6:
        a = rng.randrange(1, 999)
        b = rng.randrange(0, 999)
        return pick([f"total {a}.{b:03d},{rng.randrange(100):02d} EUR", f"${a},{b:03d}.{rng.randrange(100):02d}",
                     f"{a} {b:03d},00 €", f"€ {a} {b:03d} {rng.randrange(1000):03d},89",
                     f"USD {a},{b:03d},{rng.randrange(1000):03d}.90", f"precio {a}.{b:03d}.000 €",
                     f"presupuesto de {a} euros"]), "price"
    if k == 7:
        po = digits(rng.randrange(6, 11), "123456789")
        return pick(["PO {v}", "PO# {v}", "Purchase Order {v} - Acme", "Order PO# {v}", "Kindly book PO {v}: 12 x "
                     "XHU-00001.", "OC-2026-{v}", "orden de compra {v}"]).format(v=po), "po"
    if k == 8:
        n = digits(9, "123456789")
        return pick([f"pedido {n[:3]} {n[3:6]} {n[6:]}", f"order #{n}", f"pedido nº {n}", f"order number {n}",
                     f"su pedido {n} ha salido", f"Order {n} shipped", f"New order {n}",
                     f"albarán {n}", f"pedido {n[:3]}-{n[3:6]}-{n[6:]}", f"factura {n}"]), "order"
    if k == 9:
        return pick(["{p}-{n:05d}", "SKU {a}-{b}-{c}", "ref. {a}-{b}-{c}", "art. {a}.{b}.{c}", "modelo {p}{n:05d}",
                     "part {p}-{n:05d}-B"]).format(
            p=pick(["XHU", "KTR", "MSF", "DLL", "HPE"]), n=rng.randrange(100000), a=digits(3), b=digits(3),
            c=digits(3)), "sku"
    if k == 10:
        return pick([f"CAS-{rng.randrange(1000000):06d}-B0C6Q4", f"case {digits(8)}", f"ticket #{digits(6)}",
                     f"INC{digits(10)}", f"incidencia {digits(9)}", f"expediente {digits(4)}/{digits(6)}",
                     f"case id {digits(9)}"]), "case"
    if k == 11:
        q = rng.randrange(2, 5000)
        return pick([f"{q} units of XHU-{rng.randrange(100000):05d}", f"qty {q} 000", f"{q} 000 uds",
                     f"cantidad: {q}", f"{q * 1000} pcs", f"stock {q} 500 400"]), "quantity"
    if k == 12:
        return pick([f"factura {rng.randrange(2020, 2030)}/{digits(6)}", f"invoice INV-2026-{digits(5)}",
                     f"FRA 2026-{digits(7)}", f"invoice {digits(16)}", f"ref {digits(16)}",
                     f"referencia {digits(12)}"]), "invoice"
    if k == 13:
        # Part numbers shaped like a DNI but with the wrong control letter.
        num = rng.randrange(10_000_000, 100_000_000)
        wrong = pick([c for c in DNI if c != DNI[num % 23]])
        return pick(["part {v} out of stock", "ref {v}", "{v}"]).format(v=f"{num}{wrong}"), "dni_wrong_letter"
    if k == 14:
        return pick([f"{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}",
                     f"v{rng.randrange(10)}.{rng.randrange(20)}.{rng.randrange(40)}", f"build 2026.11.03.{digits(4)}",
                     f"resolution 1920x1080", "temperature 21.5 C", "09:30-17:30"]), "technical"
    if k == 15:
        return pick([f"{digits(5, '12345')} Madrid", f"cp {digits(5, '0123')}", "floor 3, door 12",
                     f"Room {digits(3)}"]), "place"
    if k == 16:
        num = digits(16, "123456789")
        if luhn_ok(num):
            num = num[:-1] + str((int(num[-1]) + 1) % 10)
        return pick(["contrato {v}", "account 7 {v}", "{v}", "reference number {v}"]).format(v=num), "16_digits_no_luhn"
    if k == 17:
        a = digits(3, "1234")
        return f"SKU {a}-{digits(2)}-{digits(4)} in bin {digits(2)}", "sku_ssn_shape"
    if k == 18:
        return pick([f"{digits(3, '12345')} {digits(3)} {digits(3)} units shipped", f"lote {digits(9, '6789')}",
                     f"batch {digits(3, '6789')} {digits(3)} {digits(3)}", f"serial {digits(9, '6789')}",
                     f"S/N {digits(10)}"]), "nine_digits_context"
    if k == 19:
        return pick([f"ISBN 978-{digits(2)}-{digits(3)}-{digits(4)}-{digits(1)}", f"ISBN {gtin_complete('978' + digits(9))}",
                     f"ISSN {digits(4)}-{digits(4)}"]), "isbn"
    if k == 20:
        return pick([f"{rng.randrange(1, 12)} x {rng.randrange(10, 99)} cm", f"weight {rng.randrange(1, 99)},{digits(3)} kg",
                     f"{rng.randrange(1, 50)} % discount on {rng.randrange(2, 999)} units",
                     f"page {rng.randrange(1, 300)} of {rng.randrange(300, 999)}"]), "measure"
    if k == 21:
        return pick([f"SPA CAS-{digits(6)}-{digits(6)}", f"EDI CUST850 - PO {digits(10)}", f"CDW856 ASN for PO {digits(8)}",
                     f"RMA {digits(8)}", f"lot {digits(6)}-{digits(4)}"]), "edi"
    if k == 22:
        return pick([f"the meeting is at 10:30 in room {digits(3)}", f"call the office about PO {digits(9, '6789')}",
                     f"ref. pedido {digits(3, '6789')} {digits(2)} {digits(2)} {digits(2)}",
                     f"ticket {digits(3, '6789')}-{digits(3)}-{digits(3)}"]), "phone_shape_context"
    return pick(["Hola equipo, necesito 3 portátiles para la oficina nueva.",
                 "Please confirm stock availability before shipping.",
                 "We never received the CDW855 PO acknowledgment. Can you open a case?",
                 "regalo para mi madre, presupuesto de 150 euros",
                 "Balance: 21 days, from 2026-11-03 to 2026-11-14",
                 "The invoice was charged twice; please review.",
                 "Need 24 x KTR-00412 delivered to the Madrid warehouse by Friday.",
                 "URGENT: customer line down, 3 servers affected since 06:45."]), "prose"


HAND_NEGATIVES = [
    ("ean13", "EAN 8412345678904 y GTIN 18412345678901"),
    ("order", "pedido 123 456 789 enviado"),
    ("dni_wrong_letter", "part 12345678A out of stock"),
    ("timestamp", "timestamp 20261103142530"),
    ("dates", "del 2026-11-03 2026-11-14"),
    ("tracking", "tracking 9400111899223197428490"),
    ("price", "total 1.234,56 EUR / $1,234.56"),
    ("po", "PO 12345678 for 100 units of XHU-00001, SPA CAS-091284-B0C6Q4, EDI CUST850"),
    ("prose", "Duration: 12 days, Balance: 21 days, from 2026-11-03 to 2026-11-14"),
    ("prose", "presupuesto de 150 euros para un regalo"),
    ("dates", "20261103 20261114"),
    ("po", "Shipment update - 824128253"),
    ("order", "order #912345678 confirmed"),
    ("sku", "SKU 123-456-789"),
    ("quantity", "qty 1 000 000 units"),
    ("isbn", "ISBN 978-84-376-0494-7"),
    # Written by hand after the detectors (see HAND_POSITIVES).
    ("prose", "Llegada 14:30, vuelo IB 3456, asiento 12A"),
    ("invoice", "Reference: 2026-000123456"),
    ("price", "IVA 21%: 1.234.567,89 €"),
    ("price", "precio 612.345.678 €"),
    ("price", "Total: 912 345 678 EUR"),
    ("invoice", "N.º de cuenta contable 4300012345"),
    ("place", "Código postal 28013, teléfono no disponible"),
    ("po", "Lote 20261103-0042"),
    ("technical", "Versión 6.12.345.678"),
    ("technical", "Coordinates 40.4168, -3.7038"),
    ("technical", "ISO 9001:2015, EN 60950-1, RAL 9016"),
    ("invoice", "CIF B12345678"),
    ("gtin14", "Pallet SSCC 003456789012345678"),
    ("technical", "IMEI 490154203237518"),
    ("technical", "iPhone 15, 256 GB, 6.1 pulgadas"),
    ("quantity", "612 unidades, 345 cajas y 678 palets"),
    ("quantity", "stock: 712 345 678 units"),
    ("dates", "31/12/2026 23:59:59"),
    ("timestamp", "2026-11-03T14:25:30.123456Z"),
    ("po", "our PO 7123456789 and your quote 2026-1187"),
]

# --- names and addresses (optional detectors) -------------------------------------------------------------------
NAMES = ["María García", "John Smith", "Javier Pérez", "Emily Johnson", "Laura Martínez", "Carlos Ruiz",
         "Jean Dupont", "Klaus Müller", "Ana Torres", "Michael Brown", "Sofía Navarro", "David Miller", "Priya Patel",
         "Lucía Fernández", "Olivia Taylor", "Raúl Gómez", "Marta Díaz", "James Wilson", "Elena Moreno", "Pablo Sanz"]
NAME_T = ["Best regards,\n{v}", "Saludos,\n{v}", "Thanks,\n{v}\nAcme Corp", "Hi {f},", "Hola {f}, ¿qué tal?",
          "Dear {v},", "Estimada {v}:", "Cordialement,\n{v}", "Mit freundlichen Grüßen\n{v}", "my name is {v}",
          "me llamo {v}", "I spoke with {v} yesterday", "{v} will pick it up", "Un saludo,\n{v}",
          "Kind regards\n{v}\nPurchasing", "Dear Mr. {l},", "Thank you,\n{f}"]
# Written by hand, not from the templates (so the names/addresses figure is not only the templates' recall).
HAND_NAMES = [
    ("Un abrazo,\nPepe", ["Pepe"]), ("Saludos cordiales,\nD. Antonio Jiménez Ruiz", ["Antonio", "Jiménez"]),
    ("—\nMaría José Fernández\nDirectora de Compras", ["María", "Fernández"]), ("Hi Sam and Alex,", ["Sam", "Alex"]),
    ("Gracias Lucía!", ["Lucía"]), ("cc: Juan Carlos Rodríguez", ["Juan", "Rodríguez"]),
    ("Firmado: Beatriz Soto", ["Beatriz", "Soto"]), ("From: Tom Hardy", ["Tom", "Hardy"]),
    ("Please ask Ms. Olsen", ["Olsen"]), ("att. Sr. Martínez", ["Martínez"]), ("hola pedro, ¿tienes stock?", ["pedro"]),
    ("Cheers, Dave", ["Dave"]), ("Regards, Nicole", ["Nicole"]), ("Ship it to my sister Carmen", ["Carmen"]),
    ("Thanks — Kenji Watanabe", ["Kenji", "Watanabe"]), ("Best regards,\nMaría García", ["María", "García"]),
    ("Hi John,", ["John"]), ("Estimado Sr. Gómez:", ["Gómez"]), ("Bonjour Mme Lefèvre,", ["Lefèvre"]),
    ("Atentamente,\nIñaki Etxeberria", ["Iñaki", "Etxeberria"]),
]
HAND_ADDRESSES = [
    "Avda. Diagonal 640, 08017 Barcelona", "c/ San Vicente Mártir, 12-3ª", "Plaza de España s/n",
    "Pol. Ind. Las Mercedes, nave 7", "742 Evergreen Terrace, Springfield", "PO Box 1234, Austin TX 78701",
    "Flat 2, 14 Queen's Road, Bristol BS8 1QU", "Via Roma 15, 00184 Roma", "Rua Augusta 100, 1100-053 Lisboa",
    "Carrer de Mallorca 401, Barcelona", "Kurfürstendamm 21, 10719 Berlin", "8 avenue des Champs-Élysées",
    "calle falsa 123", "1 Infinite Loop, Cupertino, CA 95014", "Calle Mayor 12, 28013 Madrid",
    "221B Baker Street, London NW1 6XE",
]
# Held out: written after the detectors were tuned on everything above and measured once, never tuned on.
HELDOUT_NAMES = [
    ("Muchas gracias,\nAlberto", ["Alberto"]), ("Best,\nRachel Green", ["Rachel", "Green"]),
    ("Greetings Dr. Chen,", ["Chen"]), ("Saludos\nLuis Miguel Ortega", ["Luis", "Ortega"]),
    ("Can you call back Mrs. Patterson?", ["Patterson"]), ("Le escribe Rosa María Vidal, de compras", ["Rosa", "Vidal"]),
    ("Dear Hiroshi,", ["Hiroshi"]), ("Cheers!\nMatt", ["Matt"]), ("I'm writing on behalf of Sandra Ortiz", ["Sandra", "Ortiz"]),
    ("Hola Montse y Jordi,", ["Montse", "Jordi"]), ("Please forward to Giulia Romano", ["Giulia", "Romano"]),
    ("Yours sincerely,\nAmelia Watson", ["Amelia", "Watson"]), ("Bises,\nCamille", ["Camille"]),
    ("Viele Grüße\nStefan", ["Stefan"]), ("buenos días carlos", ["carlos"]),
]
HELDOUT_ADDRESSES = [
    "Avenida de América 37, 28002 Madrid", "C/ Fuencarral, 120, 2ºD", "10 Downing Street, London SW1A 2AA",
    "350 Fifth Avenue, New York, NY 10118", "Rambla de Catalunya 33, Barcelona", "Paseo de la Castellana 259",
    "5 Rue du Faubourg Saint-Honoré, 75008 Paris", "Unter den Linden 77, 10117 Berlin", "Gran Vía 28, 4º izq.",
    "Apartment 4B, 500 Park Ave, New York", "Camino de Ronda 12, Granada", "Ctra. de Valencia km 7",
    "Musterstraße 12a, 80331 München", "12 Grove Road, Leeds LS6 2AP", "Travessera de Gràcia 50",
]
STREETS_ES = ["Mayor", "Alcalá", "Gran Vía", "de la Constitución", "del Prado", "San Bernardo", "Serrano"]
CITIES_ES = ["Madrid", "Barcelona", "Sevilla", "Valencia", "Bilbao"]


def address() -> tuple[str, str]:
    k = rng.randrange(6)
    n = rng.randrange(1, 200)
    if k == 0:
        return f"{pick(['Calle', 'C/', 'Avenida', 'Avda.', 'Plaza', 'Paseo'])} {pick(STREETS_ES)} {n}, " \
               f"{rng.randrange(1, 53):02d}{rng.randrange(1000):03d} {pick(CITIES_ES)}", "ES"
    if k == 1:
        return f"{pick(['Calle', 'C/', 'Avenida'])} {pick(STREETS_ES)}, {n}, {rng.randrange(1, 9)}º {pick('ABCD')}", "ES"
    if k == 2:
        return f"{n} {pick(['Baker', 'High', 'Church', 'Station', 'Victoria'])} {pick(['Street', 'Road', 'St.', 'Lane'])}, " \
               f"London {pick(['NW1 6XE', 'SW1A 2AA', 'E1 6AN', 'N7 9QJ'])}", "UK"
    if k == 3:
        return f"{n} {pick(['Main', 'Oak', 'Pine', 'Maple', 'Fifth'])} {pick(['Street', 'St', 'Ave', 'Avenue', 'Road'])}, " \
               f"{pick(['Springfield, IL', 'Austin, TX', 'New York, NY', 'Portland, OR'])} {digits(5, '123456789')}", "US"
    if k == 4:
        return f"{n} {pick(['rue', 'avenue', 'boulevard'])} {pick(['de Rivoli', 'Victor Hugo', 'de la Paix', 'des Lilas'])}, " \
               f"{pick(['75001', '69002', '13001', '31000'])} {pick(['Paris', 'Lyon', 'Marseille', 'Toulouse'])}", "FR"
    return f"{pick(['Hauptstraße', 'Bahnhofstr.', 'Gartenweg', 'Lindenallee', 'Schillerplatz'])} {n}, " \
           f"{digits(5, '123456789')} {pick(['Berlin', 'München', 'Hamburg', 'Köln'])}", "DE"


ADDRESS_T = ["envíalo a {v}", "ship to: {v}", "Address: {v}", "{v}", "deliver to {v} before noon",
             "nueva dirección\n{v}", "Lieferadresse: {v}", "adresse de livraison : {v}"]


def build() -> list[dict]:
    """The corpus rows (reseeds the RNG: the same rows on every call)."""
    rng.seed(20261203)
    rows: list[dict] = []

    def add(category, kind, source, text, values):
        rows.append({"id": f"{category.lower()}-{sum(r['category'] == category for r in rows) + 1:04d}",
                     "category": category, "kind": kind, "source": source, "text": text, "values": values})

    for category, text, values in HAND_POSITIVES:
        add(category, "hand", "hand", text, values)
    for category, gen, templates, n in (("EMAIL", email, EMAIL_T, 80), ("PHONE", phone, PHONE_T, 130),
                                        ("CARD", card, CARD_T, 70), ("IBAN", iban_value, IBAN_T, 60),
                                        ("SSN", ssn, SSN_T, 50), ("NATIONAL_ID", national_id, ID_T, 70)):
        for _ in range(n):
            value, kind = gen()
            add(category, kind, "generated", pick(templates).format(v=value), [value])
    for kind, text in HAND_NEGATIVES:
        add("NEGATIVE", kind, "hand", text, [])
    for _ in range(420):
        text, kind = negative()
        add("NEGATIVE", kind, "generated", text, [])
    for _ in range(80):
        full = pick(NAMES)
        f, last = full.split()[0], full.split()[-1]
        template = pick(NAME_T)
        value = f if "{f}" in template else last if "{l}" in template else full
        add("NAME", "name", "generated", template.format(v=full, f=f, l=last), [value])
    for text, values in HAND_NAMES:
        add("NAME", "hand", "hand", text, values)
    for value in HAND_ADDRESSES:
        add("ADDRESS", "hand", "hand", f"please send it to {value}", [value])
    for text, values in HELDOUT_NAMES:
        add("NAME", "heldout", "hand", text, values)
    for value in HELDOUT_ADDRESSES:
        add("ADDRESS", "heldout", "hand", f"dirección de entrega: {value}", [value])
    for _ in range(80):
        value, kind = address()
        add("ADDRESS", kind, "generated", pick(ADDRESS_T).format(v=value), [value])

    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    rows = build()
    OUT.write_text(render(rows), encoding="utf-8")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    print(f"wrote {len(rows)} rows to {OUT}: {counts}")


if __name__ == "__main__":
    main()
