"""Hard-example scoring: which of this month's production rows a human should label next.

Both models (the production model, or the base model on a first run, and the candidate) answer every scored row
with the inference layer (``retrain.evaluate.inference``: same prompts, same guided decoding, same budget as the
evaluation). A row is hard for one or more reasons:

* ``schema_failure``: either model's answer is not one JSON object valid under the output schema;
* ``disagreement``: both answers name a primary label, and not the same one;
* ``low_margin``: the candidate hesitated at its primary label: in a teacher-forced forward pass over the prompt
  plus the candidate's own answer, at the token where the primary label's value starts, the log-probability of
  the top token minus that of the second is below ``review.margin_below`` (nats). A margin of 0.1 means the model
  all but tossed a coin between two labels; 5 means it was sure.

The score ranks rows: 2 per failure or disagreement, plus exp(-margin) in (0, 1] so that among equals the least
sure comes first. Rows without a reason are never queued however many slots are left.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("schema_failure", "disagreement", "low_margin")
_WEIGHT = {"schema_failure": 2.0, "disagreement": 2.0}
MARGIN_BATCH = 8  # teacher-forced forward passes per batch (logits of the last position only)


# --- the rows to score ----------------------------------------------------------------------------------------


def order_key(source_id: int, salt: str = "") -> str:
    """A row's place in the fixed sample order (the same on every retry of a run)."""
    return hashlib.sha256(f"{salt}{source_id}".encode()).hexdigest()


def sample_rows(rows: list[dict], limit: int) -> list[dict]:
    """At most ``limit`` rows, the same ones on every retry (by a hash of the row id), in id order."""
    if len(rows) <= limit:
        return sorted(rows, key=lambda r: r["source_id"])
    kept = sorted(rows, key=lambda r: order_key(r["source_id"]))[:limit]
    return sorted(kept, key=lambda r: r["source_id"])


# --- judging one answer ---------------------------------------------------------------------------------------


def judge_answer(uc, validator, text: str | None) -> dict:
    """{"parsed", "schema_valid", "schema_error", "label" (primary label value or None)} of one answer."""
    from retrain.evaluate.metrics import MISSING, lookup, parse_output

    obj, strict = parse_output(text)
    error = None
    if obj is None:
        error = "no JSON object in the answer"
    elif not strict:
        error = "text around the JSON object"
    else:
        found = next(iter(validator.iter_errors(obj)), None)
        if found is not None:
            where = "/".join(str(p) for p in found.absolute_path) or "(root)"
            error = f"{where}: {found.message[:200]}"
    label = lookup(obj, uc.primary_label) if obj is not None else MISSING
    return {"parsed": obj, "schema_valid": error is None, "schema_error": error,
            "has_label": label is not MISSING, "label": None if label is MISSING else label}


def hardness(cand: dict, prod: dict, *, margin_below: float) -> tuple[float, list[str]]:
    """(score, reasons) of one row from the two models' judged answers (see the module docstring)."""
    reasons = []
    if not cand["schema_valid"] or not prod["schema_valid"]:
        reasons.append("schema_failure")
    if cand["has_label"] and prod["has_label"] and _canonical(cand["label"]) != _canonical(prod["label"]):
        reasons.append("disagreement")
    margin = cand.get("margin")
    if margin is not None and margin < margin_below:
        reasons.append("low_margin")
    score = sum(_WEIGHT.get(r, 0.0) for r in reasons)
    if margin is not None:
        score += math.exp(-max(0.0, margin))
    return round(score, 6), reasons


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def rank(scored: list[dict], max_examples: int) -> list[dict]:
    """The hardest rows first (score, then lower candidate margin, then id), at most ``max_examples``, rank 1..n."""
    hard = [r for r in scored if r["reasons"]]
    hard.sort(key=lambda r: (-r["score"], r["candidate"].get("margin") if r["candidate"].get("margin") is not None
                             else math.inf, r["source_id"]))
    out = []
    for i, row in enumerate(hard[:max_examples], 1):
        out.append({**row, "rank": i})
    return out


# --- where the primary label's value starts, and the margin there ----------------------------------------------


def value_offset(text: str, dotted: str) -> int | None:
    """Character offset in an answer where the value of the (dotted) key starts: the first character inside the
    quotes of a string value, the first character of any other value. None when the key is not there."""
    pos = 0
    for part in dotted.split("."):
        match = re.compile(r'"' + re.escape(part) + r'"\s*:\s*').search(text, pos)
        if match is None:
            return None
        pos = match.end()
    if pos >= len(text):
        return None
    return pos + 1 if text[pos] == '"' else pos


def token_at(tokenizer, ids: list[int], offset: int) -> int | None:
    """Index of the generated token whose text covers character ``offset`` of the decoded answer."""
    for k in range(len(ids)):
        if len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) > offset:
            return k
    return None


def top2_margins(model, sequences: list[list[int]], pad_id: int, *, batch_size: int = MARGIN_BATCH
                 ) -> list[tuple[float, int, int]]:
    """For each token sequence: (log-prob margin top1 - top2, top1 id, top2 id) of the next token after it.

    Left-padded batches with position ids from the attention mask (padding takes no position, as in generate), and
    the logits of the last position only: a full vocabulary row per token would cost ~200 KB each."""
    import torch

    out: list[tuple[float, int, int]] = []
    keep = {"logits_to_keep": 1} if getattr(model, "_supports_logits_to_keep", lambda: False)() else {}
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, seq in enumerate(chunk):
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           position_ids=positions.to(device), use_cache=False, **keep).logits[:, -1, :].float()
        top = torch.log_softmax(logits, dim=-1).topk(2, dim=-1)
        for row in range(len(chunk)):
            values, indices = top.values[row].tolist(), top.indices[row].tolist()
            out.append((values[0] - values[1], indices[0], indices[1]))
    return out


def primary_margins(engine, conversations: list, gens: list[list[int]], texts: list[str], primary: str
                    ) -> list[tuple[float, list[str]] | None]:
    """Per answer (token ids ``gens``, decoded ``texts``) of a loaded HFEngine: (margin, [top1, top2 token text]) at
    the token where the primary label's value starts, or None when the answer has no such value."""
    todo, sequences = [], []
    for i, (conv, gen, text) in enumerate(zip(conversations, gens, texts)):
        offset = value_offset(text, primary)
        k = token_at(engine.tokenizer, gen, offset) if offset is not None else None
        if k is None:
            continue
        # The logits after prompt + the answer's first k tokens predict the token where the value starts.
        todo.append(i)
        sequences.append(engine.prompt_ids(conv) + gen[:k])
    out: list[tuple[float, list[str]] | None] = [None] * len(gens)
    for i, (margin, first, second) in zip(todo, top2_margins(engine.model, sequences, engine.pad_id)):
        out[i] = (round(margin, 6), [engine.tokenizer.decode([first]), engine.tokenizer.decode([second])])
    return out


def answer_with(spec: dict, conversations: list, uc, *, max_new_tokens: int, batch_size: int = 32) -> list[dict]:
    """One model's answers: {"text", "error", "margin", "top_tokens"} per conversation. Margins need the model's
    logits: a local (hf) model has them, an OpenAI-compatible endpoint does not (margin None)."""
    from retrain.evaluate import inference

    schema = uc.output_schema if uc.evaluation.guided_decoding else None
    engine = inference.make_engine(spec, batch_size=batch_size, schema=schema)
    try:
        if not isinstance(engine, inference.HFEngine):
            return [{"text": r.get("text") or "", "error": r.get("error"), "margin": None, "top_tokens": None}
                    for r in engine.generate(list(conversations), max_new_tokens=max_new_tokens)]
        gens, _ = engine.generate_ids(conversations, max_new_tokens=max_new_tokens)
        texts = [engine.decode(g) for g in gens]
        results = [{"text": t, "error": None, "margin": None, "top_tokens": None} for t in texts]
        for result, found in zip(results, primary_margins(engine, conversations, gens, texts, uc.primary_label)):
            if found is not None:
                result["margin"], result["top_tokens"] = found
        return results
    finally:
        del engine
        gc.collect()


def system_prompt(uc, spec: dict) -> str:
    """The prompt this model was evaluated with (the prompted base model has its own: retrain.evaluate.baseline)."""
    from retrain.evaluate import baseline

    return baseline.system_prompt_for(uc, spec)


def score_rows(uc, rows: list[dict], production: dict, candidate: dict, *, max_new_tokens: int,
               margin_below: float) -> list[dict]:
    """Both models answer every row; each row gets both judged answers, its score and reasons."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(uc.output_schema)
    inputs = [r["input"] for r in rows]
    answers = {}
    for name, spec in (("production", production), ("candidate", candidate)):
        prompt = system_prompt(uc, spec)
        conversations = [[{"role": "system", "content": prompt}, {"role": "user", "content": uc.render_input(t)}]
                         for t in inputs]
        log.info("review: %s model %s answers %d rows", name, spec.get("path") or spec.get("model"), len(rows))
        answers[name] = answer_with(spec, conversations, uc, max_new_tokens=max_new_tokens)
    scored = []
    for i, row in enumerate(rows):
        judged = {}
        for name in ("production", "candidate"):
            a = answers[name][i]
            j = judge_answer(uc, validator, a["text"])
            judged[name] = {"text": a["text"], "error": a["error"], "margin": a["margin"],
                            "top_tokens": a["top_tokens"], "schema_valid": j["schema_valid"],
                            "schema_error": j["schema_error"], "has_label": j["has_label"], "label": j["label"],
                            "parsed": j["parsed"]}
        score, reasons = hardness(judged["candidate"], judged["production"], margin_below=margin_below)
        scored.append({**row, "candidate": judged["candidate"], "production": judged["production"],
                       "score": score, "reasons": reasons})
    return scored
