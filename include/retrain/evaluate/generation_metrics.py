"""Scoring free-text answers (kind ``generation``) against the user's real replies, and comparing two models.

A reply is scored on what the text says (chrF, ROUGE-L against the reply the user actually sent), on how it is
written (greeting and sign-off habits, formality markers, sentence length, length ratio) and on whose voice it is in
(``attribution``: a classifier trained on the tenants' own e-mails names the writer). Per-token perplexity of the
held-out replies says how well the model predicts the user's words, from (sum of token NLLs, token count) pairs.

Baseline and candidate answer the same test prompts in the same order, so every per-example metric is paired and
the gain of each gets a paired bootstrap confidence interval (``retrain.evaluate.metrics.paired_bootstrap``).
Heavy libraries (sacrebleu, rouge-score, numpy) are imported inside functions: task code imports this module.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from typing import Any, Protocol

from retrain.evaluate.metrics import paired_bootstrap

# Per-example metrics that get a paired bootstrap CI in ``compare`` (all higher is better except formality_diff).
PAIRED_METRICS = ("chrf", "rouge_l", "greeting_match", "signoff_match", "attribution", "formality_diff")
LOWER_IS_BETTER = ("formality_diff", "perplexity")
# A greeting is the opening words before a comma ("Hi Tom," / "Dear Ms. Smith,"), so the comma must come early.
_GREETING_MAX_WORDS = 6
# A short first line without a comma still reads as a greeting ("Hello!", "Hi team").
_SHORT_LINE_WORDS = 4
_SIGNOFF_MAX_WORDS = 5
_NAME_MAX_WORDS = 3

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)
_CONTRACTION = re.compile(r"\b\w+['’](?:s|t|re|ve|ll|d|m)\b", re.IGNORECASE | re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?]+")
_EDGE_PUNCT = " \t\r\n,.;:!?-–—*_\"'“”‘’()[]"
INFORMAL_WORDS = frozenset({
    "hey", "hiya", "yo", "cheers", "thx", "gonna", "wanna", "gotta", "yeah", "yep", "nope", "cool",
    "awesome", "btw", "lol", "np", "ok", "okay", "super", "stuff", "guys", "folks", "ciao", "cya", "xo", "lg",
    "tschüss", "hallo", "salut",
})
FORMAL_WORDS = frozenset({
    "dear", "sincerely", "regards", "kindly", "respectfully", "furthermore", "moreover", "accordingly",
    "therefore", "hereby", "pursuant", "appreciate", "cordially", "please", "grateful", "attached", "enclosed",
    "mit", "freundlichen", "grüßen", "cordialement",
})


class Attributor(Protocol):
    """What ``score_texts`` needs from a voice classifier (retrain.evaluate.attribution.VoiceClassifier)."""

    def predict(self, texts: list[str]) -> list[str]: ...


# --- text similarity -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _chrf_metric():
    from sacrebleu.metrics import CHRF

    return CHRF()


class _UnicodeTokenizer:
    # rouge-score's default tokenizer keeps only [a-z0-9], which erases every word with an accent or a non-Latin
    # script; the writers mix languages, so tokenise on Unicode word characters instead.
    def tokenize(self, text: str) -> list[str]:
        return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


def chrf(reference: str, hypothesis: str) -> float:
    """Sentence chrF (sacrebleu, 0-100). Identical texts score 100 even when too short (or empty) for chrF's
    character n-grams, where sacrebleu would say 0."""
    reference, hypothesis = reference or "", hypothesis or ""
    if reference == hypothesis:
        return 100.0
    score = float(_chrf_metric().sentence_score(hypothesis, [reference]).score)
    return min(100.0, max(0.0, score))


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 (0-1) on Unicode word tokens; symmetric in its arguments."""
    reference, hypothesis = reference or "", hypothesis or ""
    tokenizer = _UnicodeTokenizer()
    if tokenizer.tokenize(reference) == tokenizer.tokenize(hypothesis):
        return 1.0  # also two texts without any word: nothing differs
    return float(_rouge_scorer().score(reference, hypothesis)["rougeL"].fmeasure)


# --- style features --------------------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def _key(phrase: str) -> str | None:
    words = [w.strip(_EDGE_PUNCT) for w in phrase.split()]
    words = [w for w in words if w]
    return " ".join(words).casefold() or None


def _drop_names(phrase: str) -> str:
    """'Hi Tom' -> 'Hi', 'Dear Ms. Smith' -> 'Dear', 'Good morning Anna' -> 'Good morning', 'Hi all' -> 'Hi all':
    the habit is the greeting word, not who the e-mail goes to."""
    words = phrase.split()
    while len(words) > 1 and words[-1][:1].isupper():
        words.pop()
    return " ".join(words)


def greeting(text: str) -> str | None:
    """The opening greeting, normalised ("hi", "dear", "good morning"), or None when the e-mail starts without one."""
    lines = _lines(text)
    if not lines:
        return None
    first = lines[0]
    head, comma, _ = first.partition(",")
    if comma and 0 < len(head.split()) <= _GREETING_MAX_WORDS:
        return _key(_drop_names(head))
    if len(first.split()) <= _SHORT_LINE_WORDS and len(lines) > 1:
        return _key(_drop_names(first.rstrip(_EDGE_PUNCT)))
    return None


def signoff(text: str) -> str | None:
    """The closing phrase before the name ("best regards", "cheers"), normalised, or None when there is none.

    Looks at the last lines: "Best regards,\\nTom" -> "best regards"; "Cheers, Tom" -> "cheers"; "Thanks!" -> "thanks".
    A one-line e-mail has no sign-off."""
    lines = _lines(text)
    if len(lines) < 2:
        return None
    last, before = lines[-1], lines[-2]
    if last.endswith(",") and len(last.split()) <= _SIGNOFF_MAX_WORDS:
        return _key(last)  # a sign-off without a name under it
    head, comma, tail = last.partition(",")
    if comma and tail.strip() and len(head.split()) <= _SIGNOFF_MAX_WORDS and len(tail.split()) <= _NAME_MAX_WORDS:
        return _key(head)  # "Cheers, Tom"
    if (len(last.split()) <= _NAME_MAX_WORDS and len(lines) > 2 and len(before.split()) <= _SIGNOFF_MAX_WORDS
            and not before.endswith((".", "?", ":", ";"))):
        return _key(before)  # "Best regards,\nTom" (a short sentence like "Done." is not a sign-off)
    if len(last.split()) <= _NAME_MAX_WORDS:
        return _key(last)  # "Thanks!" or only a name: either way the writer's habit
    return None


def formality(text: str) -> dict:
    """Formality markers: contractions, exclamation marks, informal and formal words, and a score in [-1, 1]
    ((formal - informal) / (formal + informal), 0 when there is no marker at all)."""
    text = unicodedata.normalize("NFKC", text or "")
    words = [w.casefold() for w in _WORD.findall(text)]
    contractions = len(_CONTRACTION.findall(text))
    exclamations = text.count("!")
    informal = sum(w in INFORMAL_WORDS for w in words)
    formal = sum(w in FORMAL_WORDS for w in words)
    informal_total = informal + contractions + exclamations
    total = informal_total + formal
    return {
        "contractions": contractions,
        "exclamations": exclamations,
        "informal_words": informal,
        "formal_words": formal,
        "score": (formal - informal_total) / total if total else 0.0,
    }


def avg_sentence_words(text: str) -> float:
    """Mean words per sentence (sentences end at . ! ? or a line break); 0 for a text without words."""
    sentences = [s for line in _lines(text) for s in _SENTENCE_END.split(line)]
    counts = [len(_WORD.findall(s)) for s in sentences]
    counts = [c for c in counts if c]
    return sum(counts) / len(counts) if counts else 0.0


def style_features(text: str) -> dict:
    f = formality(text)
    return {
        "greeting": greeting(text),
        "signoff": signoff(text),
        "formality": f["score"],
        "contractions": f["contractions"],
        "exclamations": f["exclamations"],
        "informal_words": f["informal_words"],
        "formal_words": f["formal_words"],
        "avg_sentence_words": avg_sentence_words(text),
        "chars": len(text or ""),
    }


# --- perplexity ------------------------------------------------------------------------------------------------


def perplexity(nll: list[tuple[float, int]] | None) -> float | None:
    """Per-token perplexity over all examples: exp(total NLL / total tokens). None without tokens."""
    if not nll:
        return None
    total_nll, total_tokens = 0.0, 0
    for i, pair in enumerate(nll):
        try:
            loss, tokens = float(pair[0]), int(pair[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"nll[{i}] must be (sum of token NLLs, token count), got {pair!r}") from exc
        if tokens < 0 or not math.isfinite(loss) or loss < 0:
            raise ValueError(f"nll[{i}] must be a finite NLL >= 0 and a token count >= 0, got {pair!r}")
        total_nll += loss
        total_tokens += tokens
    if total_tokens == 0:
        return None
    return math.exp(total_nll / total_tokens)


# --- scoring and comparing -------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_texts(references: list[str], hypotheses: list[str], *, tenant: str, classifier: Attributor | None,
                nll: list[tuple[float, int]] | None = None) -> dict:
    """Score one model's replies (``hypotheses``) against the user's real ones (``references``), in order.

    ``classifier`` names whose voice each reply is in (None: attribution is not measured); ``nll``: per held-out
    reply (sum of token NLLs, token count) under this model, for perplexity."""
    if len(references) != len(hypotheses):
        raise ValueError(f"references and hypotheses must pair up, got {len(references)} and {len(hypotheses)}")
    references = [r if isinstance(r, str) else "" for r in references]
    hypotheses = [h if isinstance(h, str) else "" for h in hypotheses]
    attributed = list(classifier.predict(hypotheses)) if classifier is not None and hypotheses else None
    rows = []
    for i, (ref, hyp) in enumerate(zip(references, hypotheses)):
        ref_style, hyp_style = style_features(ref), style_features(hyp)
        who = attributed[i] if attributed is not None else None
        rows.append({
            "chrf": chrf(ref, hyp),
            "rouge_l": rouge_l(ref, hyp),
            "length_ratio": len(hyp) / len(ref) if ref else None,
            "greeting_match": int(ref_style["greeting"] == hyp_style["greeting"]),
            "signoff_match": int(ref_style["signoff"] == hyp_style["signoff"]),
            "formality_diff": abs(ref_style["formality"] - hyp_style["formality"]),
            "sentence_words_diff": hyp_style["avg_sentence_words"] - ref_style["avg_sentence_words"],
            "greeting": hyp_style["greeting"],
            "signoff": hyp_style["signoff"],
            "attributed_to": who,
            "attributed_ok": int(who == tenant) if who is not None else None,
        })
    ref_chars = sum(len(r) for r in references)
    aggregate = {
        "chrf": _mean([r["chrf"] for r in rows]),
        "rouge_l": _mean([r["rouge_l"] for r in rows]),
        # Ratio of means, not mean of ratios: one tiny reference must not dominate the figure.
        "length_ratio": (sum(len(h) for h in hypotheses) / ref_chars) if ref_chars else None,
        "greeting_match": _mean([r["greeting_match"] for r in rows]),
        "signoff_match": _mean([r["signoff_match"] for r in rows]),
        "formality_diff": _mean([r["formality_diff"] for r in rows]),
        "attribution": _mean([r["attributed_ok"] for r in rows]) if attributed is not None else None,
        "perplexity": perplexity(nll),
        "n": len(rows),
    }
    return {"tenant": tenant, "per_example": rows, "aggregate": aggregate}


def _per_example(scored: dict, name: str) -> list[float] | None:
    key = "attributed_ok" if name == "attribution" else name
    values = [row.get(key) for row in scored.get("per_example", [])]
    if not values or any(v is None for v in values):
        return None
    return [float(v) for v in values]


def compare(baseline: dict, candidate: dict, *, seed: int = 0, n_resamples: int = 2000) -> dict:
    """Candidate vs baseline on the same prompts (outputs of ``score_texts``).

    ``metrics[name]`` = {"baseline", "candidate", "gain" (candidate - baseline), "ci_low", "ci_high" (95% paired
    bootstrap CI of the gain; None for length_ratio and perplexity, which are not per-example means),
    "higher_is_better"}; ``perplexity_regression`` = candidate / baseline perplexity - 1 (None if either is missing).
    """
    n_base, n_cand = len(baseline.get("per_example", [])), len(candidate.get("per_example", []))
    if n_base != n_cand:
        raise ValueError(f"baseline and candidate were scored on different test sets ({n_base} vs {n_cand} examples); "
                         "score both models on the same prompts in the same order")
    base_agg, cand_agg = baseline.get("aggregate", {}), candidate.get("aggregate", {})
    metrics: dict[str, dict[str, Any]] = {}
    for name in (*PAIRED_METRICS, "length_ratio", "perplexity"):
        b, c = base_agg.get(name), cand_agg.get(name)
        entry = {"baseline": b, "candidate": c, "gain": (c - b) if b is not None and c is not None else None,
                 "ci_low": None, "ci_high": None, "p": None, "higher_is_better": name not in LOWER_IS_BETTER}
        a_vals, b_vals = _per_example(baseline, name), _per_example(candidate, name)
        if name in PAIRED_METRICS and a_vals is not None and b_vals is not None:
            boot = paired_bootstrap(a_vals, b_vals, n=n_resamples, seed=seed)
            entry.update(gain=boot["diff"], ci_low=boot["ci_low"], ci_high=boot["ci_high"], p=boot["p"])
        metrics[name] = entry
    base_ppl, cand_ppl = base_agg.get("perplexity"), cand_agg.get("perplexity")
    regression = cand_ppl / base_ppl - 1 if base_ppl and cand_ppl is not None else None
    return {
        "kind": "generation",
        "tenant": candidate.get("tenant"),
        "n": n_cand,
        "metrics": metrics,
        "perplexity_regression": regression,
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "ci": 0.95},
    }
