"""Free-text metrics (chrF, ROUGE-L, style, perplexity), voice attribution and the generation gate."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retrain.evaluate import gate_generation
from retrain.evaluate.attribution import UNATTRIBUTED, AttributionError, VoiceClassifier
from retrain.evaluate.generation_metrics import (
    chrf, compare, formality, greeting, perplexity, rouge_l, score_texts, signoff, style_features,
)

# --- three synthetic writers, made here so the test does not depend on the demo generator ------------------------

TOPICS = ["the quarterly budget", "next week's offsite", "the client contract", "the hiring plan",
          "the server migration", "the marketing launch", "the invoice from March", "the training schedule",
          "the office move", "the board deck"]
WRITERS = {
    "anna": dict(greet=["Hi {n},", "Hey {n}!"], sign=["Cheers,\nAnna", "Cheers!\nAnna"],
                 phrases=["Quick one about {t}!", "Just a heads-up on {t} - it's moving fast!",
                          "Let's grab a coffee and sort out {t}.", "I'm pretty sure {t} is fine, but can't hurt to check!",
                          "Super excited about {t}!"]),
    "bernd": dict(greet=["Dear {n},", "Dear Mr. {n},"], sign=["Kind regards,\nBernd Müller", "With kind regards,\nBernd Müller"],
                  phrases=["Please find attached the documents regarding {t}.",
                           "I would kindly ask you to review {t} at your earliest convenience.",
                           "Furthermore, I would like to inform you that {t} requires your approval.",
                           "Should you have any questions concerning {t}, please do not hesitate to contact me."]),
    "chloe": dict(greet=["Hello {n} -", "Hello team -"], sign=["Best,\nC.", "Thanks so much,\nC."],
                  phrases=["So, {t}: where are we?", "Circling back on {t}; no rush.",
                           "Honestly, {t} feels like it needs another pass.", "Two thoughts on {t} (short version).",
                           "Bonne idée for {t}, merci."]),
}
NAMES = ["Tom", "Sara", "Lee", "Maria", "Jonas"]
GENERIC = "The meeting is on Monday. The report is ready for review."


def email(writer: str, rng: random.Random) -> str:
    w = WRITERS[writer]
    body = " ".join(rng.choice(w["phrases"]).format(t=rng.choice(TOPICS)) for _ in range(rng.randint(2, 3)))
    return f"{rng.choice(w['greet']).format(n=rng.choice(NAMES))}\n\n{body}\n\n{rng.choice(w['sign'])}"


def corpus(n_per_writer: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    pairs = [(email(name, rng), name) for name in WRITERS for _ in range(n_per_writer)]
    return [t for t, _ in pairs], [w for _, w in pairs]


@pytest.fixture(scope="module")
def classifier() -> VoiceClassifier:
    texts, tenants = corpus(30, seed=1)
    return VoiceClassifier().fit(texts, tenants)


# --- chrF / ROUGE-L ---------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_chrf_of_identical_text_is_100(text):
    assert chrf(text, text) == 100.0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_chrf_is_within_0_and_100(ref, hyp):
    assert 0.0 <= chrf(ref, hyp) <= 100.0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200), st.text(max_size=200))
def test_rouge_l_is_symmetric_and_bounded(a, b):
    assert 0.0 <= rouge_l(a, b) <= 1.0
    assert rouge_l(a, b) == pytest.approx(rouge_l(b, a))
    assert rouge_l(a, a) == 1.0


def test_similarity_orders_texts_sensibly():
    ref = "Hi Tom,\n\nThe budget is approved. Cheers,\nAnna"
    assert chrf(ref, ref.replace("approved", "approve")) > chrf(ref, "Dear Sir, please find the report attached.")
    assert rouge_l(ref, "Hi Tom, the budget is approved") > rouge_l(ref, "Completely unrelated words here")
    # Accented words are words: rouge-score's default tokenizer would drop "für" and "grüße" and call these equal.
    assert rouge_l("Danke für alles", "Danke für nichts") < 1.0
    assert rouge_l("Спасибо, друг", "Спасибо") > 0.5 and rouge_l("Спасибо", "Привет") == 0.0


# --- style features ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("Hi Tom,\n\nBudget approved.", "hi"),
    ("Dear Ms. Smith,\nPlease find attached.", "dear"),
    ("Good morning Anna,\nquick note", "good morning"),
    ("Hey there!\n\nAll set.", "hey there"),
    ("Hi all, the deck is attached.", "hi all"),
    ("I wanted to follow up on the contract we discussed last week, see below.", None),
    ("", None),
    ("   \n\n ", None),
])
def test_greeting(text, expected):
    assert greeting(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("Hi Tom,\n\nBudget approved.\n\nBest regards,\nAnna", "best regards"),
    ("Hi,\nDone.\nCheers, Anna", "cheers"),
    ("Hi,\nDone.\nThanks!", "thanks"),
    ("Hi,\nDone and dusted, nothing else to add from my side today.\nKind regards,", "kind regards"),
    ("Just one line, no sign-off.", None),
    ("", None),
])
def test_signoff(text, expected):
    assert signoff(text) == expected


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_style_parsers_never_crash_on_arbitrary_unicode(text):
    features = style_features(text)
    assert features["greeting"] is None or isinstance(features["greeting"], str)
    assert features["signoff"] is None or isinstance(features["signoff"], str)
    assert -1.0 <= features["formality"] <= 1.0
    assert features["avg_sentence_words"] >= 0


def test_formality_markers():
    casual, formal = formality("Hey! Can't wait, gonna be awesome!"), formality("Dear Sir, kindly find attached.")
    assert casual["contractions"] == 1 and casual["exclamations"] == 2 and casual["informal_words"] >= 2
    assert casual["score"] < 0 < formal["score"]
    assert formality("")["score"] == 0.0


# --- perplexity -------------------------------------------------------------------------------------------------

def test_perplexity_is_per_token_over_all_examples():
    # Not the mean of per-example perplexities: a long reply weighs by its tokens.
    assert perplexity([(10.0, 10), (30.0, 10)]) == pytest.approx(math.exp(40 / 20))
    assert perplexity([(2.0, 1), (0.0, 99)]) == pytest.approx(math.exp(2 / 100))
    assert perplexity(None) is None and perplexity([]) is None and perplexity([(0.0, 0)]) is None
    with pytest.raises(ValueError, match=r"nll\[1\]"):
        perplexity([(1.0, 1), (float("nan"), 3)])
    with pytest.raises(ValueError, match=r"nll\[0\]"):
        perplexity([("x", 1)])


# --- score_texts / compare --------------------------------------------------------------------------------------

def _scored(classifier, seed: int, tenant: str = "anna", noisy: bool = False, nll=None):
    rng = random.Random(seed)
    refs = [email(tenant, rng) for _ in range(30)]
    if noisy:  # a base model: same topics, generic voice
        hyps = [GENERIC for _ in refs]
    else:
        hyps = [r.replace("Tom", "Sara") for r in refs]
    return score_texts(refs, hyps, tenant=tenant, classifier=classifier, nll=nll)


def test_score_texts_shape(classifier):
    out = score_texts(["Hi Tom,\nBudget approved.\nCheers,\nAnna", "Dear Lee,\nDone.\nKind regards,\nBernd Müller"],
                      ["Hi Tom,\nBudget approved!\nCheers,\nAnna", "Done."], tenant="anna", classifier=classifier,
                      nll=[(4.0, 2), (2.0, 2)])
    row = out["per_example"][0]
    assert set(row) >= {"chrf", "rouge_l", "length_ratio", "greeting_match", "signoff_match", "formality_diff",
                        "attributed_to", "attributed_ok"}
    assert row["greeting_match"] == 1 and row["signoff_match"] == 1 and row["attributed_to"] == "anna"
    assert out["per_example"][1]["greeting_match"] == 0 and out["per_example"][1]["signoff_match"] == 0
    agg = out["aggregate"]
    assert agg["n"] == 2 and agg["perplexity"] == pytest.approx(math.exp(1.5))
    refs_chars = len("Hi Tom,\nBudget approved.\nCheers,\nAnna") + len("Dear Lee,\nDone.\nKind regards,\nBernd Müller")
    assert agg["length_ratio"] == pytest.approx((len("Hi Tom,\nBudget approved!\nCheers,\nAnna") + 5) / refs_chars)
    assert 0 <= agg["attribution"] <= 1
    with pytest.raises(ValueError, match="pair up"):
        score_texts(["a"], [], tenant="anna", classifier=classifier)
    assert score_texts(["a"], ["a"], tenant="anna", classifier=None)["aggregate"]["attribution"] is None


@settings(max_examples=20, deadline=None)
@given(st.lists(st.text(max_size=80), min_size=1, max_size=8), st.integers(0, 1000))
def test_compare_identical_inputs_has_zero_gain(texts, seed):
    scored = score_texts(texts, list(reversed(texts)), tenant="t", classifier=None, nll=[(1.0, 2)])
    out = compare(scored, scored, seed=seed, n_resamples=200)
    for name in ("chrf", "rouge_l", "greeting_match", "signoff_match"):
        m = out["metrics"][name]
        assert m["gain"] == 0 and m["ci_low"] <= 0 <= m["ci_high"]
    assert out["perplexity_regression"] == 0


def test_compare_finds_the_better_model(classifier):
    base = _scored(classifier, seed=5, noisy=True, nll=[(30.0, 10)])
    cand = _scored(classifier, seed=5, nll=[(33.0, 10)])
    out = compare(base, cand, n_resamples=500)
    chrf_m = out["metrics"]["chrf"]
    assert chrf_m["gain"] > 20 and chrf_m["ci_low"] > 0
    assert out["metrics"]["attribution"]["candidate"] > out["metrics"]["attribution"]["baseline"]
    assert out["metrics"]["attribution"]["ci_low"] > 0
    assert out["perplexity_regression"] == pytest.approx(math.exp(3.3) / math.exp(3.0) - 1)
    assert compare(base, cand, n_resamples=500) == out  # seeded: reproducible
    with pytest.raises(ValueError, match="different test sets"):
        compare(base, score_texts(["a"], ["a"], tenant="anna", classifier=None))


# --- attribution ------------------------------------------------------------------------------------------------

def test_voice_classifier_tells_three_writers_apart(classifier):
    texts, tenants = corpus(20, seed=2)  # held out: other e-mails of the same writers
    assert classifier.accuracy(texts, tenants) >= 0.9
    assert classifier.classes == ["anna", "bernd", "chloe"]


def test_generic_text_is_not_confidently_attributed(classifier):
    proba = classifier.predict_proba([GENERIC])[0]
    assert max(proba.values()) < 0.6
    assert sum(proba.values()) == pytest.approx(1.0)
    strict = VoiceClassifier(min_confidence=0.6).fit(*corpus(30, seed=1))
    texts, tenants = corpus(5, seed=3)
    assert strict.predict([GENERIC]) == [UNATTRIBUTED]
    assert strict.accuracy(texts, tenants) >= 0.9


def test_voice_classifier_refuses_one_tenant():
    with pytest.raises(AttributionError, match="at least 2 tenants"):
        VoiceClassifier().fit(["Hi", "Hello"], ["anna", "anna"])
    with pytest.raises(AttributionError, match="pair up"):
        VoiceClassifier().fit(["Hi"], ["anna", "bernd"])
    with pytest.raises(AttributionError, match="not trained"):
        VoiceClassifier().predict(["Hi"])


def test_voice_classifier_is_deterministic_and_round_trips(classifier, tmp_path):
    texts, _ = corpus(5, seed=4)
    again = VoiceClassifier().fit(*corpus(30, seed=1))
    assert again.predict_proba(texts) == classifier.predict_proba(texts)
    path = classifier.save(tmp_path / "voices.joblib")
    loaded = VoiceClassifier.load(path)
    assert loaded.predict_proba(texts) == classifier.predict_proba(texts) and loaded.classes == classifier.classes
    (tmp_path / "bad.joblib").write_bytes(b"not a pickle")
    with pytest.raises(AttributionError, match="not a readable voice classifier"):
        VoiceClassifier.load(tmp_path / "bad.joblib")
    with pytest.raises(FileNotFoundError, match="no voice classifier"):
        VoiceClassifier.load(tmp_path / "missing.joblib")


# --- the generation gate ----------------------------------------------------------------------------------------

RULES = SimpleNamespace(min_chrf_gain=2.0, min_attribution=0.5, max_perplexity_regression=0.10,
                        min_length_ratio=0.5, max_length_ratio=2.0, min_judge_win_rate=0.5)


def _comparison(**over):
    c = {"chrf": (30.0, 40.0, 6.0, 14.0), "attribution": 0.8, "length_ratio": 1.1, "ppl": 0.05}
    c.update(over)
    base, cand, low, high = c["chrf"]
    return {
        "tenant": "anna", "n": 50,
        "metrics": {
            "chrf": {"baseline": base, "candidate": cand, "gain": cand - base, "ci_low": low, "ci_high": high},
            "attribution": {"baseline": 0.3, "candidate": c["attribution"], "gain": None, "ci_low": None, "ci_high": None},
            "length_ratio": {"baseline": 1.5, "candidate": c["length_ratio"], "gain": None, "ci_low": None, "ci_high": None},
            "perplexity": {"baseline": 10.0, "candidate": None if c["ppl"] is None else 10.0 * (1 + c["ppl"])},
        },
        "perplexity_regression": c["ppl"],
    }


def _judge(win_rate=0.9, calibrated=True, kappa=0.8):
    return {"win_rate": win_rate, "ci_low": win_rate - 0.1, "ci_high": min(1.0, win_rate + 0.1), "n": 20,
            "calibration": {"kappa": kappa, "n": 12, "min_kappa": 0.6, "calibrated": calibrated}}


def test_gate_all_rules_pass_is_go():
    d = gate_generation.decide(RULES, _comparison(), baseline_kind="base_model", judge=_judge())
    assert d["decision"] == "GO" and d["failed"] == []
    assert {c["name"] for c in d["checks"]} == {"min_chrf_gain", "min_attribution", "max_perplexity_regression",
                                                "min_length_ratio", "max_length_ratio", "min_judge_win_rate"}
    assert all(set(c) == {"name", "value", "threshold", "passed", "required", "reason"} for c in d["checks"])
    assert {"decision", "summary", "failed", "checks", "baseline_score", "candidate_score", "baseline_kind",
            "overrides", "decided_at"} <= set(d)
    assert d["candidate_score"] == 40.0 and d["tenant"] == "anna" and d["summary"].startswith("GO")


@pytest.mark.parametrize("over,judge,rule", [
    ({"chrf": (30.0, 31.0, 0.2, 1.8)}, None, "min_chrf_gain"),          # significant but too small
    ({"chrf": (30.0, 35.0, -0.5, 10.5)}, None, "min_chrf_gain"),        # big enough but CI includes 0
    ({"attribution": 0.4}, None, "min_attribution"),
    ({"ppl": 0.25}, None, "max_perplexity_regression"),
    ({"length_ratio": 0.3}, None, "min_length_ratio"),
    ({"length_ratio": 2.6}, None, "max_length_ratio"),
    ({}, _judge(win_rate=0.3), "min_judge_win_rate"),                 # a calibrated judge does count
])
def test_gate_each_rule_alone_fails(over, judge, rule):
    d = gate_generation.decide(RULES, _comparison(**over), baseline_kind="production", judge=judge)
    assert d["decision"] == "NO-GO" and d["failed"] == [rule]
    assert rule in d["summary"]


def test_gate_uncalibrated_judge_never_flips_a_decision():
    for comparison, expected in ((_comparison(), "GO"), (_comparison(attribution=0.1), "NO-GO")):
        for judge in (_judge(win_rate=0.0, calibrated=False, kappa=0.1), _judge(win_rate=1.0, calibrated=False, kappa=0.1),
                      _judge(win_rate=1.0, calibrated=False, kappa=None)):
            d = gate_generation.decide(RULES, comparison, baseline_kind="base_model", judge=judge)
            assert d["decision"] == expected
            check = next(c for c in d["checks"] if c["name"] == "min_judge_win_rate")
            assert check["required"] is False and "not calibrated" in check["reason"]


def test_gate_skips_unmeasured_perplexity_with_a_note():
    d = gate_generation.decide(RULES, _comparison(ppl=None), baseline_kind="base_model")
    check = next(c for c in d["checks"] if c["name"] == "max_perplexity_regression")
    assert d["decision"] == "GO" and check["required"] is False and "not measured" in check["reason"]
    judge_check = next(c for c in d["checks"] if c["name"] == "min_judge_win_rate")
    assert judge_check["required"] is False and "no judge" in judge_check["reason"]


def test_gate_rejects_unusable_input():
    with pytest.raises(ValueError, match="baseline_kind"):
        gate_generation.decide(RULES, _comparison(), baseline_kind="yesterday")
    with pytest.raises(ValueError, match="no metric 'chrf'"):
        gate_generation.decide(RULES, {"metrics": {}}, baseline_kind="base_model")


def test_gate_accepts_the_real_pydantic_rules():
    from retrain.schemas.generation import GenerationGate

    d = gate_generation.decide(GenerationGate(), _comparison(), baseline_kind="base_model")
    assert d["decision"] == "GO"
    d = gate_generation.decide(GenerationGate(min_attribution=0.9), _comparison(), baseline_kind="base_model")
    assert d["failed"] == ["min_attribution"]


def test_gate_on_real_metrics(classifier):
    """End to end through the metrics: a model in the tenant's voice passes against a generic base model,
    and the same model against itself (month 2, unchanged data) is a NO-GO on the chrF gain."""
    base = _scored(classifier, seed=6, noisy=True, nll=[(30.0, 10)])
    cand = _scored(classifier, seed=6, nll=[(29.0, 10)])
    assert gate_generation.decide(RULES, compare(base, cand, n_resamples=500), baseline_kind="base_model")["decision"] == "GO"
    d = gate_generation.decide(RULES, compare(cand, cand, n_resamples=500), baseline_kind="production")
    assert d["decision"] == "NO-GO" and d["failed"] == ["min_chrf_gain"]
