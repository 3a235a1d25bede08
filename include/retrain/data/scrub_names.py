"""Optional detectors for person names and postal addresses (a use case's ``pii: {names, addresses}``).

Offline heuristics, no model: names after a greeting (Hi/Hola/Dear/Estimado/Bonjour/Hallo...) or on the line
after a sign-off (Best regards/Saludos/Cordialement/Mit freundlichen Grüßen...), after "my name is"/"me llamo",
and any known first name followed by a capitalised word; addresses as a street keyword (calle, c/, avenida,
plaza, street, road, st., ave, rue, -straße/-weg...) with a house number, and a postcode followed by a city
(ES/FR/DE 5 digits, UK postcodes, US state + ZIP). Recall is measured by bench/pii_scrub.py, not promised.
"""

from __future__ import annotations

import re

_CAP = r"[A-ZÁÉÍÓÚÑÄÖÜÇÀÈÂÊÎÔÛ][\w'’-]+"
_TITLE = r"(?:(?:Mr|Mrs|Ms|Dr|Sr|Sra|Srta|Herr|Frau|M|Mme|Don|Doña)\.?\s+)?"
_NAME = rf"{_CAP}(?:[ \t]+(?:(?:de|del|de la|van|von|da|di|le)[ \t]+)?{_CAP}){{0,3}}"
_NOT_NAMES = {
    "team", "all", "sir", "madam", "customer", "customers", "support", "sales", "equipo", "todos", "there", "everyone",
    "colleagues", "hello", "hi", "thanks", "team,", "friends", "amigos", "señores", "señor", "señora", "madame",
    "monsieur", "acme", "corp", "purchasing", "sales", "team.", "urgent", "please", "good", "morning", "compras",
}
_GREETING = re.compile(
    rf"(?:^|(?<=[\n.!?¡¿]))[ \t]*(?:Hi|Hello|Hey|Dear|Hola|Buenos días|Buenas tardes|Estimad[oa]s?|Querid[oa]|"
    rf"Bonjour|Cher|Chère|Hallo|Liebe[r]?|Sehr geehrte[r]?|Good morning|Morning)[ \t]+{_TITLE}({_NAME})",
    re.MULTILINE,
)
_SIGN_OFF = re.compile(
    rf"(?i:best regards|kind regards|regards|best|thanks|thank you|cheers|sincerely|saludos|un saludo|"
    rf"atentamente|gracias|cordialement|bien à vous|mit freundlichen grüßen|viele grüße|grüße|besos|abrazos|--)"
    rf"(?:[ \t]*[,.!]?[ \t]*\n[ \t]*|[ \t]*[,—–-][ \t]*){_TITLE}({_NAME})"
)
_INTRO = re.compile(rf"(?i:my name is|me llamo|mi nombre es|je m'appelle|ich heiße|ich bin|soy|i am|i'm|"
                    rf"spoke with|hablé con|talked to|contact person:?|attn:?|a la atención de)[ \t]+{_TITLE}({_NAME})")
_RELATION = re.compile(r"(?i:sister|brother|mother|father|mum|mom|dad|wife|husband|friend|colleague|boss|"
                       r"hermana|hermano|madre|padre|mujer|marido|amig[oa]|hij[oa]|compañer[oa]|jef[ae]|son|daughter|"
                       r"gracias|thanks|thank you|merci|danke|cc:?|from:?|de:|para:?|to:)[ \t]+"
                       rf"({_CAP}|[a-záéíóúñ]+)")
_TITLED = re.compile(rf"\b(?:Mr|Mrs|Ms|Dr|Sr|Sra|Srta|Herr|Frau|Mme)\.?[ \t]+({_NAME})")

_GREETING_LOWER = re.compile(r"(?i:\b(?:hi|hello|hey|dear|hola|buenas|bonjour|hallo))[ \t]+([a-záéíóúñ]+)\b")
_FIRST_NAMES = set("""
tom dave nicole sam alex pepe kenji paco lola quique chema nacho rocio susana yolanda ramiro gustavo
ana maria maría lucia lucía carmen javier pablo diego sofia sofía john emily michael sarah david laura carlos elena
james olivia raul raúl marta kevin priya jose josé juan antonio manuel francisco luis miguel pedro jorge alberto
fernando sergio rafael daniel alejandro adrian adrián alvaro álvaro ivan iván ruben rubén oscar óscar andres andrés
enrique ramon ramón vicente isabel pilar dolores teresa rosa cristina patricia paula sara nuria beatriz silvia
raquel eva irene alba andrea claudia marina julia natalia rocio rocío lorena inés ines mercedes montserrat jean
pierre marie sophie camille nicolas thomas julien françois francois isabelle nathalie klaus hans peter jürgen
jurgen stefan andreas thomas wolfgang sabine petra monika ursula robert william richard joseph charles christopher
matthew anthony mark steven paul andrew joshua jennifer linda elizabeth barbara susan jessica karen nancy lisa
betty helen sandra donna carol ruth sharon michelle emma ava isabella mia charlotte amelia harper evelyn liam noah
oliver elijah lucas mason logan ethan jacob jack henry alexander benjamin sebastian samuel mateo hugo martin
martín leo alex marco marco giulia giuseppe giovanni francesca chiara alessandro luca ahmed mohamed fatima ali
wei li chen raj anil sunita pooja björn bjorn lars erik ingrid zoë zoe iñigo inigo nerea aitor ainhoa gorka pau jordi
montse núria ignacio gonzalo santiago tomás tomas mario victor víctor hector héctor guillermo jaime marcos
""".split())
_KNOWN_FIRST = re.compile(rf"\b({_CAP})((?:[ \t]+(?:(?:and|y|et|und)[ \t]+)?{_CAP}){{1,3}})")

_STREET_ES = (r"(?:[Cc]alle|C/|c/|[Cc]arrer|[Pp]asseig|[Vv]ia|[Rr]ua|[Pp]ol\.[ \t]*[Ii]nd\.|[Pp]ol[ií]gono(?: [Ii]ndustrial)?|[Aa]venida|[Aa]vda\.?|[Aa]v\.|[Pp]laza|[Pp]za\.|[Pp]aseo|[Pp]º|[Cc]amino|"
              r"[Cc]arretera|[Cc]tra\.|[Rr]onda|[Tt]ravesía|[Gg]lorieta)")
_ADDRESS = re.compile(
    # Calle Mayor 12, 3º B, 28013 Madrid / C/ Alcalá, 45
    rf"{_STREET_ES}[ \t]+(?:(?:de|del|de la|de los|de las)[ \t]+)?[\w.'ºª-]+(?:[ \t]+[\w.'ºª-]+){{0,3}}?,?[ \t]*"
    rf"(?:(?:n[º°o]\.?|nave|local|portal|km\.?)[ \t]*)?(?:\d{{1,4}}[A-Za-z]?|s/n)"
    rf"(?:[,-]?[ \t]*\d{{1,2}}[ºª°]?[ \t]*[A-Za-z]?(?!\w))?"
    rf"(?:,?[ \t]*(?:(?:\d{{5}}|\d{{4}}-\d{{3}})[ \t]+)?{_CAP}(?:[ \t]+{_CAP})?)?"
    # 221B Baker Street, London NW1 6XE / 1600 Pennsylvania Ave NW, Washington, DC 20500
    rf"|\b\d{{1,5}}[A-Za-z]?[ \t]+(?:{_CAP}[ \t]+){{1,3}}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|"
    rf"Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Square|Sq|Terrace|Close|Loop|Parkway|Pkwy|Highway|Hwy|"
    rf"Circle|Cir|Row|Walk|Crescent|Grove|Hill|Gardens|Mews)(?:\.|(?!\w))"
    rf"(?:[ \t]+(?:NW|NE|SW|SE|N|S|E|W)\b)?(?:,?[ \t]+{_CAP}(?!\w)(?:[ \t]+(?![A-Z]{{1,2}}\d){_CAP})?)?"
    rf"(?:,?[ \t]+(?:[A-Z]{{2}}[ \t]+\d{{5}}(?:-\d{{4}})?|[A-Z]{{1,2}}\d[A-Z\d]?[ \t]?\d[A-Z]{{2}}))?"
    # 12 rue de Rivoli, 75001 Paris
    rf"|\b\d{{1,4}}(?:[ \t]?(?:bis|ter))?,?[ \t]+(?:rue|avenue|boulevard|bd|place|allée|chemin|impasse|quai|cours)"
    rf"[ \t]+(?:(?:de|du|des|de la|d')[ \t]*)?[\w'-]+(?:[ \t]+{_CAP}){{0,3}}(?:,?[ \t]+\d{{5}}[ \t]+{_CAP})?"
    # Hauptstraße 5, 10115 Berlin
    rf"|\b[A-ZÄÖÜ][\wäöüß-]*(?:straße|strasse|str\.|weg|platz|allee|gasse|ring|damm)[ \t]+\d{{1,4}}[a-z]?"
    rf"(?:,?[ \t]+\d{{5}}[ \t]+{_CAP})?"
    # PO Box 1234, Austin TX 78701
    rf"|\b(?:PO|P\.O\.)[ \t]+Box[ \t]+\d+(?:,?[ \t]+{_CAP}(?:[ \t]+{_CAP})?)?(?:,?[ \t]+[A-Z]{{2}}[ \t]+\d{{5}})?"
    # a postcode + city on its own: 28013 Madrid, London SW1A 2AA, Austin, TX 78701
    rf"|\b(?:0[1-9]|[1-4]\d|5[0-2])\d{{3}}[ \t]+(?:Madrid|Barcelona|Sevilla|Valencia|Bilbao|Málaga|Zaragoza|"
    rf"Paris|Lyon|Marseille|Toulouse|Berlin|München|Hamburg|Köln|Frankfurt)\b"
    rf"|\b[A-Z]{{1,2}}\d[A-Z\d]?[ \t]\d[ABD-HJLNP-UW-Z]{{2}}\b"
)


def name_spans(text: str, key: str | None = None) -> list[tuple[int, int, str]]:
    spans: list[tuple[int, int, str]] = []
    for pattern in (_GREETING, _SIGN_OFF, _INTRO, _TITLED):
        for m in pattern.finditer(text):
            start, end = m.span(1)
            words = m.group(1).split()
            # Drop trailing words that are not names ("John Please ...") and refuse "Hi Team".
            while words and words[-1].lower().strip(",.") in _NOT_NAMES:
                words.pop()
            if not words or words[0].lower().strip(",.") in _NOT_NAMES:
                continue
            if pattern is _INTRO and words[0].lower() not in _FIRST_NAMES and len(words) < 2:
                continue  # "I am Happy": only a known first name, or first + last
            spans.append((start, start + len(" ".join(words)) if " " not in m.group(1)[:len(" ".join(words))]
                          else start + len(" ".join(words)), "NAME"))
    for m in _KNOWN_FIRST.finditer(text):
        if m.group(1).lower() in _FIRST_NAMES:
            words = m.group(2).split()
            while words and words[-1].lower().strip(",.") in _NOT_NAMES | {"and", "y", "et", "und"}:
                words.pop()
            if words:
                end = text.index(words[-1], m.start(2)) + len(words[-1])
                spans.append((m.start(), end, "NAME"))
    for m in _RELATION.finditer(text):
        if m.group(1).lower() in _FIRST_NAMES:  # "my sister Carmen", "gracias Lucía", "hola pedro"
            spans.append((m.start(1), m.end(1), "NAME"))
    for m in _GREETING_LOWER.finditer(text):
        if m.group(1).lower() in _FIRST_NAMES:
            spans.append((m.start(1), m.end(1), "NAME"))
    return _merge(spans)


def address_spans(text: str, key: str | None = None) -> list[tuple[int, int, str]]:
    return _merge([(m.start(), m.end(), "ADDRESS") for m in _ADDRESS.finditer(text)])


def _merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(end, out[-1][1]), kind)
        else:
            out.append((start, end, kind))
    return out
