"""A tiny OpenAI-compatible judge for tests: ``POST /v1/chat/completions`` with deterministic verdicts.

It reads reply A and reply B out of the prompt that ``retrain.evaluate.judge`` sends (between ``[Reply A]`` and
``[End of reply A]``, likewise B) and answers with a verdict chosen by ``mode``:

* ``"marker"`` (default): prefers the reply containing ``marker``; "tie" when both or neither contain it;
* ``"always_a"``: always "A" (a judge with pure position bias, blind to the text);
* ``"garbage"``: an answer without a verdict, to exercise retries and the unparsed count;
* any callable ``(a, b) -> str``: answers whatever it returns.

``wrap`` formats the answer (e.g. ``"Verdict: {}"``); ``api_key`` makes it answer 401 to any other bearer token;
``reject_max_tokens`` answers 400 to ``max_tokens`` the way newer OpenAI models do.
Usage: ``judge = FakeJudge(); base_url, stop = judge.start(); ...; stop()``; ``judge.requests`` counts calls.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fake_openai import send_json

_REPLY = re.compile(r"\[Reply (A|B)\]\n(.*?)\n\[End of reply \1\]", re.DOTALL)


class FakeJudge:
    def __init__(self, *, mode: str | Callable[[str, str], str] = "marker", marker: str = "VOICE",
                 wrap: str = "{}", api_key: str | None = None, reject_max_tokens: bool = False):
        self.mode, self.marker, self.wrap, self.api_key = mode, marker, wrap, api_key
        self.reject_max_tokens = reject_max_tokens  # like newer OpenAI models, which want max_completion_tokens
        self.requests = 0
        self.models: list[str] = []
        self._lock = threading.Lock()

    def verdict(self, a: str, b: str) -> str:
        if callable(self.mode):
            return self.mode(a, b)
        if self.mode == "always_a":
            return "A"
        if self.mode == "garbage":
            return "Both replies have merits and I cannot decide without more context."
        in_a, in_b = self.marker in a, self.marker in b
        return "A" if in_a and not in_b else "B" if in_b and not in_a else "tie"

    def answer(self, body: dict) -> str:
        text = "\n".join(m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user")
        replies = dict(_REPLY.findall(text))
        return self.wrap.format(self.verdict(replies.get("A", ""), replies.get("B", "")))

    def start(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            _send = send_json

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if fake.api_key is not None and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, {"error": {"message": "Incorrect API key provided.",
                                                      "type": "invalid_request_error", "code": "invalid_api_key"}})
                if fake.reject_max_tokens and "max_tokens" in body:
                    return self._send(400, {"error": {
                        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. Use "
                                   "'max_completion_tokens' instead.", "type": "invalid_request_error",
                        "param": "max_tokens", "code": "unsupported_parameter"}})
                with fake._lock:
                    fake.requests += 1
                    fake.models.append(body.get("model"))
                content = fake.answer(body)
                self._send(200, {
                    "id": f"chatcmpl-{fake.requests}", "object": "chat.completion", "created": 0,
                    "model": body.get("model", "judge"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                })

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop():
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return f"http://127.0.0.1:{server.server_address[1]}/v1", stop
