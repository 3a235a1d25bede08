"""Recall and false-positive rate of the PII detectors (retrain.data.scrub) on the labelled corpus.

    .venv/bin/python bench/pii_scrub.py [--corpus tests/pii_corpus/corpus.jsonl] [--misses]

A positive counts as found when every personal value in it is gone from the scrubbed text and the placeholder of
its category is there. A negative (business text) is a false positive when scrubbing changes it at all; the
per-category rate says which detector fired. Targets for the always-on categories: recall >= 0.99 each, false
positives <= 1% of negatives. Names and addresses (off by default, ``pii: {names: true, addresses: true}``) are
measured with both turned on: a positive counts only if every word and number of the name/address is gone.
Also prints the scrubbing speed on the corpus texts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "include"))
CORPUS = REPO / "tests" / "pii_corpus" / "corpus.jsonl"
CLAIMED = ("EMAIL", "PHONE", "CARD", "IBAN", "SSN", "NATIONAL_ID")
OPTIONAL = ("NAME", "ADDRESS")
TARGET_RECALL, TARGET_FP = 0.99, 0.01
_STOP = {"calle", "avenida", "avda", "plaza", "paseo", "street", "road", "lane", "avenue", "ave", "rue", "boulevard",
         "de", "la", "del", "des", "mr", "the"}


def load(path: Path = CORPUS) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tokens(value: str) -> list[str]:
    return [t for t in re.findall(r"[^\W\d_]{2,}|\d+", value) if t.lower() not in _STOP]


def measure(rows: list[dict]) -> dict:
    """{"recall": {cat: (found, total)}, "fp": {cat: n}, "negatives": n, "fp_total": n, "misses": [...], ...}"""
    from retrain.data.scrub import scrub_text
    from retrain.schemas.pii import PiiConfig

    both = PiiConfig(names=True, addresses=True)
    found: Counter[str] = Counter()
    total: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fp_optional: Counter[str] = Counter()
    negatives = fp_total = fp_optional_total = 0
    misses: list[dict] = []
    for row in rows:
        cat, text = row["category"], row["text"]
        if cat == "NEGATIVE":
            negatives += 1
            counts: Counter[str] = Counter()
            if scrub_text(text, counts) != text:
                fp_total += 1
                fp.update(counts.keys())
                misses.append({**row, "scrubbed": scrub_text(text)})
            counts = Counter()
            if scrub_text(text, counts, both) != text:
                fp_optional_total += 1
                fp_optional.update(k for k in counts if k in OPTIONAL)
            continue
        total[cat] += 1
        if cat in OPTIONAL:
            out = scrub_text(text, None, both)
            ok = all(t not in out for v in row["values"] for t in _tokens(v))
        else:
            out = scrub_text(text)
            ok = all(v not in out for v in row["values"]) and f"[{cat}]" in out
        if row["kind"] == "heldout":
            total[f"{cat} (held out)"] += 1
            found[f"{cat} (held out)"] += ok
        if ok:
            found[cat] += 1
        else:
            misses.append({**row, "scrubbed": out})
    return {"recall": {c: (found[c], total[c]) for c in total}, "fp": dict(fp), "negatives": negatives,
            "fp_total": fp_total, "fp_optional": dict(fp_optional), "fp_optional_total": fp_optional_total,
            "misses": misses}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--misses", action="store_true", help="print every miss and false positive")
    args = ap.parse_args()
    rows = load(args.corpus)
    res = measure(rows)
    n_neg = res["negatives"]
    print(f"corpus {args.corpus.relative_to(REPO) if args.corpus.is_relative_to(REPO) else args.corpus}: "
          f"{sum(t for _, t in res['recall'].values())} positives, {n_neg} negatives")
    print(f"{'category':<20} {'recall':>8} {'found/total':>12} {'FP rate':>8} {'FP':>4}")
    ok = True
    for cat in CLAIMED + OPTIONAL + tuple(f"{c} (held out)" for c in OPTIONAL):
        if cat not in res["recall"]:
            continue
        f, t = res["recall"][cat]
        fps = res["fp"].get(cat, 0) if cat in CLAIMED else res["fp_optional"].get(cat.split()[0], 0)
        note = "" if cat in CLAIMED else "  (optional, names+addresses on; no target)" if cat in OPTIONAL else \
            "  (subset written after tuning, never tuned on)"
        print(f"{cat:<20} {f / t:8.3f} {f:>5}/{t:<6} {fps / n_neg:8.3%} {fps:>4}{note}")
        if cat in CLAIMED and f / t < TARGET_RECALL:
            ok = False
    rate = res["fp_total"] / n_neg
    print(f"negatives changed (always-on detectors): {res['fp_total']}/{n_neg} = {rate:.2%} (target <= 1%)")
    print(f"negatives changed with names+addresses on: {res['fp_optional_total']}/{n_neg} = "
          f"{res['fp_optional_total'] / n_neg:.2%}")
    ok = ok and rate <= TARGET_FP

    from retrain.data.scrub import scrub_text

    texts = [r["text"] for r in rows] * 20
    t = time.perf_counter()
    for text in texts:
        scrub_text(text)
    dt = time.perf_counter() - t
    print(f"speed: {len(texts) / dt:,.0f} texts/s ({dt / len(texts) * 1e6:.1f} us per text, corpus texts)")
    print("targets met" if ok else "TARGETS MISSED")
    if args.misses:
        for m in res["misses"]:
            print(f"  {m['id']:<18} {m['kind']:<14} {m['text']!r} -> {m['scrubbed']!r}")


if __name__ == "__main__":
    main()
