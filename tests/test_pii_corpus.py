"""The PII detectors against the labelled corpus in tests/pii_corpus/ (deterministic, not timed).

Targets (issue 16): recall >= 0.99 for every always-on category, and scrubbing changes at most 1% of the ordinary
business texts. Names and addresses are optional and only measured (bench/pii_scrub.py prints the figures).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "pii_corpus" / "corpus.jsonl"


def _load_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_module(REPO / "bench" / "pii_scrub.py", "bench_pii_scrub")
make_corpus = _load_module(REPO / "tests" / "pii_corpus" / "make_corpus.py", "make_pii_corpus")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bench.load(CORPUS)


@pytest.fixture(scope="module")
def result(rows) -> dict:
    return bench.measure(rows)


def test_corpus_is_what_the_committed_script_generates():
    assert CORPUS.read_text(encoding="utf-8") == make_corpus.render(make_corpus.build()), \
        "corpus.jsonl is stale: run .venv/bin/python tests/pii_corpus/make_corpus.py"


def test_corpus_size_and_labels(rows):
    positives = [r for r in rows if r["category"] in bench.CLAIMED]
    negatives = [r for r in rows if r["category"] == "NEGATIVE"]
    assert len(positives) >= 300 and len(negatives) >= 300
    for cat in bench.CLAIMED:
        assert sum(r["category"] == cat for r in positives) >= 50, cat
    for r in positives:
        assert r["values"] and all(v in r["text"] for v in r["values"]), r["id"]
    # Generated values carry real checksums (independent of the detectors).
    for r in positives:
        if r["category"] == "CARD" and r["source"] == "generated":
            digits = "".join(ch for ch in r["values"][0] if ch.isdigit())
            assert make_corpus.luhn_ok(digits), r
        if r["category"] == "IBAN" and r["source"] == "generated":
            s = r["values"][0].replace(" ", "").upper()
            assert int("".join(str(int(ch, 36)) for ch in s[4:] + s[:4])) % 97 == 1, r


@pytest.mark.parametrize("category", ["EMAIL", "PHONE", "CARD", "IBAN", "SSN", "NATIONAL_ID"])
def test_recall_per_category(result, category):
    found, total = result["recall"][category]
    missed = [m["text"] for m in result["misses"] if m["category"] == category]
    assert found / total >= 0.99, f"{category}: {found}/{total}; missed: {missed[:10]}"


def test_false_positive_rate_on_business_text(result):
    changed = [(m["text"], m["scrubbed"]) for m in result["misses"] if m["category"] == "NEGATIVE"]
    assert result["fp_total"] / result["negatives"] <= 0.01, changed[:10]


def test_scrubbing_is_idempotent_on_the_corpus(rows):
    from retrain.data.scrub import find_pii, scrub_text

    for r in rows:
        if r["category"] in bench.OPTIONAL:
            continue
        once = scrub_text(r["text"])
        assert scrub_text(once) == once and find_pii(once) == [], r["id"]


def test_names_and_addresses_only_when_configured():
    from retrain.data.scrub import scrub_text
    from retrain.schemas.pii import PiiConfig

    text = "Best regards,\nMaría García\nCalle Mayor 12, 28013 Madrid"
    assert scrub_text(text) == text  # off by default
    assert scrub_text(text, None, PiiConfig(names=True)) == "Best regards,\n[NAME]\nCalle Mayor 12, 28013 Madrid"
    out = scrub_text(text, None, PiiConfig(names=True, addresses=True))
    assert "María" not in out and "Mayor" not in out and "[ADDRESS]" in out


def test_pii_config_is_strict():
    from pydantic import ValidationError

    from retrain.schemas.pii import PiiConfig

    with pytest.raises(ValidationError, match="name"):
        PiiConfig.model_validate({"name": True})
    with pytest.raises(ValidationError):
        PiiConfig.model_validate({"names": "yes"})
    assert json.loads(PiiConfig().model_dump_json()) == {"names": False, "addresses": False}
