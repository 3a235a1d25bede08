"""Personal data planted in synthetic inputs: every format is matched by retrain.data.scrub.PII_PATTERNS (tests assert
it row by row), with real check digits (Luhn, IBAN mod 97, DNI letter) so the values look like the real thing."""

from __future__ import annotations

import random


def pick(rng: random.Random, seq):
    # ~3x faster than rng.choice; the generator makes a dozen picks per row.
    return seq[int(rng.random() * len(seq))]


_FIRST = ("ana", "maria", "lucia", "carmen", "javier", "pablo", "diego", "sofia", "john", "emily", "michael",
          "sarah", "david", "laura", "carlos", "elena", "james", "olivia", "raul", "marta")
_LAST = ("garcia", "lopez", "martinez", "sanchez", "perez", "gomez", "smith", "johnson", "brown", "williams",
         "fernandez", "ruiz", "diaz", "moreno", "taylor", "miller", "navarro", "torres")
_MAIL_DOMAINS = ("gmail.com", "hotmail.com", "yahoo.es", "outlook.com", "icloud.com", "acme-corp.com",
                 "globex.io", "empresa.es")
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def digits(rng: random.Random, k: int) -> str:
    return str(rng.randrange(10 ** (k - 1), 10 ** k)) if k > 1 else str(rng.randrange(10))


def pii_email(rng: random.Random) -> str:
    style = rng.random()
    first, last = pick(rng, _FIRST), pick(rng, _LAST)
    if style < 0.4:
        local = f"{first}.{last}"
    elif style < 0.7:
        local = f"{first}{last[0]}{rng.randrange(1, 99)}"
    else:
        local = f"{first[0]}{last}"
    return f"{local}@{pick(rng, _MAIL_DOMAINS)}"


def pii_phone_es(rng: random.Random) -> str:
    a, b, c = f"6{digits(rng, 2)}", digits(rng, 3), digits(rng, 3)
    style = rng.random()
    if style < 0.6:
        return f"+34 {a} {b} {c}"
    if style < 0.8:
        return f"+34{a}{b}{c}"
    return f"{a} {b} {c}"


def pii_phone_us(rng: random.Random) -> str:
    area, mid, end = str(rng.randrange(201, 990)), digits(rng, 3), f"{rng.randrange(10000):04d}"
    style = rng.random()
    if style < 0.5:
        return f"({area}) {mid}-{end}"
    if style < 0.75:
        return f"+1 {area} {mid} {end}"
    return f"{area}-{mid}-{end}"


def _luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # doubled positions, counted from the (missing) check digit
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return body + str((10 - total % 10) % 10)


def pii_card(rng: random.Random) -> str:
    prefix = "4" if rng.random() < 0.6 else str(rng.randrange(51, 56))
    number = _luhn_complete(prefix + digits(rng, 15 - len(prefix)))
    sep = pick(rng, (" ", " ", "-", ""))
    return sep.join(number[i:i + 4] for i in range(0, 16, 4))


def pii_iban(rng: random.Random) -> str:
    # Real check digits (ISO 13616 mod 97) so the value looks like what a payroll form would hold.
    if rng.random() < 0.8:
        country, letters, bban = "ES", "1428", digits(rng, 20)
    else:
        country, letters, bban = "DE", "1314", digits(rng, 18)
    check = 98 - int(bban + letters + "00") % 97
    iban = f"{country}{check:02d}{bban}"
    if rng.random() < 0.75:
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    return iban


def pii_ssn(rng: random.Random) -> str:
    area = rng.randrange(1, 899)
    if area == 666:
        area = 667
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def pii_dni(rng: random.Random) -> str:
    num = rng.randrange(10_000_000, 100_000_000)
    return f"{num}{_DNI_LETTERS[num % 23]}"
