"""Inference for evaluation: one interface, two engines (a local Hugging Face model, an OpenAI-compatible API).

Both engines take chat conversations (system + user; a trailing assistant message, i.e. the label of a
test row, is dropped) and return one result per conversation, in order:

    {"text": str, "latency_s": float, "tokens": int, "error": str | None, ...engine-specific extras}

A failed example carries ``error`` (and empty text) instead of aborting the evaluation: one rate-limited
request must not throw away an hour of evaluation, and the metrics count it as an invalid answer.

Latency means different things per engine, so only compare like with like:

* ``hf``: examples run in batches (sorted by prompt length, left-padded; the prompt prefix a batch shares,
  i.e. the system prompt, is computed once and its key/value cache shared). An example's ``latency_s`` is its
  batch's wall time divided by the batch size: the amortised cost per example, which is what throughput
  planning needs. The real wall time of the batch is kept in ``batch_s`` (with ``batch_size`` and ``batch``,
  its index), so a per-request latency can still be reported. Outputs do not depend on batching: float32
  greedy decoding with attention masks and mask-derived position ids gives the tokens of a one-by-one
  ``generate`` (tests/test_inference.py and bench/eval_throughput.py check it token for token).
* ``openai``: the wall time of the request that succeeded (backoff sleeps excluded, ``attempts`` counts tries).

Model spec (JSON-able, travels through XCom):
    {"kind": "hf", "path": "<local dir | hub id | smollm2-135m-instruct>", "label": ...}
        a directory holding ``adapter_config.json`` is a PEFT adapter: its base (``base_model_name_or_path``,
        or spec["base_model"]) is loaded and the adapter merged into it.
    {"kind": "openai", "model": "<model id>", "base_url": <str|None>, "label": ...}
        optional: "conn_id" (default openai_default), "max_attempts" (5), "backoff_base_s" (1.0),
        "backoff_max_s" (30), "timeout_s" (60).

Heavy libraries (torch, transformers, peft, openai) are imported inside functions: DAG files import this
module's callers at parse time.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Engine(Protocol):
    def generate(self, conversations: list[list[dict]], *, max_new_tokens: int) -> list[dict]:
        """One result per conversation, in order:
        {"text": str, "latency_s": float, "tokens": int, "error": str | None}."""
        ...


class InferenceError(RuntimeError):
    """A model cannot be loaded or called; the message says what to fix."""


# --- output budget -------------------------------------------------------------------------------------
# max_new_tokens bounds the cost of a model that never closes its JSON (an untrained base model rambling):
# a batch runs until its slowest member stops. So the budget is derived from the largest answer the output
# schema allows, not a fixed number. Characters -> tokens: JSON with short keys and digits tokenises at
# ~2.2-3.9 characters per token with SmolLM2's tokenizer (measured on the three demo use cases), so 2.5 plus
# 25% headroom covers the worst case; the clamp keeps a schema with no limits from costing minutes per batch.
CHARS_PER_TOKEN = 2.5
HEADROOM = 1.25
MIN_NEW_TOKENS = 48
MAX_NEW_TOKENS = 512
# Schemas rarely bound everything; these stand in for a missing maxLength / maxItems.
DEFAULT_STRING_CHARS = 64  # a free-text property (a reason, a category name)
DEFAULT_ITEM_CHARS = 32  # a string inside an array (a tag, a short recommendation)
DEFAULT_ARRAY_ITEMS = 6
DEFAULT_NUMBER_CHARS = 12


def _max_json_chars(schema: dict[str, Any], *, in_array: bool = False) -> int:
    """Upper estimate of the length of json.dumps(value) (default separators) for a value of this schema."""
    import json

    if "enum" in schema:
        return max(len(json.dumps(v, ensure_ascii=False)) for v in schema["enum"]) if schema["enum"] else 4
    if "const" in schema:
        return len(json.dumps(schema["const"], ensure_ascii=False))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return max(_max_json_chars(s, in_array=in_array) for s in schema[key])
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]
        return max(_max_json_chars({**schema, "type": k}, in_array=in_array) for k in kind)
    if kind == "object":
        props = schema.get("properties", {})
        # {"key": value, ...}: quotes, colon+space, comma+space per property.
        return 2 + sum(len(k) + 6 + _max_json_chars(v) for k, v in props.items())
    if kind == "array":
        items = schema.get("items", {}) or {}
        n = schema.get("maxItems")
        if n is None:
            # Unique items drawn from an enum cannot outnumber the enum.
            enum = items.get("enum")
            n = len(enum) if enum and schema.get("uniqueItems") else DEFAULT_ARRAY_ITEMS
        return 2 + n * (_max_json_chars(items, in_array=True) + 2)
    if kind == "string":
        n = schema.get("maxLength", DEFAULT_ITEM_CHARS if in_array else DEFAULT_STRING_CHARS)
        return n + 2
    if kind == "boolean":
        return 5
    if kind == "null":
        return 4
    if kind in ("integer", "number"):
        return DEFAULT_NUMBER_CHARS
    return DEFAULT_STRING_CHARS


# Observed answers tighten the schema's bound: the worst tokenisation seen (2.2 characters per token) with
# 50% headroom over the longest labelled answer of the dataset.
OBSERVED_CHARS_PER_TOKEN = 2.2
OBSERVED_HEADROOM = 1.5


def max_new_tokens_for(uc, answers: Iterable[str] | None = None) -> int:
    """Generation budget for one answer of this use case: the largest JSON the output schema allows, in tokens,
    with headroom, clamped to [MIN_NEW_TOKENS, MAX_NEW_TOKENS].

    With ``answers`` (the labelled answers of the training data), the budget is also capped at 1.5x the longest of
    them. Schemas bound free text loosely (product_intent allows ~400 tokens where real answers stay under 100),
    and a batch runs until its slowest member stops: an untuned base model that never closes its JSON would cost
    4x the time for nothing, since an answer longer than anything the model was taught is wrong anyway.
    """
    chars = _max_json_chars(uc.output_schema)
    tokens = math.ceil(chars / CHARS_PER_TOKEN * HEADROOM)
    longest = max((len(a) for a in answers or ()), default=0)
    if longest:
        tokens = min(tokens, math.ceil(longest / OBSERVED_CHARS_PER_TOKEN * OBSERVED_HEADROOM))
    return max(MIN_NEW_TOKENS, min(MAX_NEW_TOKENS, tokens))


# --- conversations -------------------------------------------------------------------------------------


def prompt_messages(conversation: Any) -> list[dict]:
    """The messages the model sees: the conversation without its trailing assistant answer(s).

    Accepts a message list or a dataset row {"messages": [...]}. Earlier assistant turns (few-shot examples)
    are kept; only the answer being evaluated is removed.
    """
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InferenceError(
            "a conversation must be a list of {'role', 'content'} messages (or a dataset row with 'messages'), "
            f"got {type(conversation).__name__}: check the test.jsonl rows"
        )
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == 0:
        raise InferenceError("a conversation has no system/user message to answer: check the test.jsonl rows")
    return [{"role": m["role"], "content": m["content"]} for m in messages[:end]]


# --- where the JSON object closes ----------------------------------------------------------------------


class JsonScanner:
    """Tracks brace depth of the first top-level JSON object in streamed text, ignoring braces in strings.

    Text before the first '{' is prose (a model may write 'Here is the "answer": {...'), so quotes there do not
    open strings. ``feed`` returns the offset in the fed chunk just after the closing '}', or -1.
    """

    __slots__ = ("depth", "in_string", "escaped", "closed")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.closed = False

    def feed(self, chunk: str) -> int:
        if self.closed:
            return 0
        for i, ch in enumerate(chunk):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == "{":
                self.depth += 1
            elif self.depth == 0:
                continue
            elif ch == '"':
                self.in_string = True
            elif ch == "}":
                self.depth -= 1
                if self.depth == 0:
                    self.closed = True
                    return i + 1
        return -1


def json_object_end(text: str) -> int | None:
    """Offset just after the '}' closing the first top-level JSON object in text, or None if it never closes."""
    end = JsonScanner().feed(text)
    return end if end >= 0 else None


@functools.cache
def _json_stop_class():
    from transformers import StoppingCriteria

    class JsonObjectStop(StoppingCriteria):
        """Per sequence: done once the first JSON object in the generated text has closed.

        Only the new token of each step is scanned (state kept per sequence), so the cost per step is a dict
        lookup per sequence. Token texts are decoded one token at a time: with byte-level BPE a lone token may
        decode to a partial UTF-8 character, but '{', '}', '"' and '\\' are ASCII and always decode intact.
        """

        def __init__(self, token_text, prompt_len: int, batch_size: int):
            self.token_text = token_text
            self.prompt_len = prompt_len
            self.scanners = [JsonScanner() for _ in range(batch_size)]
            self.seen = prompt_len
            self.stop_index: list[int | None] = [None] * batch_size  # index in the generated tokens

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            new_cols = input_ids[:, self.seen:].tolist()  # normally one column: the token just generated
            for b, scanner in enumerate(self.scanners):
                for j, token in enumerate(new_cols[b]):
                    if not scanner.closed and scanner.feed(self.token_text(token)) >= 0:
                        self.stop_index[b] = self.seen + j - self.prompt_len
            self.seen = input_ids.shape[1]
            return torch.tensor([s.closed for s in self.scanners], dtype=torch.bool, device=input_ids.device)

    return JsonObjectStop


# --- Hugging Face engine -------------------------------------------------------------------------------
# Below this many shared leading tokens, a separate prefix pass costs more than it saves.
MIN_SHARED_PREFIX = 16


def shared_prefix_len(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all prompts share, leaving at least one own token per prompt (generation
    must start from a token the batch computes, not from the shared cache)."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)



def _resolve_path(name: str) -> str:
    from retrain.evaluate.models import DEFAULT_BASE_MODEL, resolve_base_model

    path = os.path.expanduser(name)
    # An adapter trained in another RETRAIN_HOME (a test session, another machine) records an absolute base
    # path that may be gone; the default base model can be rebuilt here, so fall back to it by name.
    if os.path.isabs(path) and not os.path.exists(path) and os.path.basename(path.rstrip("/")) == DEFAULT_BASE_MODEL:
        return resolve_base_model(DEFAULT_BASE_MODEL)
    return resolve_base_model(name)


class HFEngine:
    """Batched greedy generation with a local causal LM (float32 on CPU, so batched == one-by-one outputs)."""

    def __init__(self, spec: dict, *, batch_size: int = 32, prefix_cache: bool = True,
                 schema: dict[str, Any] | None = None):
        import json

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        # With a schema, decoding is guided by it (retrain.evaluate.guided): as a serving stack with JSON-schema output.
        self.schema = schema
        self.label = spec.get("label")
        raw = spec.get("path")
        if not raw:
            raise InferenceError(
                f"an 'hf' model spec needs a 'path' (local dir, hub id or smollm2-135m-instruct): {spec}")
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # fp32 on CPU: bf16 matmuls on CPU are slow and round differently per batch shape.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        started = time.perf_counter()
        adapter_cfg = os.path.join(os.path.expanduser(raw), "adapter_config.json")
        try:
            if os.path.isfile(adapter_cfg):
                from peft import PeftModel

                with open(adapter_cfg, encoding="utf-8") as fh:
                    base_name = spec.get("base_model") or json.load(fh).get("base_model_name_or_path")
                if not base_name:
                    raise InferenceError(
                        f"{adapter_cfg} names no base model: add 'base_model' to the model spec")
                base_path = _resolve_path(base_name)
                adapter_dir = os.path.expanduser(raw)
                has_tok = os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
                self.tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tok else base_path)
                base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
                # Merged, the adapter costs nothing per forward pass (no extra LoRA matmuls in every projection).
                self.model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
                self.source = f"adapter {adapter_dir} merged into {base_path}"
            else:
                path = _resolve_path(raw)
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                self.source = path
        except InferenceError:
            raise
        except (OSError, ValueError) as exc:
            raise InferenceError(
                f"cannot load the model '{raw}': {exc}. Point the spec's path at a saved model directory "
                f"(config.json + weights), a PEFT adapter directory, or an available hub id."
            ) from exc
        self.model.to(self.device).eval()
        tok = self.tokenizer
        if tok.pad_token_id is None:
            # Padding positions are masked out, so any token works; EOS is the conventional choice.
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        self.pad_id = tok.pad_token_id
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tok.eos_token_id is not None:
            eos_ids.add(tok.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self._token_text = functools.lru_cache(maxsize=None)(lambda i: tok.decode([i]))
        log.info("loaded %s (%s) on %s in %.1f s", self.label or "model", self.source, self.device,
                 time.perf_counter() - started)

    # prompts ---------------------------------------------------------------------------------------
    def prompt_text(self, conversation: Any) -> str:
        messages = prompt_messages(conversation)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # A base model without a chat template: plain text, so evaluation still runs (and scores what it can).
        return "\n\n".join(m["content"] for m in messages) + "\n"

    def prompt_ids(self, conversation: Any) -> list[int]:
        # The chat template already writes the special tokens it wants (BOS included, if any).
        return self.tokenizer(self.prompt_text(conversation), add_special_tokens=False)["input_ids"]

    # generation ------------------------------------------------------------------------------------
    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        # Greedy, explicitly: a fine-tuned model's saved generation_config may ask for sampling.
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                temperature=None, top_p=None, top_k=None,
                                pad_token_id=self.pad_id, eos_token_id=self.eos_ids, use_cache=True)

    def _run_batch(self, batch: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], int, int]:
        """(generated token ids per prompt, cut at EOS or where the JSON object closed; shared prefix length;
        tokens the output schema overruled)."""
        import torch
        from transformers import StoppingCriteriaList

        prefix = shared_prefix_len(batch) if len(batch) > 1 and self.prefix_cache else 0
        if prefix < MIN_SHARED_PREFIX:
            prefix = 0
        head = batch[0][:prefix]
        tails = [ids[prefix:] for ids in batch]
        width = max(len(t) for t in tails)
        total = prefix + width
        # [shared prefix][left padding][rest of the prompt]: with no shared prefix this is plain left padding.
        input_ids = torch.full((len(batch), total), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), total), dtype=torch.long)
        input_ids[:, :prefix] = torch.tensor(head, dtype=torch.long)
        attention[:, :prefix] = 1
        for row, tail in enumerate(tails):
            input_ids[row, total - len(tail):] = torch.tensor(tail, dtype=torch.long)
            attention[row, total - len(tail):] = 1
        stop = _json_stop_class()(self._token_text, total, len(batch))
        kwargs = {}
        guard = None
        if self.schema is not None:
            from transformers import LogitsProcessorList

            from retrain.evaluate.guided import schema_guard_class

            # From the first token, as Ollama's format / vLLM's guided decoding serve JSON: an untuned base model that
            # would open with prose ("Sure! Here is...") answers with the object like the candidate does.
            guard = schema_guard_class()(self.schema, self._token_text, total, len(batch), self.eos_ids,
                                         from_first_token=True)
            kwargs["logits_processor"] = LogitsProcessorList([guard])
        with torch.inference_mode():
            if prefix:
                # Every test prompt starts with the same system prompt (~60% of its tokens): run it once and let
                # the batch share its key/value cache instead of recomputing it per row.
                from transformers import DynamicCache

                cache = DynamicCache(config=self.model.config)
                extra = {"logits_to_keep": 1} if self.model._supports_logits_to_keep() else {}
                self.model(input_ids=input_ids[:1, :prefix].to(self.device), past_key_values=cache,
                           use_cache=True, **extra)
                cache.batch_repeat_interleave(len(batch))
                kwargs["past_key_values"] = cache
            # generate derives position ids from the attention mask (cumsum - 1): padding takes no position, so
            # every row sees the positions it would see alone.
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=self._generation_config(max_new_tokens),
                stopping_criteria=StoppingCriteriaList([stop]),
                **kwargs,
            )
        results = []
        eos = set(self.eos_ids)
        for row, gen in enumerate(out[:, total:].tolist()):
            end = len(gen)
            for i, t in enumerate(gen):
                if t in eos:
                    end = i + 1  # the EOS token was generated: count it, decoding skips it
                    break
            if stop.stop_index[row] is not None:
                end = min(end, stop.stop_index[row] + 1)
            results.append(gen[:end])
        if guard is not None and guard.lost:
            log.warning("%d of %d answers left unguided: no token of the vocabulary could continue them under the "
                        "output schema", guard.lost, len(batch))
        return results, prefix, guard.masked if guard is not None else 0

    def generate_ids(self, conversations: Sequence[Any], *, max_new_tokens: int,
                     batch_size: int | None = None) -> tuple[list[list[int]], list[dict]]:
        """(generated ids per conversation in input order, one {"indices", "seconds", "prompt_tokens",
        "shared_prefix", "new_tokens"} per batch)."""
        size = batch_size or self.batch_size
        prompts = [self.prompt_ids(c) for c in conversations]
        # Batching prompts of similar length wastes less compute on padding; stable sort keeps ties in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        batches = []
        n_batches = math.ceil(len(order) / size) if order else 0
        for k in range(n_batches):
            idx = order[k * size:(k + 1) * size]
            started = time.perf_counter()
            gens, shared, guided = self._run_batch([prompts[i] for i in idx], max_new_tokens)
            seconds = time.perf_counter() - started
            for i, g in zip(idx, gens):
                outputs[i] = g
            info = {"indices": idx, "seconds": seconds, "prompt_tokens": max(len(prompts[i]) for i in idx),
                    "shared_prefix": shared, "new_tokens": max(len(g) for g in gens),
                    "guided_tokens": guided}
            batches.append(info)
            log.info("%s batch %d/%d: %d examples, %d prompt tokens (%d shared), %d new tokens, %.2f s%s",
                     self.label or "model", k + 1, n_batches, len(idx), info["prompt_tokens"], shared,
                     info["new_tokens"], seconds,
                     f", {guided} tokens overruled by the output schema" if self.schema else "")
        return outputs, batches

    def decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        # The token that closed the object may carry more characters ('}\n', '}}'): not part of the answer.
        end = json_object_end(text)
        return text[:end] if end is not None else text

    def generate(self, conversations: list[list[dict]], *, max_new_tokens: int) -> list[dict]:
        outputs, batches = self.generate_ids(conversations, max_new_tokens=max_new_tokens)
        results: list[dict] = [{} for _ in outputs]
        for b, info in enumerate(batches):
            n = len(info["indices"])
            for i in info["indices"]:
                results[i] = {"text": self.decode(outputs[i]), "latency_s": info["seconds"] / n,
                              "tokens": len(outputs[i]), "error": None, "batch": b, "batch_size": n,
                              "batch_s": info["seconds"]}
        return results


# --- OpenAI-compatible engine --------------------------------------------------------------------------


def _openai_settings(spec: dict) -> tuple[str | None, str | None]:
    """(api_key, base_url): the spec's base_url, then the Airflow connection (password / extra ``api_key``,
    extra ``base_url``), then OPENAI_API_KEY / OPENAI_BASE_URL. The fine-tuning backend's own lookup, so a model is
    evaluated with the key and server that trained it. The key is a secret: never log it."""
    from retrain.settings import openai_credentials

    return openai_credentials(spec.get("conn_id") or "openai_default", base_url=spec.get("base_url") or None)


class OpenAIEngine:
    """Chat completions against OpenAI or any compatible server, `concurrency` requests in flight."""

    def __init__(self, spec: dict, *, concurrency: int = 4, client=None):
        from openai import OpenAI

        self.model = spec.get("model")
        if not self.model:
            raise InferenceError(f"an 'openai' model spec needs a 'model' id: {spec}")
        self.label = spec.get("label")
        self.concurrency = max(1, int(concurrency))
        self.max_attempts = max(1, int(spec.get("max_attempts", 5)))
        self.backoff_base_s = float(spec.get("backoff_base_s", 1.0))
        self.backoff_max_s = float(spec.get("backoff_max_s", 30.0))
        if client is None:
            key, base_url = _openai_settings(spec)
            if key is None:
                if base_url is None:
                    raise InferenceError(
                        "no OpenAI API key: set OPENAI_API_KEY or the password of the Airflow connection "
                        f"'{spec.get('conn_id') or 'openai_default'}' (or give a base_url for a local server)")
                key = "unused"  # local OpenAI-compatible servers (vLLM, Ollama) accept any key
            # Retries are ours (jittered, per example, counted); the client's own would hide them.
            client = OpenAI(api_key=key, base_url=base_url, max_retries=0,
                            timeout=float(spec.get("timeout_s", 60.0)))
        self.client = client
        self._token_param = "max_tokens"
        self._lock = threading.Lock()

    def _delay(self, attempt: int, exc: Exception) -> float:
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            try:
                retry_after = float(response.headers.get("retry-after"))
            except (TypeError, ValueError):
                retry_after = None
        if retry_after is not None:
            return min(self.backoff_max_s, max(0.0, retry_after))
        # Exponential backoff with "equal jitter": concurrent workers that hit the limit together spread out.
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return cap / 2 + random.random() * cap / 2

    def _one(self, conversation: Any, max_new_tokens: int) -> dict:
        import openai

        messages = prompt_messages(conversation)
        error, last_exc = None, None
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            param = self._token_param
            started = time.perf_counter()
            try:
                resp = self.client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0, **{param: max_new_tokens})
            except (openai.RateLimitError, openai.APIConnectionError, openai.InternalServerError) as exc:
                error, last_exc = _describe(exc), exc
            except openai.APIStatusError as exc:
                if exc.status_code >= 500:
                    error, last_exc = _describe(exc), exc
                elif exc.status_code == 400 and param == "max_tokens" and "max_completion_tokens" in str(exc):
                    # Newer models reject max_tokens: switch for every worker and retry now, without counting
                    # an attempt (the request was fine otherwise).
                    with self._lock:
                        self._token_param = "max_completion_tokens"
                    attempt -= 1
                    continue
                else:  # any other 4xx: the request itself is wrong, so retrying cannot help
                    return _failed(_describe(exc), attempt)
            except Exception as exc:  # a malformed response, a broken proxy: record it, keep evaluating
                return _failed(_describe(exc), attempt)
            else:
                latency = time.perf_counter() - started
                choice = resp.choices[0] if resp.choices else None
                text = (choice.message.content if choice and choice.message else None) or ""
                usage = getattr(resp, "usage", None)
                tokens = getattr(usage, "completion_tokens", None) if usage else None
                return {"text": text, "latency_s": latency, "tokens": int(tokens or 0), "error": None,
                        "attempts": attempt}
            if attempt < self.max_attempts:
                delay = self._delay(attempt, last_exc)
                log.warning("%s: %s (attempt %d/%d), retrying in %.1f s", self.model, error, attempt,
                            self.max_attempts, delay)
                time.sleep(delay)
        return _failed(f"{error} (gave up after {self.max_attempts} attempts)", self.max_attempts)

    def generate(self, conversations: list[list[dict]], *, max_new_tokens: int) -> list[dict]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="openai-eval") as pool:
            results = list(pool.map(lambda c: self._one(c, max_new_tokens), conversations))
        failed = sum(r["error"] is not None for r in results)
        if failed:
            log.warning("%s: %d of %d requests failed (recorded per example)", self.model, failed, len(results))
        return results


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    msg = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}{f' {status}' if status else ''}: {msg}".rstrip(": ")


def _failed(error: str, attempts: int) -> dict:
    return {"text": "", "latency_s": 0.0, "tokens": 0, "error": error, "attempts": attempts}


# --- entry points --------------------------------------------------------------------------------------


def make_engine(spec: dict, *, batch_size: int = 32, concurrency: int = 4,
                schema: dict[str, Any] | None = None) -> Engine:
    """schema: guide a local model's decoding by this JSON schema (retrain.evaluate.guided). An OpenAI-compatible endpoint
    decodes on its side; fine-tuned chat models there answer in the trained format."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "hf":
        return HFEngine(spec, batch_size=batch_size, schema=schema)
    if kind == "openai":
        return OpenAIEngine(spec, concurrency=concurrency)
    raise InferenceError(f"unknown model spec kind {kind!r} in {spec!r}: use 'hf' (local model) or 'openai'")


def percentile(values: Iterable[float], q: float) -> float | None:
    """q in [0, 100], linear interpolation between closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# Decoding on a CPU is bound by reading the weights once per step, so wider batches are cheaper per token:
# SmolLM2-135M, fp32, 2 cores: 7.2 ms/token at 16 rows, 4.6 at 32, 3.8 at 64 (prefill grows with the width).
DEFAULT_BATCH_SIZE = 32


def predict(spec: dict, conversations: Sequence[Any], uc, *, batch_size: int = DEFAULT_BATCH_SIZE, concurrency: int = 4,
            max_new_tokens: int | None = None) -> tuple[list[dict], dict]:
    """Answer every conversation with the model in spec.

    Returns (results in input order, {"seconds", "examples_per_s", "p50", "p95", "max_new_tokens", "errors",
    "n"}); p50/p95 are per-example latencies (see the module docstring for what latency means per engine)
    over the examples that did not fail. max_new_tokens defaults to max_new_tokens_for(uc). A local model decodes
    under the use case's output schema unless ``evaluation.guided_decoding`` is false.
    """
    import gc

    max_new = max_new_tokens or max_new_tokens_for(uc)
    schema = uc.output_schema if uc.evaluation.guided_decoding else None
    engine = make_engine(spec, batch_size=batch_size, concurrency=concurrency, schema=schema)
    try:
        started = time.perf_counter()
        results = engine.generate(list(conversations), max_new_tokens=max_new)
        seconds = time.perf_counter() - started
    finally:
        # The next predict() (baseline then candidate) loads another model: do not hold two in memory.
        del engine
        gc.collect()
    ok = [r["latency_s"] for r in results if r["error"] is None]
    stats = {"n": len(results), "seconds": seconds,
             "examples_per_s": len(results) / seconds if seconds > 0 else 0.0,
             "p50": percentile(ok, 50), "p95": percentile(ok, 95),
             "max_new_tokens": max_new, "errors": len(results) - len(ok)}
    log.info("%s: %d examples in %.1f s (%.2f/s), p50 %s s, p95 %s s, %d errors", spec.get("label") or spec.get("kind"),
             stats["n"], seconds, stats["examples_per_s"], _fmt(stats["p50"]), _fmt(stats["p95"]), stats["errors"])
    return results, stats


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
