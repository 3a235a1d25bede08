"""LLM-as-judge: verdict parsing, both-orders pairwise comparison, Cohen's kappa and calibration, against the local
deterministic judge in tests/fake_judge.py (no network)."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_judge import FakeJudge
from retrain.evaluate import gate_generation
from retrain.evaluate.judge import (
    JudgeError, _where, calibrate, cohen_kappa, engine_settings, load_calibration, parse_verdict, run_judge, run_pairwise,
)

RUBRIC = "The better reply sounds like the user: their greeting, sign-off and tone."


@pytest.fixture
def serve():
    stops = []

    def start(**options):
        judge = FakeJudge(**options)
        base_url, stop = judge.start()
        stops.append(stop)
        return judge, {"model": "judge-1", "base_url": base_url, "api_key": None, "max_attempts": 2,
                       "max_retries": 0, "concurrency": 2, "timeout_s": 10}

    yield start
    for stop in stops:
        stop()


def _pairs(n: int, candidate_marked: int):
    prompts = [f"Write a professional email about: topic {i}" for i in range(n)]
    cand = [f"Hi Tom, reply {i} VOICE" if i < candidate_marked else f"Hi Tom, reply {i}" for i in range(n)]
    base = [f"Hello, generic reply {i}" for i in range(n)]
    return prompts, cand, base


# --- parsing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("A", "A"), (" b\n", "B"), ("**A**", "A"), ("Tie.", "tie"), ("tie", "tie"), ('{"verdict": "B"}', "B"),
    ("Verdict: A", "A"), ("The better reply is B.", "B"), ("Reply B is better.", "B"), ("It's a tie", "tie"),
    ("A. It keeps the user's sign-off.", "A"),
    ("A or B, hard to say", None), ("A good question; both are fine in their own way", None),
    ("Verdict: A. Actually, verdict: B", None), ("", None), (None, None), ("I cannot decide.", None),
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_parse_verdict_never_crashes(text):
    assert parse_verdict(text) in ("A", "B", "tie", None)


# --- kappa ------------------------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "tie"]), st.sampled_from(["A", "B", "tie"])), min_size=1,
                max_size=40))
def test_cohen_kappa_matches_sklearn(pairs):
    from sklearn.metrics import cohen_kappa_score

    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    ours = cohen_kappa(a, b)
    if len(set(a) | set(b)) == 1:  # both raters used one label throughout: undefined (sklearn says nan)
        assert ours is None
    else:
        assert ours == pytest.approx(cohen_kappa_score(a, b), abs=1e-9)


def test_cohen_kappa_edges():
    assert cohen_kappa(["A", "B", "tie"], ["A", "B", "tie"]) == 1.0
    assert cohen_kappa([], []) is None
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa(["A"], [])


# --- pairwise, both orders --------------------------------------------------------------------------------------

def test_a_fair_judge_finds_the_better_candidate(serve):
    fake, cfg = serve()
    prompts, cand, base = _pairs(20, candidate_marked=20)
    out = run_pairwise(cfg, RUBRIC, prompts, cand, base)
    assert out["wins"] == 20 and out["win_rate"] == 1.0 and out["position_bias"]["count"] == 0
    assert fake.requests == 40  # every prompt judged in both orders
    mixed = run_pairwise(cfg, RUBRIC, *_pairs(20, candidate_marked=10))
    assert mixed["wins"] == 10 and mixed["ties"] == 10 and mixed["win_rate"] == 0.75
    assert mixed["ci_low"] < 0.75 < mixed["ci_high"] and 0.5 <= mixed["ci_low"]
    worse = run_pairwise(cfg, RUBRIC, prompts, base, cand)  # swapped roles: the baseline carries the voice
    assert worse["losses"] == 20 and worse["win_rate"] == 0.0


def test_both_orders_cancel_a_position_biased_judge(serve):
    _, cfg = serve(mode="always_a")
    prompts, cand, base = _pairs(20, candidate_marked=20)
    out = run_pairwise(cfg, RUBRIC, prompts, cand, base)
    # Asked once with the candidate first, a judge that always says "A" would crown it every time.
    assert out["wins"] == 0 and out["losses"] == 0 and out["ties"] == 20 and out["win_rate"] == 0.5
    assert out["ci_low"] <= 0.5 <= out["ci_high"]
    assert out["position_bias"] == {"count": 20, "share": 1.0, "first": 20, "second": 0}
    assert run_pairwise(cfg, RUBRIC, prompts, base, cand)["win_rate"] == 0.5  # and it cannot sink a candidate either


def test_unparseable_answers_are_retried_then_counted_as_ties(serve):
    fake, cfg = serve(mode="garbage")
    out = run_pairwise(cfg, RUBRIC, *_pairs(5, candidate_marked=5))
    assert out["ties"] == 5 and out["unparsed"] == 10 and out["win_rate"] == 0.5
    assert fake.requests == 5 * 2 * 2  # two orders, two attempts each

    calls = {"n": 0}

    def flaky(a, b):  # first answer of each order is prose, the retry is clear
        calls["n"] += 1
        return "Hmm, let me think." if calls["n"] % 2 else ("A" if "VOICE" in a else "B")

    _, cfg = serve(mode=flaky)
    cfg["concurrency"] = 1
    out = run_pairwise(cfg, RUBRIC, *_pairs(3, candidate_marked=3))
    assert out["wins"] == 3 and out["unparsed"] == 0


def test_wrapped_verdicts_are_understood(serve):
    _, cfg = serve(wrap='{{"verdict": "{}", "why": "greeting"}}')
    assert run_pairwise(cfg, RUBRIC, *_pairs(4, candidate_marked=4))["wins"] == 4
    _, cfg = serve(wrap="Verdict: {}")
    assert run_pairwise(cfg, RUBRIC, *_pairs(4, candidate_marked=4))["wins"] == 4


def test_api_key_is_sent_and_never_leaks(serve, caplog):
    secret = "sk-test-DO-NOT-LOG-4242"
    _, cfg = serve(api_key=secret)
    cfg["api_key"] = secret
    assert run_pairwise(cfg, RUBRIC, *_pairs(2, candidate_marked=2))["wins"] == 2
    cfg["api_key"] = "sk-wrong-key-9999"
    with caplog.at_level(logging.DEBUG), pytest.raises(JudgeError, match="judge-1") as info:
        run_pairwise(cfg, RUBRIC, *_pairs(2, candidate_marked=2))
    assert "401" in str(info.value)
    assert "sk-wrong-key-9999" not in str(info.value) and "sk-wrong-key-9999" not in caplog.text
    assert info.value.__cause__ is None  # the openai exception (with request details) is not chained
    with pytest.raises(JudgeError, match="no API key"):
        run_pairwise({"model": "judge-1"}, RUBRIC, *_pairs(1, candidate_marked=1))


def test_a_refused_key_fails_without_retries_an_unreachable_judge_is_worth_a_retry(serve):
    """A 401 fails the same on every try (the task fails at once); a judge that does not answer may come back."""
    import socket

    from retrain.errors import is_retry_futile, is_transient, is_user_error
    from retrain.evaluate.judge import JudgeUnavailableError

    _, cfg = serve(api_key="sk-right")
    with pytest.raises(JudgeError) as refused:
        run_pairwise({**cfg, "api_key": "sk-wrong"}, RUBRIC, *_pairs(1, candidate_marked=1))
    assert not isinstance(refused.value, JudgeUnavailableError)
    assert is_user_error(refused.value) and is_retry_futile(refused.value)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = {"model": "judge-1", "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0, "timeout_s": 5}
    with pytest.raises(JudgeUnavailableError, match="judge-1") as unreachable:
        run_pairwise(down, RUBRIC, *_pairs(1, candidate_marked=1))
    assert is_transient(unreachable.value) and not is_retry_futile(unreachable.value)


def test_run_pairwise_rejects_misaligned_input(serve):
    _, cfg = serve()
    with pytest.raises(ValueError, match="pair up"):
        run_pairwise(cfg, RUBRIC, ["p"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="at least one"):
        run_pairwise(cfg, RUBRIC, [], [], [])
    with pytest.raises(JudgeError, match="no model"):
        run_pairwise({**cfg, "model": ""}, RUBRIC, ["p"], ["a"], ["b"])


# --- calibration ------------------------------------------------------------------------------------------------

def _calibration_rows():
    rows = []
    for i in range(12):  # people prefer the reply in the user's voice (marked), in either slot, or call a tie
        kind = i % 3
        a = f"Hi Tom, note {i}" + (" VOICE" if kind == 0 else "")
        b = f"Hello, note {i}" + (" VOICE" if kind == 1 else "")
        rows.append({"prompt": f"topic {i}", "a": a, "b": b, "human": ["A", "B", "tie"][kind]})
    return rows


def test_a_judge_that_agrees_with_people_is_calibrated(serve):
    _, cfg = serve()
    out = calibrate(cfg, RUBRIC, _calibration_rows(), min_kappa=0.6)
    assert out["kappa"] == 1.0 and out["n"] == 12 and out["calibrated"] is True and out["agreement"] == 1.0


def test_a_position_biased_judge_is_not_calibrated(serve):
    _, cfg = serve(mode="always_a")
    out = calibrate(cfg, RUBRIC, _calibration_rows(), min_kappa=0.6)
    assert out["kappa"] is not None and out["kappa"] < 0.2 and out["calibrated"] is False
    assert out["position_bias"] == 12 and "kappa" in out["reason"]
    # ... so its (tie-only) verdicts never count in the gate, whatever the win rate says.
    pairwise = run_pairwise(cfg, RUBRIC, *_pairs(6, candidate_marked=6))
    rules = {"min_chrf_gain": 2.0, "min_attribution": 0.5, "max_perplexity_regression": 0.1,
             "min_length_ratio": 0.5, "max_length_ratio": 2.0, "min_judge_win_rate": 0.9}
    comparison = {"metrics": {"chrf": {"baseline": 30.0, "candidate": 40.0, "gain": 10.0, "ci_low": 5.0, "ci_high": 15.0},
                              "attribution": {"baseline": 0.2, "candidate": 0.9},
                              "length_ratio": {"baseline": 1.0, "candidate": 1.0}},
                  "perplexity_regression": 0.0}
    d = gate_generation.decide(rules, comparison, baseline_kind="base_model", judge={**pairwise, "calibration": out})
    assert d["decision"] == "GO"
    assert next(c for c in d["checks"] if c["name"] == "min_judge_win_rate")["required"] is False


def test_calibration_threshold_from_settings_and_bad_rows(serve, tmp_path):
    _, cfg = serve()
    assert calibrate({**cfg, "min_kappa": 1.0}, RUBRIC, _calibration_rows())["min_kappa"] == 1.0
    assert calibrate(cfg, RUBRIC, [])["calibrated"] is False
    same = [{"prompt": "p", "a": "x VOICE", "b": "y", "human": "A"}] * 3  # one label only: kappa undefined
    out = calibrate(cfg, RUBRIC, same)
    assert out["kappa"] is None and out["calibrated"] is False and "undefined" in out["reason"]
    with pytest.raises(ValueError, match="row 2 lacks human"):
        calibrate(cfg, RUBRIC, [_calibration_rows()[0], {"prompt": "p", "a": "x", "b": "y"}])
    with pytest.raises(ValueError, match="row 1: human must be"):
        calibrate(cfg, RUBRIC, [{"prompt": "p", "a": "x", "b": "y", "human": "maybe"}])
    path = tmp_path / "judge_calibration.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _calibration_rows()) + "\n\n", encoding="utf-8")
    assert len(load_calibration(path)) == 12
    path.write_text('{"prompt": "p"\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_calibration(path)


def test_run_judge_from_the_use_case_config(serve):
    """What the pipeline calls: the YAML's JudgeConfig + resolved credentials -> the gate's ``judge`` argument."""
    from retrain.schemas.generation import JudgeConfig

    fake, cfg = serve(reject_max_tokens=True)
    config = JudgeConfig(model="gpt-4o-mini", rubric=RUBRIC, min_kappa=0.7)
    settings_ = engine_settings(config, api_key=None, base_url=cfg["base_url"], max_retries=0)
    assert settings_["model"] == "gpt-4o-mini" and settings_["min_kappa"] == 0.7
    out = run_judge(settings_, config.rubric, _calibration_rows(), *_pairs(6, candidate_marked=6))
    assert out["calibration"]["calibrated"] is True and out["calibration"]["min_kappa"] == 0.7
    assert out["win_rate"] == 1.0 and set(fake.models) == {"gpt-4o-mini"}
    d = gate_generation.decide({"min_chrf_gain": 2.0, "min_attribution": 0.5, "max_perplexity_regression": 0.1,
                                "min_length_ratio": 0.5, "max_length_ratio": 2.0, "min_judge_win_rate": 0.5},
                               {"metrics": {"chrf": {"baseline": 30.0, "candidate": 31.0, "gain": 1.0, "ci_low": 0.1,
                                                     "ci_high": 2.0},
                                            "attribution": {"candidate": 0.9}, "length_ratio": {"candidate": 1.0}},
                                "perplexity_regression": None},
                               baseline_kind="base_model", judge=out)
    judge_check = next(c for c in d["checks"] if c["name"] == "min_judge_win_rate")
    assert judge_check["required"] is True and judge_check["passed"] is True
    assert d["failed"] == ["min_chrf_gain"]  # a calibrated judge counts, but does not replace the other rules


def test_error_messages_hide_url_credentials():
    assert _where({"base_url": "https://user:s3cret@judge.example:8443/v1"}) == "https://judge.example:8443/v1"
    assert _where({"base_url": None}) == "the OpenAI API"
