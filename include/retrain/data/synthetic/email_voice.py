"""Synthetic sent e-mails of a few writers with distinct, measurable voices (use case email_voice, seed 003).

Seed 003 fine-tunes one adapter per user on their sent e-mails: input = the subject ("Write a professional email
about: <subject>"), output = the body the user actually sent. For "sounds like the user" to be measurable on
synthetic data, each writer has habits a metric (or a character n-gram classifier) can pick up, and nothing else
tells the writers apart:

* **greeting and sign-off**: each writer's set is disjoint from the others' (``Dear`` / ``Hey`` / ``Hola`` ...);
* **sentence length and formality**: alice writes long formal sentences without contractions, bob short casual
  ones with contractions and exclamation marks, carmen mid-length sentences mixing Spanish and English;
* **recurring phrases**: each writer has pet phrases that show up in most of their e-mails;
* **subjects come from one shared pool** (every writer samples the same distribution), so the input alone does
  not reveal the writer: only the voice does.

Bodies are 40-120 words so CPU training stays cheap. A few bodies carry personal data (an e-mail address or a
phone number; ``pii`` lists what was planted) so collection's scrubber is exercised. Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from retrain.data.synthetic.pii import pick, pii_email, pii_phone_es, pii_phone_us

MIN_WORDS, MAX_WORDS = 40, 120
PII_RATE = 0.05
# The demo mix: three writers with enough e-mails for an adapter, one below tenants.min_examples (listed, skipped).
DEFAULT_MIX = {"alice": 120, "bob": 120, "carmen": 120, "dan": 20}
SMALL_TENANT = "dan"
DIRTY_KINDS = ("no_tenant", "empty_body", "huge_body")

# --- the shared subject pool ------------------------------------------------------------------------------
_ACTIONS = ("Follow-up on", "Question about", "Rescheduling", "Update on", "Feedback on", "Reminder about",
            "Next steps for", "Draft of", "Approval needed for", "Notes from")
_TOPICS = ("the Q3 budget review", "the weekly project sync", "the new vendor contract", "the client demo",
           "the onboarding plan", "the quarterly report", "the office move", "the product launch",
           "the hiring plan", "the travel reimbursement", "the website redesign", "the training session")
_QUALIFIERS = ("", " with the design team", " for the Madrid office", " with finance", " for next week",
               " with our partners", " for the board", " before Friday")
SUBJECTS = tuple(f"{a} {t}{q}" for a in _ACTIONS for t in _TOPICS for q in _QUALIFIERS)  # 960 subjects

_RECIPIENTS = ("Laura", "Mark", "Priya", "Tom", "Sofía", "James", "Elena", "David", "Nadia", "Peter")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
_DAYS_ES = ("lunes", "martes", "miércoles", "jueves", "viernes")


@dataclass(frozen=True)
class VoiceProfile:
    """One writer's habits. ``{r}`` is the recipient, ``{t}`` the subject's topic, ``{d}``/``{de}`` a weekday
    (English/Spanish)."""

    name: str
    greetings: tuple[str, ...]
    signoffs: tuple[str, ...]
    phrases: tuple[str, ...]           # recurring phrases: at least one per e-mail
    openers: tuple[str, ...]           # the first sentence, about the topic
    sentences: tuple[str, ...]         # the rest of the body
    words: tuple[int, int]             # target body length in words (within MIN_WORDS..MAX_WORDS)
    formality: str                     # formal | casual | mixed
    language: str                      # en | es+en

    @property
    def greeting_words(self) -> frozenset[str]:
        """The greetings without the recipient: what a greeting-match metric compares."""
        return frozenset(g.split("{r}")[0].strip() for g in self.greetings)


_VOICES = (
    VoiceProfile(
        name="alice",
        greetings=("Dear {r},", "Good morning {r},"),
        signoffs=("Kind regards,\nAlice", "With best regards,\nAlice Morgan"),
        phrases=("I would be grateful if you could confirm at your earliest convenience.",
                 "Please do not hesitate to contact me should you have any questions."),
        openers=("I am writing with regard to {t}, as I would like to ensure that everyone has the information "
                 "they require before we proceed.",
                 "I hope this message finds you well; I would like to share a brief update regarding {t}.",
                 "Further to our conversation last week, I have prepared a summary of the outstanding points "
                 "concerning {t}."),
        sentences=("I have attached the relevant documents, which set out the proposed timeline and the "
                   "responsibilities of each team in considerable detail.",
                   "It would be most helpful to receive your comments by {d}, so that we may finalise the "
                   "arrangements accordingly.",
                   "Should it be necessary, I would be pleased to arrange a short meeting to discuss the matter "
                   "further.",
                   "I remain confident that, with careful planning, we shall be able to meet the agreed deadline.",
                   "Thank you in advance for your time and for your continued support with this matter."),
        words=(70, 110), formality="formal", language="en"),
    VoiceProfile(
        name="bob",
        greetings=("Hey {r}!", "Hi {r},"),
        signoffs=("Cheers,\nBob", "Thanks!\n- B"),
        phrases=("Quick heads-up!", "No worries if not, just ping me."),
        openers=("Quick one about {t}.", "So, {t} - here's where we're at.", "Got a sec for {t}?"),
        sentences=("It's mostly done.", "Can you take a look by {d}?", "I'll send the deck later.",
                   "Shouldn't take long!", "Let's sync after lunch.", "Tom's on it too.",
                   "I think we're good.", "Don't stress about the numbers yet.", "Happy to jump on a call."),
        words=(40, 60), formality="casual", language="en"),
    VoiceProfile(
        name="carmen",
        greetings=("Hola {r},", "Buenos días {r},"),
        signoffs=("Un abrazo,\nCarmen", "Saludos,\nCarmen"),
        phrases=("Por cierto, gracias de antemano por la ayuda.", "Lo vemos en la reunión, vale?"),
        openers=("Te escribo sobre {t}, because we need to close it this week.",
                 "Quería comentarte algo sobre {t}, it is going well so far.",
                 "Un update rápido sobre {t}: we are almost there."),
        sentences=("I think the plan is good, pero necesito tu feedback antes del {de}.",
                   "El equipo de Madrid already reviewed the first version.",
                   "Si tienes dudas, call me and we talk it through.",
                   "The numbers look better than last month, la verdad.",
                   "Te mando el documento final mañana por la mañana.",
                   "We can present it together, si te parece bien."),
        words=(55, 85), formality="mixed", language="es+en"),
    VoiceProfile(
        name="dan",
        greetings=("Hello {r},",),
        signoffs=("Regards,\nDan",),
        phrases=("Let me know what you think.",),
        openers=("This is about {t}.", "I wanted to follow up regarding {t}."),
        sentences=("The latest version is in the shared folder.", "We should decide by {d}.",
                   "I have added my comments to the document.", "The timeline has not changed."),
        words=(45, 70), formality="neutral", language="en"),
)


def voices() -> dict[str, VoiceProfile]:
    """The synthetic writers by tenant name (alice, bob, carmen: enough data; dan: below the minimum)."""
    return {v.name: v for v in _VOICES}


def topic_of(subject: str) -> str:
    """The topic phrase of a pool subject ("Update on the client demo for next week" -> "the client demo")."""
    for topic in _TOPICS:
        if topic in subject:
            return topic
    return subject


def _fill(template: str, rng: random.Random, topic: str, recipient: str) -> str:
    return template.format(t=topic, r=recipient, d=pick(rng, _DAYS), de=pick(rng, _DAYS_ES))


def _words(text: str) -> int:
    return len(text.split())


def email_body(voice: VoiceProfile, subject: str, rng: random.Random, with_pii: bool = False
               ) -> tuple[str, list[str]]:
    """(body, planted personal data) of one e-mail by ``voice`` about ``subject``; 40-120 words."""
    topic = topic_of(subject)
    recipient = pick(rng, _RECIPIENTS)
    greeting = _fill(pick(rng, voice.greetings), rng, topic, recipient)
    signoff = pick(rng, voice.signoffs)
    lo, hi = voice.words
    target = rng.randint(lo, hi)
    opener = _fill(pick(rng, voice.openers), rng, topic, recipient)
    phrase = pick(rng, voice.phrases)
    planted: list[str] = []
    contact = ""
    if with_pii:
        value = pii_email(rng) if rng.random() < 0.5 else (pii_phone_es(rng) if voice.name == "carmen"
                                                             else pii_phone_us(rng))
        planted.append(value)
        contact = {"alice": f"Alternatively, I can be reached at {value}.", "bob": f"Reach me at {value}!",
                   "carmen": f"Mi contacto: {value}."}.get(voice.name, f"Contact: {value}.")
    phrase_last = rng.random() < 0.6  # where each writer habitually puts the pet phrase: last, or second
    pool = list(voice.sentences)
    rng.shuffle(pool)
    fixed = sum(map(_words, (greeting, signoff, opener, phrase, contact)))
    middle: list[str] = []
    for sentence in pool:
        # Fill towards the target, then to the floor; never past MAX_WORDS.
        filled = fixed + sum(map(_words, middle))
        if filled >= target and filled >= MIN_WORDS:
            break
        sentence = _fill(sentence, rng, topic, recipient)
        if filled + _words(sentence) > MAX_WORDS:
            continue
        middle.append(sentence)
    parts = [opener, *middle, phrase] if phrase_last else [opener, phrase, *middle]
    if contact:
        parts.append(contact)
    body = f"{greeting}\n\n{' '.join(parts)}\n\n{signoff}"
    return body, planted


def rows(n_per_tenant: dict[str, int] | int, seed: int = 0, *, start: datetime | None = None,
         dirty: float = 0.0) -> list[dict]:
    """Production rows for email_voice: {"input": subject, "model_output": None, "corrected_output": body,
    "feedback": "corrected", "tenant", "created_at", "pii": [planted values], "dirty": None or the defect}.

    ``n_per_tenant``: e-mails per writer (a dict, names from :func:`voices`) or the same count for alice, bob and
    carmen. Each writer's subjects are drawn without replacement from the shared pool. ``dirty``: share of extra
    broken rows (no tenant, empty body, huge body) added on top, for validation to catch. Deterministic for
    (n_per_tenant, seed, start, dirty); ``start`` defaults to now minus 30 days.
    """
    profiles = voices()
    counts = n_per_tenant if isinstance(n_per_tenant, dict) else {n: n_per_tenant for n in ("alice", "bob", "carmen")}
    unknown = sorted(set(counts) - set(profiles))
    if unknown:
        raise ValueError(f"no synthetic voice for tenant(s) {', '.join(unknown)}; known: {', '.join(profiles)}")
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"e-mail counts must be >= 0, got {counts}")
    if not 0.0 <= dirty <= 1.0:
        raise ValueError(f"dirty must be a fraction between 0 and 1, got {dirty}")
    if start is None:
        start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=30)
    elif start.tzinfo is None:
        start = start.replace(tzinfo=timezone.utc)
    out: list[dict] = []
    for tenant in sorted(counts):
        rng = random.Random(f"email_voice:{seed}:{tenant}")
        n = counts[tenant]
        subjects = rng.sample(SUBJECTS, min(n, len(SUBJECTS)))
        subjects += [f"{pick(rng, SUBJECTS)} (part {i + 2})" for i in range(n - len(subjects))]
        for subject in subjects:
            body, planted = email_body(profiles[tenant], subject, rng, rng.random() < PII_RATE)
            out.append({"input": subject, "model_output": None, "corrected_output": body, "feedback": "corrected",
                        "tenant": tenant, "pii": planted, "dirty": None})
    mix = random.Random(f"email_voice:{seed}:mix")
    mix.shuffle(out)  # interleave the writers, as a month of traffic would
    n_dirty = round(len(out) * dirty)
    for i in range(n_dirty):
        kind = DIRTY_KINDS[i % len(DIRTY_KINDS)]
        base = dict(out[mix.randrange(len(out))]) if out else {"input": pick(mix, SUBJECTS), "tenant": "alice",
                                                              "corrected_output": "x", "model_output": None,
                                                              "feedback": "corrected"}
        base.update(pii=[], dirty=kind)
        if kind == "no_tenant":
            base["tenant"] = None
        elif kind == "empty_body":
            base["corrected_output"] = pick(mix, ("", "   ", "\n"))
        else:
            base["corrected_output"] = ("lorem ipsum dolor " * 400).strip()
        out.insert(mix.randrange(len(out) + 1), base)
    step = timedelta(seconds=30 * 86_400 // max(len(out), 1))
    for i, row in enumerate(out):
        row["created_at"] = start + i * step
    return out


def rows_for_total(n: int, seed: int = 0, *, dirty: float = 0.0, start: datetime | None = None) -> list[dict]:
    """About ``n`` rows in the demo's proportions: dan stays below the minimum (20, fewer for a tiny n), the rest
    is split evenly between alice, bob and carmen (what ``retrain seed --rows N`` and the demo insert)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    total = sum(DEFAULT_MIX.values())
    small = DEFAULT_MIX[SMALL_TENANT] if n >= total else round(n * DEFAULT_MIX[SMALL_TENANT] / total)
    main = [t for t in DEFAULT_MIX if t != SMALL_TENANT]
    each, extra = divmod(n - small, len(main))
    counts: dict[str, Any] = {t: each + (1 if i < extra else 0) for i, t in enumerate(main)}
    counts[SMALL_TENANT] = small
    return rows(counts, seed, start=start, dirty=dirty)
