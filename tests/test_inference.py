"""The inference layer: output budget, prompts, the JSON stop rule, batched HF generation (== one-by-one greedy
generation, token for token), PEFT adapters, and the OpenAI engine against a local OpenAI-compatible server
(backoff on 429/5xx, per-example errors, concurrency).

The HF tests run a tiny random Llama with SmolLM2's real tokenizer and chat template (fast); the real SmolLM2
run is marked slow.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fake_openai import send_json

from retrain.schemas.use_case import load_use_case
from retrain.evaluate.inference import (
    MAX_NEW_TOKENS,
    MIN_NEW_TOKENS,
    InferenceError,
    JsonScanner,
    json_object_end,
    make_engine,
    max_new_tokens_for,
    percentile,
    predict,
    prompt_messages,
)
from retrain.data.synthetic import generate_rows

USE_CASES = ("product_intent", "email_intel", "hr_leave")


def conversations(uc_name: str, n: int, seed: int = 3, with_label: bool = True) -> list[list[dict]]:
    """Dataset-shaped conversations (system, user, assistant label) from the synthetic generator."""
    uc = load_use_case(uc_name)
    convs = []
    for row in generate_rows(uc, n * 2, seed=seed, dirty=0):
        label = row["corrected_output"] or row["model_output"]
        conv = [{"role": "system", "content": uc.system_prompt},
                {"role": "user", "content": uc.render_input(row["input"])}]
        if with_label:
            conv.append({"role": "assistant", "content": json.dumps(label, ensure_ascii=False)})
        convs.append(conv)
        if len(convs) == n:
            break
    return convs


@pytest.fixture(scope="session")
def smol_path() -> str:
    from retrain.evaluate.models import resolve_base_model

    return resolve_base_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved like any HF model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smol_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def reference_generate(model, tokenizer, conversation, max_new_tokens: int) -> list[int]:
    """The unbatched baseline: one plain greedy model.generate per example, no padding, no custom stopping;
    the output is cut afterwards at EOS and at the token where the first JSON object closes."""
    import torch

    text = tokenizer.apply_chat_template(prompt_messages(conversation), add_generation_prompt=True, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    gen = out[0, enc["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(gen):
        if t == tokenizer.eos_token_id:
            gen = gen[: i + 1]
            break
    for i in range(len(gen)):
        if json_object_end(tokenizer.decode(gen[: i + 1], skip_special_tokens=True)) is not None:
            return gen[: i + 1]
    return gen


# --- output budget, prompts, the JSON stop rule --------------------------------------------------------


@pytest.mark.parametrize("name", USE_CASES)
def test_max_new_tokens_covers_the_longest_real_answer(name, smol_tokenizer):
    uc = load_use_case(name)
    budget = max_new_tokens_for(uc)
    longest = max(len(smol_tokenizer(c[-1]["content"])["input_ids"]) for c in conversations(name, 400, seed=9))
    # Headroom over the longest label seen, but bounded so a rambling model cannot run for minutes per batch.
    assert longest * 1.3 <= budget <= MAX_NEW_TOKENS, (name, longest, budget)


def test_max_new_tokens_follows_the_schema_and_is_clamped():
    from retrain.schemas.use_case import UseCase

    def uc_with(schema):
        return UseCase.model_validate({
            "name": "probe", "description": "d", "system_prompt": "You classify things carefully.",
            "input_template": "{input}", "output_schema": schema, "fields": {"labels": ["k"]}})

    tiny = uc_with({"type": "object", "properties": {"k": {"type": "string", "enum": ["a", "b"]}}})
    assert max_new_tokens_for(tiny) == MIN_NEW_TOKENS
    many = {f"f{i}": {"type": "array", "items": {"type": "string"}} for i in range(40)}
    huge = uc_with({"type": "object", "properties": {"k": {"type": "string", "enum": ["a"]}, **many}})
    assert max_new_tokens_for(huge) == MAX_NEW_TOKENS
    def with_tags(max_items):
        return uc_with({"type": "object", "properties": {
            "k": {"type": "string", "enum": ["a"]},
            "t": {"type": "array", "items": {"type": "string"}, "maxItems": max_items}}})

    small, large = with_tags(8), with_tags(20)
    assert max_new_tokens_for(small) < max_new_tokens_for(large)


def test_prompt_messages_drop_only_the_answer():
    conv = conversations("product_intent", 1)[0]
    assert [m["role"] for m in prompt_messages(conv)] == ["system", "user"]
    assert prompt_messages({"messages": conv}) == conv[:2]
    few_shot = conv[:2] + [{"role": "assistant", "content": "{}"}, conv[1], conv[2]]
    assert [m["role"] for m in prompt_messages(few_shot)] == ["system", "user", "assistant", "user"]
    with pytest.raises(InferenceError, match="list of"):
        prompt_messages("just text")
    with pytest.raises(InferenceError, match="no system/user"):
        prompt_messages([{"role": "assistant", "content": "{}"}])


@pytest.mark.parametrize("text,end", [
    ('{"a": 1} trailing', 8),
    ('Sure, the "answer": {"a": "}{", "b": {"c": [1, {"d": 2}]}}\n```', 58),
    ('{"q": "say \\"}\\" now"}, more', 22),
    ('{"a": "\\\\"}x', 11),
    ('no json here', None),
    ('{"open": {"never": "closes"}', None),
])
def test_json_object_end(text, end):
    assert json_object_end(text) == end
    if end is not None:
        assert json.loads(text[text.index("{"):end]) is not None


def test_json_scanner_works_on_streamed_chunks():
    text = 'Here: {"a": "x}", "b": {"c": "\\"{"}} and then {"second": 1}'
    scanner = JsonScanner()
    offsets = [scanner.feed(ch) for ch in text]
    assert offsets.count(1) == 1 and text[: offsets.index(1) + 1].endswith('"\\"{"}}')


def test_stop_criterion_stops_each_sequence_where_its_object_closes(smol_tokenizer):
    """Drive the stopping criterion the way generate does: one new column per step, rows finishing apart."""
    import torch

    from retrain.evaluate.inference import _json_stop_class

    tok = smol_tokenizer
    texts = ['{"intent_type": "GIFT", "tags": ["a}", "b"]}\n\nMore text', 'Sure! {"x": {"y": 1}} {"z": 2}',
             "no braces at all in this one"]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    rows = [r + [tok.pad_token_id] * (width - len(r)) for r in rows]
    prompt = [[5, 6, 7]] * len(rows)
    stop = _json_stop_class()(lambda i: tok.decode([i]), 3, len(rows))
    done_at = [None] * len(rows)
    for step in range(1, width + 1):
        ids = torch.tensor([p + r[:step] for p, r in zip(prompt, rows)])
        flags = stop(ids, None).tolist()
        for b, f in enumerate(flags):
            if f and done_at[b] is None:
                done_at[b] = step
    for b in (0, 1):
        emitted = tok.decode(rows[b][: done_at[b]])
        assert json_object_end(emitted) is not None  # closed by now...
        assert json_object_end(tok.decode(rows[b][: done_at[b] - 1])) is None  # ...and not one token earlier
        assert stop.stop_index[b] == done_at[b] - 1
    assert done_at[2] is None and stop.stop_index[2] is None


def test_percentile_matches_numpy():
    import numpy as np

    xs = [0.3, 1.0, 0.1, 7.5, 2.2, 0.9]
    for q in (0, 50, 95, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 50) is None


# --- Hugging Face engine -------------------------------------------------------------------------------


def test_hf_prompt_uses_the_chat_template_without_the_answer(tiny_model_dir):
    engine = make_engine({"kind": "hf", "path": tiny_model_dir})
    conv = conversations("product_intent", 1)[0]
    text = engine.prompt_text(conv)
    assert text.startswith("<|im_start|>system\n" + conv[0]["content"])
    assert conv[1]["content"] in text and conv[2]["content"] not in text
    assert text.endswith("<|im_start|>assistant\n")


def test_hf_batched_equals_one_by_one_greedy(tiny_model_dir):
    """Left-padded, length-sorted batches must give exactly the tokens of a plain per-example generate."""
    engine = make_engine({"kind": "hf", "path": tiny_model_dir}, batch_size=4)
    convs = conversations("product_intent", 6) + conversations("email_intel", 5)  # prompt lengths vary a lot
    lengths = [len(engine.prompt_ids(c)) for c in convs]
    assert max(lengths) - min(lengths) > 20  # so batches really are padded

    batched, batches = engine.generate_ids(convs, max_new_tokens=12)
    reference = [reference_generate(engine.model, engine.tokenizer, c, 12) for c in convs]
    assert batched == reference
    assert [len(b["indices"]) for b in batches] == [4, 4, 3]
    # Batches of one use case share the system prompt's cache; the mixed batch is plain left padding.
    assert [b["shared_prefix"] > 20 for b in batches] == [True, False, True]
    # Sorted by prompt length into batches, results back in input order.
    flat = [i for b in batches for i in b["indices"]]
    assert sorted(flat) == list(range(len(convs))) and [lengths[i] for i in flat] == sorted(lengths)

    results = engine.generate(convs, max_new_tokens=12)
    assert [r["tokens"] for r in results] == [len(r) for r in reference]
    assert [r["text"] for r in results] == [engine.decode(r) for r in reference]
    for r in results:
        assert r["error"] is None and r["latency_s"] == pytest.approx(r["batch_s"] / r["batch_size"])


def test_shared_prefix_len():
    from retrain.evaluate.inference import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 3, 4, 7]]) == 3
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each prompt keeps a token of its own
    assert shared_prefix_len([[9, 2], [1, 2]]) == 0


def test_hf_adapter_is_loaded_on_its_base_and_merged(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # a freshly initialised LoRA is a no-op (B = 0): make it change the model
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model_dir

    convs = conversations("hr_leave", 3)
    engine = make_engine({"kind": "hf", "path": str(adapter_dir), "label": "candidate"}, batch_size=3)
    assert "merged" in engine.source and not isinstance(engine.model, PeftModel)
    got, _ = engine.generate_ids(convs, max_new_tokens=10)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter_dir).merge_and_unload()
    assert got == [reference_generate(merged.eval(), tok, c, 10) for c in convs]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert got != [reference_generate(plain, tok, c, 10) for c in convs]  # the adapter really took effect


def test_hf_bad_spec_says_what_to_fix(tmp_path):
    with pytest.raises(InferenceError, match="needs a 'path'"):
        make_engine({"kind": "hf"})
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InferenceError, match="cannot load the model"):
        make_engine({"kind": "hf", "path": str(tmp_path)})
    with pytest.raises(InferenceError, match="use 'hf'"):
        make_engine({"kind": "vllm", "path": "x"})


def test_predict_hf_reports_throughput_and_latency(tiny_model_dir):
    uc = load_use_case("product_intent")
    convs = conversations("product_intent", 5)
    results, stats = predict({"kind": "hf", "path": tiny_model_dir, "label": "baseline"}, convs, uc, batch_size=2,
                             max_new_tokens=8)
    assert len(results) == 5 and all(r["error"] is None and 0 < r["tokens"] <= 8 for r in results)
    assert stats["n"] == 5 and stats["errors"] == 0 and stats["max_new_tokens"] == 8
    assert stats["examples_per_s"] == pytest.approx(5 / stats["seconds"])
    assert 0 < stats["p50"] <= stats["p95"] <= max(r["latency_s"] for r in results)


def test_predict_guides_local_models_by_the_output_schema_unless_the_use_case_says_no(tiny_model_dir, monkeypatch):
    import retrain.evaluate.inference as inference

    seen = []
    real = inference.make_engine
    monkeypatch.setattr(inference, "make_engine", lambda spec, **kw: seen.append(kw["schema"]) or real(spec, **kw))
    uc = load_use_case("product_intent")
    raw = uc.model_copy(update={"evaluation": uc.evaluation.model_copy(update={"guided_decoding": False})})
    convs = conversations("product_intent", 2)
    guided, _ = predict({"kind": "hf", "path": tiny_model_dir}, convs, uc, max_new_tokens=6)
    unguided, _ = predict({"kind": "hf", "path": tiny_model_dir}, convs, raw, max_new_tokens=6)
    assert seen == [uc.output_schema, None]
    # The random tiny model never opens a JSON object by itself; guided, every answer opens with it from the first
    # token (as a serving stack's JSON-schema output does) and stays on the schema's path.
    assert not any(r["text"].lstrip().startswith("{") for r in unguided)
    assert all(r["text"].startswith('{"') for r in guided), [r["text"] for r in guided]
    from retrain.evaluate.guided import SchemaCursor

    assert all(SchemaCursor(uc.output_schema).feed(r["text"]) for r in guided)


def test_the_prompted_base_model_answers_with_the_object_from_its_first_token(tiny_model_dir):
    """The prompted baseline's path (retrain.evaluate.baseline): base model, baseline prompt, guided decoding: the
    first generated token opens the JSON object, and no answer ends before it (end of sequence is refused there)."""
    from retrain.evaluate import baseline as baselines

    uc = load_use_case("product_intent")
    inputs = [c[1]["content"] for c in conversations("product_intent", 4)]
    convs = baselines.conversations(uc, inputs, baselines.baseline_prompt(uc))
    assert convs[0][0]["content"] == baselines.baseline_prompt(uc)
    spec = baselines.prompted_base_spec(uc) | {"path": tiny_model_dir}
    results, _ = predict(spec, convs, uc, max_new_tokens=12)
    assert all(r["text"].startswith("{") and r["tokens"] == 12 for r in results), [r["text"] for r in results]


@pytest.mark.slow
def test_real_smollm2_batched_equals_one_by_one_and_stops_at_json(smol_path):
    """The real base model: a batch of 6 vs 6 single generates, same tokens; answers stop at EOS or '}'."""
    engine = make_engine({"kind": "hf", "path": "smollm2-135m-instruct"}, batch_size=6)
    convs = conversations("product_intent", 6, seed=5)
    batched, _ = engine.generate_ids(convs, max_new_tokens=48)
    single, _ = engine.generate_ids(convs, max_new_tokens=48, batch_size=1)
    assert batched == single
    assert batched == [reference_generate(engine.model, engine.tokenizer, c, 48) for c in convs]
    for ids in batched:
        text = engine.decode(ids)
        assert len(ids) == 48 or ids[-1] in engine.eos_ids or text.endswith("}")


# --- OpenAI engine against a local OpenAI-compatible server ---------------------------------------------

ANSWER = {"intent_type": "GIFT", "budget_tier": "premium", "category": "watch", "recipient": "father",
          "context_tags": ["birthday"], "priority_features": ["quality"]}


class FakeChatServer:
    """POST /v1/chat/completions. Behaviour by marker in the last user message:
    RATE429 -> 429 on the first request, then 200; FAIL500 -> 500 once, then 200; ALWAYS429 -> always 429;
    BAD400 -> 400; otherwise 200. The model "new-model" rejects max_tokens like OpenAI's newer models."""

    def __init__(self):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    user = body["messages"][-1]["content"]
                    count = server.seen[user] = server.seen.get(user, 0) + 1
                try:
                    time.sleep(0.05)  # long enough for concurrent requests to overlap
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": "not found"}})
                    if body["model"] == "new-model" and "max_tokens" in body:
                        return self._send(400, {"error": {
                            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                       "Use 'max_completion_tokens' instead.", "type": "invalid_request_error"}})
                    if "ALWAYS429" in user or ("RATE429" in user and count == 1):
                        return self._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}})
                    if "FAIL500" in user and count == 1:
                        return self._send(500, {"error": {"message": "The server had an error"}})
                    if "BAD400" in user:
                        return self._send(400, {"error": {"message": "Invalid 'messages'"}})
                    text = json.dumps({**ANSWER, "category": user[:20]})
                    return self._send(200, {
                        "id": f"chatcmpl-{count}", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 30, "completion_tokens": 17, "total_tokens": 47}})
                finally:
                    with server.lock:
                        server.in_flight -= 1

            _send = send_json

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with FakeChatServer() as server:
        yield server


def user_conv(text: str) -> list[dict]:
    return [{"role": "system", "content": "Classify."}, {"role": "user", "content": text},
            {"role": "assistant", "content": "the label, not sent"}]


def test_openai_engine_answers_through_the_real_client(chat_server):
    engine = make_engine({"kind": "openai", "model": "ft:gpt-4o-mini:acme", "base_url": chat_server.base_url,
                          "backoff_base_s": 0.01}, concurrency=4)
    convs = [user_conv(f"query number {i}") for i in range(8)]
    results = engine.generate(convs, max_new_tokens=77)
    assert [json.loads(r["text"])["category"] for r in results] == [f"query number {i}"[:20] for i in range(8)]
    assert all(r["error"] is None and r["tokens"] == 17 and r["latency_s"] > 0 for r in results)
    req = chat_server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test-SECRET-123"
    assert req["body"]["temperature"] == 0 and req["body"]["max_tokens"] == 77
    assert [m["role"] for m in req["body"]["messages"]] == ["system", "user"]  # the label is never sent
    assert 1 < chat_server.max_in_flight <= 4


def test_openai_engine_backs_off_on_429_and_5xx_and_records_failures(chat_server, caplog):
    engine = make_engine({"kind": "openai", "model": "m", "base_url": chat_server.base_url, "max_attempts": 3,
                          "backoff_base_s": 0.01}, concurrency=3)
    convs = [user_conv("RATE429 a"), user_conv("FAIL500 b"), user_conv("plain c"), user_conv("ALWAYS429 d"),
             user_conv("BAD400 e")]
    with caplog.at_level(logging.DEBUG, logger="retrain.evaluate.inference"):
        results = engine.generate(convs, max_new_tokens=50)
    ok, err = [r for r in results[:3]], results[3:]
    assert [r["error"] for r in ok] == [None, None, None]
    assert [r["attempts"] for r in ok] == [2, 2, 1]
    assert json.loads(ok[0]["text"])["intent_type"] == "GIFT"
    assert chat_server.seen["RATE429 a"] == 2 and chat_server.seen["FAIL500 b"] == 2
    # Persistent 429: bounded attempts, then an error on that example only.
    assert chat_server.seen["ALWAYS429 d"] == 3
    assert err[0]["text"] == "" and "RateLimitError 429" in err[0]["error"] and "after 3 attempts" in err[0]["error"]
    # A 400 is our fault: no retry.
    assert chat_server.seen["BAD400 e"] == 1 and "BadRequestError 400" in err[1]["error"]
    assert "sk-test-SECRET-123" not in caplog.text + json.dumps(results)


def test_openai_engine_switches_to_max_completion_tokens(chat_server):
    engine = make_engine({"kind": "openai", "model": "new-model", "base_url": chat_server.base_url})
    results = engine.generate([user_conv("one"), user_conv("two")], max_new_tokens=40)
    assert all(r["error"] is None for r in results)
    assert chat_server.requests[-1]["body"]["max_completion_tokens"] == 40
    assert "max_tokens" not in chat_server.requests[-1]["body"]


def test_predict_openai_counts_errors_and_latency(chat_server, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", chat_server.base_url)  # base_url from the environment
    uc = load_use_case("product_intent")
    convs = [user_conv(f"q{i}") for i in range(5)] + [user_conv("BAD400 x")]
    results, stats = predict({"kind": "openai", "model": "m", "label": "baseline"}, convs, uc)
    assert stats["n"] == 6 and stats["errors"] == 1 and results[5]["error"]
    assert chat_server.requests[0]["body"]["max_tokens"] == max_new_tokens_for(uc)
    assert 0.04 < stats["p50"] <= stats["p95"]  # the server sleeps 50 ms per request


def test_openai_engine_reads_key_and_base_url_from_the_airflow_connection(chat_server, monkeypatch):
    # The same connection the fine-tuning backend uses: password = key, extra base_url = the server. A baseline
    # spec carries no base_url, so without reading the extra it would go to api.openai.com.
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(
        {"conn_type": "generic", "password": "sk-from-conn", "extra": {"base_url": chat_server.base_url}}))
    results = make_engine({"kind": "openai", "model": "gpt-4o-mini"}).generate([user_conv("q")], max_new_tokens=20)
    assert results[0]["error"] is None
    assert chat_server.requests[-1]["auth"] == "Bearer sk-from-conn"


def test_openai_engine_without_key_says_where_to_put_it(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(InferenceError, match="OPENAI_API_KEY"):
        make_engine({"kind": "openai", "model": "gpt-4o-mini"})
    with pytest.raises(InferenceError, match="needs a 'model'"):
        make_engine({"kind": "openai"})
