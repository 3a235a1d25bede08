"""Synthetic product_intent traffic: shopping queries in Spanish and English whose intent, budget tier, category,
recipient, tags and features follow from disjoint cue words."""

from __future__ import annotations

import random
from typing import Any

from retrain.data.synthetic.pii import pick, pii_card, pii_email, pii_phone_es, pii_phone_us

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
        v = pii_email(rng)
        s = pick(rng, ("Mi correo es {}", "Envíame la info a {}", "contacto: {}")) if lang == "es" else \
            pick(rng, ("My email is {}", "reach me at {}", "send details to {}"))
    elif kind < 0.75:
        v = pii_phone_es(rng) if lang == "es" or rng.random() < 0.3 else pii_phone_us(rng)
        s = pick(rng, ("Llámame al {}", "mi móvil: {}", "whatsapp {}")) if lang == "es" else \
            pick(rng, ("call me at {}", "text me at {}", "my number is {}"))
    else:
        v = pii_card(rng)
        s = pick(rng, ("pago con la tarjeta {}", "tarjeta {}")) if lang == "es" else \
            pick(rng, ("I'll pay with card {}", "card number {}"))
    return s.format(v), [v]


def product_intent_row(rng: random.Random, with_pii: bool) -> tuple[str, dict, list[str]]:
    lang = "es" if rng.random() < 0.55 else "en"
    es = lang == "es"
    intent = pick(rng, _INTENTS)
    tier = pick(rng, _BUDGET_TIERS)
    prod = pick(rng, _PRODUCTS)
    slots: dict[str, Any] = {}
    tags = [_INTENT_TAG[intent]]
    feats = list(_INTENT_FEATURES[intent])
    extras: list[str] = []
    category, recipient = "unspecified", "self"

    if intent == "GIFT":
        template, needs_product = pick(rng, _GIFT_T[lang])
        rec = pick(rng, _RECIPIENTS)
        recipient = rec[0]
        slots["r"] = pick(rng, rec[1] if es else rec[2])
        if rng.random() < 0.7:
            occ = pick(rng, _OCCASIONS)
            slots["o"] = occ[1] if es else occ[2]
            tags.append(occ[0])
        else:
            slots["o"] = ""
        if needs_product:
            if rng.random() < 0.2:
                slots["p"] = pick(rng, _NO_PRODUCT_ES if es else _NO_PRODUCT_EN)
            else:
                slots["p"] = prod[1] if es else prod[3]
                category = prod[0]
        if rng.random() < 0.45:
            mod = pick(rng, _MODIFIERS)
            extras.append(mod[0] if es else mod[1])
            if mod[2]:
                tags.append(mod[2])
            feats.append(mod[3])
        if recipient == "child":
            feats.append("age_appropriate")
    elif intent == "PERSONAL_USE":
        template, _ = pick(rng, _PERSONAL_T[lang])
        slots["p"], slots["pp"] = (prod[1], prod[2]) if es else (prod[3], prod[4])
        category = prod[0]
        if rng.random() < 0.4 and "{a}" in template:
            act = pick(rng, _ACTIVITIES)
            slots["a"] = act[1] if es else act[2]
            tags.append(act[0])
        else:
            slots["a"] = ""
    elif intent == "BUSINESS":
        template, _ = pick(rng, _BUSINESS_T[lang])
        slots["pp"] = prod[2] if es else prod[4]
        slots["q"] = pick(rng, _QUANTITIES)
        category = prod[0]
        rec = pick(rng, _BUSINESS_RECIPIENTS)
        recipient = rec[0]
        slots["r"] = pick(rng, rec[1] if es else rec[2])
        if rng.random() < 0.3:
            extras.append("con factura" if es else "invoice required")
            feats.append("invoice")
    elif intent == "COMPARISON":
        template, _ = pick(rng, _COMPARISON_T[lang])
        pair = pick(rng, _PAIRS)
        category = pair[0]
        if rng.random() < 0.5:
            slots["A"], slots["B"] = pair[1], pair[2]
        else:
            slots["A"], slots["B"] = pair[2], pair[1]
        feats.append("value_for_money")
    else:  # URGENT
        template, needs_product = pick(rng, _URGENT_T[lang])
        when = pick(rng, _WHEN)
        slots["w"] = when[1] if es else when[2]
        tags.append(when[0])
        if needs_product:
            slots["p"] = prod[1] if es else prod[3]
            category = prod[0]
        else:
            rec = pick(rng, _RECIPIENTS)
            recipient = rec[0]
            slots["r"] = pick(rng, rec[1] if es else rec[2])
            tags.append("gift")

    # Asked-for features (0-2), listed in the label in a fixed order so the label is a function of the text.
    r = rng.random()
    if r < 0.45 and intent != "URGENT":
        k = 1 if r < 0.3 else 2
        chosen = rng.sample(_FEATURES, k)
        extras.extend(f[0] if es else f[1] for f in chosen)
        feats.extend(sorted((f[2] for f in chosen), key=_FEATURE_ORDER.__getitem__))
    if tier != "unspecified":
        extras.append(pick(rng, _BUDGETS[tier][0 if es else 1]))
        feats.append(_BUDGET_FEATURE[tier])

    text = template.format(**slots) if slots else template
    if extras:
        text += ", " + ", ".join(extras)
    if rng.random() < 0.3:
        text = text[0].lower() + text[1:]
    pii: list[str] = []
    if with_pii:
        sentence, pii = _pi_pii(rng, lang)
        text += pick(rng, (". ", " - ", ". ")) + sentence
    seen: set[str] = set()
    feats = [f for f in feats if not (f in seen or seen.add(f))]
    label = {"intent_type": intent, "budget_tier": tier, "category": category, "recipient": recipient,
             "context_tags": tags, "priority_features": feats}
    return text, label, pii


_PI_CONFUSIONS = {"GIFT": ("PERSONAL_USE", "URGENT"), "PERSONAL_USE": ("GIFT", "COMPARISON", "BUSINESS"),
                  "BUSINESS": ("PERSONAL_USE",), "COMPARISON": ("PERSONAL_USE",), "URGENT": ("GIFT", "PERSONAL_USE")}
_TIER_CONFUSIONS = {"unspecified": ("mid_range",), "mid_range": ("economic", "premium", "unspecified"),
                    "economic": ("mid_range",), "premium": ("mid_range",)}


def product_intent_wrong(rng: random.Random, label: dict) -> dict:
    wrong = dict(label, context_tags=list(label["context_tags"]), priority_features=list(label["priority_features"]))
    r = rng.random()
    if r < 0.65:
        wrong["intent_type"] = pick(rng, _PI_CONFUSIONS[label["intent_type"]])
        wrong["context_tags"][0] = _INTENT_TAG[wrong["intent_type"]]
    if r >= 0.45:
        wrong["budget_tier"] = pick(rng, _TIER_CONFUSIONS[label["budget_tier"]])
    return wrong
