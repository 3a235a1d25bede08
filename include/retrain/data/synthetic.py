"""Synthetic production traffic for the three demo use cases (product_intent, email_intel, hr_leave).

The generator stands in for months of real user feedback so the pipeline can be exercised end to end.
Three properties matter more than realism:

* The TRUE label is a deterministic function of the input text (templates with disjoint cue vocabularies),
  so a small model can actually learn it and the go/no-go gate has something real to measure.
* Personal data is planted on purpose (and recorded per row) so scrubbing can be verified, and broken rows
  (prose instead of JSON, unknown labels, null/empty/huge inputs) are planted at a known rate so the
  validation stage has to catch them.
* It is cheap: one pass of ``random.Random`` calls and string formatting per row, no per-row JSON
  round-trips, so a million rows take seconds and ``insert_rows`` streams them with COPY.

Rows carry one extra key besides the documented ones: ``dirty`` is None for a well-formed row or the name
of the defect planted in it (``prose_json``, ``unknown_label``, ``missing_field``, ``null_input``,
``empty_input``, ``huge_input``), which tests use as the ground truth for what validation must reject.
Rows whose input carries a SQL-injection string are well-formed (``dirty`` None): the text must simply
round-trip.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from retrain.schemas.use_case import UseCase

# Share of rows carrying personal data, and the feedback mix of well-formed rows (seed 004's production
# feedback loop: most predictions are accepted, a human fixes some, rejects a few).
PII_RATE = 0.35
CORRECTED_RATE = 0.10
REJECTED_RATE = 0.05
# SQL-injection rows are valid traffic; they ride along with dirty batches at this share of `dirty`.
SQL_INJECTION_SHARE = 1 / 7
SQL_INJECTION = "'); DROP TABLE production_examples; --"
HUGE_INPUT_CHARS = 1 << 20  # 1 MiB of text: far over every use case's max_input_chars
# Broken-row kinds and their weights; huge inputs are capped per call (see _huge_cap) because a million-row
# dirty batch would otherwise ship gigabytes of filler into the database.
DIRTY_KINDS = ("prose_json", "unknown_label", "missing_field", "null_input", "empty_input", "huge_input")
DIRTY_WEIGHTS = (0.22, 0.22, 0.20, 0.12, 0.12, 0.12)
_INPUT_DEFECTS = ("null_input", "empty_input", "huge_input")


def _pick(rng: random.Random, seq):
    # ~3x faster than rng.choice; the generator makes a dozen picks per row.
    return seq[int(rng.random() * len(seq))]


# --- personal data -----------------------------------------------------------------------------------
# Every format below is matched by retrain.data.scrub.PII_PATTERNS (tests assert it row by row).

_FIRST = ("ana", "maria", "lucia", "carmen", "javier", "pablo", "diego", "sofia", "john", "emily", "michael",
          "sarah", "david", "laura", "carlos", "elena", "james", "olivia", "raul", "marta")
_LAST = ("garcia", "lopez", "martinez", "sanchez", "perez", "gomez", "smith", "johnson", "brown", "williams",
         "fernandez", "ruiz", "diaz", "moreno", "taylor", "miller", "navarro", "torres")
_MAIL_DOMAINS = ("gmail.com", "hotmail.com", "yahoo.es", "outlook.com", "icloud.com", "acme-corp.com",
                 "globex.io", "empresa.es")
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _digits(rng: random.Random, k: int) -> str:
    return str(rng.randrange(10 ** (k - 1), 10 ** k)) if k > 1 else str(rng.randrange(10))


def _pii_email(rng: random.Random) -> str:
    style = rng.random()
    first, last = _pick(rng, _FIRST), _pick(rng, _LAST)
    if style < 0.4:
        local = f"{first}.{last}"
    elif style < 0.7:
        local = f"{first}{last[0]}{rng.randrange(1, 99)}"
    else:
        local = f"{first[0]}{last}"
    return f"{local}@{_pick(rng, _MAIL_DOMAINS)}"


def _pii_phone_es(rng: random.Random) -> str:
    a, b, c = f"6{_digits(rng, 2)}", _digits(rng, 3), _digits(rng, 3)
    style = rng.random()
    if style < 0.6:
        return f"+34 {a} {b} {c}"
    if style < 0.8:
        return f"+34{a}{b}{c}"
    return f"{a} {b} {c}"


def _pii_phone_us(rng: random.Random) -> str:
    area, mid, end = str(rng.randrange(201, 990)), _digits(rng, 3), f"{rng.randrange(10000):04d}"
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


def _pii_card(rng: random.Random) -> str:
    prefix = "4" if rng.random() < 0.6 else str(rng.randrange(51, 56))
    number = _luhn_complete(prefix + _digits(rng, 15 - len(prefix)))
    sep = _pick(rng, (" ", " ", "-", ""))
    return sep.join(number[i:i + 4] for i in range(0, 16, 4))


def _pii_iban(rng: random.Random) -> str:
    # Real check digits (ISO 13616 mod 97) so the value looks like what a payroll form would hold.
    if rng.random() < 0.8:
        country, letters, bban = "ES", "1428", _digits(rng, 20)
    else:
        country, letters, bban = "DE", "1314", _digits(rng, 18)
    check = 98 - int(bban + letters + "00") % 97
    iban = f"{country}{check:02d}{bban}"
    if rng.random() < 0.75:
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    return iban


def _pii_ssn(rng: random.Random) -> str:
    area = rng.randrange(1, 899)
    if area == 666:
        area = 667
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def _pii_dni(rng: random.Random) -> str:
    num = rng.randrange(10_000_000, 100_000_000)
    return f"{num}{_DNI_LETTERS[num % 23]}"


# --- product_intent ----------------------------------------------------------------------------------
# Products: (category, es singular with article, es plural, en singular with article, en plural).
_PRODUCTS: tuple[tuple[str, str, str, str, str], ...] = (
    ("electronics", "unos auriculares", "auriculares", "a pair of headphones", "headphones"),
    ("electronics", "una tablet", "tablets", "a tablet", "tablets"),
    ("electronics", "un altavoz bluetooth", "altavoces bluetooth", "a bluetooth speaker", "bluetooth speakers"),
    ("electronics", "un smartwatch", "smartwatches", "a smartwatch", "smartwatches"),
    ("electronics", "un portátil", "portátiles", "a laptop", "laptops"),
    ("electronics", "una cámara de fotos", "cámaras de fotos", "a camera", "cameras"),
    ("electronics", "un monitor", "monitores", "a monitor", "monitors"),
    ("home", "una lámpara de mesa", "lámparas de mesa", "a table lamp", "table lamps"),
    ("home", "un juego de sábanas", "juegos de sábanas", "a bedding set", "bedding sets"),
    ("home", "una manta", "mantas", "a throw blanket", "throw blankets"),
    ("home", "un difusor de aromas", "difusores de aromas", "an aroma diffuser", "aroma diffusers"),
    ("kitchen", "una cafetera", "cafeteras", "a coffee maker", "coffee makers"),
    ("kitchen", "una freidora de aire", "freidoras de aire", "an air fryer", "air fryers"),
    ("kitchen", "un juego de cuchillos", "juegos de cuchillos", "a knife set", "knife sets"),
    ("kitchen", "una batidora", "batidoras", "a blender", "blenders"),
    ("fashion", "una chaqueta", "chaquetas", "a jacket", "jackets"),
    ("fashion", "un bolso", "bolsos", "a handbag", "handbags"),
    ("fashion", "unas zapatillas", "zapatillas", "a pair of sneakers", "sneakers"),
    ("fashion", "una bufanda", "bufandas", "a scarf", "scarves"),
    ("beauty", "un perfume", "perfumes", "a perfume", "perfumes"),
    ("beauty", "un set de maquillaje", "sets de maquillaje", "a makeup set", "makeup sets"),
    ("beauty", "una crema facial", "cremas faciales", "a face cream", "face creams"),
    ("sports", "una esterilla de yoga", "esterillas de yoga", "a yoga mat", "yoga mats"),
    ("sports", "unas mancuernas", "mancuernas", "a set of dumbbells", "dumbbells"),
    ("sports", "una bicicleta estática", "bicicletas estáticas", "an exercise bike", "exercise bikes"),
    ("sports", "una raqueta de pádel", "raquetas de pádel", "a padel racket", "padel rackets"),
    ("books", "un libro de cocina", "libros de cocina", "a cookbook", "cookbooks"),
    ("books", "una novela", "novelas", "a novel", "novels"),
    ("books", "un cómic", "cómics", "a comic book", "comic books"),
    ("toys", "un juego de mesa", "juegos de mesa", "a board game", "board games"),
    ("toys", "un set de LEGO", "sets de LEGO", "a LEGO set", "LEGO sets"),
    ("toys", "un peluche", "peluches", "a stuffed animal", "stuffed animals"),
    ("toys", "un puzzle", "puzzles", "a jigsaw puzzle", "jigsaw puzzles"),
    ("office", "una silla ergonómica", "sillas ergonómicas", "an ergonomic chair", "ergonomic chairs"),
    ("office", "una agenda de piel", "agendas de piel", "a leather planner", "leather planners"),
    ("office", "una impresora", "impresoras", "a printer", "printers"),
    ("office", "un organizador de escritorio", "organizadores de escritorio", "a desk organizer", "desk organizers"),
    ("jewelry", "un collar", "collares", "a necklace", "necklaces"),
    ("jewelry", "unos pendientes", "pendientes", "a pair of earrings", "earrings"),
    ("jewelry", "una pulsera", "pulseras", "a bracelet", "bracelets"),
    ("jewelry", "un reloj de pulsera", "relojes de pulsera", "a wristwatch", "wristwatches"),
    ("garden", "una barbacoa", "barbacoas", "a barbecue grill", "barbecue grills"),
    ("garden", "unas macetas", "macetas", "a set of planters", "planters"),
    ("garden", "unas herramientas de jardín", "herramientas de jardín", "a garden tool set", "garden tool sets"),
)
# "Something" with no product noun: category unspecified.
_NO_PRODUCT_ES = ("algo", "un detalle", "alguna cosa")
_NO_PRODUCT_EN = ("something", "a little something", "anything nice")

# Recipients: (label, es phrases, en phrases). Only GIFT (and gift-flavoured URGENT) queries name one.
_RECIPIENTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("mother", ("mi madre", "mi mamá"), ("my mom", "my mother")),
    ("father", ("mi padre", "mi papá"), ("my dad", "my father")),
    ("partner", ("mi pareja", "mi novia", "mi novio", "mi mujer", "mi marido"),
     ("my partner", "my girlfriend", "my boyfriend", "my wife", "my husband")),
    ("friend", ("mi amigo", "mi amiga", "mi mejor amiga"), ("my friend", "my best friend")),
    ("boss", ("mi jefe", "mi jefa"), ("my boss", "my manager")),
    ("colleague", ("un compañero de trabajo", "una compañera de trabajo"), ("a coworker", "a colleague")),
    ("child", ("mi hijo", "mi hija", "mi sobrina"), ("my son", "my daughter", "my niece")),
    ("grandparent", ("mi abuela", "mi abuelo"), ("my grandma", "my grandpa")),
    ("sibling", ("mi hermano", "mi hermana"), ("my brother", "my sister")),
    ("teacher", ("mi profesor", "mi profesora"), ("my teacher",)),
)
_BUSINESS_RECIPIENTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("team", ("mi equipo", "el equipo"), ("my team", "our team")),
    ("clients", ("nuestros clientes",), ("our clients", "our customers")),
    ("employees", ("los empleados", "la plantilla"), ("our employees", "the staff")),
    ("office", ("la oficina",), ("the office",)),
)
# Occasions: (context tag, es phrase, en phrase); phrases carry their own leading space.
_OCCASIONS: tuple[tuple[str, str, str], ...] = (
    ("birthday", " por su cumpleaños", " for their birthday"),
    ("christmas", " para Navidad", " for Christmas"),
    ("anniversary", " por nuestro aniversario", " for our anniversary"),
    ("wedding", " por su boda", " for their wedding"),
    ("graduation", " por su graduación", " for their graduation"),
    ("retirement", " por su jubilación", " for their retirement"),
    ("valentines", " por San Valentín", " for Valentine's Day"),
    ("housewarming", " por su casa nueva", " for a housewarming"),
)
# Gift modifiers: (es, en, context tag or None, priority feature).
_MODIFIERS: tuple[tuple[str, str, str | None, str], ...] = (
    ("algo especial", "something special", "special", "memorable"),
    ("algo original", "something original", "original", "unique"),
    ("sostenible", "eco-friendly", "sustainable", "eco_friendly"),
    ("hecho a mano", "handmade", "handmade", "craftsmanship"),
    ("con grabado personalizado", "with a personalized engraving", "personalized", "personalization"),
    ("envuelto para regalo", "gift-wrapped", None, "gift_wrapping"),
)
# Product features asked for: (es, en, priority feature). Order here is the order in the label.
_FEATURES: tuple[tuple[str, str, str], ...] = (
    ("con buena batería", "with long battery life", "battery_life"),
    ("resistente al agua", "waterproof", "waterproof"),
    ("que pese poco", "lightweight", "lightweight"),
    ("sin cables", "wireless", "wireless"),
    ("con garantía", "with a good warranty", "warranty"),
    ("fácil de usar", "easy to use", "ease_of_use"),
    ("con buen diseño", "with a nice design", "design"),
    ("que dure años", "durable", "durability"),
)
_FEATURE_ORDER = {f[2]: i for i, f in enumerate(_FEATURES)}
_BUDGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "economic": (("barato", "económico", "lo más barato posible", "de bajo coste", "con poco presupuesto",
                  "por menos de 30 euros", "por menos de 20€"),
                 ("cheap", "budget-friendly", "affordable", "low cost", "under $30", "on a tight budget")),
    "mid_range": (("presupuesto medio", "precio medio", "gama media", "entre 50 y 100 euros", "precio razonable"),
                  ("mid-range", "moderately priced", "reasonably priced", "between $50 and $100", "medium budget")),
    "premium": (("premium", "de alta gama", "de lujo", "sin límite de presupuesto", "lo mejor de lo mejor"),
                ("premium", "luxury", "high-end", "top of the line", "money is no object")),
}
_BUDGET_TIERS = ("unspecified", "mid_range", "mid_range", "economic", "premium")  # uniform pick = weights
_BUDGET_FEATURE = {"economic": "low_price", "mid_range": "value_for_money", "premium": "premium_quality"}
# Personal-use activities: (context tag, es, en).
_ACTIVITIES: tuple[tuple[str, str, str], ...] = (
    ("gym", " para el gimnasio", " for the gym"),
    ("travel", " para viajar", " for travel"),
    ("home_office", " para teletrabajar", " for working from home"),
    ("running", " para salir a correr", " for running"),
    ("study", " para estudiar", " for studying"),
)
# Urgency: (context tag, es, en).
_WHEN: tuple[tuple[str, str, str], ...] = (
    ("same_day", "para hoy", "today"),
    ("same_day", "hoy mismo", "by tonight"),
    ("next_day", "para mañana", "by tomorrow"),
    ("next_day", "en 24 horas", "within 24 hours"),
    ("asap", "lo antes posible", "ASAP"),
    ("asap", "urgente", "urgently"),
)
# Comparison pairs: (category, A, B).
_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("electronics", "iPhone 15", "Galaxy S24"), ("electronics", "AirPods Pro", "Galaxy Buds"),
    ("electronics", "iPad Air", "Galaxy Tab S9"), ("electronics", "Sony WH-1000XM5", "Bose QuietComfort"),
    ("electronics", "MacBook Air", "Dell XPS 13"), ("electronics", "Kindle Paperwhite", "Kobo Clara"),
    ("electronics", "Apple Watch", "Garmin Venu"), ("kitchen", "Nespresso", "Dolce Gusto"),
    ("kitchen", "Thermomix", "Mambo"), ("kitchen", "Cosori", "Ninja Foodi"), ("home", "Roomba", "Roborock"),
    ("home", "Dyson V15", "Rowenta X-Force"), ("beauty", "Dyson Airwrap", "GHD"),
    ("fashion", "Nike Pegasus", "Adidas Ultraboost"), ("toys", "LEGO", "Playmobil"),
    ("toys", "Nintendo Switch", "PlayStation 5"), ("office", "HP LaserJet", "Brother HL"),
    ("sports", "Peloton", "Bowflex"),
)

# Templates: (text, needs product). Placeholders: {p} product, {pp} plural product, {r} recipient,
# {o} occasion, {a} activity, {w} when, {q} quantity, {A}/{B} comparison pair.
_GIFT_T = {
    "es": (("Busco {p} para {r}{o}", True), ("regalo para {r}{o}: {p}", True),
           ("¿Qué le regalo a {r}{o}? Pensaba en {p}", True), ("Quiero regalarle {p} a {r}{o}", True),
           ("ideas de regalo para {r}{o}", False), ("un regalo para {r}{o}", False),
           ("Busco {p} para regalar a {r}{o}", True)),
    "en": (("gift for {r}{o}", False), ("Looking for {p} as a gift for {r}{o}", True),
           ("What should I get {r}{o}? Thinking about {p}", True), ("present ideas for {r}{o}", False),
           ("I want to buy {p} for {r}{o} as a present", True), ("gift idea: {p} for {r}{o}", True)),
}
_PERSONAL_T = {
    "es": (("Busco {p} para mí{a}", True), ("Quiero comprarme {p}{a}", True), ("{pp}{a}", True),
           ("recomendación de {pp} para uso personal{a}", True), ("me hace falta {p}{a}", True),
           ("quiero darme un capricho: {p}", True)),
    "en": (("{pp}{a}", True), ("I'm looking for {p} for myself{a}", True), ("want to treat myself to {p}", True),
           ("need {p} for personal use{a}", True), ("recommend me {p}{a}", True)),
}
_BUSINESS_T = {
    "es": (("{q} {pp} para {r}", True), ("Compra corporativa: {q} {pp} para {r}", True),
           ("Necesitamos {q} {pp} para {r}", True), ("cotización de {q} {pp} para {r}, pedido de empresa", True)),
    "en": (("bulk order: {q} {pp} for {r}", True), ("corporate purchase of {q} {pp} for {r}", True),
           ("we need {q} {pp} for {r}", True), ("quote for {q} {pp} for {r}, company purchase", True)),
}
_COMPARISON_T = {
    "es": (("{A} vs {B}", False), ("{A} o {B}, ¿cuál es mejor?", False), ("comparar {A} y {B}", False),
           ("diferencias entre {A} y {B}", False), ("¿Qué me compro, {A} o {B}?", False)),
    "en": (("{A} vs {B}", False), ("{A} or {B}, which one is better?", False), ("compare {A} and {B}", False),
           ("difference between {A} and {B}", False), ("should I buy {A} or {B}?", False)),
}
_URGENT_T = {
    "es": (("Necesito {p} {w}", True), ("{p} {w}, por favor", True), ("necesito un regalo para {r} {w}", False),
           ("¿Puedo recibir {p} {w}?", True), ("entrega {w}: {p}", True)),
    "en": (("need {p} {w}", True), ("I need a gift for {r} {w}", False), ("can I get {p} delivered {w}?", True),
           ("{p} {w}!", True), ("delivery {w}: {p}", True)),
}
_INTENTS = ("GIFT",) * 7 + ("PERSONAL_USE",) * 5 + ("BUSINESS",) * 3 + ("COMPARISON",) * 3 + ("URGENT",) * 3
_INTENT_TAG = {"GIFT": "gift", "PERSONAL_USE": "personal", "BUSINESS": "business", "COMPARISON": "comparison",
               "URGENT": "urgent"}
_INTENT_FEATURES = {"GIFT": ["thoughtful"], "PERSONAL_USE": ["good_reviews"], "BUSINESS": ["bulk_pricing"],
                    "COMPARISON": ["specs_comparison"], "URGENT": ["fast_delivery"]}
_QUANTITIES = (5, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 75, 100, 150, 200)


def _pi_pii(rng: random.Random, lang: str) -> tuple[str, list[str]]:
    kind = rng.random()
    if kind < 0.4:
        v = _pii_email(rng)
        s = _pick(rng, ("Mi correo es {}", "Envíame la info a {}", "contacto: {}")) if lang == "es" else \
            _pick(rng, ("My email is {}", "reach me at {}", "send details to {}"))
    elif kind < 0.75:
        v = _pii_phone_es(rng) if lang == "es" or rng.random() < 0.3 else _pii_phone_us(rng)
        s = _pick(rng, ("Llámame al {}", "mi móvil: {}", "whatsapp {}")) if lang == "es" else \
            _pick(rng, ("call me at {}", "text me at {}", "my number is {}"))
    else:
        v = _pii_card(rng)
        s = _pick(rng, ("pago con la tarjeta {}", "tarjeta {}")) if lang == "es" else \
            _pick(rng, ("I'll pay with card {}", "card number {}"))
    return s.format(v), [v]


def _product_intent_row(rng: random.Random, with_pii: bool) -> tuple[str, dict, list[str]]:
    lang = "es" if rng.random() < 0.55 else "en"
    es = lang == "es"
    intent = _pick(rng, _INTENTS)
    tier = _pick(rng, _BUDGET_TIERS)
    prod = _pick(rng, _PRODUCTS)
    slots: dict[str, Any] = {}
    tags = [_INTENT_TAG[intent]]
    feats = list(_INTENT_FEATURES[intent])
    extras: list[str] = []
    category, recipient = "unspecified", "self"

    if intent == "GIFT":
        template, needs_product = _pick(rng, _GIFT_T[lang])
        rec = _pick(rng, _RECIPIENTS)
        recipient = rec[0]
        slots["r"] = _pick(rng, rec[1] if es else rec[2])
        if rng.random() < 0.7:
            occ = _pick(rng, _OCCASIONS)
            slots["o"] = occ[1] if es else occ[2]
            tags.append(occ[0])
        else:
            slots["o"] = ""
        if needs_product:
            if rng.random() < 0.2:
                slots["p"] = _pick(rng, _NO_PRODUCT_ES if es else _NO_PRODUCT_EN)
            else:
                slots["p"] = prod[1] if es else prod[3]
                category = prod[0]
        if rng.random() < 0.45:
            mod = _pick(rng, _MODIFIERS)
            extras.append(mod[0] if es else mod[1])
            if mod[2]:
                tags.append(mod[2])
            feats.append(mod[3])
        if recipient == "child":
            feats.append("age_appropriate")
    elif intent == "PERSONAL_USE":
        template, _ = _pick(rng, _PERSONAL_T[lang])
        slots["p"], slots["pp"] = (prod[1], prod[2]) if es else (prod[3], prod[4])
        category = prod[0]
        if rng.random() < 0.4 and "{a}" in template:
            act = _pick(rng, _ACTIVITIES)
            slots["a"] = act[1] if es else act[2]
            tags.append(act[0])
        else:
            slots["a"] = ""
    elif intent == "BUSINESS":
        template, _ = _pick(rng, _BUSINESS_T[lang])
        slots["pp"] = prod[2] if es else prod[4]
        slots["q"] = _pick(rng, _QUANTITIES)
        category = prod[0]
        rec = _pick(rng, _BUSINESS_RECIPIENTS)
        recipient = rec[0]
        slots["r"] = _pick(rng, rec[1] if es else rec[2])
        if rng.random() < 0.3:
            extras.append("con factura" if es else "invoice required")
            feats.append("invoice")
    elif intent == "COMPARISON":
        template, _ = _pick(rng, _COMPARISON_T[lang])
        pair = _pick(rng, _PAIRS)
        category = pair[0]
        if rng.random() < 0.5:
            slots["A"], slots["B"] = pair[1], pair[2]
        else:
            slots["A"], slots["B"] = pair[2], pair[1]
        feats.append("value_for_money")
    else:  # URGENT
        template, needs_product = _pick(rng, _URGENT_T[lang])
        when = _pick(rng, _WHEN)
        slots["w"] = when[1] if es else when[2]
        tags.append(when[0])
        if needs_product:
            slots["p"] = prod[1] if es else prod[3]
            category = prod[0]
        else:
            rec = _pick(rng, _RECIPIENTS)
            recipient = rec[0]
            slots["r"] = _pick(rng, rec[1] if es else rec[2])
            tags.append("gift")

    # Asked-for features (0-2), listed in the label in a fixed order so the label is a function of the text.
    r = rng.random()
    if r < 0.45 and intent != "URGENT":
        k = 1 if r < 0.3 else 2
        chosen = rng.sample(_FEATURES, k)
        extras.extend(f[0] if es else f[1] for f in chosen)
        feats.extend(sorted((f[2] for f in chosen), key=_FEATURE_ORDER.__getitem__))
    if tier != "unspecified":
        extras.append(_pick(rng, _BUDGETS[tier][0 if es else 1]))
        feats.append(_BUDGET_FEATURE[tier])

    text = template.format(**slots) if slots else template
    if extras:
        text += ", " + ", ".join(extras)
    if rng.random() < 0.3:
        text = text[0].lower() + text[1:]
    pii: list[str] = []
    if with_pii:
        sentence, pii = _pi_pii(rng, lang)
        text += _pick(rng, (". ", " - ", ". ")) + sentence
    seen: set[str] = set()
    feats = [f for f in feats if not (f in seen or seen.add(f))]
    label = {"intent_type": intent, "budget_tier": tier, "category": category, "recipient": recipient,
             "context_tags": tags, "priority_features": feats}
    return text, label, pii


_PI_CONFUSIONS = {"GIFT": ("PERSONAL_USE", "URGENT"), "PERSONAL_USE": ("GIFT", "COMPARISON", "BUSINESS"),
                  "BUSINESS": ("PERSONAL_USE",), "COMPARISON": ("PERSONAL_USE",), "URGENT": ("GIFT", "PERSONAL_USE")}
_TIER_CONFUSIONS = {"unspecified": ("mid_range",), "mid_range": ("economic", "premium", "unspecified"),
                    "economic": ("mid_range",), "premium": ("mid_range",)}


def _product_intent_wrong(rng: random.Random, label: dict) -> dict:
    wrong = dict(label, context_tags=list(label["context_tags"]), priority_features=list(label["priority_features"]))
    r = rng.random()
    if r < 0.65:
        wrong["intent_type"] = _pick(rng, _PI_CONFUSIONS[label["intent_type"]])
        wrong["context_tags"][0] = _INTENT_TAG[wrong["intent_type"]]
    if r >= 0.45:
        wrong["budget_tier"] = _pick(rng, _TIER_CONFUSIONS[label["budget_tier"]])
    return wrong


# --- email_intel -------------------------------------------------------------------------------------
_COMPANIES = ("Acme Corp", "Globex", "Initech", "Umbrella IT", "Stark Retail", "Wayne Tech", "Hooli",
              "Vandelay Industries", "Contoso", "Fabrikam", "Northwind Traders", "Tailspin Toys", "Blue Yonder IT",
              "Iberia Sistemas", "Soluciones Norte")
_SKU_PREFIXES = ("XHU", "KTR", "MSF", "DLL", "HPE", "LNV", "CSC", "APL", "SMS", "LGE")
_SIGN_NAMES = ("Ana", "María", "Javier", "Pablo", "John", "Emily", "Michael", "Sarah", "David", "Laura", "Carlos",
               "Elena", "James", "Olivia", "Raúl", "Marta", "Kevin", "Priya")
_EMAIL_INTENTS = ("purchase_order",) * 5 + ("quote_request",) * 4 + ("support_ticket",) * 3 + \
                 ("ship_notice",) * 3 + ("invoice_query",) * 2 + ("return_request",) * 2
_ACTION_ORDER = ("validate_po", "apply_spa", "process_order", "prepare_quote", "check_inventory", "open_ticket",
                 "escalate", "update_tracking", "notify_customer", "review_invoice", "issue_rma")
_ACTION_RANK = {a: i for i, a in enumerate(_ACTION_ORDER)}
_URGENCIES = ("low", "low", "low", "medium", "medium", "high", "high")
_URG_SUBJECT = (" - URGENT", " [URGENT]", " - ASAP")
_URG_BODY = {
    "high": ("This is urgent, we need it today.", "URGENT: customer line down.",
             "Please treat as critical and reply ASAP."),
    "medium": ("Please handle this week.", "We need an answer by Friday.", "Please reply by end of week."),
    "low": ("", "", "No rush on this one.", "Whenever you get a chance."),
}
_GREETINGS = ("Hi team,", "Hello,", "Good morning,", "Hi,", "Dear sales team,", "Hola equipo,")
_CLOSINGS = ("Thanks,", "Regards,", "Best,", "Thank you,", "Saludos,")
_STOCK_CLAUSES = ("Please confirm stock availability before shipping.", "Can you check inventory first?",
                  "Let us know the lead time and stock availability.")
_EMAIL_ESCALATE = {"support_ticket", "invoice_query", "return_request"}


def _email_qty_phrase(rng: random.Random, qty: int, product: str) -> str:
    return _pick(rng, ("{q} units of {p}", "{q} x {p}", "{q} pcs of {p}", "qty {q} of {p}")).format(q=qty, p=product)


def _email_intel_row(rng: random.Random, with_pii: bool) -> tuple[str, dict, list[str]]:
    intent = _pick(rng, _EMAIL_INTENTS)
    urgency = _pick(rng, _URGENCIES)
    company = _pick(rng, _COMPANIES)
    po = _digits(rng, rng.randrange(6, 11))
    product = f"{_pick(rng, _SKU_PREFIXES)}-{rng.randrange(100000):05d}"
    qty = _pick(rng, (2, 5, 10, 12, 20, 24, 25, 40, 50, 75, 100, 150, 200, 250, 500, 1000)) \
        if rng.random() < 0.7 else rng.randrange(2, 999)
    spa = f"CAS-{rng.randrange(1000000):06d}-" + "".join(
        _pick(rng, "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
    ent: dict[str, Any] = {}
    actions: list[str] = []
    body: list[str] = []

    if intent == "purchase_order":
        edi = rng.random() < 0.3
        subject = (f"EDI CUST850 - PO {po}" if edi else
                   _pick(rng, ("PO {po}", "Purchase Order {po} - {c}", "New order {po}", "Order PO# {po}"))
                   .format(po=po, c=company))
        body.append(_pick(rng, ("Please process attached purchase order for {x}.",
                                "Attached is PO {po} for {x}.", "Kindly book PO {po}: {x}."))
                    .format(po=po, x=_email_qty_phrase(rng, qty, product)))
        ent.update(po_number=po, product=product, quantity=qty)
        actions += ["validate_po", "process_order"]
        if rng.random() < 0.4:
            body.append(_pick(rng, ("Apply SPA {s}.", "Pricing per SPA {s}.", "Use special pricing {s}."))
                        .format(s=spa))
            ent["spa_code"] = spa
            actions.append("apply_spa")
        if edi:
            body.append("The CUST850 was also sent through EDI.")
            ent["edi"] = "CUST850"
        if rng.random() < 0.3:
            body.append(_pick(rng, _STOCK_CLAUSES))
            actions.append("check_inventory")
    elif intent == "quote_request":
        subject = _pick(rng, ("Quote request - {p}", "RFQ: {q} x {p}", "Pricing for {p}", "Quote-FTQ {c}")) \
            .format(p=product, q=qty, c=company)
        body.append(_pick(rng, ("Could you send a quote for {x}?", "We would like pricing for {x}.",
                                "Please quote {x} for {c}.")).format(x=_email_qty_phrase(rng, qty, product), c=company))
        ent.update(product=product, quantity=qty)
        actions.append("prepare_quote")
        if rng.random() < 0.35:
            body.append(_pick(rng, ("Please quote under SPA {s}.", "We have SPA {s} for this deal.")).format(s=spa))
            ent["spa_code"] = spa
            actions.append("apply_spa")
        if rng.random() < 0.35:
            body.append(_pick(rng, _STOCK_CLAUSES))
            actions.append("check_inventory")
    elif intent == "support_ticket":
        variant = rng.random()
        if variant < 0.25:
            subject = f"CDW855 acknowledgment missing for PO {po}"
            body.append(f"We never received the CDW855 PO acknowledgment for PO {po}. Can you open a case?")
            ent.update(po_number=po, edi="CDW855")
        elif variant < 0.65:
            subject = _pick(rng, ("Issue with {p}", "Problem: {p} not working", "Defective unit {p}")).format(p=product)
            body.append(_pick(rng, ("The {p} we received keeps rebooting.", "Our {p} fails the firmware update.",
                                    "{p} shows a power fault on startup.")).format(p=product))
            ent["product"] = product
        else:
            subject = _pick(rng, ("Support needed - order {po}", "Help with order {po}")).format(po=po)
            body.append(_pick(rng, ("Units from PO {po} ({p}) are failing on boot.",
                                    "Devices delivered on PO {po} ({p}) will not power on.")).format(po=po, p=product))
            ent.update(po_number=po, product=product)
        actions.append("open_ticket")
    elif intent == "ship_notice":
        edi = rng.random() < 0.5
        subject = (f"CDW856 ASN for PO {po}" if edi else
                   _pick(rng, ("Ship notice PO {po}", "Shipment update - {po}", "Order {po} shipped")).format(po=po))
        ent["po_number"] = po
        if rng.random() < 0.6:
            body.append(f"Please be advised PO {po} has shipped: {_email_qty_phrase(rng, qty, product)}.")
            ent.update(product=product, quantity=qty)
        else:
            body.append(f"PO {po} left our warehouse this morning.")
        if edi:
            body.append("EDI CDW856 advance ship notice transmitted.")
            ent["edi"] = "CDW856"
        body.append("Carrier tracking is available in the portal.")
        actions += ["update_tracking", "notify_customer"]
    elif intent == "invoice_query":
        edi = rng.random() < 0.3
        subject = (f"CUST810 invoice for PO {po}" if edi else
                   _pick(rng, ("Invoice question - PO {po}", "Billing discrepancy on PO {po}")).format(po=po))
        ent["po_number"] = po
        if rng.random() < 0.5:
            body.append(f"The invoice for PO {po} does not reflect the pricing agreed in SPA {spa}.")
            ent["spa_code"] = spa
        else:
            body.append(_pick(rng, ("The invoice for PO {po} was charged twice.",
                                    "We were billed freight on PO {po} although it was waived.")).format(po=po))
        if edi:
            body.append("The CUST810 came through EDI yesterday.")
            ent["edi"] = "CUST810"
        actions.append("review_invoice")
    else:  # return_request
        subject = _pick(rng, ("RMA request - PO {po}", "Return {q} units of {p}", "Damaged goods on PO {po}")) \
            .format(po=po, q=qty, p=product)
        body.append(_pick(rng, ("We need to return {x} from PO {po}; the boxes arrived damaged.",
                                "Please issue an RMA for {x} on PO {po}, wrong model shipped."))
                    .format(x=_email_qty_phrase(rng, qty, product), po=po))
        ent.update(po_number=po, product=product, quantity=qty)
        actions += ["issue_rma", "notify_customer"]

    if urgency == "high":
        r = rng.random()
        if r < 0.6:
            subject += _pick(rng, _URG_SUBJECT)
        if r >= 0.35:
            body.append(_pick(rng, _URG_BODY["high"]))
        if intent in _EMAIL_ESCALATE:
            actions.append("escalate")
    else:
        cue = _pick(rng, _URG_BODY[urgency])
        if cue:
            body.append(cue)

    name = _pick(rng, _SIGN_NAMES)
    signature = f"{_pick(rng, _CLOSINGS)}\n{name}" + (f"\n{company}" if rng.random() < 0.5 else "")
    pii: list[str] = []
    if with_pii:
        r = rng.random()
        if r < 0.35:
            v = _pii_email(rng)
            signature += f"\n{v}"
        elif r < 0.5:
            v = f"sales{rng.randrange(1000, 9999)}@tdsynnex.com"  # team routing addresses (seed 000)
            body.append(f"cc {v}")
        elif r < 0.75:
            v = _pii_phone_es(rng) if rng.random() < 0.4 else _pii_phone_us(rng)
            signature += f"\n{_pick(rng, ('Tel: ', 'Mobile: ', 'Direct: '))}{v}"
        elif r < 0.9:
            v = _pii_iban(rng)
            body.append(f"Refunds to our account IBAN {v}.")
        else:
            v = _pii_card(rng)
            body.append(f"Charge the card on file {v}.")
        pii.append(v)
    text = f"Subject: {subject}\nBody: {_pick(rng, _GREETINGS)}\n{' '.join(body)}\n{signature}"
    actions.sort(key=_ACTION_RANK.__getitem__)
    label = {"intent": intent, "entities": ent, "actions": actions, "urgency": urgency}
    return text, label, pii


_EMAIL_CONFUSIONS = {"purchase_order": ("quote_request", "ship_notice"), "quote_request": ("purchase_order",),
                     "support_ticket": ("return_request", "invoice_query"), "ship_notice": ("purchase_order",),
                     "invoice_query": ("support_ticket",), "return_request": ("support_ticket",)}


def _email_intel_wrong(rng: random.Random, label: dict) -> dict:
    wrong = {"intent": label["intent"], "entities": dict(label["entities"]), "actions": list(label["actions"]),
             "urgency": label["urgency"]}
    r = rng.random()
    if r < 0.5:
        wrong["intent"] = _pick(rng, _EMAIL_CONFUSIONS[label["intent"]])
    elif r < 0.8 or len(wrong["entities"]) < 2:
        wrong["urgency"] = _pick(rng, tuple(u for u in ("low", "medium", "high") if u != label["urgency"]))
    else:
        wrong["entities"].pop(_pick(rng, tuple(wrong["entities"])))  # missed an entity
    return wrong


# --- hr_leave ------------------------------------------------------------------------------------------
# Policy table from seed 002, plus the advance-notice rule it tells the analyst to check.
HR_POLICY: dict[str, dict[str, Any]] = {
    "casual_leave": {"max": 3, "quota": 12, "approvers": ["manager"], "notice": 1},
    "sick_leave": {"max": 5, "quota": 12, "approvers": ["manager"], "notice": 0},
    "annual_leave": {"max": 15, "quota": 21, "approvers": ["manager", "hr"], "notice": 7},
}
_LEAVE_TYPES = ("casual_leave", "sick_leave", "annual_leave")
_HR_FIRST = ("John", "Jane", "Ana", "Luis", "María", "Pedro", "Emily", "Michael", "Sofía", "Carlos", "Laura",
             "David", "Lucía", "Jorge", "Sarah", "Priya", "Wei", "Fatima", "Omar", "Elena")
_HR_LAST = ("Doe", "Smith", "García", "López", "Martínez", "Johnson", "Brown", "Fernández", "Chen", "Patel",
            "Rodríguez", "Khan", "Müller", "Rossi", "Silva", "Navarro")
_HR_DEPTS = ("Engineering", "Sales", "Finance", "Operations", "Marketing", "Support", "Legal")
_HR_REASONS = {
    "casual_leave": ("family event", "moving house", "personal errands", "child's school event", "wedding of a friend"),
    "sick_leave": ("flu", "medical procedure", "back pain", "fever", "dental surgery"),
    "annual_leave": ("summer vacation", "trip to Japan", "family holiday", "visiting relatives", "rest"),
}


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def hr_decision(leave_type: str, duration: int, balance: int, notice: int) -> dict:
    """The true label for a leave request under HR_POLICY (exposed so tests and docs share one rule)."""
    pol = HR_POLICY[leave_type]
    human = leave_type.replace("_", " ")
    mx, min_notice = pol["max"], pol["notice"]
    problems, recs = [], []
    if duration > mx:
        problems.append(f"Duration ({_days(duration)}) exceeds maximum consecutive days allowed ({_days(mx)}) "
                        f"for {human}")
        recs.append(f"Split into two requests: {_days(mx)} + {_days(duration - mx)}")
        if leave_type == "sick_leave":
            recs += ["Provide medical certificate for extended sick leave", "Consider extended medical leave policy"]
    if duration > balance:
        problems.append(f"Insufficient balance: requested {_days(duration)} but only {_days(balance)} available")
        recs.append(f"Reduce the request to {_days(balance)} or fewer" if balance > 0
                    else "Consider unpaid leave or wait for the balance to accrue")
    if notice < min_notice:
        problems.append(f"Notice ({_days(notice)}) is shorter than the required {_days(min_notice)} for {human}")
        recs.append(f"Submit the request at least {_days(min_notice)} in advance")
    if problems:
        return {"eligible": False, "reason": "; ".join(problems), "required_approvers": [], "recommendations": recs}
    notice_part = (f"notice ({_days(notice)}) meets the minimum ({_days(min_notice)})" if min_notice
                   else "no advance notice is required for sick leave")
    reason = (f"Duration ({_days(duration)}) is within max consecutive days ({mx}), balance is sufficient "
              f"({_days(balance)}) and {notice_part}")
    if leave_type == "casual_leave":
        recs = ["Ensure 1 day advance notice", "Complete handover before leave"]
    elif leave_type == "sick_leave":
        recs = (["Provide medical certificate"] if duration > 2 else []) + ["Inform your team of your absence"]
    else:
        recs = ["Complete handover before leave", "Set an out-of-office reply"]
    return {"eligible": True, "reason": reason, "required_approvers": list(pol["approvers"]), "recommendations": recs}


def _hr_leave_row(rng: random.Random, with_pii: bool, name: str | None = None) -> tuple[str, dict, list[str]]:
    leave_type = _pick(rng, _LEAVE_TYPES)
    pol = HR_POLICY[leave_type]
    mx = pol["max"]
    # Durations and notice cluster around the limits so boundary cases (exactly max, exactly balance) are common.
    duration = rng.randrange(1, mx + 1) if rng.random() < 0.7 else rng.randrange(mx + 1, mx + 6)
    balance = rng.randrange(0, pol["quota"] + 1)
    if rng.random() < 0.5:
        balance = max(balance, duration)
    if rng.random() < 0.8:
        notice = rng.randrange(pol["notice"], pol["notice"] + 15)
    else:
        notice = rng.randrange(0, pol["notice"] + 1)
    name = name or f"{_pick(rng, _HR_FIRST)} {_pick(rng, _HR_LAST)}"
    lines = [f"Employee: {name}"]
    if rng.random() < 0.4:
        lines.append(f"Department: {_pick(rng, _HR_DEPTS)}")
    pii: list[str] = []
    if with_pii:
        r = rng.random()
        if r < 0.3:
            v, field = _pii_email(rng), "Contact"
        elif r < 0.55:
            v, field = (_pii_phone_es(rng) if rng.random() < 0.5 else _pii_phone_us(rng)), "Phone"
        elif r < 0.75:
            v, field = _pii_iban(rng), "Payroll IBAN"
        elif r < 0.9:
            v, field = _pii_ssn(rng), "SSN"
        else:
            v, field = _pii_dni(rng), "DNI"
        lines.append(f"{field}: {v}")
        pii.append(v)
    lines += [f"Type: {leave_type}", f"Duration: {_days(duration)}", f"Balance: {_days(balance)}",
              f"Notice: {_days(notice)}", f"Policy max: {_days(mx)}", f"Min notice: {_days(pol['notice'])}"]
    if rng.random() < 0.5:
        lines.append(f"Reason: {_pick(rng, _HR_REASONS[leave_type])}")
    return "\n".join(lines), hr_decision(leave_type, duration, balance, notice), pii


def _hr_leave_wrong(rng: random.Random, label: dict) -> dict:
    if label["eligible"]:
        if "hr" in label["required_approvers"] and rng.random() < 0.4:
            # Plausible slip: forgot the second approver for annual leave.
            return dict(label, required_approvers=["manager"])
        return {"eligible": False, "reason": "Request exceeds the policy limits for this leave type",
                "required_approvers": [], "recommendations": ["Reduce duration"]}
    return {"eligible": True, "reason": "Request complies with policy. Duration within limits.",
            "required_approvers": ["manager"], "recommendations": ["Ensure advance notice", "Complete handover"]}


# --- dispatch ----------------------------------------------------------------------------------------
# name -> (row builder, wrong-label maker, unknown label values for the primary field)
_BUILDERS: dict[str, tuple[Callable, Callable, str, tuple[Any, ...]]] = {
    "product_intent": (_product_intent_row, _product_intent_wrong, "intent_type",
                       ("GIFTS", "REFUND", "gift", "PERSONAL")),
    "email_intel": (_email_intel_row, _email_intel_wrong, "intent", ("REFUND", "order", "PURCHASE_ORDER", "spam")),
    "hr_leave": (_hr_leave_row, _hr_leave_wrong, "eligible", ("yes", "maybe", "pending", "true")),
}


def supported_use_cases() -> list[str]:
    return sorted(_BUILDERS)


def _builder(name: str):
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"no synthetic traffic generator for use case '{name}' (supported: {', '.join(supported_use_cases())}); "
            "load real production_examples instead, or add a row builder to retrain.data.synthetic"
        ) from None


def _prose(rng: random.Random, label: dict) -> str:
    # What a chatty model returns when it ignores "Return only valid JSON".
    js = json.dumps(label, ensure_ascii=False)
    # None of these may be pure JSON: the dataset stage accepts a JSON string that parses cleanly.
    return _pick(rng, (f"Sure! Here is the JSON: {js}", f"```json\n{js}\n```",
                       f"Here you go:\n{js}\nLet me know if you need anything else.",
                       "I'm sorry, I can't help with that request.", js[:-1]))


def _huge_cap(n: int) -> int:
    return max(2, n // 100_000)


def _sql_injection_row(uc_name: str, rng: random.Random, build) -> tuple[str, dict, list[str]]:
    # Valid text that also exercises COPY escaping: a quote-laden SQL payload, a tab, a backslash and the
    # literal two characters of COPY's NULL marker.
    payload = f"{SQL_INJECTION} \\N C:\\temp\t"
    if uc_name == "hr_leave":
        return _hr_leave_row(rng, False, name=f"Robert{payload}")
    text, label, pii = build(rng, False)
    if uc_name == "email_intel":
        subject_end = text.index("\n")
        return text[:subject_end] + " " + payload + text[subject_end:], label, pii
    return f"{text} {payload}", label, pii


def generate_rows(uc: UseCase, n: int, *, seed: int = 0, dirty: float = 0.01,
                  start: datetime | None = None) -> Iterator[dict]:
    """Yield n rows: {"input": str|None, "model_output": <JSON-able or None>, "corrected_output": <JSON-able or None>,
    "feedback": "accepted"|"corrected"|"rejected", "created_at": datetime (tz-aware, increasing),
    "pii": [list of planted personal-data strings in input], "dirty": None or the planted defect's name}.

    Deterministic for (uc.name, n, seed, dirty, start). ``start`` defaults to now minus 30 days (pass it for
    byte-identical runs); a naive ``start`` is taken as UTC. Rows span ~30 days with strictly increasing times.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= dirty <= 1.0:
        raise ValueError(f"dirty must be a fraction between 0 and 1 (e.g. 0.01 for normal traffic, 0.3 for a "
                         f"dirty batch), got {dirty}")
    build, wrong_of, primary, unknown_values = _builder(uc.name)
    required = list(uc.output_schema.get("required", []))
    rng = random.Random(f"{uc.name}:{seed}")
    if start is None:
        start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=30)
    elif start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    # Spread over 30 days; jitter < one step keeps times strictly increasing without sorting.
    step_us = max(1, (30 * 86_400 * 1_000_000) // max(n, 1))
    sql_rate = dirty * SQL_INJECTION_SHARE
    huge_left = _huge_cap(n)
    huge_text: str | None = None
    rnd = rng.random
    uc_name = uc.name

    for i in range(n):
        created_at = start + timedelta(microseconds=i * step_us + int(rnd() * step_us * 0.9))
        r = rnd()
        kind = None
        if r < dirty:
            kind = rng.choices(DIRTY_KINDS, DIRTY_WEIGHTS)[0]
            if kind == "huge_input":
                if huge_left > 0:
                    huge_left -= 1
                else:
                    kind = "empty_input"
        if dirty <= r < dirty + sql_rate:
            text, label, pii = _sql_injection_row(uc_name, rng, build)
        else:
            # Rows whose input gets replaced carry no personal data, so their "pii" list stays truthful.
            plant = rnd() < PII_RATE and kind not in _INPUT_DEFECTS
            text, label, pii = build(rng, plant)

        if kind is None:
            f = rnd()
            if f < REJECTED_RATE:
                yield {"input": text, "model_output": wrong_of(rng, label), "corrected_output": None,
                       "feedback": "rejected", "created_at": created_at, "pii": pii, "dirty": None}
            elif f < REJECTED_RATE + CORRECTED_RATE:
                yield {"input": text, "model_output": wrong_of(rng, label), "corrected_output": label,
                       "feedback": "corrected", "created_at": created_at, "pii": pii, "dirty": None}
            else:
                yield {"input": text, "model_output": label, "corrected_output": None,
                       "feedback": "accepted", "created_at": created_at, "pii": pii, "dirty": None}
            continue

        # Broken rows keep feedback accepted/corrected: the defect sits in whatever the pipeline would use as
        # the label (corrected_output when present, else model_output), so only validation can stop it.
        row = {"input": text, "model_output": label, "corrected_output": None, "feedback": "accepted",
               "created_at": created_at, "pii": pii, "dirty": kind}
        if kind == "prose_json":
            row["model_output"] = _prose(rng, label)
        elif kind in ("unknown_label", "missing_field"):
            bad = dict(label)
            if kind == "unknown_label":
                bad[primary] = _pick(rng, unknown_values)
            else:
                bad.pop(_pick(rng, required))
            if rnd() < 0.3:
                row.update(model_output=wrong_of(rng, label), corrected_output=bad, feedback="corrected")
            else:
                row["model_output"] = bad
        else:
            if kind == "null_input":
                row["input"] = None
            elif kind == "empty_input":
                row["input"] = _pick(rng, ("", "   ", "\n"))
            else:
                if huge_text is None:
                    unit = text + "\n"
                    huge_text = (unit * (HUGE_INPUT_CHARS // len(unit) + 1))[:HUGE_INPUT_CHARS]
                row["input"] = huge_text
            if rnd() < 0.2:
                row.update(model_output=wrong_of(rng, label), corrected_output=label, feedback="corrected")
        yield row


# --- database ------------------------------------------------------------------------------------------
_COPY_SQL = ("COPY production_examples (use_case, input, model_output, corrected_output, feedback, created_at) "
             "FROM STDIN")


def _copy_field(s: str | None) -> str:
    # COPY text format: backslash escapes for the delimiter, row separators and the escape itself; \N is NULL.
    if s is None:
        return "\\N"
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _copy_json(v: Any) -> str:
    return "\\N" if v is None else _copy_field(json.dumps(v, ensure_ascii=False))


def insert_rows(conn, use_case: str, rows: Iterable[dict], batch_size: int = 10_000) -> int:
    """Insert into production_examples with COPY FROM STDIN (psycopg2 conn.cursor().copy_expert), streaming in
    batches (bounded memory, must handle 1,000,000 rows); 'pii' key is not stored. Returns rows inserted.

    All batches run in one transaction, committed at the end: a failure leaves no half-seeded month behind.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    import psycopg2

    uc = _copy_field(use_case)
    total = 0
    buf = io.StringIO()
    pending = 0

    def flush(cur) -> None:
        buf.seek(0)
        cur.copy_expert(_COPY_SQL, buf)
        buf.seek(0)
        buf.truncate()

    try:
        with conn.cursor() as cur:
            for row in rows:
                created = row["created_at"]
                if created.tzinfo is None:
                    created = created.replace(tzinfo=timezone.utc)
                buf.write(f"{uc}\t{_copy_field(row['input'])}\t{_copy_json(row['model_output'])}\t"
                          f"{_copy_json(row.get('corrected_output'))}\t{row['feedback']}\t{created.isoformat()}\n")
                pending += 1
                if pending >= batch_size:
                    flush(cur)
                    total += pending
                    pending = 0
            if pending:
                flush(cur)
                total += pending
        conn.commit()
    except psycopg2.errors.UndefinedTable:
        conn.rollback()
        raise RuntimeError(
            "table production_examples does not exist in this database; apply include/sql/schema.sql "
            "(retrain.db.ensure_schema) first, then seed again"
        ) from None
    except Exception:
        conn.rollback()
        raise
    return total


def seed_examples(conn, uc: UseCase, rows: int, *, seed: int = 0, dirty: float = 0.01, start=None) -> dict:
    """generate_rows + insert_rows; returns {"use_case", "inserted", "dirty_fraction"} (the measured share of
    broken rows actually planted, which differs slightly from ``dirty``)."""
    broken = 0

    def counted() -> Iterator[dict]:
        nonlocal broken
        for row in generate_rows(uc, rows, seed=seed, dirty=dirty, start=start):
            if row["dirty"] is not None:
                broken += 1
            yield row

    inserted = insert_rows(conn, uc.name, counted())
    return {"use_case": uc.name, "inserted": inserted,
            "dirty_fraction": round(broken / inserted, 4) if inserted else 0.0}
